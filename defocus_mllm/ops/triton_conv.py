"""Causal depthwise conv1d + SiLU on channels-last `[B, L, D]` memory as Triton kernels (forward and backward).

The Mamba mixer's conv input is the first half of `in_proj`'s output, `[B, L, 2D]` memory: `conv1d` would need a
transposed, padded copy of it and `causal_conv1d_silu`'s shifted-tap fallback makes `K` passes over memory. Here
one program owns a `[BLOCK_L, BLOCK_D]` tile, reads the `K - 1` earlier rows it needs with masked loads (the causal
padding), and writes `silu(bias + sum_k w_k x_{l - K + 1 + k})` once. The backward recomputes the pre-activation
of the rows that a tile's inputs feed (`K^2` multiply-adds per element; `K = 4`, read from cache) and writes
`dx` once; the weight and bias gradients are per-tile partials summed on the host (deterministic).

Registered as the causal conv's `"triton"` backend: `causal_conv1d_silu` takes it for CUDA tensors when
causal-conv1d's CUDA kernel is not installed; inputs it is not for (not channels-last, float64) go to the PyTorch
conv.
"""

# no `from __future__ import annotations`: see triton_scan.py
import contextlib
from typing import Optional

import torch

from . import causal_conv
from .triton_scan import _interpreted, triton, triton_scan_available

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _pre_activation(x_ptr, w_ptr, bias, rows, d, sxl, sxd, base, mask_d, L, K: tl.constexpr,
                        BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
        """`bias + sum_k w_k x_{row - K + 1 + k}` for a `[BLOCK_L, BLOCK_D]` tile of rows (zero padding before 0)."""
        acc = tl.zeros([BLOCK_L, BLOCK_D], dtype=tl.float32) + bias[None, :]
        for k in tl.static_range(K):
            src = rows - (K - 1) + k
            m = ((src >= 0) & (src < L))[:, None] & mask_d[None, :]
            xv = tl.load(x_ptr + base + src[:, None] * sxl + d[None, :] * sxd, mask=m, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + d * K + k, mask=mask_d, other=0.0).to(tl.float32)
            acc += xv * w[None, :]
        return acc

    @triton.jit
    def _conv_tile(b_ptr, D, HAS_BIAS: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
        """This program's tile of a `(L / BLOCK_L, D / BLOCK_D, B)` grid: its row block, batch index, rows, channels
        and their mask, and the channels' fp32 bias (0 without one)."""
        pid_l = tl.program_id(0)
        pid_d = tl.program_id(1)
        pid_b = tl.program_id(2).to(tl.int64)
        rows = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
        d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        mask_d = d < D
        bias = tl.zeros([BLOCK_D], dtype=tl.float32)
        if HAS_BIAS:
            bias = tl.load(b_ptr + d, mask=mask_d, other=0.0).to(tl.float32)
        return pid_l, pid_b, rows, d, mask_d, bias

    @triton.jit
    def _conv_fwd_kernel(x_ptr, w_ptr, b_ptr, out_ptr, sxb, sxl, sxd, L, D, HAS_BIAS: tl.constexpr,
                         K: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
        pid_l, pid_b, rows, d, mask_d, bias = _conv_tile(b_ptr, D, HAS_BIAS, BLOCK_L, BLOCK_D)
        pre = _pre_activation(x_ptr, w_ptr, bias, rows, d, sxl, sxd, pid_b * sxb, mask_d, L, K, BLOCK_L, BLOCK_D)
        out = pre * tl.sigmoid(pre)
        m = (rows < L)[:, None] & mask_d[None, :]
        tl.store(out_ptr + pid_b * L * D + rows[:, None] * D + d[None, :], out.to(out_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _conv_bwd_kernel(x_ptr, w_ptr, b_ptr, g_ptr, dx_ptr, dw_ptr, db_ptr, sxb, sxl, sxd, sgb, sgl, sgd, L, D,
                         HAS_BIAS: tl.constexpr, K: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
        pid_l, pid_b, rows, d, mask_d, bias = _conv_tile(b_ptr, D, HAS_BIAS, BLOCK_L, BLOCK_D)
        dx = tl.zeros([BLOCK_L, BLOCK_D], dtype=tl.float32)
        dpre_here = dx
        for k in tl.static_range(K):
            # input row l feeds output row l + K - 1 - k through tap k
            out_rows = rows + (K - 1 - k)
            m = (out_rows < L)[:, None] & mask_d[None, :]
            pre = _pre_activation(x_ptr, w_ptr, bias, out_rows, d, sxl, sxd, pid_b * sxb, mask_d, L, K, BLOCK_L, BLOCK_D)
            g = tl.load(g_ptr + pid_b * sgb + out_rows[:, None] * sgl + d[None, :] * sgd, mask=m,
                        other=0.0).to(tl.float32)
            sg = tl.sigmoid(pre)
            dpre = tl.where(m, g * sg * (1.0 + pre * (1.0 - sg)), 0.0)
            w = tl.load(w_ptr + d * K + k, mask=mask_d, other=0.0).to(tl.float32)
            dx += dpre * w[None, :]
            if k == K - 1:
                dpre_here = dpre  # the gradient of this tile's own output rows
        m_rows = (rows < L)[:, None] & mask_d[None, :]
        tl.store(dx_ptr + pid_b * L * D + rows[:, None] * D + d[None, :], dx.to(dx_ptr.dtype.element_ty),
                 mask=m_rows)
        part = (pid_b * tl.num_programs(0) + pid_l) * D
        for k in tl.static_range(K):
            src = rows - (K - 1) + k
            m = ((src >= 0) & (src < L))[:, None] & mask_d[None, :]
            xv = tl.load(x_ptr + pid_b * sxb + src[:, None] * sxl + d[None, :] * sxd, mask=m, other=0.0).to(tl.float32)
            tl.store(dw_ptr + (part + d) * K + k, tl.sum(dpre_here * xv, axis=0), mask=mask_d)
        tl.store(db_ptr + part + d, tl.sum(dpre_here, axis=0), mask=mask_d)


_BLOCK_L, _BLOCK_D = 16, 64


def _grid(batch: int, length: int, dim: int, block_l: int, block_d: int) -> tuple[int, int, int]:
    return (triton.cdiv(length, block_l), triton.cdiv(dim, block_d), batch)


class _CausalConvSiluTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, block_l, block_d):  # noqa: D102 - x [B, L, D] (any strides), weight [D, K]
        batch, length, dim = x.shape
        w = weight.contiguous()
        out = x.new_empty(batch, length, dim)
        with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
            _conv_fwd_kernel[_grid(batch, length, dim, block_l, block_d)](
                x, w, bias if bias is not None else w, out, *x.stride(), length, dim, HAS_BIAS=bias is not None,
                K=w.shape[1], BLOCK_L=block_l, BLOCK_D=block_d)
        ctx.save_for_backward(x, w, bias)
        ctx.blocks = (block_l, block_d)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, w, bias = ctx.saved_tensors
        block_l, block_d = ctx.blocks
        batch, length, dim = x.shape
        grid = _grid(batch, length, dim, block_l, block_d)
        dx = x.new_empty(batch, length, dim)
        dw = x.new_empty(batch * grid[0], dim, w.shape[1], dtype=torch.float32)
        db = x.new_empty(batch * grid[0], dim, dtype=torch.float32)
        with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
            _conv_bwd_kernel[grid](x, w, bias if bias is not None else w, grad_out, dx, dw, db, *x.stride(),
                                   *grad_out.stride(), length, dim, HAS_BIAS=bias is not None, K=w.shape[1],
                                   BLOCK_L=block_l, BLOCK_D=block_d)
        grad_bias = None if bias is None else db.sum(0).to(ctx.dtypes[1])
        return dx, dw.sum(0).to(ctx.dtypes[0]), grad_bias, None, None


def causal_conv1d_silu_triton(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], *,
                              block_l: int = _BLOCK_L, block_d: int = _BLOCK_D) -> torch.Tensor:
    """`silu(causal depthwise conv1d(x))` with the Triton kernels, differentiable in `x`, `weight`, `bias`.

    Args:
        x: `[B, D, L]` with any strides; channels-last memory (a transposed `[B, L, D]` view, `x.stride(1) == 1`)
            is the layout the kernels read coalesced.
        weight: `[D, K]` or `[D, 1, K]`; bias: `[D]` or None. The sums run in fp32.
        block_l, block_d: tile of one program (powers of two).

    Returns:
        `[B, D, L]` in `x`'s dtype, a transposed view of channels-last `[B, L, D]` memory.
    """
    if triton is None:
        raise RuntimeError("causal_conv1d_silu_triton: triton is not installed (pip install triton)")
    if not x.is_cuda and not _interpreted():
        raise RuntimeError("causal_conv1d_silu_triton: CPU tensors need TRITON_INTERPRET=1 set before defocus_mllm "
                           "is imported (Triton's interpreter)")
    if block_l & (block_l - 1) or block_d & (block_d - 1):
        raise ValueError(f"causal_conv1d_silu_triton: block_l ({block_l}) and block_d ({block_d}) must be powers of two")
    weight = weight.reshape(weight.shape[0], -1)
    if weight.shape[0] != x.shape[1]:
        raise ValueError(f"causal_conv1d_silu_triton: weight has {weight.shape[0]} filters for {x.shape[1]} channels")
    return _CausalConvSiluTriton.apply(x.transpose(1, 2), weight, bias, block_l, block_d).transpose(1, 2)


def _handles(x: torch.Tensor) -> bool:
    # channels-last memory, fp32 / bf16 / fp16: the case this kernel is for
    return x.stride(1) == 1 and x.dtype != torch.float64


def _conv_triton(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    if _handles(x):
        return causal_conv1d_silu_triton(x, weight, bias)
    return causal_conv.causal_conv1d_silu(x, weight, bias, backend="torch")


causal_conv.register_causal_conv_backend("triton", _conv_triton, triton_scan_available)

__all__ = ["causal_conv1d_silu_triton"]
