"""De-focus Mamba mixer: Mamba's selective scan with a learnable bandpass filter (SPEC §2.2).

The low-pass half of the filter is the learnable decay `exp(delta * A)` of the scan; the high-pass half is a
learnable rotation of `B` and `C` by `theta[n, k] = n * freq[k]`, which makes the implicit attention
`C_i . prod(decay) . B_j` depend on the relative position `i - j` with a per-state frequency.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init

from ...ops import causal_conv1d_silu, selective_scan
from ..filters import apply_rotary, rope_angles


def default_rope_frequencies(state_size: int) -> torch.Tensor:
    """`freq[k] = (100^(-(k+1)/N) - 0.01) / 0.99`: from ~0.75 down to 0 over the N states."""
    k = torch.arange(1, state_size + 1, dtype=torch.float32)
    return (100.0 ** (-k / state_size) - 0.01) / 0.99


class DefocusMambaMixer(nn.Module):
    """Selective-scan token mixer with the De-focus filter; `[B, L, hidden] -> [B, L, hidden]`."""

    def __init__(self, config, layer_idx: int = 0) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        hidden, inner = config.hidden_size, config.intermediate_size
        self.intermediate_size = inner
        self.state_size = config.state_size
        self.time_step_rank = config.time_step_rank
        self.group_norm_size = config.group_norm_size

        self.in_proj = nn.Linear(hidden, 2 * inner, bias=False)
        self.conv1d = nn.Conv1d(inner, inner, kernel_size=config.conv_kernel, groups=inner, bias=True)
        self.x_proj = nn.Linear(inner, self.time_step_rank + 2 * self.state_size, bias=False)
        self.dt_proj = nn.Linear(self.time_step_rank, inner, bias=True)
        self.A_log = nn.Parameter(torch.empty(inner, self.state_size))
        self.D = nn.Parameter(torch.empty(inner))
        self.out_proj = nn.Linear(inner, hidden, bias=False)
        if config.use_rope:
            if config.rope_mode == "learnable":
                self.freq = nn.Parameter(default_rope_frequencies(self.state_size))
            else:
                self.register_buffer("freq", default_rope_frequencies(self.state_size))
        else:
            self.freq = None

    def _init_mixer_weights(self) -> None:
        """The release's initialisation of the scan parameters (Linear weights are handled model-wide)."""
        inner, cfg = self.intermediate_size, self.config
        bound = self.time_step_rank**-0.5 * cfg.time_step_scale
        init.uniform_(self.dt_proj.weight, -bound, bound)
        dt = torch.exp(torch.linspace(math.log(cfg.time_step_min), math.log(cfg.time_step_max), inner))
        dt = dt.clamp(min=cfg.time_step_floor)
        init.copy_(self.dt_proj.bias, dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        A = torch.arange(1, self.state_size + 1, dtype=torch.float32).expand(inner, -1)
        init.copy_(self.A_log, torch.log(A))
        init.ones_(self.D)
        if self.freq is not None:
            init.copy_(self.freq, default_rope_frequencies(self.state_size))

    def ssm_inputs(self, hidden_states: torch.Tensor):
        """Everything the scan consumes, `(x, z, delta, A, B, C)`; shared by `forward` and the diagnostics.

        Shapes: x, z, delta `[B, D, L]`; A `[D, N]`; B, C `[B, N, L]`.
        """
        length = hidden_states.shape[1]
        x, z = self.in_proj(hidden_states).transpose(1, 2).chunk(2, dim=1)  # [B, D, L] each
        x = causal_conv1d_silu(x, self.conv1d.weight, self.conv1d.bias)
        dt, B, C = torch.split(self.x_proj(x.transpose(1, 2)),
                               [self.time_step_rank, self.state_size, self.state_size], dim=-1)  # [B, L, .]
        if self.freq is not None:
            theta = rope_angles(length, self.freq, self.config.rope_scale_factor)  # [L, N]
            B, C = apply_rotary(B, theta), apply_rotary(C, theta)
        delta = self.dt_proj.weight @ dt.transpose(1, 2)  # [B, D, L]
        delta = F.softplus(delta + self.dt_proj.bias.float()[None, :, None]).to(delta.dtype)
        delta = delta / self.config.delta_scale_factor
        A = -torch.exp(self.A_log.float())
        return x, z, delta, A, B.transpose(1, 2), C.transpose(1, 2)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x, z, delta, A, B, C = self.ssm_inputs(hidden_states)
        y = selective_scan(x, delta, A, B, C)  # [B, D, L]
        return self.out_proj(self.gate(y, x, z).transpose(1, 2))

    def gate(self, y: torch.Tensor, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Group RMS norm of the scan output, the `D` skip and the SiLU gate, in fp32; `[B, D, L]`."""
        out_dtype = y.dtype
        y = y.float()
        if self.group_norm_size > 0:
            batch, dim, length = y.shape
            y = y.view(batch, dim // self.group_norm_size, self.group_norm_size, length)
            y = (y * torch.rsqrt(y.pow(2).mean(2, keepdim=True) + 1e-6)).view(batch, dim, length)
        y = y + x.float() * self.D.float()[None, :, None]
        return (y * F.silu(z.float())).to(out_dtype)
