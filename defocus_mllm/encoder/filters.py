"""The De-focus bandpass filter, both halves, for every token mixer (docs/method.md §3).

The filter of a mixer is two tensors on the module that owns them:

* `A_log`, the low-pass half: a decay `exp(A)` per step of token distance, `A = -exp(A_log) < 0`, kept in log space
  so that it stays negative whatever the optimiser does;
* `freq`, the high-pass half: rotary frequencies, `theta[n] = (n / rope_scale_factor) * freq` at token position `n`.

Each tensor is `"learnable"` (an `nn.Parameter`), `"fixed"` (a buffer: saved with the model, never trained) or
`"none"` (the attribute is `None`); `register_filter_tensor` is the one place that decides. What differs between
the mixers is described by small frozen specs, not by copies of the setup code:

* the decay: `HeadDecay` (attention / retention: one `lambda_h = exp(A_h)` per head, the step "delta" is 1) or
  `ScanDecay` (Mamba: `A [D, N]` is the selective scan's own state matrix; the step is the data-dependent `delta_t`
  of the scan, so the decay between tokens `j` and `i` is `exp(sum_{t=j+1..i} delta_t A)`);
* the rotary layout: `PerElementRotary` (Mamba: `freq [N]`, element `k` of `B` / `C` turns by its own angle
  `theta[n, k]`, the released weights' indexing) or `PairSharedRotary` (heads: `freq [H, d/2]`, the two elements of
  a pair share one angle, so `q_i . k_j` depends on positions only through `i - j`).

`BandpassFilter` is the mixin that owns the tensors and applies them (`register_decay`, `register_rotary`,
`reset_filter`, `log_decay`, `rotary_angles`, `rotate`). Two modules use it:

* `DefocusHeadFilter`, the `filter` submodule of the attention and retention mixers (state-dict names
  `blocks.{i}.mixer.filter.A_log` `[H]` and `blocks.{i}.mixer.filter.freq` `[H, d/2]`);
* `DefocusMambaMixer` itself: its decay *is* the scan's `A`, so the filter is fused into the mixer, and the
  released checkpoints name the tensors `blocks.{i}.mixer.A_log` `[D, N]` and `blocks.{i}.mixer.freq` `[N]`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import nn
from transformers import initialization as init

from ..ops.rotary import apply_rotary, rope_angles, rotate_every_two

# How a filter tensor is kept (`register_filter_tensor`); the rotary half has no "none" mode, `use_rope` turns it off
FILTER_MODES = ("learnable", "fixed", "none")
ROPE_MODES = FILTER_MODES[:2]


# --------------------------------------------------------------------------------------------------- initial values


def default_rope_frequencies(state_size: int) -> torch.Tensor:
    """Mamba's `freq[k] = (100^(-(k+1)/N) - 0.01) / 0.99`: from ~0.75 down to 0 over the N states."""
    k = torch.arange(1, state_size + 1, dtype=torch.float32)
    return (100.0 ** (-k / state_size) - 0.01) / 0.99


def default_head_rope_frequencies(num_heads: int, head_dim: int) -> torch.Tensor:
    """Standard RoPE frequencies `10000^(-2k/d)` for each of the `d/2` pairs, the same for every head: `[H, d/2]`."""
    k = torch.arange(head_dim // 2, dtype=torch.float32)
    return (10000.0 ** (-2.0 * k / head_dim)).expand(num_heads, -1).clone()


def default_head_decay_log(num_heads: int) -> torch.Tensor:
    """`A_log [H]` with `lambda_h = exp(-exp(A_log_h)) = 1 - 2^-e_h`, `e_h` evenly spaced over [5, 12].

    RetNet's multi-scale decay range: the first head forgets within ~32 tokens, the last keeps ~4k tokens.
    """
    exponents = torch.linspace(5.0, 12.0, num_heads) if num_heads > 1 else torch.tensor([5.0])
    log_lambda = torch.log1p(-(2.0 ** -exponents))  # log(lambda) < 0
    return torch.log(-log_lambda)


def default_scan_decay_log(inner_size: int, state_size: int) -> torch.Tensor:
    """Mamba's `A_log [D, N] = log(1, 2, ..., N)` for every channel (S4D-real): state n decays n times faster."""
    A = torch.arange(1, state_size + 1, dtype=torch.float32).expand(inner_size, -1)
    return torch.log(A)


# --------------------------------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class HeadDecay:
    """Low-pass half of the attention / retention filter: one decay per head, `A_log [H]`, a step of 1 per token."""

    num_heads: int

    def initial_log(self) -> torch.Tensor:
        return default_head_decay_log(self.num_heads)


@dataclass(frozen=True)
class ScanDecay:
    """Low-pass half of the Mamba filter: the scan's state matrix, `A_log [D, N]`; the step is the scan's `delta`."""

    inner_size: int
    state_size: int

    def initial_log(self) -> torch.Tensor:
        return default_scan_decay_log(self.inner_size, self.state_size)


@dataclass(frozen=True)
class PerElementRotary:
    """Mamba's rotary layout: `freq [N]`, angles `theta[n, k] = (n / s) * freq[k]`, `[L, N]`.

    Element k uses `freq[k]`, so the two elements `2i`, `2i+1` of a pair turn by different angles. The released
    weights were trained with this indexing; it is reproduced exactly.
    """

    size: int

    def initial_frequencies(self) -> torch.Tensor:
        return default_rope_frequencies(self.size)

    def angles(self, freq: torch.Tensor, length: int, scale_factor: float, offset: int = 0) -> torch.Tensor:
        return rope_angles(length, freq, scale_factor, offset)


@dataclass(frozen=True)
class PairSharedRotary:
    """The heads' rotary layout: `freq [H, d/2]`, both elements of pair i of head h use `freq[h, i]`; angles
    `[H, L, d]`, a true rotation of each pair."""

    num_heads: int
    head_dim: int

    def initial_frequencies(self) -> torch.Tensor:
        return default_head_rope_frequencies(self.num_heads, self.head_dim)

    def angles(self, freq: torch.Tensor, length: int, scale_factor: float, offset: int = 0) -> torch.Tensor:
        per_element = freq.repeat_interleave(2, dim=-1).flatten()  # one angle per element, pairs equal
        theta = rope_angles(length, per_element, scale_factor, offset)  # [L, H * d]
        return theta.view(length, self.num_heads, self.head_dim).transpose(0, 1)


DecaySpec = Union[HeadDecay, ScanDecay]
RotaryLayout = Union[PerElementRotary, PairSharedRotary]


# --------------------------------------------------------------------------------------------------- the filter


def register_filter_tensor(owner: nn.Module, name: str, mode: str, value: torch.Tensor) -> None:
    """Put a filter tensor on `owner`: a parameter (`"learnable"`), a buffer (`"fixed"`) or `None` (`"none"`)."""
    # The initial values are computed in fp32 whatever the default dtype; stored in the default dtype like every
    # other parameter, so that `from_pretrained(dtype=torch.bfloat16)` (which builds under that default) gives the
    # same all-bf16 model as `.to(torch.bfloat16)` rather than one with fp32 filters.
    value = value.to(torch.get_default_dtype())
    if mode == "learnable":
        setattr(owner, name, nn.Parameter(value))
    elif mode == "fixed":
        owner.register_buffer(name, value)
    elif mode == "none":
        setattr(owner, name, None)
    else:
        raise ValueError(f"filter mode {mode!r} for {name} must be one of {FILTER_MODES}")


def validate_filter_modes(config) -> None:
    """Raise a `ValueError` naming `rope_mode` or `decay_mode` when it is not a filter mode."""
    if config.rope_mode not in ROPE_MODES:
        raise ValueError(f"DefocusVisionConfig: rope_mode={config.rope_mode!r} must be 'learnable' or 'fixed'")
    if config.decay_mode not in FILTER_MODES:
        raise ValueError(f"DefocusVisionConfig: decay_mode={config.decay_mode!r} must be one of {FILTER_MODES}")


class BandpassFilter:
    """Mixin for the `nn.Module` that owns a filter: its `A_log` (decay) and `freq` (rotation) and their use.

    The owner calls both `register_decay` and `register_rotary` in `__init__` (in the order its state dict lists the
    tensors; `A_log` / `freq` are then a parameter, a buffer or `None`) and keeps its configuration in `self.config`,
    from which `rope_scale_factor` is read at run time.
    """

    decay_spec: Optional[DecaySpec] = None
    rotary_layout: Optional[RotaryLayout] = None

    def register_decay(self, spec: DecaySpec, mode: str) -> None:
        self.decay_spec = spec
        register_filter_tensor(self, "A_log", mode, spec.initial_log())

    def register_rotary(self, layout: RotaryLayout, mode: str) -> None:
        self.rotary_layout = layout
        register_filter_tensor(self, "freq", mode, layout.initial_frequencies())

    @property
    def rope_scale_factor(self) -> float:
        """Positions are divided by it (the release's extrapolation to more tokens; docs/method.md §2.5)."""
        return self.config.rope_scale_factor

    def reset_filter(self) -> None:
        """Set the filter's tensors back to their initial values."""
        if self.A_log is not None:
            init.copy_(self.A_log, self.decay_spec.initial_log())
        if self.freq is not None:
            init.copy_(self.freq, self.rotary_layout.initial_frequencies())

    def log_decay(self) -> Optional[torch.Tensor]:
        """`A = -exp(A_log) < 0` in fp32 (`[H]` per head, Mamba's `[D, N]`); `None` without decay."""
        return None if self.A_log is None else -torch.exp(self.A_log.float())

    def rotary_angles(self, length: int, offset: int = 0) -> Optional[torch.Tensor]:
        """The angles of positions `offset .. offset + length - 1` in the owner's layout (`[L, N]` or `[H, L, d]`),
        fp32; `None` without rotation."""
        if self.freq is None:
            return None
        return self.rotary_layout.angles(self.freq, length, self.rope_scale_factor, offset)

    def rotate(self, *xs: torch.Tensor, offset: int = 0) -> Union[torch.Tensor, tuple[torch.Tensor, ...]]:
        """Rotate each `x` at its absolute positions `offset + l` (`l` along the second-to-last dim); the identity
        without rotation.

        `x`: `[..., L, N]` for Mamba's `B` / `C`, `[B, H, L, d]` for queries and keys. One tensor gives a tensor,
        several (of one length) a tuple, with the angles computed once for all of them.
        """
        theta = self.rotary_angles(xs[0].shape[-2], offset)
        out = xs if theta is None else tuple(apply_rotary(x, theta) for x in xs)
        return out[0] if len(xs) == 1 else out


class DefocusHeadFilter(BandpassFilter, nn.Module):
    """The filter of the attention / retention mixers (docs/method.md §2.6-2.7), one decay and one set of rotary
    frequencies per head.

    Low-pass: `lambda_h = exp(A_h)`, `A_h = -exp(A_log_h) < 0` ("delta is set to 1"). High-pass: queries and keys
    rotated at their absolute positions `n` by `theta[h, n, 2i] = theta[h, n, 2i+1] = (n / rope_scale_factor) *
    freq[h, i]`, so that `q_i . k_j` sees the relative rotation `theta (i - j)`.

    `decay_mode`: `"learnable"`, `"fixed"` or `"none"`; `rope_mode`: `"learnable"` or `"fixed"`, and `"none"` when
    `use_rope=False`.
    """

    def __init__(self, config, num_heads: int, head_dim: int) -> None:
        super().__init__()
        self.config = config
        self.num_heads, self.head_dim = num_heads, head_dim
        self.decay_mode = config.decay_mode
        self.rope_mode = config.rope_mode if config.use_rope else "none"
        self.register_decay(HeadDecay(num_heads), self.decay_mode)
        self.register_rotary(PairSharedRotary(num_heads, head_dim), self.rope_mode)

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


__all__ = [
    "FILTER_MODES",
    "ROPE_MODES",
    "BandpassFilter",
    "DefocusHeadFilter",
    "HeadDecay",
    "PairSharedRotary",
    "PerElementRotary",
    "ScanDecay",
    "apply_rotary",
    "default_head_decay_log",
    "default_head_rope_frequencies",
    "default_rope_frequencies",
    "default_scan_decay_log",
    "register_filter_tensor",
    "rope_angles",
    "rotate_every_two",
    "validate_filter_modes",
]
