"""De-focus RetNet mixer: multi-scale retention with a learnable per-head bandpass filter (docs/method.md §2.7).

`o_i = sum_{j <= i} lambda_h^(i-j) (q_i R(theta i)) . (k_j R(theta j)) v_j`, then a per-head group norm and a swish
gate as in RetNet. RetNet fixes `lambda_h` and `theta`; here both are learnable (`decay_mode` / `rope_mode`).

Three forms compute the same operator: the parallel form `[B, H, L, L]` (training, `forward`), the recurrent form
with a `[B, H, d_k, d_v]` state (`recurrent_forward`), and the chunkwise form (`chunkwise_forward`), which is parallel
inside a chunk and recurrent across chunks. The per-row rescalings of RetNet's reference code are left out: the group
norm divides them out again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..filters import DefocusHeadFilter
from .base import TokenMixer, refuse_unless, validate_heads


def group_rms_norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Weightless RMS normalisation over the last dim (one group = one head), in fp32, cast back."""
    y = x.float()
    return (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@dataclass
class RetentionStreamState:
    """What a De-focus RetNet layer carries between chunks: `state [B, H, d_k, d_v]` fp32,
    `sum_{j < n} lambda_h^(n-1-j) k_j^T v_j` over the `n` tokens seen (rotated, scaled keys); fixed size."""

    state: torch.Tensor


class DefocusRetentionMixer(TokenMixer):
    """Multi-scale retention with the De-focus filter; `[B, L, hidden] -> [B, L, hidden]`.

    Queries and keys have `hidden / heads` channels per head, values and the gate `intermediate_size / heads`
    (RetNet uses twice the hidden width). The block adds a GELU MLP after it when `config.mlp_ratio > 0`.
    """

    has_feed_forward = True

    @classmethod
    def validate_config(cls, config) -> None:
        super().validate_config(config)
        validate_heads(config)
        heads = config.num_attention_heads
        refuse_unless(config.intermediate_size % heads == 0,
                      f"intermediate_size={config.intermediate_size} (the retention value width) is not a multiple "
                      f"of num_attention_heads={heads}")

    def __init__(self, config, layer_idx: int = 0) -> None:
        super().__init__(config, layer_idx)
        self.num_heads = config.num_attention_heads
        self.key_dim = config.hidden_size // self.num_heads
        self.value_dim = config.intermediate_size // self.num_heads
        self.scaling = self.key_dim**-0.5
        hidden, value = config.hidden_size, config.intermediate_size
        self.q_proj = nn.Linear(hidden, hidden, bias=False)
        self.k_proj = nn.Linear(hidden, hidden, bias=False)
        self.v_proj = nn.Linear(hidden, value, bias=False)
        self.g_proj = nn.Linear(hidden, value, bias=False)
        self.out_proj = nn.Linear(value, hidden, bias=False)
        self.filter = DefocusHeadFilter(config, self.num_heads, self.key_dim)

    def init_weights(self) -> None:
        self.filter.reset_filter()

    def queries_keys_values(self, hidden_states: torch.Tensor, position_offset: int = 0
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rotated queries, rotated and `1/sqrt(d_k)`-scaled keys `[B, H, L, d_k]`, values `[B, H, L, d_v]`; the
        tokens sit at positions `position_offset ..` (a stream's later chunk)."""
        batch, length, _ = hidden_states.shape

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, length, self.num_heads, -1).transpose(1, 2)

        q = self.filter.rotate(heads(self.q_proj(hidden_states)), offset=position_offset)
        k = self.filter.rotate(heads(self.k_proj(hidden_states)), offset=position_offset) * self.scaling
        return q, k, heads(self.v_proj(hidden_states))

    def decay_mask(self, length: int, device: torch.device) -> torch.Tensor:
        """`D[h, i, j] = lambda_h^(i-j)` for `j <= i`, 0 above the diagonal; `[H, L, L]` fp32."""
        log_decay = self.filter.relative_log_decay(length)
        if log_decay is None:
            return torch.ones(1, length, length, device=device).tril()
        return torch.exp(log_decay).tril()

    def _head_log_decay(self, device: torch.device) -> torch.Tensor:
        log_decay = self.filter.log_decay()
        return torch.zeros(self.num_heads, device=device) if log_decay is None else log_decay

    def _output(self, retained: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        """Group norm per head, swish gate, output projection; `retained` is `[B, H, L, d_v]`."""
        batch, _, length, _ = retained.shape
        retained = group_rms_norm(retained).transpose(1, 2).reshape(batch, length, -1)
        gate = F.silu(self.g_proj(hidden_states))
        return self.out_proj(gate * retained.to(gate.dtype))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The parallel form."""
        q, k, v = self.queries_keys_values(hidden_states)
        scores = (q @ k.transpose(-1, -2)) * self.decay_mask(q.shape[2], q.device).to(q.dtype)
        return self._output(scores @ v, hidden_states)

    def recurrent_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The recurrent form, one token at a time: `S_n = lambda S_{n-1} + k_n^T v_n`, `o_n = q_n S_n` (fp32 state)."""
        q, k, v = (t.float() for t in self.queries_keys_values(hidden_states))
        decay = torch.exp(self._head_log_decay(q.device))[:, None, None]  # [H, 1, 1]
        state = q.new_zeros(q.shape[0], self.num_heads, self.key_dim, self.value_dim)
        outputs = []
        for n in range(q.shape[2]):
            state = decay * state + k[:, :, n, :, None] * v[:, :, n, None, :]
            outputs.append(q[:, :, n, None, :] @ state)
        return self._output(torch.cat(outputs, dim=2).to(hidden_states.dtype), hidden_states)

    def chunkwise_forward(self, hidden_states: torch.Tensor, chunk_size: int = 64) -> torch.Tensor:
        """The chunkwise form: parallel inside chunks of `chunk_size` tokens, a recurrent state across them.

        Memory is `O(L * chunk_size)` instead of `O(L^2)`.
        """
        if chunk_size < 1:
            raise ValueError(f"chunk_size={chunk_size} must be positive")
        q, k, v = (t.float() for t in self.queries_keys_values(hidden_states))
        log_decay = self._head_log_decay(q.device)[:, None, None]  # [H, 1, 1]
        state = q.new_zeros(q.shape[0], self.num_heads, self.key_dim, self.value_dim)
        outputs = []
        for start in range(0, q.shape[2], chunk_size):
            qc, kc, vc = (t[:, :, start:start + chunk_size] for t in (q, k, v))
            size = qc.shape[2]
            pos = torch.arange(size, device=q.device, dtype=torch.float32)[:, None]  # [c, 1]
            inner = ((qc @ kc.transpose(-1, -2)) * self.decay_mask(size, q.device)) @ vc
            # the state holds sum_{j < start} lambda^(start-1-j) k_j^T v_j; query start+i is i+1 steps further
            cross = (qc * torch.exp((pos + 1) * log_decay)) @ state
            outputs.append(inner + cross)
            decayed_keys = kc * torch.exp((size - 1 - pos) * log_decay)
            state = torch.exp(size * log_decay) * state + decayed_keys.transpose(-1, -2) @ vc
        return self._output(torch.cat(outputs, dim=2).to(hidden_states.dtype), hidden_states)

    def forward_stream(self, hidden_states: torch.Tensor, state: Optional[RetentionStreamState], position_offset: int
                       ) -> tuple[torch.Tensor, RetentionStreamState]:
        """One step of the chunkwise form for the next tokens of a stream: parallel inside the chunk, the carried
        state for everything before it (the decay depends only on distances, so only the rotation needs the
        absolute positions)."""
        q, k, v = (t.float() for t in self.queries_keys_values(hidden_states, position_offset))
        log_decay = self._head_log_decay(q.device)[:, None, None]  # [H, 1, 1]
        size = q.shape[2]
        pos = torch.arange(size, device=q.device, dtype=torch.float32)[:, None]  # [l, 1]
        out = ((q @ k.transpose(-1, -2)) * self.decay_mask(size, q.device)) @ v
        if state is not None:
            # query i of the chunk is i + 1 steps after the state's last token
            out = out + (q * torch.exp((pos + 1) * log_decay)) @ state.state
        new_state = (k * torch.exp((size - 1 - pos) * log_decay)).transpose(-1, -2) @ v
        if state is not None:
            new_state = new_state + torch.exp(size * log_decay) * state.state
        return self._output(out.to(hidden_states.dtype), hidden_states), RetentionStreamState(state=new_state)

    @torch.no_grad()
    def attention_map(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The retention's implicit attention `|lambda_h^(i-j) q_i . k_j|` (rotated, scaled), `[B, H, L, L]`, not
        row-normalised. `hidden_states` is the mixer's input, i.e. the block's normed residual stream."""
        q, k, _ = self.queries_keys_values(hidden_states)
        scores = q.float() @ k.float().transpose(-1, -2)
        return (scores * self.decay_mask(q.shape[2], q.device)).abs()

