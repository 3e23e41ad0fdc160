"""De-focus ViT mixer: softmax attention with a per-head learnable bandpass filter (SPEC §2.3).

The logits are `q_i . R(theta (i - j)) k_j / sqrt(d) + (i - j) * A_h`: rotating queries and keys at their absolute
positions gives the relative rotation (the high-pass part), and the per-head decay enters as an additive bias (the
low-pass part). `causal=False`, `use_rope=False`, `decay_mode="none"` is a plain DeiT-style attention layer.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..filters import DefocusHeadFilter


class DefocusAttentionMixer(nn.Module):
    """Multi-head softmax attention with the De-focus filter; `[B, L, hidden] -> [B, L, hidden]`.

    The block adds a GELU MLP after it when `config.mlp_ratio > 0` (`has_feed_forward`).
    """

    has_feed_forward = True

    def __init__(self, config, layer_idx: int = 0) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // self.num_heads
        self.causal = config.causal
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=True)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size, bias=True)
        self.filter = DefocusHeadFilter(config, self.num_heads, self.head_dim)

    def queries_keys_values(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rotated queries and keys and the values, each `[B, H, L, d]`."""
        batch, length, _ = hidden_states.shape
        qkv = self.qkv(hidden_states).view(batch, length, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        return self.filter.rotate(q), self.filter.rotate(k), v

    def attention_bias(self, length: int, device: torch.device, dtype: torch.dtype) -> Optional[torch.Tensor]:
        """The additive logit bias `[H, L, L]`: `(i - j) * A_h`, and `-inf` above the diagonal when causal.

        `None` when there is neither decay nor a causal mask; a causal model without decay gets the causal mask
        alone (`forward` then uses SDPA's `is_causal` fast path instead).
        """
        bias = self.filter.relative_log_decay(length, causal=self.causal)
        if self.causal:
            future = torch.ones(length, length, dtype=torch.bool, device=device).triu(1)
            if bias is None:
                bias = torch.zeros(1, length, length, device=device)
            bias = bias.masked_fill(future, float("-inf"))
        return None if bias is None else bias.to(dtype)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, length, hidden = hidden_states.shape
        q, k, v = self.queries_keys_values(hidden_states)
        if self.filter.A_log is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.attention_bias(length, q.device, q.dtype))
        return self.proj(out.transpose(1, 2).reshape(batch, length, hidden))

    @torch.no_grad()
    def attention_map(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The attention weights `[B, H, L, L]` (rows sum to 1): softmax of the logits with the decay bias and the
        causal mask. `hidden_states` is the mixer's input, i.e. the block's normed residual stream."""
        length = hidden_states.shape[1]
        q, k, _ = self.queries_keys_values(hidden_states)
        logits = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(self.head_dim)
        bias = self.attention_bias(length, q.device, torch.float32)
        if bias is not None:
            logits = logits + bias
        return logits.softmax(dim=-1)
