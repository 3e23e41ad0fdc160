"""Softmax attention with the De-focus ViT's per-head decay bias, computed one tile of queries at a time.

`decay_attention(q, k, v, log_decay, causal)` is `softmax(q k^T / sqrt(d) + bias) v` with the bias
`(i - j) * A_h` (and `-inf` for `j > i`) when causal, `|i - j| * A_h` otherwise, for `q, k, v: [B, H, L, d]`.
Written as one `scaled_dot_product_attention` call it needs the bias as a dense `[H, L, L]` tensor (236 MB per
layer in fp32 for 6 heads at 896 px, and a 3D mask sends CPU SDPA to its unfused path, which also materialises
`[B, H, L, L]` scores). Here the queries are cut into tiles of `chunk_size` rows: the bias of a tile is built for
that tile only (`[1, H, T, k]`), causal tiles see only the keys `j < end of the tile` (the tiles above the diagonal
are never computed), and each tile is one fused SDPA call. Every row of the softmax lies inside one tile, so no
online rescaling across tiles is needed and the numbers are those of the dense call.

The backward is a custom `autograd.Function` that recomputes each tile's probabilities from the saved `q, k, v`
and the output (FlashAttention's backward written tile by tile in PyTorch ops), so that neither direction holds
more than a few `[B, H, T, L]` tiles: memory linear in `L` for a fixed tile size. Gradients reach `q`, `k`, `v`
and `log_decay` (`dA_h = sum_ij dS_hij (i - j)`); the rotary frequencies get theirs through the rotated `q`, `k`
outside this op.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

DEFAULT_CHUNK_SIZE = 256


def _tile_distance(start: int, end: int, keys: int, causal: bool, device: torch.device) -> torch.Tensor:
    """`i - j` for queries `start .. end - 1` and keys `0 .. keys - 1`, `[T, keys]` fp32: `+inf` where `j > i`
    when causal (times `A_h < 0` that is the `-inf` of the mask, so one multiply builds bias and mask), `|i - j|`
    otherwise."""
    rows = torch.arange(start, end, device=device, dtype=torch.float32)
    cols = torch.arange(keys, device=device, dtype=torch.float32)
    distance = rows[:, None] - cols[None, :]
    if causal:
        return distance.masked_fill_(distance < 0, float("inf"))
    return distance.abs_()


def _tile_bias(distance: torch.Tensor, log_decay: Optional[torch.Tensor], causal: bool) -> Optional[torch.Tensor]:
    """The additive bias of one tile, `[1, H, T, keys]` (a 4D mask keeps CPU SDPA on its fused kernel) or
    `[1, 1, T, keys]` without decay; None when there is nothing to add."""
    if log_decay is None:
        if not causal:
            return None
        return torch.zeros_like(distance).masked_fill_(distance == float("inf"), float("-inf"))[None, None]
    # `A_h` is strictly negative (`-exp(A_log)`), except where exp underflows to 0; clamping keeps `inf * A` = -inf
    decay = log_decay.float().clamp(max=-torch.finfo(torch.float32).tiny)
    return (distance[None] * decay[:, None, None])[None]


def _tiles(length: int, chunk_size: int):
    for start in range(0, length, chunk_size):
        yield start, min(start + chunk_size, length)


class _DecayAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: Optional[torch.Tensor],
                causal: bool, chunk_size: int) -> torch.Tensor:
        batch, heads, length, head_dim = q.shape
        # written in `[B, L, H, d]` memory order: the mixer's `transpose(1, 2).reshape` of it is then free
        out = q.new_empty(batch, length, heads, v.shape[-1]).transpose(1, 2)
        for start, end in _tiles(length, chunk_size):
            keys = end if causal else length
            distance = _tile_distance(start, end, keys, causal, q.device)
            bias = _tile_bias(distance, log_decay, causal)
            out[:, :, start:end] = F.scaled_dot_product_attention(
                q[:, :, start:end], k[:, :, :keys], v[:, :, :keys],
                attn_mask=None if bias is None else bias.to(q.dtype))
        ctx.save_for_backward(q, k, v, out, log_decay)
        ctx.causal, ctx.chunk_size = causal, chunk_size
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        q, k, v, out, log_decay = ctx.saved_tensors
        causal, chunk_size = ctx.causal, ctx.chunk_size
        need_q, need_k, need_v, need_decay = ctx.needs_input_grad[:4]
        length, scale = q.shape[-2], q.shape[-1] ** -0.5
        # tiles in fp32 whatever the input dtype (the probabilities and their products with `dO` are sums over
        # up to `L` keys); grads are accumulated in fp32 and cast back once
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device) if need_q else None
        dk = torch.zeros(k.shape, dtype=torch.float32, device=q.device) if need_k else None
        dv = torch.zeros(v.shape, dtype=torch.float32, device=q.device) if need_v else None
        d_decay = torch.zeros(log_decay.shape, dtype=torch.float32, device=q.device) if need_decay else None
        with torch.autocast(q.device.type, enabled=False):
            for start, end in _tiles(length, chunk_size):
                keys = end if causal else length
                q_t = q[:, :, start:end].float()
                k_t, v_t = k[:, :, :keys].float(), v[:, :, :keys].float()
                do_t, o_t = grad_out[:, :, start:end].float(), out[:, :, start:end].float()
                distance = _tile_distance(start, end, keys, causal, q.device)
                bias = _tile_bias(distance, log_decay, causal)
                if bias is not None and q.dtype != torch.float32:  # the forward added the bias in q's dtype
                    bias = bias.to(q.dtype).float()
                scores = torch.matmul(q_t, k_t.transpose(-1, -2)).mul_(scale)
                if bias is not None:
                    scores.add_(bias)
                probs = scores.softmax(dim=-1)
                del scores
                if need_v:
                    dv[:, :, :keys] += torch.matmul(probs.transpose(-1, -2), do_t)
                # dS = P * (dP - rowsum(dO * O)), dP = dO V^T
                d_scores = torch.matmul(do_t, v_t.transpose(-1, -2))
                d_scores.sub_((do_t * o_t).sum(-1, keepdim=True)).mul_(probs)
                del probs
                if need_decay:
                    # masked entries have dS = 0; their `inf` distance is zeroed so that 0 * inf adds no NaN
                    finite = distance.masked_fill(distance == float("inf"), 0.0)
                    d_decay += torch.einsum("bhij,ij->h", d_scores, finite)
                if need_q:
                    dq[:, :, start:end] = torch.matmul(d_scores, k_t).mul_(scale)
                if need_k:
                    dk[:, :, :keys] += torch.matmul(d_scores.transpose(-1, -2), q_t).mul_(scale)
        return (None if dq is None else dq.to(q.dtype), None if dk is None else dk.to(k.dtype),
                None if dv is None else dv.to(v.dtype), None if d_decay is None else d_decay.to(log_decay.dtype),
                None, None)


def decay_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: Optional[torch.Tensor],
                    causal: bool = True, chunk_size: int = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """`softmax(q k^T / sqrt(d) + distance * A_h) v`, one tile of `chunk_size` queries at a time; `[B, H, L, d]`.

    Args:
        q, k, v: `[B, H, L, d]` (any strides; `q`, `k` already rotated).
        log_decay: `A_h [H]` (< 0, fp32) or None for no decay.
        causal: the distance is `i - j` with keys `j <= i` only; `False`: `|i - j|` over all keys.
        chunk_size: queries per tile; memory is a few `[B, H, chunk_size, L]` tiles in the forward and backward.

    Returns:
        `[B, H, L, d]` in `q`'s dtype, a transposed view of `[B, L, H, d]` memory.
    """
    if q.dim() != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"decay_attention: q, k, v must be [B, H, L, d] of one shape, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if log_decay is not None and log_decay.shape != (q.shape[1],):
        raise ValueError(f"decay_attention: log_decay must be [H] = [{q.shape[1]}], got {tuple(log_decay.shape)}")
    if chunk_size < 1:
        raise ValueError(f"decay_attention: chunk_size={chunk_size} must be positive")
    return _DecayAttention.apply(q, k, v, log_decay, causal, chunk_size)


__all__ = ["DEFAULT_CHUNK_SIZE", "decay_attention"]
