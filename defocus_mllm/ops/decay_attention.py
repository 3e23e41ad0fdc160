"""Softmax attention with the De-focus ViT's per-head decay bias, computed one tile of queries at a time.

`decay_attention(q, k, v, log_decay, causal)` is `softmax(q k^T / sqrt(d) + bias) v` with the bias
`(i - j) * A_h` (and `-inf` for `j > i`) when causal, `|i - j| * A_h` otherwise, for `q, k, v: [B, H, L, d]`.
Written as one `scaled_dot_product_attention` call it needs the bias as a dense `[H, L, L]` tensor (236 MB per
layer in fp32 for 6 heads at 896 px, and a 3D mask sends CPU SDPA to its unfused path, which also materialises
`[B, H, L, L]` scores). Here the queries are cut into tiles of `chunk_size` rows, each one fused SDPA call: causal
tiles see only the keys up to their last query (the tiles above the diagonal are never computed), and a tile's bias
`[1, H, T, keys]` is a strided view of `H (T + keys)` numbers, since it depends on `i - j` only (`_tile_distance`).
Every row of the softmax lies inside one tile, so no online rescaling across tiles is needed and the numbers are
those of the dense call.

The backward is a custom `autograd.Function` that recomputes each tile's probabilities from the saved `q, k, v`
and the output (FlashAttention's backward written tile by tile in PyTorch ops), so that neither direction holds
more than a few `[B, H, T, L]` tiles: memory linear in `L` for a fixed tile size. Gradients reach `q`, `k`, `v`
and `log_decay` (`dA_h = sum_ij dS_hij (i - j)`); the rotary frequencies get theirs through the rotated `q`, `k`
outside this op.

Short sequences that need gradients (at most `AUTOGRAD_MAX_KEYS` keys, fp32: a tiny encoder's training) take plain
autograd ops instead, the whole `[B, H, L, keys]` score matrix at once: it is no larger than one tile, and at these
sizes the custom backward's per-tile bookkeeping (flips, recomputed softmax, the einsum of `dA_h`) costs more than
the matmuls (docs/kernels.md, "Short sequences").
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

# queries per tile: fewer, longer SDPA calls against the diagonal tiles' wasted half (T / L of the work); the sizes
# compared are in docs/kernels.md ("Chunked decay attention on CPU")
DEFAULT_CHUNK_SIZE = 512
# fp32 training at up to this many keys goes through plain autograd ops (`_autograd_decay_attention`): 2.0x faster
# forward + backward at 65 tokens, 1.3x at 129, 0.87x at 257 (docs/kernels.md); autograd then keeps each layer's
# `[B, H, L, keys]` probabilities, at most the size of a 128-query tile
AUTOGRAD_MAX_KEYS = 128


def _tiles(length: int, chunk_size: int, causal: bool, offset: int = 0):
    """`(first, last, keys)` of each tile of the *reversed* queries: rows `first .. last - 1` of `q.flip(2)`, i.e.
    the queries at positions `i = offset + L - 1 - row`, which see the keys `0 .. keys - 1` (`j <= i` when
    causal)."""
    for first in range(0, length, chunk_size):
        yield first, min(first + chunk_size, length), offset + length - first if causal else length


def _tile_distance(length: int, first: int, last: int, keys: int, causal: bool, device: torch.device,
                   offset: int = 0) -> torch.Tensor:
    """`i - j` of a tile, `[rows, keys]` fp32, as a strided view of a vector of `rows + keys - 1` entries.

    With the queries reversed, row `r` of the tile is query `i = offset + L - 1 - first - r`, so `i - j = top - (r + j)`
    depends on `r + j` only: the tile is the vector `top - m` read with strides `(1, 1)`, and building a tile's bias
    costs `H (rows + keys)` numbers instead of `H rows keys`. Causal: `+inf` where `j > i` (times `A_h < 0` that is
    the `-inf` of the mask, so one multiply gives bias and mask); otherwise `|i - j|`.
    """
    rows, top = last - first, offset + length - 1 - first
    distance = top - torch.arange(rows + keys - 1, device=device, dtype=torch.float32)
    distance = distance.masked_fill_(distance < 0, float("inf")) if causal else distance.abs_()
    return distance


def _as_tile(vector: torch.Tensor, rows: int, keys: int) -> torch.Tensor:
    """`[..., rows + keys - 1]` -> the `[1, ..., rows, keys]` view `tile[r, c] = vector[r + c]` (no copy)."""
    vector = vector.reshape(-1, vector.shape[-1])
    return vector.as_strided((1, vector.shape[0], rows, keys), (0, vector.stride(0), 1, 1))


def _tile_bias(distance: torch.Tensor, log_decay: Optional[torch.Tensor], causal: bool, rows: int, keys: int,
               dtype: torch.dtype) -> Optional[torch.Tensor]:
    """The additive bias of one tile in `dtype`, `[1, H, rows, keys]` (`[1, 1, rows, keys]` without decay; 4D keeps
    CPU SDPA on its fused kernel), a strided view; None when there is nothing to add."""
    if log_decay is None:
        if not causal:
            return None
        vector = torch.zeros_like(distance).masked_fill_(distance == float("inf"), float("-inf"))
    else:
        # `A_h` is strictly negative (`-exp(A_log)`) unless exp underflows to 0: the clamp keeps `inf * A` at -inf
        decay = log_decay.float().clamp(max=-torch.finfo(torch.float32).tiny)
        vector = distance[None] * decay[:, None]
    return _as_tile(vector.to(dtype), rows, keys)


def _autograd_decay_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: Optional[torch.Tensor],
                               causal: bool, offset: int) -> torch.Tensor:
    """The same attention as whole-matrix autograd ops, for short fp32 sequences; `[B, H, L, d]`."""
    positions = torch.arange(k.shape[2], device=q.device, dtype=torch.float32)
    distance = positions[offset:, None] - positions[None, :]  # i - j, [L, keys]
    future = distance < 0 if causal else None
    scores = torch.matmul(q, k.transpose(-1, -2)).mul_(q.shape[-1] ** -0.5)  # [B, H, L, keys]
    if log_decay is not None:
        # the masked entries get a finite distance: `inf * A_h` there would make the gradient of `A_h` NaN
        bias = (distance.clamp(min=0) if causal else distance.abs())[None] * log_decay.float()[:, None, None]
        scores = scores + (bias if future is None else bias.masked_fill(future, float("-inf")))
    elif causal:
        scores = scores.masked_fill(future, float("-inf"))
    return torch.matmul(scores.softmax(dim=-1), v)


def _takes_autograd_path(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: Optional[torch.Tensor]) -> bool:
    """Short fp32 sequences under autograd (see `AUTOGRAD_MAX_KEYS`); inference keeps the fused SDPA tiles."""
    if k.shape[2] > AUTOGRAD_MAX_KEYS or q.dtype != torch.float32 or not torch.is_grad_enabled():
        return False
    return any(t is not None and t.requires_grad for t in (q, k, v, log_decay))


class _DecayAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: Optional[torch.Tensor],
                causal: bool, chunk_size: int, offset: int) -> torch.Tensor:
        batch, heads, length, _ = q.shape
        # reversed queries make every tile's bias a strided view of a vector (`_tile_distance`); one flip of `q`
        # and one of the output per call, against `L^2` work in the tiles
        q_rev = q.flip(2)
        out_rev = q.new_empty(batch, heads, length, v.shape[-1])
        for first, last, keys in _tiles(length, chunk_size, causal, offset):
            distance = _tile_distance(length, first, last, keys, causal, q.device, offset)
            out_rev[:, :, first:last] = F.scaled_dot_product_attention(
                q_rev[:, :, first:last], k[:, :, :keys], v[:, :, :keys],
                attn_mask=_tile_bias(distance, log_decay, causal, last - first, keys, q.dtype))
        ctx.save_for_backward(q_rev, k, v, out_rev, log_decay)
        ctx.causal, ctx.chunk_size, ctx.offset = causal, chunk_size, offset
        # written in `[B, L, H, d]` memory order: the mixer's `transpose(1, 2).reshape` of it is then free
        out = q.new_empty(batch, length, heads, v.shape[-1]).transpose(1, 2)
        return out.copy_(out_rev.flip(2))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        q_rev, k, v, out_rev, log_decay = ctx.saved_tensors
        causal, chunk_size, offset = ctx.causal, ctx.chunk_size, ctx.offset
        need_q, need_k, need_v, need_decay = ctx.needs_input_grad[:4]
        length, scale = q_rev.shape[-2], q_rev.shape[-1] ** -0.5
        grad_rev = grad_out.flip(2)
        # tiles in fp32 whatever the input dtype (the probabilities and their products with `dO` are sums over
        # up to `L` keys); grads are accumulated in fp32 and cast back once
        device = q_rev.device
        dq_rev = torch.zeros(q_rev.shape, dtype=torch.float32, device=device) if need_q else None
        dk = torch.zeros(k.shape, dtype=torch.float32, device=device) if need_k else None
        dv = torch.zeros(v.shape, dtype=torch.float32, device=device) if need_v else None
        d_decay = torch.zeros(log_decay.shape, dtype=torch.float32, device=device) if need_decay else None
        with torch.autocast(device.type, enabled=False):
            for first, last, keys in _tiles(length, chunk_size, causal, offset):
                rows = last - first
                q_t = q_rev[:, :, first:last].float()
                k_t, v_t = k[:, :, :keys].float(), v[:, :, :keys].float()
                do_t, o_t = grad_rev[:, :, first:last].float(), out_rev[:, :, first:last].float()
                distance = _tile_distance(length, first, last, keys, causal, device, offset)
                # the bias as the forward added it (in the inputs' dtype), then in fp32
                bias = _tile_bias(distance, log_decay, causal, rows, keys, q_rev.dtype)
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
                    # dA_h = sum dS (i - j); masked entries have dS = 0 and their `inf` distance is zeroed (0 * inf)
                    finite = _as_tile(distance.masked_fill(distance == float("inf"), 0.0), rows, keys)[0, 0]
                    d_decay += torch.einsum("bhij,ij->h", d_scores, finite)
                if need_q:
                    dq_rev[:, :, first:last] = torch.matmul(d_scores, k_t).mul_(scale)
                if need_k:
                    dk[:, :, :keys] += torch.matmul(d_scores.transpose(-1, -2), q_t).mul_(scale)
        return (None if dq_rev is None else dq_rev.flip(2).to(q_rev.dtype), None if dk is None else dk.to(k.dtype),
                None if dv is None else dv.to(v.dtype), None if d_decay is None else d_decay.to(log_decay.dtype),
                None, None, None)


def decay_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: Optional[torch.Tensor],
                    causal: bool = True, chunk_size: Optional[int] = None, query_offset: int = 0) -> torch.Tensor:
    """`softmax(q k^T / sqrt(d) + distance * A_h) v`, one tile of `chunk_size` queries at a time; `[B, H, L, d]`.

    Args:
        q, k, v: `[B, H, L, d]` (any strides; `q`, `k` already rotated).
        log_decay: `A_h [H]` (< 0, fp32) or None for no decay.
        causal: the distance is `i - j` with keys `j <= i` only; `False`: `|i - j|` over all keys.
        chunk_size: queries per tile (default `DEFAULT_CHUNK_SIZE`); memory is a few `[B, H, chunk_size, L]` tiles
            in the forward and backward.
        query_offset: causal only: the queries are the last `L` of `query_offset + L` keys (`k, v: [B, H,
            query_offset + L, d]`), at positions `query_offset ..`: a chunk of a stream attending to the cached
            keys and its own, with the same tiles (no `[H, L, query_offset + L]` bias).

    Returns:
        `[B, H, L, d]` in `q`'s dtype; from the tiles, a transposed view of `[B, L, H, d]` memory.
    """
    if query_offset < 0 or (query_offset and not causal):
        raise ValueError(f"decay_attention: query_offset={query_offset} needs causal=True and must not be negative")
    keys = q.shape[2] + query_offset if q.dim() == 4 else None
    if q.dim() != 4 or k.shape != (*q.shape[:2], keys, q.shape[3]) or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"decay_attention: q, k, v must be [B, H, L, d] of one shape (k, v: [B, H, query_offset + "
                         f"L, .]), got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)} "
                         f"(query_offset={query_offset})")
    if log_decay is not None and log_decay.shape != (q.shape[1],):
        raise ValueError(f"decay_attention: log_decay must be [H] = [{q.shape[1]}], got {tuple(log_decay.shape)}")
    chunk_size = DEFAULT_CHUNK_SIZE if chunk_size is None else chunk_size
    if chunk_size < 1:
        raise ValueError(f"decay_attention: chunk_size={chunk_size} must be positive")
    if _takes_autograd_path(q, k, v, log_decay):
        return _autograd_decay_attention(q, k, v, log_decay, causal, query_offset)
    return _DecayAttention.apply(q, k, v, log_decay, causal, chunk_size, query_offset)


__all__ = ["AUTOGRAD_MAX_KEYS", "DEFAULT_CHUNK_SIZE", "decay_attention"]
