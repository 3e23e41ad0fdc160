"""Causal depthwise 1D convolution followed by SiLU, with the causal-conv1d CUDA kernel when present."""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F


def _causal_conv1d_fn():
    try:
        from causal_conv1d import causal_conv1d_fn
    except Exception:  # ImportError, or its CUDA extension failing to load
        return None
    return causal_conv1d_fn


# ---- hook for kernels registered by other modules (kept minimal: a registry API may replace it) ----------------
# (handles(x) -> bool, fn(x, weight, bias) -> out) pairs, tried in order for CUDA tensors when causal-conv1d's
# kernel is not installed; `ops/triton_conv.py` appends its channels-last Triton kernel here on import.
_CUDA_KERNELS: list[tuple[Callable[[torch.Tensor], bool], Callable[..., torch.Tensor]]] = []


def register_cuda_kernel(handles: Callable[[torch.Tensor], bool], fn: Callable[..., torch.Tensor]) -> None:
    """Add a fallback CUDA kernel `fn(x [B, D, L], weight [D, K], bias) -> [B, D, L]` for inputs `handles(x)`."""
    _CUDA_KERNELS.append((handles, fn))
# ----------------------------------------------------------------------------------------------------------------


def causal_conv1d_silu(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                       backend: Optional[str] = None) -> torch.Tensor:
    """`silu(conv1d(x))` with left padding `K - 1`, one filter per channel.

    Args:
        x: `[B, D, L]`.
        weight: `[D, K]` (or the `[D, 1, K]` of an `nn.Conv1d`).
        bias: `[D]` or None.
        backend: `"torch"`, `"cuda"` or None (CUDA kernel for CUDA tensors when causal-conv1d imports, else a
            kernel registered in `_CUDA_KERNELS` that handles the input, e.g. the Triton one for channels-last).
    """
    weight = weight.reshape(weight.shape[0], -1)
    fn = _causal_conv1d_fn() if backend != "torch" and x.is_cuda else None
    if backend == "cuda" and fn is None:
        raise RuntimeError("causal_conv1d_silu: the causal-conv1d CUDA kernel is not available")
    if fn is None and backend is None and x.is_cuda:
        for handles, kernel_fn in _CUDA_KERNELS:
            if handles(x):
                return kernel_fn(x, weight, bias)
    if fn is not None:
        return fn(x.contiguous(), weight.to(x.dtype).contiguous(),
                  None if bias is None else bias.to(x.dtype), activation="silu")
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
