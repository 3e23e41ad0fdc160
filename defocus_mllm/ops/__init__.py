"""Sequence operators of the De-focus mixers: kernel dispatch (native CPU, Triton, CUDA) with pure-PyTorch fallbacks.

`mamba_mixer_core` is the Mamba mixer between its projections; `selective_scan` is the scan alone."""

from .causal_conv import available_causal_conv_backends, causal_conv1d_silu, register_causal_conv_backend
from .cpu_mixer import mamba_mixer_core_cpu  # registers the "cpu" mixer backend
from .cpu_scan import selective_scan_cpu  # registers the "cpu" scan backend (the kernel is built on first use)
from .mamba_mixer import available_mamba_mixer_backends, mamba_mixer_core, register_mamba_mixer_backend
from .selective_scan import (
    available_backends,
    register_selective_scan_backend,
    selective_scan,
    selective_scan_torch,
)
from .triton_scan import selective_scan_triton  # registers the "triton" backend (needs triton; CUDA or interpreter)
from .triton_mixer import mamba_mixer_core_triton  # registers the mixer's "triton" backend
from .triton_conv import causal_conv1d_silu_triton  # registers the causal conv's "triton" backend

__all__ = [
    "available_backends",
    "available_causal_conv_backends",
    "available_mamba_mixer_backends",
    "causal_conv1d_silu",
    "causal_conv1d_silu_triton",
    "mamba_mixer_core",
    "mamba_mixer_core_cpu",
    "mamba_mixer_core_triton",
    "register_causal_conv_backend",
    "register_mamba_mixer_backend",
    "register_selective_scan_backend",
    "selective_scan",
    "selective_scan_cpu",
    "selective_scan_torch",
    "selective_scan_triton",
]
