"""De-focus ViT mixer: softmax attention with a per-head learnable bandpass filter (docs/method.md §2.6).

The logits are `q_i . R(theta (i - j)) k_j / sqrt(d) + (i - j) * A_h`: rotating queries and keys at their absolute
positions gives the relative rotation (the high-pass part), and the per-head decay enters as an additive bias (the
low-pass part). `causal=False`, `use_rope=False`, `decay_mode="none"` is a plain DeiT-style attention layer.

Three implementations give the same numbers (docs/method.md §3.4): `scaled_dot_product_attention` with the decay and
the causal mask as a dense `[H, L, L]` additive bias, FlexAttention with the decay as a `score_mod` and causality as
a block mask (no `[H, L, L]` tensor, fully masked blocks skipped), and `ops.decay_attention`, SDPA one tile of queries
at a time with the bias built per tile (no `[H, L, L]` tensor, forward or backward). `attention_backend` picks one.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ...ops.decay_attention import decay_attention
from ..filters import DefocusHeadFilter
from .base import TokenMixer, validate_heads

# How softmax attention is computed (`DefocusVisionConfig.attention_backend`; `uses_flex`, `uses_chunked`)
ATTENTION_BACKENDS = ("auto", "sdpa", "chunked", "flex", "flex_eager")

try:  # torch >= 2.5
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError:  # pragma: no cover - old torch: the SDPA path only
    BlockMask = create_block_mask = flex_attention = None

FLEX_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def flex_attention_available() -> bool:
    """Whether this torch has FlexAttention (2.5 or later)."""
    return flex_attention is not None


def _causal_mask_mod(batch, head, q_idx, kv_idx):
    return q_idx >= kv_idx


@functools.lru_cache(maxsize=32)
def causal_block_mask(length: int, device: torch.device) -> "BlockMask":
    """FlexAttention's block mask of `j <= i` over `length` tokens (cached per length and device)."""
    return create_block_mask(_causal_mask_mod, None, None, length, length, device=device)


def flex_decay_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: Optional[torch.Tensor],
                         block_mask: Optional["BlockMask"], symmetric: bool = False) -> torch.Tensor:
    """`softmax(q k^T / sqrt(d) + distance * A_h) v` with FlexAttention; `q, k, v: [B, H, L, d]`.

    `log_decay`: `A_h [H]` (fp32, < 0) or None for no decay; the distance is `i - j` (masked to `j <= i` by
    `block_mask`), or `|i - j|` when `symmetric`. Gradients reach `log_decay` through the `score_mod`.
    """
    score_mod = None
    if log_decay is not None:
        def score_mod(score, batch, head, q_idx, kv_idx):
            distance = q_idx - kv_idx
            if symmetric:
                distance = torch.abs(distance)
            return score + distance * log_decay[head]
    return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask)


@functools.lru_cache(maxsize=None)
def compiled_flex_decay_attention() -> Callable[..., torch.Tensor]:
    """`flex_decay_attention` under `torch.compile` (the fused kernel; compiled once per shape on first use)."""
    return torch.compile(flex_decay_attention)


def validate_attention_backend(backend: str) -> None:
    """Raise a `ValueError` naming `attention_backend` when it is not one of `ATTENTION_BACKENDS`."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention_backend={backend!r} must be one of {ATTENTION_BACKENDS}")


@dataclass
class AttentionKVCache:
    """What a De-focus ViT layer carries between chunks: the keys and values of every token seen, `[B, H, n, d]`.

    Keys are stored rotated at their absolute positions `0 .. n - 1` (the positions are the cache's index), so a
    later query rotated at its own position sees the relative rotation. Unlike the Mamba and RetNet states the
    cache grows by one key and one value per token, as a transformer's does.
    """

    keys: torch.Tensor
    values: torch.Tensor

    @property
    def length(self) -> int:
        return self.keys.shape[2]


class DefocusAttentionMixer(TokenMixer):
    """Multi-head softmax attention with the De-focus filter; `[B, L, hidden] -> [B, L, hidden]`.

    The block adds a GELU MLP after it when `config.mlp_ratio > 0` (`has_feed_forward`).
    """

    has_feed_forward = True
    supports_non_causal = True

    @classmethod
    def validate_config(cls, config) -> None:
        super().validate_config(config)
        validate_heads(config)
        validate_attention_backend(config.attention_backend)

    def __init__(self, config, layer_idx: int = 0) -> None:
        super().__init__(config, layer_idx)
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // self.num_heads
        self.causal = config.causal
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=True)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size, bias=True)
        self.filter = DefocusHeadFilter(config, self.num_heads, self.head_dim)
        # one of ATTENTION_BACKENDS (see `uses_flex`, `uses_chunked`); a plain attribute, so it can be set per mixer
        self.attention_backend = config.attention_backend

    def init_weights(self) -> None:
        self.filter.reset_filter()

    def uses_flex(self, q: torch.Tensor) -> bool:
        """Whether `forward` takes the FlexAttention path for queries like `q`.

        `"auto"` takes it on CUDA for fp32 / bf16 / fp16 (compiled), and the chunked path elsewhere (`uses_chunked`):
        on CPU the compiled kernel costs a long compilation per sequence length and PyTorch has no FlexAttention
        backward there (docs/kernels.md has the measurements). `"flex"` / `"flex_eager"` always take it (PyTorch then
        raises where it is not supported, e.g. a backward on CPU); `"sdpa"` and `"chunked"` never do.
        """
        backend = self.attention_backend
        if backend == "auto":
            return flex_attention_available() and q.is_cuda and q.dtype in FLEX_DTYPES
        if backend in ("flex", "flex_eager"):
            if not flex_attention_available():
                raise RuntimeError(f"attention_backend={backend!r} needs torch >= 2.5 (FlexAttention)")
            return True
        validate_attention_backend(backend)
        return False

    def uses_chunked(self, q: torch.Tensor) -> bool:
        """Whether `forward` takes `ops.decay_attention` (a decay bias built per tile of queries) for queries like
        `q` when it does not take FlexAttention: `"chunked"`, and `"auto"` off CUDA, where it is faster than the
        dense bias and keeps memory linear in the length (docs/kernels.md)."""
        return self.attention_backend == "chunked" or (self.attention_backend == "auto" and not q.is_cuda)

    def queries_keys_values(self, hidden_states: torch.Tensor, position_offset: int = 0
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rotated queries and keys and the values, each `[B, H, L, d]`, for tokens at positions
        `position_offset ..`."""
        batch, length, _ = hidden_states.shape
        qkv = self.qkv(hidden_states).view(batch, length, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.filter.rotate(q, k, offset=position_offset)  # the angles once for both
        return q, k, v

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

    def flex_forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention of rotated `q, k` and `v` (`[B, H, L, d]`) with FlexAttention: the decay as a `score_mod`,
        causality as a block mask."""
        block_mask = causal_block_mask(q.shape[-2], q.device) if self.causal else None
        attend = flex_decay_attention if self.attention_backend == "flex_eager" else compiled_flex_decay_attention()
        return attend(q, k, v, self.filter.log_decay(), block_mask, symmetric=not self.causal)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, length, hidden = hidden_states.shape
        q, k, v = self.queries_keys_values(hidden_states)
        if self.uses_flex(q):
            out = self.flex_forward(q, k, v)
        elif self.filter.A_log is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        elif self.uses_chunked(q):
            out = decay_attention(q, k, v, self.filter.log_decay(), causal=self.causal)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.attention_bias(length, q.device, q.dtype))
        return self.proj(out.transpose(1, 2).reshape(batch, length, hidden))

    def forward_stream(self, hidden_states: torch.Tensor, state: Optional[AttentionKVCache], position_offset: int
                       ) -> tuple[torch.Tensor, AttentionKVCache]:
        """Attention of the next tokens of a stream over the cached keys and values and their own: where `forward`
        takes the chunked path (`uses_chunked`, the CPU default), `ops.decay_attention` with the chunk's queries at
        their offset, one tile of queries at a time; otherwise SDPA with the decay and the causal mask as a
        `[H, l, n + l]` bias. The FlexAttention path is not used here."""
        if not self.causal:
            raise ValueError("causal=False: a non-causal attention mixer cannot encode a stream in chunks (every "
                             "token attends to later ones); use a causal configuration")
        batch, length, hidden = hidden_states.shape
        q, k, v = self.queries_keys_values(hidden_states, position_offset)
        if state is not None:
            if state.length != position_offset:
                raise ValueError(f"the key/value cache holds {state.length} tokens but the chunk starts at position "
                                 f"{position_offset}")
            k = torch.cat([state.keys, k], dim=2)
            v = torch.cat([state.values, v], dim=2)
        if self.uses_chunked(q):
            out = decay_attention(q, k, v, self.filter.log_decay(), causal=True, query_offset=position_offset)
            out = self.proj(out.transpose(1, 2).reshape(batch, length, hidden))
            return out, AttentionKVCache(keys=k, values=v)
        query_pos = torch.arange(position_offset, position_offset + length, device=q.device, dtype=torch.float32)
        key_pos = torch.arange(k.shape[2], device=q.device, dtype=torch.float32)
        distance = query_pos[:, None] - key_pos[None, :]  # [l, n + l]
        log_decay = self.filter.log_decay()
        bias = torch.zeros(1, *distance.shape, device=q.device)
        if log_decay is not None:
            bias = distance.clamp(min=0)[None] * log_decay[:, None, None]
        bias = bias.masked_fill(distance < 0, float("-inf")).to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        out = self.proj(out.transpose(1, 2).reshape(batch, length, hidden))
        return out, AttentionKVCache(keys=k, values=v)

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
