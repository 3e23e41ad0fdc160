"""The De-focus bandpass filter: rotary (high-pass) helpers shared by the mixers, and the per-head decay + rotation
of the attention / retention mixers."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from transformers import initialization as init


def rope_angles(length: int, freq: torch.Tensor, scale_factor: float = 1.0) -> torch.Tensor:
    """`theta[n, k] = (n / scale_factor) * freq[k]`, `[L, K]` in fp32.

    Positions are built in fp32 whatever the autocast dtype: bf16 cannot represent integer positions past 256.
    """
    positions = torch.arange(length, device=freq.device, dtype=torch.float32) / scale_factor
    return positions[:, None] * freq.float()[None, :]


def rotate_every_two(x: torch.Tensor) -> torch.Tensor:
    """Map each pair `(x[2i], x[2i+1])` of the last dim to `(-x[2i+1], x[2i])`."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def apply_rotary(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """`x * cos(theta) + rotate_every_two(x) * sin(theta)`; `theta` broadcasts against `x`'s last two dims `[L, K]`.

    `theta` is indexed per element k (elements 2i and 2i+1 use their own angles), as in the released weights.
    """
    return x * torch.cos(theta).to(x.dtype) + rotate_every_two(x) * torch.sin(theta).to(x.dtype)


def default_head_decay_log(num_heads: int) -> torch.Tensor:
    """`A_log [H]` with `lambda_h = exp(-exp(A_log_h)) = 1 - 2^-e_h`, `e_h` evenly spaced over [5, 12].

    RetNet's multi-scale decay range: the first head forgets within ~32 tokens, the last keeps ~4k tokens.
    """
    exponents = torch.linspace(5.0, 12.0, num_heads) if num_heads > 1 else torch.tensor([5.0])
    log_lambda = torch.log1p(-(2.0 ** -exponents))  # log(lambda) < 0
    return torch.log(-log_lambda)


def default_head_rope_frequencies(num_heads: int, head_dim: int) -> torch.Tensor:
    """Standard RoPE frequencies `10000^(-2k/d)` for each of the `d/2` pairs, the same for every head: `[H, d/2]`."""
    k = torch.arange(head_dim // 2, dtype=torch.float32)
    return (10000.0 ** (-2.0 * k / head_dim)).expand(num_heads, -1).clone()


class DefocusHeadFilter(nn.Module):
    """The learnable bandpass filter of the attention / retention mixers, one per head.

    Low-pass: a decay `lambda_h = exp(A_h)` with `A_h = -exp(A_log_h) < 0` (SPEC §2.3: "Delta is set to 1").
    High-pass: a rotation of queries and keys by `theta[h, n, k] = (n / rope_scale_factor) * freq[h, k]` at absolute
    positions `n`. Unlike Mamba's filter, the two elements of a pair share one frequency, so the rotation is a true
    rotation and `q_i . k_j` depends on positions only through `i - j`.

    `decay_mode` / `rope_mode`: `"learnable"` (a parameter), `"fixed"` (a buffer at its initial value) or, for the
    decay, `"none"`; `use_rope=False` removes the rotation.
    """

    def __init__(self, config, num_heads: int, head_dim: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        self.rope_scale_factor = config.rope_scale_factor
        self.decay_mode = config.decay_mode
        self.rope_mode = config.rope_mode if config.use_rope else "none"
        self._register("A_log", self.decay_mode, default_head_decay_log(num_heads))
        self._register("freq", self.rope_mode, default_head_rope_frequencies(num_heads, head_dim))

    def _register(self, name: str, mode: str, value: torch.Tensor) -> None:
        if mode == "learnable":
            setattr(self, name, nn.Parameter(value))
        elif mode == "fixed":
            self.register_buffer(name, value)
        else:
            setattr(self, name, None)

    def _init_mixer_weights(self) -> None:
        if self.A_log is not None:
            init.copy_(self.A_log, default_head_decay_log(self.num_heads))
        if self.freq is not None:
            init.copy_(self.freq, default_head_rope_frequencies(self.num_heads, self.head_dim))

    def log_decay(self) -> Optional[torch.Tensor]:
        """`A_h = log(lambda_h) < 0` per head, `[H]` in fp32; `None` without decay."""
        return None if self.A_log is None else -torch.exp(self.A_log.float())

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate `x [B, H, L, d]` at its absolute positions; the identity without rope."""
        if self.freq is None:
            return x
        length = x.shape[-2]
        freq = self.freq.repeat_interleave(2, dim=-1).flatten()  # one angle per element, pairs equal
        theta = rope_angles(length, freq, self.rope_scale_factor)  # [L, H * d]
        theta = theta.view(length, self.num_heads, self.head_dim).transpose(0, 1)  # [H, L, d]
        return apply_rotary(x, theta)

    def relative_log_decay(self, length: int, causal: bool = True) -> Optional[torch.Tensor]:
        """`(i - j) * A_h` for `j <= i`, `[H, L, L]` fp32; with `causal=False` the decay is symmetric, `|i - j| * A_h`.

        Entries above the diagonal of the causal form are 0 here: the caller masks them.
        """
        log_decay = self.log_decay()
        if log_decay is None:
            return None
        positions = torch.arange(length, device=log_decay.device, dtype=torch.float32)
        distance = positions[:, None] - positions[None, :]
        distance = distance.abs() if not causal else distance.clamp(min=0)
        return distance[None] * log_decay[:, None, None]

