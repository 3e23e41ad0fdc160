"""The `"cpu"` backend of `mamba_mixer_core`: the mixer between its projections in one native pass (``cpu_scan.cpp``).

One kernel call per direction does everything `mamba_mixer_core_torch` does op by op. Forward: the rotation of
`B`, `C` into small time-major `[B, L, Np]` buffers (cos / sin formed in the kernel), then per batch element and
group of channels: `delta = softplus(dt + dt_bias) / delta_scale_factor` (with `dt_proj_weight`, `dt` is
`dt_proj`'s low-rank input and the kernel applies the projection too, so its `[B, L, D]` output never goes through
memory), the scan from `initial_state`, the group RMS norm, the `D` skip and the SiLU gate, writing the `[B, L, D]`
`out_proj` input once. `x`, `z` and `dt` are read in place, whatever their strides (the projections' channels-last
outputs and slices of them).

Backward: the kernel recomputes each group's `delta` and scan output, goes back through the gate, skip and norm,
and runs the scan's adjoint recurrence with the states recomputed per channel (nothing of size `[L, B, D, N]` is
stored in either pass; autograd keeps only the inputs and the rotated `B`, `C`). It returns the gradients of every
input: x, z, dt, dt_bias, A, B, C, D, freq and the initial state.

Activations in bf16 / fp16 are converted to fp32 once on the way in (the kernel accumulates in fp32); outputs and
gradients come back in each input's dtype. Where the library cannot be built, the backend reports itself
unavailable and the dispatch uses the PyTorch reference (one warning, logged by `cpu_scan.load_library`).
"""

from __future__ import annotations

import ctypes
from typing import Any, Optional

import torch
import torch.nn.functional as F

from . import cpu_scan
from .cpu_scan import _check, _ptr, load_library, padded_state
from .mamba_mixer import MixerOptions, MixerResult, mamba_mixer_core_torch, register_mamba_mixer_backend
from .selective_scan import check_state_operands

_LANES = 8  # the kernel's vector width in states


def _f32(t: torch.Tensor) -> torch.Tensor:
    """fp32 without a copy when already fp32 (the kernel takes any strides)."""
    return t if t.dtype == torch.float32 else t.to(torch.float32)


def _strides3(t: torch.Tensor) -> tuple[int, int, int]:
    # a dimension of size 1 may carry any stride; torch sometimes reports 0 there, which the kernel would honour
    return tuple(s if n > 1 else 0 for s, n in zip(t.stride(), t.shape))


def _rotate(lib: ctypes.CDLL, B32: torch.Tensor, C32: torch.Tensor, freq32: Optional[torch.Tensor], n_pad: int,
            position_offset: int, rope_scale_factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    batch, length, n = B32.shape
    Bt = torch.empty(batch, length, n_pad, dtype=torch.float32)
    Ct = torch.empty_like(Bt)
    rc = lib.defocus_mixer_rotate(_ptr(B32), _ptr(C32), (ctypes.c_int64 * 3)(*_strides3(B32)),
                                  (ctypes.c_int64 * 3)(*_strides3(C32)), _ptr(freq32), batch, length, n, n_pad,
                                  position_offset, rope_scale_factor, _ptr(Bt), _ptr(Ct), torch.get_num_threads())
    _check(rc, "defocus_mixer_rotate")
    return Bt, Ct


def _shape_args(x32, z32, dt32, n_pad: int, group_norm_size: int, rank: int = 0):
    batch, length, dim = x32.shape
    shape = (ctypes.c_int64 * 6)(batch, dim, length, n_pad, group_norm_size, rank)
    strides = (ctypes.c_int64 * 9)(*_strides3(x32), *_strides3(z32), *_strides3(dt32))
    return shape, strides


class _MambaMixerCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, z, dt, dt_bias, A, B, C, D, freq, initial_state, dt_weight,  # noqa: D102 - see mamba_mixer_core
                delta_scale_factor, rope_scale_factor, group_norm_size, position_offset, return_final_state):
        ctx.set_materialize_grads(False)
        lib = load_library()
        batch, length, dim = x.shape
        n = A.shape[1]
        n_pad = n + (-n % _LANES)
        x32, z32, dt32 = _f32(x), _f32(z), _f32(dt)  # dt32: [B, L, R] when the kernel applies dt_proj
        w32 = None if dt_weight is None else _f32(dt_weight)
        wt32 = None if w32 is None else w32.t().contiguous()  # [R, D]: one rank's weights are contiguous
        B32, C32 = _f32(B), _f32(C)
        freq32 = None if freq is None else _f32(freq).contiguous()
        A32 = _f32(A).contiguous()
        if n_pad != n:
            A32 = F.pad(A32, (0, n_pad - n))  # A = 0 in the padding: those states stay 0
        bias32, D32 = _f32(dt_bias).contiguous(), _f32(D).contiguous()
        Bt, Ct = _rotate(lib, B32, C32, freq32, n_pad, position_offset, rope_scale_factor)
        s0 = padded_state(initial_state, n_pad)
        out = torch.empty(batch, length, dim, dtype=torch.float32)
        final = torch.empty(batch, dim, n_pad, dtype=torch.float32) if return_final_state else None
        shape, strides = _shape_args(x32, z32, dt32, n_pad, group_norm_size, 0 if w32 is None else w32.shape[1])
        rc = lib.defocus_mixer_forward(_ptr(x32), _ptr(z32), _ptr(dt32), _ptr(wt32), _ptr(bias32), _ptr(A32), _ptr(Bt),
                                       _ptr(Ct), _ptr(D32), _ptr(s0), _ptr(out), _ptr(final), shape, strides,
                                       delta_scale_factor, torch.get_num_threads())
        _check(rc, "defocus_mixer_forward")
        if any(ctx.needs_input_grad):
            ctx.save_for_backward(x32, z32, dt32, bias32, A32, B32, C32, D32, freq32, Bt, Ct, s0, w32)
            ctx.dtypes = tuple(None if t is None else t.dtype
                               for t in (x, z, dt, dt_bias, A, B, C, D, freq, initial_state, dt_weight))
            ctx.config = (delta_scale_factor, rope_scale_factor, group_norm_size, position_offset)
        return out.to(x.dtype), None if final is None else final[:, :, :n]

    @staticmethod
    def backward(ctx, grad_out, grad_final):
        lib = load_library()
        x32, z32, dt32, bias32, A32, B32, C32, D32, freq32, Bt, Ct, s0, w32 = ctx.saved_tensors
        dt_low = None
        if w32 is not None:  # the backward kernel takes the projected dt; the projection's own gradients below
            dt_low, dt32 = dt32, F.linear(dt32, w32)
        delta_scale_factor, rope_scale_factor, group_norm_size, position_offset = ctx.config
        batch, length, dim = x32.shape
        n_pad = A32.shape[1]
        n = B32.shape[-1]
        threads = torch.get_num_threads()
        if grad_out is None:
            grad_out = torch.zeros(batch, length, dim)
        gout = grad_out.to(torch.float32).contiguous()
        gfin = padded_state(grad_final, n_pad)
        gx, gz, gdt = (torch.empty(batch, length, dim) for _ in range(3))
        gA, gBt, gCt = torch.empty_like(A32), torch.empty_like(Bt), torch.empty_like(Ct)
        gvec = torch.empty(2, dim)
        gs0 = torch.empty(batch, dim, n_pad) if ctx.dtypes[9] is not None else None
        shape, strides = _shape_args(x32, z32, dt32, n_pad, group_norm_size)
        rc = lib.defocus_mixer_backward(_ptr(x32), _ptr(z32), _ptr(dt32), _ptr(bias32), _ptr(A32), _ptr(Bt),
                                        _ptr(Ct), _ptr(D32), _ptr(s0), _ptr(gout), _ptr(gfin), _ptr(gx), _ptr(gz),
                                        _ptr(gdt), _ptr(gA), _ptr(gBt), _ptr(gCt), _ptr(gvec), _ptr(gs0), shape,
                                        strides, delta_scale_factor, threads)
        _check(rc, "defocus_mixer_backward")
        gB, gC = torch.empty(batch, length, n), torch.empty(batch, length, n)
        gfreq = None if freq32 is None else torch.empty(n)
        rc = lib.defocus_mixer_rotate_backward(_ptr(B32), _ptr(C32), (ctypes.c_int64 * 3)(*_strides3(B32)),
                                               (ctypes.c_int64 * 3)(*_strides3(C32)), _ptr(freq32), batch, length,
                                               n, n_pad, position_offset, rope_scale_factor, _ptr(gBt), _ptr(gCt),
                                               _ptr(gB), _ptr(gC), _ptr(gfreq), threads)
        _check(rc, "defocus_mixer_rotate_backward")
        gw = None
        if dt_low is not None:  # dt = dt_low W^T
            gw = gdt.reshape(-1, dim).t() @ dt_low.reshape(-1, dt_low.shape[-1]) if ctx.needs_input_grad[10] else None
            gdt = gdt @ w32 if ctx.needs_input_grad[2] else None
        grads = (gx, gz, gdt, gvec[0], gA[:, :n], gB, gC, gvec[1], gfreq,
                 None if gs0 is None else gs0[:, :, :n], gw)
        cast = tuple(None if g is None or dtype is None else g.to(dtype) for g, dtype in zip(grads, ctx.dtypes))
        return cast + (None,) * 5


def mamba_mixer_core_cpu(x: torch.Tensor, z: torch.Tensor, dt: torch.Tensor, dt_bias: torch.Tensor,
                         A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, D: torch.Tensor,
                         freq: Optional[torch.Tensor], dt_proj_weight: Optional[torch.Tensor] = None,
                         **options: Any) -> MixerResult:
    """`mamba_mixer_core` in the native CPU kernel (arguments, `MixerOptions`, and results as there); with
    `dt_proj_weight` `[D, R]`, `dt` is `dt_proj`'s input `[B, L, R]` and the kernel applies the projection."""
    opt = MixerOptions(**options)
    tensors = [t for t in (x, z, dt, dt_bias, A, B, C, D, freq, opt.initial_state, dt_proj_weight) if t is not None]
    if any(t.device.type != "cpu" for t in tensors):
        raise ValueError("mamba_mixer_core backend 'cpu' needs CPU tensors")
    if load_library() is None:
        raise RuntimeError(f"the native CPU mixer kernel is unavailable: {cpu_scan._failure}")
    if freq is not None and A.shape[1] % 2:
        raise ValueError(f"mamba_mixer_core: the rotation of B, C turns pairs of states; N={A.shape[1]} is odd")
    batch, length, dim = x.shape
    check_state_operands("mamba_mixer_core", A, B, C, opt.initial_state, batch, dim, length, time_major=True)
    if x.numel() == 0 or A.shape[1] == 0:  # degenerate shapes: nothing worth a kernel call
        if dt_proj_weight is not None:
            dt = F.linear(dt, dt_proj_weight)
        return mamba_mixer_core_torch(x, z, dt, dt_bias, A, B, C, D, freq, **options)
    out, final = _MambaMixerCPU.apply(x, z, dt, dt_bias, A, B, C, D, freq, opt.initial_state, dt_proj_weight,
                                      float(opt.delta_scale_factor), float(opt.rope_scale_factor),
                                      int(opt.group_norm_size), int(opt.position_offset), bool(opt.return_final_state))
    return (out, final) if opt.return_final_state else out


register_mamba_mixer_backend("cpu", mamba_mixer_core_cpu, cpu_scan.is_available, carries_state=True, projects_dt=True)

__all__ = ["mamba_mixer_core_cpu"]
