"""The over-focus numbers of docs/method.md §5.3, from the maps of `maps.py`.

The mean normalised row entropy of each attention map, the share of all attention mass that the top 1% of key
tokens receive, and the share of the gradient held by the top 5% of image tokens. Over-focused models have low
entropy and high shares.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Union

import numpy as np
import torch

TOP_KEY_FRACTION = 0.01
TOP_GRADIENT_FRACTION = 0.05


def _top_count(n: int, fraction: float) -> int:
    return min(n, max(1, round(fraction * n)))


def is_causal_map(attention: torch.Tensor) -> bool:
    """True when nothing lies above the diagonal of the `[..., L, L]` map."""
    return bool(torch.triu(attention, diagonal=1).abs().max() == 0)


def attention_entropy(attention: torch.Tensor, causal: Optional[bool] = None) -> float:
    """Mean normalised row entropy of row-normalised maps `[..., L, L]`, in [0, 1] (1: uniform rows).

    Row `i` is normalised by the log of the number of keys it can see: `i + 1` for a causal map, `L` otherwise, so a
    causal and a bidirectional model are on one scale. Rows that see a single key carry no information and are left
    out. `causal=None` reads it off the map (nothing above the diagonal).
    """
    attention = attention.double()
    length = attention.shape[-1]
    if causal is None:
        causal = is_causal_map(attention)
    visible = torch.arange(1, length + 1, dtype=torch.float64) if causal else torch.full((length,), float(length),
                                                                                       dtype=torch.float64)
    entropy = -torch.special.xlogy(attention, attention).sum(-1)  # [..., L]
    keep = visible > 1
    normalised = entropy[..., keep] / visible[keep].log()
    return float(normalised.mean())


def top_key_share(attention: torch.Tensor, fraction: float = TOP_KEY_FRACTION) -> float:
    """Share of all attention mass (summed over rows) received by the top `fraction` of key tokens (at least one),
    averaged over the leading dims of `[..., L, L]`."""
    mass = attention.double().sum(-2)  # per key: [..., L]
    k = _top_count(mass.shape[-1], fraction)
    share = mass.topk(k, dim=-1).values.sum(-1) / mass.sum(-1).clamp_min(1e-300)
    return float(share.mean())


def gradient_top_share(gradient: torch.Tensor, fraction: float = TOP_GRADIENT_FRACTION) -> float:
    """Share of the summed per-token gradient norm held by the top `fraction` of image tokens (at least one),
    averaged over the batch of `[B, h, w]` (or `[B, n]`) maps."""
    flat = gradient.double().reshape(gradient.shape[0], -1)
    k = _top_count(flat.shape[-1], fraction)
    share = flat.topk(k, dim=-1).values.sum(-1) / flat.sum(-1).clamp_min(1e-300)
    return float(share.mean())


def overfocus_metrics(attention: Union[Mapping[int, torch.Tensor], torch.Tensor],
                      gradient: Optional[torch.Tensor] = None, top_key_fraction: float = TOP_KEY_FRACTION,
                      top_gradient_fraction: float = TOP_GRADIENT_FRACTION) -> dict[str, Any]:
    """The over-focus numbers of docs/method.md §5.3 for maps from `attention_maps` (a dict, or one `[B, L, L]` map)
    and an optional gradient map from `gradient_map`.

    Returns `{"layers": {layer: {"entropy", "top_key_share"}}, "mean_entropy", "mean_top_key_share"}` plus
    `"gradient_top_share"` when a gradient map is given. Over-focused models have low entropy and high shares.
    """
    if isinstance(attention, torch.Tensor):
        attention = {0: attention}
    per_layer = {layer: {"entropy": attention_entropy(m), "top_key_share": top_key_share(m, top_key_fraction)}
                 for layer, m in attention.items()}
    result: dict[str, Any] = {"layers": per_layer}
    if per_layer:
        result["mean_entropy"] = float(np.mean([v["entropy"] for v in per_layer.values()]))
        result["mean_top_key_share"] = float(np.mean([v["top_key_share"] for v in per_layer.values()]))
    if gradient is not None:
        result["gradient_top_share"] = gradient_top_share(gradient, top_gradient_fraction)
    return result
