"""The De-focus Mamba mixer between its projections as one Triton kernel per pass: `mamba_mixer_core`'s `"triton"`
backend.

One forward launch reads the projections' channels-last outputs in place (`x`, `z`, `dt` `[B, L, D]`, `B`, `C`
`[B, L, N]`), and per time step, inside the scan of `triton_scan.py`:

* `delta = softplus(dt + dt_bias) / delta_scale_factor` (fp32, never written to memory);
* the rotation of `B_t` and `C_t` by `theta[k] = ((offset + t) / rope_scale_factor) * freq[k]`, cos / sin computed
  in the kernel (no `[L, N]` angle tensor, no rotated copies of `B` and `C`);
* the scan step on the `[BLOCK_D, N]` fp32 state in registers;
* the epilogue: group RMS norm over `group_norm_size` channels (a program owns whole groups), `+ x * D`, `* silu(z)`,
  written once in `x`'s dtype as the `out_proj` input.

The backward launch recomputes all of it from the checkpointed states and writes `dx`, `dz`, `d dt` `[B, L, D]`
once; the per-channel gradients (`A`, `D`, `dt_bias`) are per-batch-row partials summed on the host, and the
gradients of the rotated `B`, `C` (block-reduced, atomically added, `[B, L, N]` fp32) are turned back through the
rotation on the host, which also gives `d freq`: that is `O(B L N)` work, 1/`D` of the rest.

Group sizes that are not a power of two (Triton tiles are) go to the PyTorch composition, as do float64 inputs.
"""

# no `from __future__ import annotations`: see triton_scan.py
from typing import Any, Optional

import torch

from .mamba_mixer import (
    MixerOptions,
    MixerResult,
    mamba_mixer_core_torch,
    register_mamba_mixer_backend,
    rotate_state_projections,
)
from .triton_scan import _interpreted, ssm_backward, ssm_forward, triton, triton_scan_available


class _MambaMixerTriton(torch.autograd.Function):
    """Autograd wrapper: one fused forward kernel, one fused backward kernel, the rotation's adjoint on the host."""

    @staticmethod
    def forward(ctx, x, z, dt, dt_bias, A, B, C, D, freq, initial_state, delta_scale_factor, rope_scale_factor,
                group_norm_size, position_offset):  # noqa: D102 - shapes in mamba_mixer.py
        needs_grad = any(ctx.needs_input_grad[:10])
        kw = dict(z=z, dt_bias=dt_bias, Dskip=D, freq=freq, delta_scale_factor=delta_scale_factor,
                  rope_scale_factor=rope_scale_factor, group_norm_size=group_norm_size,
                  position_offset=position_offset)
        res = ssm_forward(x, dt, A, B, C, initial_state=initial_state, return_final_state=True,
                          store_checkpoints=needs_grad, **kw)
        if needs_grad:
            ctx.save_for_backward(x, z, dt, dt_bias, A, B, C, D, freq, res["ckpt"])
            ctx.config = res["config"]
            ctx.kw = {k: v for k, v in kw.items() if not isinstance(v, torch.Tensor) and v is not None}
            ctx.has_freq = freq is not None
            ctx.s0_dtype = None if initial_state is None else initial_state.dtype
        return res["out"], res["final"]

    @staticmethod
    def backward(ctx, grad_out, grad_final):
        x, z, dt, dt_bias, A, B, C, D, freq, ckpt = ctx.saved_tensors
        freq = freq if ctx.has_freq else None
        g = ssm_backward(x, dt, A, B, C, grad_out, ckpt, ctx.config, z=z, dt_bias=dt_bias, Dskip=D, freq=freq,
                         grad_final=grad_final, need_initial_grad=ctx.s0_dtype is not None, **ctx.kw)
        dB, dC, dfreq = g["B"], g["C"], None
        if freq is not None:
            # adjoint of the rotation: the kernel returned the gradients of the rotated B, C
            with torch.enable_grad():
                leaves = [t.detach().float().requires_grad_() for t in (B, C, freq)]
                turned = rotate_state_projections(*leaves, ctx.kw["rope_scale_factor"], ctx.kw["position_offset"])
                dB, dC, dfreq = torch.autograd.grad(turned, leaves, (g["B"], g["C"]))
            dfreq = dfreq.to(freq.dtype)
        ds0 = None if ctx.s0_dtype is None else g["initial_state"].to(ctx.s0_dtype)
        return (g["x"], g["z"], g["dt"], g["dt_bias"].to(dt_bias.dtype), g["A"].to(A.dtype), dB.to(B.dtype),
                dC.to(C.dtype), g["D"].to(D.dtype), dfreq, ds0, None, None, None, None)


def mamba_mixer_core_triton(x: torch.Tensor, z: torch.Tensor, dt: torch.Tensor, dt_bias: torch.Tensor,
                            A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, D: torch.Tensor,
                            freq: Optional[torch.Tensor], **options: Any) -> MixerResult:
    """`mamba_mixer_core` as fused Triton kernels (arguments, `MixerOptions` and shapes as there; fp32 state and
    epilogue).

    `delta` stays fp32 inside the kernel where the PyTorch composition rounds it to `dt`'s dtype first, so under
    bf16 the two differ by that rounding; in fp32 they agree to float rounding.
    """
    if triton is None:
        raise RuntimeError("mamba_mixer_core_triton: triton is not installed (pip install triton)")
    opt = MixerOptions(**options)
    group = int(opt.group_norm_size)
    if x.dtype == torch.float64 or (group > 0 and group & (group - 1)):
        return mamba_mixer_core_torch(x, z, dt, dt_bias, A, B, C, D, freq, **options)
    if not x.is_cuda and not _interpreted():
        raise RuntimeError("mamba_mixer_core_triton: CPU tensors need TRITON_INTERPRET=1 set before defocus_mllm is "
                           "imported (Triton's interpreter); use the 'torch' backend otherwise")
    if freq is not None and A.shape[1] % 2:
        raise ValueError(f"mamba_mixer_core_triton: the rotation pairs states, so N={A.shape[1]} must be even")
    batch, length, dim = x.shape
    if length == 0:
        out = x.new_empty(batch, 0, dim)
        final = (opt.initial_state.float().clone() if opt.initial_state is not None
                 else x.new_zeros(batch, dim, A.shape[1], dtype=torch.float32))
        return (out, final) if opt.return_final_state else out
    out, final = _MambaMixerTriton.apply(x, z, dt, dt_bias, A, B, C, D, freq, opt.initial_state,
                                         float(opt.delta_scale_factor), float(opt.rope_scale_factor), group,
                                         int(opt.position_offset))
    return (out, final) if opt.return_final_state else out


register_mamba_mixer_backend("triton", mamba_mixer_core_triton, triton_scan_available, carries_state=True)

__all__ = ["mamba_mixer_core_triton"]
