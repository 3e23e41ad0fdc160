"""Causal depthwise 1D convolution followed by SiLU, with backend dispatch.

* `"torch"`: the reference, PyTorch ops (for a channels-last input `K` shifted multiply-adds, else `conv1d`);
* `"cpu"`: the native kernel of ``cpu_scan.cpp`` (built on first use): one pass over a channels-last input read
  in place, forward and backward, output channels-last;
* `"cuda"`: the causal-conv1d CUDA kernel, where that package imports;
* `"triton"`: the channels-last Triton kernels of ``triton_conv.py`` (registered there), no CUDA build needed.

`DEFOCUS_CONV_BACKEND` names a backend for every call; otherwise CPU tensors use `"cpu"` where the kernel builds,
CUDA tensors `"cuda"` where causal-conv1d imports, else `"triton"` where triton imports, everything else (and
float64) `"torch"`.
"""

from __future__ import annotations

import ctypes
import functools
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .registry import BackendRegistry, always_available

ConvFn = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]

_REGISTRY: BackendRegistry[ConvFn] = BackendRegistry(
    "causal_conv1d_silu", "DEFOCUS_CONV_BACKEND", {"cpu": ("cpu",), "cuda": ("cuda", "triton")})


def register_causal_conv_backend(name: str, fn: ConvFn, is_available: Callable[[], bool] = always_available) -> None:
    """Register an implementation `fn(x [B, D, L], weight [D, K], bias [D] or None) -> silu(conv) [B, D, L]`."""
    _REGISTRY.register(name, fn, is_available)


def available_causal_conv_backends() -> list[str]:
    """Registered causal-conv backends that can run here."""
    return _REGISTRY.available()


@functools.lru_cache(maxsize=1)
def _causal_conv1d_fn():
    """causal-conv1d's kernel, imported once per process (a failed import is not retried on every call)."""
    try:
        from causal_conv1d import causal_conv1d_fn
    except Exception:  # ImportError, or its CUDA extension failing to load
        return None
    return causal_conv1d_fn


def _conv_cuda(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return _causal_conv1d_fn()(x.contiguous(), weight.to(x.dtype).contiguous(),
                               None if bias is None else bias.to(x.dtype), activation="silu")


def _conv_torch(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    kernel = weight.shape[-1]
    weight = weight.to(x.dtype)
    bias = None if bias is None else bias.to(x.dtype)
    if x.stride(1) == 1 and x.shape[1] > 1:
        return F.silu(_shifted_taps(x.transpose(1, 2), weight, bias)).transpose(1, 2)
    out = F.conv1d(F.pad(x, (kernel - 1, 0)), weight.unsqueeze(1), bias, groups=x.shape[1])
    return F.silu(out)


def _shifted_taps(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """The causal depthwise convolution of a channels-last `x [B, L, D]` as `K` shifted multiply-adds (tap `k` looks
    back `K - 1 - k` steps): no padded or transposed copy, which is what `conv1d` would need in this layout."""
    kernel, length = weight.shape[-1], x.shape[1]
    out = x * weight[:, kernel - 1]
    if bias is not None:
        out = out + bias
    for k in range(kernel - 1):
        shift = kernel - 1 - k
        if shift < length:
            out[:, shift:].addcmul_(x[:, : length - shift], weight[:, k])
    return out


def _native_args(x_bld: torch.Tensor, kernel: int):
    batch, length, dim = x_bld.shape
    strides = tuple(s if n > 1 else 0 for s, n in zip(x_bld.stride(), x_bld.shape))
    return (ctypes.c_int64 * 4)(batch, length, dim, kernel), (ctypes.c_int64 * 3)(*strides)


class _CausalConvCPU(torch.autograd.Function):
    """The native kernel; the backward recomputes the pre-activation, so only the inputs are saved."""

    @staticmethod
    def forward(ctx, x, weight, bias):  # noqa: D102 - shapes in `causal_conv1d_silu`
        from .cpu_scan import _check, _ptr, load_library

        lib = load_library()
        xl = x.transpose(1, 2).to(torch.float32)  # [B, L, D]: a view of channels-last memory, read in place
        wt = weight.to(torch.float32).t().contiguous()  # [K, D]: one tap's weights are contiguous
        b32 = None if bias is None else bias.to(torch.float32).contiguous()
        out = torch.empty(xl.shape, dtype=torch.float32)
        shape, strides = _native_args(xl, weight.shape[-1])
        _check(lib.defocus_conv_forward(_ptr(xl), _ptr(wt), _ptr(b32), _ptr(out), shape, strides,
                                        torch.get_num_threads()), "defocus_conv_forward")
        if any(ctx.needs_input_grad):
            ctx.save_for_backward(xl, wt, b32)
            ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        return out.to(x.dtype).transpose(1, 2)

    @staticmethod
    def backward(ctx, grad_out):
        from .cpu_scan import _check, _ptr, load_library

        lib = load_library()
        xl, wt, b32 = ctx.saved_tensors
        gout = grad_out.transpose(1, 2).to(torch.float32).contiguous()  # [B, L, D]
        gx = torch.empty(xl.shape, dtype=torch.float32)
        gwt = torch.empty_like(wt)
        gb = None if b32 is None else torch.empty_like(b32)
        shape, strides = _native_args(xl, wt.shape[0])
        _check(lib.defocus_conv_backward(_ptr(xl), _ptr(wt), _ptr(b32), _ptr(gout), _ptr(gx), _ptr(gwt), _ptr(gb),
                                         shape, strides, torch.get_num_threads()), "defocus_conv_backward")
        dx, dw, db = ctx.dtypes
        return gx.to(dx).transpose(1, 2), gwt.t().to(dw), None if gb is None else gb.to(db)


def _conv_cpu(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    from .cpu_scan import _failure, load_library

    if x.device.type != "cpu":
        raise ValueError("causal_conv1d_silu backend 'cpu' needs CPU tensors")
    if load_library() is None:
        raise RuntimeError(f"the native CPU causal-conv kernel is unavailable: {_failure}")
    if x.numel() == 0:
        return _conv_torch(x, weight, bias)
    return _CausalConvCPU.apply(x, weight, bias)


def _cpu_available() -> bool:
    from .cpu_scan import is_available

    return is_available()


register_causal_conv_backend("torch", _conv_torch)
register_causal_conv_backend("cpu", _conv_cpu, _cpu_available)
register_causal_conv_backend("cuda", _conv_cuda, lambda: _causal_conv1d_fn() is not None)


def causal_conv1d_silu(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                       backend: Optional[str] = None) -> torch.Tensor:
    """`silu(conv1d(x))` with left padding `K - 1`, one filter per channel.

    Args:
        x: `[B, D, L]` (a `.transpose(1, 2)` view of channels-last `[B, L, D]` memory is read in place by the
            `"cpu"` and `"torch"` backends, which then return a channels-last result too).
        weight: `[D, K]` (or the `[D, 1, K]` of an `nn.Conv1d`).
        bias: `[D]` or None.
        backend: a registered name (`"torch"`, `"cpu"`, `"cuda"`, `"triton"`), or None for the device's default (module
            docstring); `DEFOCUS_CONV_BACKEND` overrides the default.
    """
    if x.dim() != 3:
        raise ValueError(f"causal_conv1d_silu: x must be [B, D, L], got {tuple(x.shape)}")
    weight = weight.reshape(weight.shape[0], -1)
    if weight.shape[0] != x.shape[1]:
        raise ValueError(f"causal_conv1d_silu: weight has {weight.shape[0]} filters for D={x.shape[1]} channels")
    return _REGISTRY.resolve(backend or _REGISTRY.default(x))(x, weight, bias)


__all__ = ["available_causal_conv_backends", "causal_conv1d_silu", "register_causal_conv_backend"]
