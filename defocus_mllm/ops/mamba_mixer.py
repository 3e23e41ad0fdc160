"""The De-focus Mamba mixer's work between its projections as one op, `mamba_mixer_core`, with per-device backends.

Around its four matmuls (`in_proj`, `x_proj`, `dt_proj`, `out_proj`) and the causal conv, the mixer does
elementwise and sequential work that costs as much as the matmuls when written as separate PyTorch ops (each one
a pass over `[B, L, D]` memory, some with transposed copies): the `delta` bias, softplus and scale, the rotation of
`B` and `C`, the scan, the group RMS norm, the `D` skip and the SiLU gate. `mamba_mixer_core` is that whole stretch,
so a backend can do it in one pass over memory:

* `"torch"`: the reference, a composition of PyTorch ops around `selective_scan` (whose own dispatch picks the
  scan kernel). It runs anywhere and is what every other backend is tested against;
* backends registered by kernel modules (`register_mamba_mixer_backend`): `"cpu"`, the native kernel of
  ``cpu_mixer.py`` (one pass forward, one backward; the default for CPU tensors where it builds), and Triton on
  CUDA.

Inputs are the projections' channels-last outputs, read in place (views of `in_proj` / `x_proj` outputs are fine):

    x      [B, L, D]  conv + SiLU output: the scan input `u` and the `D` skip's input
    z      [B, L, D]  the gate's input
    dt     [B, L, D]  `dt_proj` without its bias
    dt_bias [D];  A [D, N] (`-exp(A_log)`, fp32);  B, C [B, L, N] not yet rotated;  D [D];  freq [N] or None

and the output, `[B, L, D]` in `x`'s dtype, is the `out_proj` input. Streaming callers pass `position_offset` (the
index of the first token, for the rotation), `initial_state` `[B, D, N]` and `return_final_state=True`.

`dt_proj` may be left to the op too: with `dt_proj_weight` `[D, R]`, `dt` is `dt_proj`'s input `[B, L, R]` (a view
of the `x_proj` output). Backends registered with `projects_dt=True` (the native CPU kernel) apply it inside, so its
`[B, L, D]` output is never written to memory; for the others the dispatch applies it first (`F.linear`).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Union

import torch
import torch.nn.functional as F

from .rotary import apply_rotary, rope_angles
from .registry import FALLBACK, BackendRegistry, always_available
from .selective_scan import _REGISTRY as _SCAN_REGISTRY
from .selective_scan import available_backends as available_scan_backends
from .selective_scan import check_state_operands, selective_scan

MixerResult = Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]
MixerCoreFn = Callable[..., MixerResult]


class MixerOptions(NamedTuple):
    """The keyword arguments of `mamba_mixer_core` besides `backend`, with their defaults: a kernel backend takes
    them as `**options` and reads them through `MixerOptions(**options)` (an unknown keyword is a `TypeError`)."""

    delta_scale_factor: float = 1.0
    rope_scale_factor: float = 1.0
    group_norm_size: int = 0
    position_offset: int = 0
    initial_state: Optional[torch.Tensor] = None
    return_final_state: bool = False


# Backends tried in order per device type when none is named; "torch" ends every list.
_REGISTRY: BackendRegistry[MixerCoreFn] = BackendRegistry(
    "mamba_mixer_core", "DEFOCUS_MIXER_BACKEND", {"cpu": ("cpu",), "cuda": ("triton",)})
_PROJECTS_DT: set[str] = set()  # backends that take `dt_proj_weight` and apply dt_proj themselves


def register_mamba_mixer_backend(name: str, fn: MixerCoreFn, is_available: Callable[[], bool] = always_available,
                                 carries_state: bool = False, projects_dt: bool = False) -> None:
    """Register an implementation of `mamba_mixer_core` (same arguments, without `backend`).

    `carries_state=True`: it also honours `position_offset`, `initial_state` and `return_final_state`; calls that
    use them are otherwise sent to a backend that does. `projects_dt=True`: it takes the keyword `dt_proj_weight`
    (then `dt` is `[B, L, R]`); other backends get `dt` projected by the dispatch and never see the keyword.
    """
    _REGISTRY.register(name, fn, is_available, carries_state)
    if projects_dt:
        _PROJECTS_DT.add(name)
    else:
        _PROJECTS_DT.discard(name)


def available_mamba_mixer_backends() -> list[str]:
    """Registered mixer backends that can run here."""
    return _REGISTRY.available()


# --------------------------------------------------------------------------------------------------- the pieces


def time_step(dt: torch.Tensor, dt_bias: torch.Tensor, delta_scale_factor: float = 1.0) -> torch.Tensor:
    """`delta = softplus(dt + dt_bias) / delta_scale_factor`, computed in fp32, returned in `dt`'s dtype."""
    delta = F.softplus(dt.float() + dt_bias.float())
    if delta_scale_factor != 1.0:
        delta = delta / delta_scale_factor
    return delta.to(dt.dtype)


def rotate_state_projections(B: torch.Tensor, C: torch.Tensor, freq: Optional[torch.Tensor],
                             rope_scale_factor: float = 1.0, position_offset: int = 0
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn `B`, `C` `[B, L, N]` by `theta[l, k] = ((position_offset + l) / rope_scale_factor) * freq[k]` (the
    release's per-element rotary layout); unchanged when `freq` is None."""
    if freq is None:
        return B, C
    theta = rope_angles(B.shape[-2], freq, rope_scale_factor, position_offset)  # [L, N]
    return apply_rotary(B, theta), apply_rotary(C, theta)


def gate_scan_output(y: torch.Tensor, x: torch.Tensor, z: torch.Tensor, D: torch.Tensor,
                     group_norm_size: int = 0) -> torch.Tensor:
    """Group RMS norm of the scan output (groups of `group_norm_size` channels, eps 1e-6; none when 0), the `D`
    skip and the SiLU gate, in fp32: `(norm(y) + x * D) * silu(z)`; `[B, L, D]` in and out (`y`'s dtype)."""
    out_dtype = y.dtype
    y = y.float()
    if group_norm_size > 0:
        batch, length, dim = y.shape
        groups = y.reshape(batch, length, dim // group_norm_size, group_norm_size)
        y = (groups * torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + 1e-6)).view(batch, length, dim)
    y = y + x.float() * D.float()
    return (y * F.silu(z.float())).to(out_dtype)


def mamba_mixer_core_torch(x: torch.Tensor, z: torch.Tensor, dt: torch.Tensor, dt_bias: torch.Tensor,
                           A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, D: torch.Tensor,
                           freq: Optional[torch.Tensor], *, delta_scale_factor: float = 1.0,
                           rope_scale_factor: float = 1.0, group_norm_size: int = 0, position_offset: int = 0,
                           initial_state: Optional[torch.Tensor] = None,
                           return_final_state: bool = False) -> MixerResult:
    """The reference: PyTorch ops around `selective_scan` (differentiable in every input)."""
    delta = time_step(dt, dt_bias, delta_scale_factor)  # [B, L, D]
    B, C = rotate_state_projections(B, C, freq, rope_scale_factor, position_offset)
    # transposed views: the scan backends read channels-last memory in place
    scanned = selective_scan(x.transpose(1, 2), delta.transpose(1, 2), A, B.transpose(1, 2), C.transpose(1, 2),
                             initial_state=initial_state, return_final_state=return_final_state)
    y, final = scanned if return_final_state else (scanned, None)
    out = gate_scan_output(y.transpose(1, 2), x, z, D, group_norm_size)
    return (out, final) if return_final_state else out


register_mamba_mixer_backend("torch", mamba_mixer_core_torch, carries_state=True)


# --------------------------------------------------------------------------------------------------- dispatch


def _default_backend(x: torch.Tensor, carrying_state: bool) -> str:
    forced = _REGISTRY.forced()
    if forced:
        return forced
    # a forced scan backend, float64 (gradcheck) and mamba-ssm's CUDA scan all go through the reference composition,
    # except a forced "triton" scan on CUDA, which means the Triton path: the fused mixer is its scan with the
    # mixer's elementwise steps folded in (DEFOCUS_MIXER_BACKEND=torch runs the Triton scan alone)
    forced_scan = _SCAN_REGISTRY.forced()
    if forced_scan == "triton" and x.is_cuda and x.dtype != torch.float64 and _REGISTRY.is_available("triton"):
        return "triton"
    if forced_scan or (x.is_cuda and "cuda" in available_scan_backends()):
        return FALLBACK
    return _REGISTRY.preferred(x, lambda name: not carrying_state or name in _REGISTRY.carries_state)


def mamba_mixer_core(x: torch.Tensor, z: torch.Tensor, dt: torch.Tensor, dt_bias: torch.Tensor, A: torch.Tensor,
                     B: torch.Tensor, C: torch.Tensor, D: torch.Tensor, freq: Optional[torch.Tensor], *,
                     delta_scale_factor: float = 1.0, rope_scale_factor: float = 1.0, group_norm_size: int = 0,
                     position_offset: int = 0, initial_state: Optional[torch.Tensor] = None,
                     return_final_state: bool = False, dt_proj_weight: Optional[torch.Tensor] = None,
                     backend: Optional[str] = None) -> MixerResult:
    """The De-focus Mamba mixer between its projections (shapes in the module docstring).

    Args:
        delta_scale_factor, rope_scale_factor, group_norm_size: the configuration's values.
        position_offset: position of the first token (the rotation's `n`), for a stream continued in chunks.
        initial_state: `[B, D, N]` scan state before the first token (zeros when None).
        return_final_state: also return the scan state after the last token, `[B, D, N]` fp32.
        dt_proj_weight: `dt_proj`'s weight `[D, R]`; `dt` is then `dt_proj`'s input `[B, L, R]` (without bias).
        backend: a registered name; `None` picks the native kernel of the device when registered and available
            (`"cpu"`, `"triton"` on CUDA unless mamba-ssm's scan imports), else `"torch"`. Float64 inputs and a set
            `DEFOCUS_SCAN_BACKEND` use `"torch"` (except `DEFOCUS_SCAN_BACKEND=triton` on CUDA: the fused Triton
            mixer); `DEFOCUS_MIXER_BACKEND` overrides everything.

    Returns:
        `[B, L, D]` in `x`'s dtype, or `(out, final_state)`.
    """
    if dt_proj_weight is not None:
        low_rank = (dt_proj_weight.dim() == 2 and dt.dim() == 3 and dt_proj_weight.shape[0] == x.shape[-1]
                    and dt.shape[:2] == x.shape[:2] and dt.shape[-1] == dt_proj_weight.shape[1])
        if not low_rank:
            raise ValueError(f"mamba_mixer_core: with dt_proj_weight [D, R], dt must be [B, L, R]; got x "
                             f"{tuple(x.shape)}, dt {tuple(dt.shape)}, dt_proj_weight {tuple(dt_proj_weight.shape)}")
    if x.dim() != 3 or z.shape != x.shape or (dt_proj_weight is None and dt.shape != x.shape):
        raise ValueError(f"mamba_mixer_core: x, z and dt must be [B, L, D] of one shape, got {tuple(x.shape)}, "
                         f"{tuple(z.shape)} and {tuple(dt.shape)}")
    batch, length, dim = x.shape
    check_state_operands("mamba_mixer_core", A, B, C, initial_state, batch, dim, length, time_major=True)
    if group_norm_size > 0 and dim % group_norm_size:
        raise ValueError(f"mamba_mixer_core: group_norm_size {group_norm_size} does not divide D={dim}")
    carrying = initial_state is not None or return_final_state or position_offset != 0
    name = backend or _default_backend(x, carrying)
    fn = _REGISTRY.resolve(name)
    if carrying and name not in _REGISTRY.carries_state:
        raise ValueError(f"mamba_mixer_core: backend {name!r} does not carry a stream's state; backends that do: "
                         f"{sorted(_REGISTRY.carries_state)}")
    options = dict(delta_scale_factor=delta_scale_factor, rope_scale_factor=rope_scale_factor,
                   group_norm_size=group_norm_size, position_offset=position_offset, initial_state=initial_state,
                   return_final_state=return_final_state)
    if dt_proj_weight is not None:
        if name in _PROJECTS_DT:
            options["dt_proj_weight"] = dt_proj_weight
        else:
            dt = F.linear(dt, dt_proj_weight)
    return fn(x, z, dt, dt_bias, A, B, C, D, freq, **options)


__all__ = [
    "MixerOptions",
    "available_mamba_mixer_backends",
    "gate_scan_output",
    "mamba_mixer_core",
    "mamba_mixer_core_torch",
    "register_mamba_mixer_backend",
    "rotate_state_projections",
    "time_step",
]
