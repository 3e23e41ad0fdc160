"""Rotary position angles and the pairwise rotation they drive (the high-pass half of the De-focus filter)."""

from __future__ import annotations

import torch


def rope_angles(length: int, freq: torch.Tensor, scale_factor: float = 1.0, offset: int = 0) -> torch.Tensor:
    """`theta[n, k] = (n / scale_factor) * freq[k]` for positions `n = offset .. offset + length - 1`, `[L, K]` fp32.

    Positions are built in fp32 whatever the autocast dtype: bf16 cannot represent integer positions past 256.
    """
    positions = torch.arange(offset, offset + length, device=freq.device, dtype=torch.float32) / scale_factor
    return positions[:, None] * freq.float()[None, :]


def rotate_every_two(x: torch.Tensor) -> torch.Tensor:
    """Map each pair `(x[2i], x[2i+1])` of the last dim to `(-x[2i+1], x[2i])`."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def apply_rotary(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """`x * cos(theta) + rotate_every_two(x) * sin(theta)`; `theta` broadcasts against `x`'s last two dims `[L, K]`.

    `theta` holds one angle per element k; the rotary layouts decide whether the two elements of a pair share it.
    """
    return x * torch.cos(theta).to(x.dtype) + rotate_every_two(x) * torch.sin(theta).to(x.dtype)
