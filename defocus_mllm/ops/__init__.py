"""Sequence operators of the De-focus mixers, with CUDA kernel dispatch and pure-PyTorch fallbacks."""

from .causal_conv import causal_conv1d_silu
from .selective_scan import (
    available_backends,
    register_selective_scan_backend,
    selective_scan,
    selective_scan_torch,
)

__all__ = [
    "available_backends",
    "causal_conv1d_silu",
    "register_selective_scan_backend",
    "selective_scan",
    "selective_scan_torch",
]
