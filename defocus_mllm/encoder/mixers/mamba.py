"""De-focus Mamba mixer: Mamba's selective scan with a learnable bandpass filter (docs/method.md §2.3).

The filter is fused into the scan (docs/method.md §3.2). Its low-pass half is the scan's own decay
`exp(delta_t * A)`, `A = -exp(A_log) [D, N]`, with the data-dependent step `delta_t`; its high-pass half rotates `B`
and `C` by `theta[n, k] = (n / rope_scale_factor) * freq[k]`, which makes the implicit attention
`C_i . prod(decay) . B_j` depend on the relative position `i - j` with a per-state frequency. The mixer owns both
tensors itself (`BandpassFilter` with `ScanDecay` and `PerElementRotary`): the released checkpoints call them
`mixer.A_log` and `mixer.freq`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init

from ...ops import causal_conv1d_silu
from ...ops.mamba_mixer import mamba_mixer_core, rotate_state_projections, time_step
from ..filters import BandpassFilter, PerElementRotary, ScanDecay
from .base import TokenMixer, refuse_unless

# Elements of one `[B, d, L, L]` slice of the implicit attention computed at a time (16 MiB in fp32): the peak, a few
# such slices, stays below one layer's `[B, D, L, L]` at the released sizes (238 MiB for Base at 224px).
_ATTENTION_CHUNK_ELEMENTS = 1 << 22


def mamba_attention_kernel(delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """The selective scan written as an attention matrix per channel: `alpha [B, D, L, L]` with
    `y_i[d] = sum_{j <= i} alpha[d, i, j] x_j[d]` (the scan without the `D` skip term).

    `alpha[d, i, j] = sum_n C_i[n] exp(sum_{t=j+1..i} delta_t[d] A[d, n]) delta_j[d] B_j[n]` for `j <= i`, 0 above the
    diagonal. Inputs as for `selective_scan`: `delta [B, D, L]`, `A [D, N]`, `B, C [B, N, L]`. The output is fp32
    (fp64 for fp64 inputs); memory is a few `[B, D, L, L]` tensors, so callers pass a slice of the channels.
    """
    out_dtype = torch.float64 if delta.dtype == torch.float64 else torch.float32
    length = delta.shape[-1]
    # cumulative log-decay in fp64: the difference of two long sums must keep its small values exact
    log_decay = torch.cumsum(delta.double()[:, :, None, :] * A.double()[None, :, :, None], dim=-1)  # [B, D, N, L]
    future = torch.ones(length, length, dtype=torch.bool, device=delta.device).triu(1)
    B_in = (delta.to(out_dtype)[:, :, None, :] * B.to(out_dtype)[:, None, :, :])  # delta_j B_j: [B, D, N, L]
    C = C.to(out_dtype)
    alpha = delta.new_zeros(delta.shape + (length,), dtype=out_dtype)  # [B, D, L, L]
    # one state at a time keeps the peak at a few [B, D, L, L] instead of [B, D, N, L, L]
    for n in range(A.shape[1]):
        seg = log_decay[:, :, n, :, None] - log_decay[:, :, n, None, :]  # sum_{t=j+1..i}: [B, D, L(i), L(j)]
        # masked before exp: above the diagonal the "decay" would be a growing exponential
        decay = seg.masked_fill_(future, float("-inf")).exp_().to(out_dtype)
        del seg
        alpha += decay.mul_(C[:, None, n, :, None]).mul_(B_in[:, :, n, None, :])
        del decay
    return alpha


@dataclass
class MambaStreamState:
    """What a De-focus Mamba layer carries from one chunk of a stream to the next; its size is fixed by the
    configuration, whatever the number of tokens seen.

    conv_window: `[B, K - 1, D]`, the last `conv_kernel - 1` inputs of the causal conv (zeros at the start, which is
        the conv's own zero padding), in the activations' dtype.
    scan_state: `[B, D, N]` fp32, the selective scan's state after the last token.
    """

    conv_window: torch.Tensor
    scan_state: torch.Tensor


class DefocusMambaMixer(BandpassFilter, TokenMixer):
    """Selective-scan token mixer with the De-focus filter; `[B, L, hidden] -> [B, L, hidden]`."""

    @classmethod
    def validate_config(cls, config) -> None:
        super().validate_config(config)
        group = config.group_norm_size
        refuse_unless(group <= 0 or config.intermediate_size % group == 0,
                      f"intermediate_size={config.intermediate_size} is not a multiple of group_norm_size={group}")
        refuse_unless(not config.use_rope or config.state_size % 2 == 0,
                      f"state_size={config.state_size} must be even for the rotary filter")

    def __init__(self, config, layer_idx: int = 0) -> None:
        super().__init__(config, layer_idx)
        self.config = config
        hidden, inner = config.hidden_size, config.intermediate_size
        self.intermediate_size = inner
        self.state_size = config.state_size
        self.time_step_rank = config.time_step_rank
        self.group_norm_size = config.group_norm_size

        self.in_proj = nn.Linear(hidden, 2 * inner, bias=False)
        self.conv1d = nn.Conv1d(inner, inner, kernel_size=config.conv_kernel, groups=inner, bias=True)
        self.x_proj = nn.Linear(inner, self.time_step_rank + 2 * self.state_size, bias=False)
        self.dt_proj = nn.Linear(self.time_step_rank, inner, bias=True)
        # the scan's decay is always learnable (`decay_mode` concerns the attention / retention filters)
        self.register_decay(ScanDecay(inner, self.state_size), "learnable")
        self.D = nn.Parameter(torch.empty(inner))
        self.out_proj = nn.Linear(inner, hidden, bias=False)
        self.register_rotary(PerElementRotary(self.state_size), config.rope_mode if config.use_rope else "none")

    def init_weights(self) -> None:
        """The release's initialisation of the scan parameters (Linear weights are handled model-wide)."""
        inner, cfg = self.intermediate_size, self.config
        bound = self.time_step_rank**-0.5 * cfg.time_step_scale
        init.uniform_(self.dt_proj.weight, -bound, bound)
        dt = torch.exp(torch.linspace(math.log(cfg.time_step_min), math.log(cfg.time_step_max), inner))
        dt = dt.clamp(min=cfg.time_step_floor)
        init.copy_(self.dt_proj.bias, dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        init.ones_(self.D)
        self.reset_filter()

    def projections(self, hidden_states: torch.Tensor):
        """The matmul and conv half of the mixer: `(x, z, dt, B, C)`, channels-last `[B, L, .]` views.

        x is the conv + SiLU output, dt is `dt_proj`'s input `[B, L, R]` (`mamba_mixer_core` applies `dt_proj`'s
        weight given `dt_proj_weight`; the bias is its `dt_bias`), B and C are not yet rotated.
        """
        x, z = self.in_proj(hidden_states).chunk(2, dim=-1)  # [B, L, D] each
        x = causal_conv1d_silu(x.transpose(1, 2), self.conv1d.weight, self.conv1d.bias).transpose(1, 2)
        dt, B, C = torch.split(self.x_proj(x), [self.time_step_rank, self.state_size, self.state_size],
                               dim=-1)  # [B, L, .]
        return x, z, dt, B, C

    def ssm_inputs(self, hidden_states: torch.Tensor):
        """Everything the scan consumes, `(x, z, delta, A, B, C)`, for `attention_map` and diagnostics.

        Shapes: x, z, delta `[B, D, L]`; A `[D, N]`; B, C `[B, N, L]` (rotated by the filter), transposed views of
        channels-last `[B, L, .]` memory.
        """
        x, z, dt, B, C = self.projections(hidden_states)
        B, C = rotate_state_projections(B, C, self.freq, self.rope_scale_factor)  # the high-pass half
        delta = time_step(F.linear(dt, self.dt_proj.weight), self.dt_proj.bias, self.config.delta_scale_factor)
        A = self.log_decay()  # the low-pass half: the scan decays by exp(delta_t * A)
        return (x.transpose(1, 2), z.transpose(1, 2), delta.transpose(1, 2), A, B.transpose(1, 2),
                C.transpose(1, 2))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x, z, dt, B, C = self.projections(hidden_states)
        cfg = self.config
        # dt_proj, the delta bias and softplus, the rotation, the scan, the norm, the D skip and the gate: one op
        y = mamba_mixer_core(x, z, dt, self.dt_proj.bias, self.log_decay(), B, C, self.D, self.freq,
                             delta_scale_factor=cfg.delta_scale_factor, rope_scale_factor=self.rope_scale_factor,
                             group_norm_size=self.group_norm_size, dt_proj_weight=self.dt_proj.weight)  # [B, L, D]
        return self.out_proj(y)

    def forward_stream(self, hidden_states: torch.Tensor, state: Optional[MambaStreamState], position_offset: int
                       ) -> tuple[torch.Tensor, MambaStreamState]:
        """`forward` for the next tokens of a stream: the conv sees the carried window before the chunk, the
        rotation turns `B` and `C` at their absolute positions and the scan starts from the carried state."""
        x, z = self.in_proj(hidden_states).chunk(2, dim=-1)  # [B, l, D] each
        batch, _, inner = x.shape
        window = self.conv1d.kernel_size[0] - 1
        previous = (x.new_zeros(batch, window, inner) if state is None else state.conv_window.to(x.dtype))
        extended = torch.cat([previous, x], dim=1)  # [B, K - 1 + l, D]
        # the extra outputs at the front are those of the previous chunk's last inputs: dropped
        x = causal_conv1d_silu(extended.transpose(1, 2), self.conv1d.weight, self.conv1d.bias).transpose(1, 2)
        x = x[:, window:]
        dt, B, C = torch.split(self.x_proj(x), [self.time_step_rank, self.state_size, self.state_size], dim=-1)
        cfg = self.config
        y, scan_state = mamba_mixer_core(
            x, z, dt, self.dt_proj.bias, self.log_decay(), B, C, self.D, self.freq,
            delta_scale_factor=cfg.delta_scale_factor, rope_scale_factor=self.rope_scale_factor,
            group_norm_size=self.group_norm_size, position_offset=position_offset,
            initial_state=None if state is None else state.scan_state, return_final_state=True,
            dt_proj_weight=self.dt_proj.weight)
        # a copy: a slice would keep the whole `extended` buffer alive for as long as the state lives
        new_window = extended[:, extended.shape[1] - window:].clone()
        return self.out_proj(y), MambaStreamState(conv_window=new_window, scan_state=scan_state)

    @torch.no_grad()
    def attention_map(self, hidden_states: torch.Tensor, channel_chunk: Optional[int] = None) -> torch.Tensor:
        """The scan's implicit attention `|alpha|` averaged over the `D` channels, as one head: `[B, 1, L, L]` fp32,
        not row-normalised (docs/method.md §5.1). `hidden_states` is the mixer's input (the block's normed
        residual stream).

        The channels are processed `channel_chunk` at a time (default: as many as fit 2^22 elements of
        `[B, d, L, L]`), so the full `[B, D, L, L]` never exists.
        """
        _, _, delta, A, B, C = self.ssm_inputs(hidden_states)
        batch, dim, length = delta.shape
        if channel_chunk is None:
            channel_chunk = max(1, _ATTENTION_CHUNK_ELEMENTS // (batch * length * length))
        if channel_chunk < 1:
            raise ValueError(f"channel_chunk={channel_chunk} must be positive")
        total = torch.zeros(batch, length, length, dtype=torch.float32, device=delta.device)
        for start in range(0, dim, channel_chunk):
            end = start + channel_chunk
            total += mamba_attention_kernel(delta[:, start:end], A[start:end], B, C).abs().sum(1).float()
        return (total / dim)[:, None]


__all__ = ["DefocusMambaMixer", "MambaStreamState", "mamba_attention_kernel"]
