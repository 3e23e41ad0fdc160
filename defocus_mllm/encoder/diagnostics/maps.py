"""Attention maps and gradient maps of a De-focus encoder (docs/method.md §5.1 and §5.2).

* `attention_maps(model, pixel_values, layers)` gives one `[B, L, L]` map per layer, head / channel averaged and
  row-normalised: the softmax weights of attention mixers, and the implicit attention of retention
  (`|lambda^(i-j) q_i . k_j|`) and of Mamba (`implicit_mamba_attention`).
* `gradient_map(model, pixel_values)` gives `|d loss / d patch embedding|` per token on the image grid, `[B, h, w]`.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..mixers import DefocusMambaMixer, TokenMixer
from ..modeling_defocus import DefocusForImageClassification, DefocusVisionModel


def find_encoder(model: nn.Module) -> DefocusVisionModel:
    """The `DefocusVisionModel` inside `model` (the model itself, a classifier's `.defocus`, a LLaVA vision tower)."""
    if isinstance(model, DefocusVisionModel):
        return model
    for module in model.modules():
        if isinstance(module, DefocusVisionModel):
            return module
    raise TypeError(f"{type(model).__name__} contains no DefocusVisionModel")


@torch.no_grad()
def implicit_mamba_attention(mixer: DefocusMambaMixer, hidden_states: torch.Tensor,
                             channel_chunk: Optional[int] = None) -> torch.Tensor:
    """Channel-averaged `|alpha|` of a Mamba mixer, `[B, L, L]` fp32, not row-normalised (docs/method.md §5.1).

    The mixer's `attention_map` without its head dim: `hidden_states` is the mixer's input (the block's normed
    residual stream), and the `D` channels are processed `channel_chunk` at a time, so `[B, D, L, L]` never exists.
    """
    return mixer.attention_map(hidden_states, channel_chunk=channel_chunk)[:, 0]


def row_normalize(attention: torch.Tensor) -> torch.Tensor:
    """Divide every row (last dim) by its sum; all-zero rows stay zero."""
    return attention / attention.sum(-1, keepdim=True).clamp_min(torch.finfo(attention.dtype).tiny)


@torch.no_grad()
def mixer_attention_map(mixer: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """One layer's row-normalised, head / channel-averaged map `[B, L, L]` from its mixer input.

    Every mixer gives `attention_map(h) -> [B, H, L, L]` (the mixer contract, docs/method.md §3.3): softmax rows
    already sum to 1; retention's `|scores|` and Mamba's channel-averaged `|alpha|` (one head) are averaged over the
    heads first, then normalised (docs/method.md §5.1).
    """
    if not isinstance(mixer, TokenMixer):
        raise TypeError(f"{type(mixer).__name__} is not a De-focus token mixer (mixers.TokenMixer)")
    return row_normalize(mixer.attention_map(hidden_states).float().mean(1))


def _layer_indices(layers: Optional[Iterable[int]], depth: int) -> list[int]:
    if layers is None:
        return list(range(depth))
    indices = []
    for layer in layers:
        if not -depth <= layer < depth:
            raise ValueError(f"Layer {layer} is out of range for an encoder of {depth} layers")
        indices.append(layer % depth)
    return sorted(set(indices))


@torch.no_grad()
def attention_maps(model: nn.Module, pixel_values: torch.Tensor,
                   layers: Optional[Iterable[int]] = None) -> dict[int, torch.Tensor]:
    """Per-layer maps `{layer: [B, L, L]}` (rows sum to 1, CLS token last) of a De-focus encoder on `pixel_values`.

    `layers`: block indices (negative ones count from the end); all layers by default. One forward pass captures
    each requested block's mixer input with a hook; the maps are then computed one layer at a time.
    """
    encoder = find_encoder(model)
    indices = _layer_indices(layers, len(encoder.blocks))
    inputs: dict[int, torch.Tensor] = {}

    def capture(layer: int):
        def hook(module: nn.Module, args: tuple) -> None:
            inputs[layer] = args[0].detach()
        return hook

    handles = [encoder.blocks[i].mixer.register_forward_pre_hook(capture(i)) for i in indices]
    try:
        encoder(pixel_values)
    finally:
        for handle in handles:
            handle.remove()
    maps = {}
    for i in indices:
        maps[i] = mixer_attention_map(encoder.blocks[i].mixer, inputs.pop(i)).cpu()
    return maps


# ------------------------------------------------------------------------------------------------- gradient maps


def gradient_loss_name(model: nn.Module, labels: Optional[torch.Tensor] = None) -> str:
    """What `gradient_map` differentiates for this model (see there)."""
    if isinstance(model, DefocusForImageClassification):
        return "cross_entropy(predicted class)" if labels is None else "cross_entropy(labels)"
    return "norm(pooled output)"


def gradient_map(model: nn.Module, pixel_values: torch.Tensor,
                 labels: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`[B, h, w]` fp32: the L2 norm of `d loss / d patch_embedding_output` per image token, on the image grid.

    The loss: for `DefocusForImageClassification`, the cross-entropy of the CLS head against `labels`, or against its
    own predicted class when `labels` is None; for a bare encoder (or any other module holding one), the L2 norm of
    the pooled (last, CLS) token. Losses are summed over the batch, so each sample's map does not depend on the
    others. No parameter `.grad` is touched. Call `model.eval()` first (drop path would randomise the map).
    """
    encoder = find_encoder(model)
    captured: list[torch.Tensor] = []

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        # a fresh leaf: the gradient stops here, so frozen models work and no weight gradient is computed
        leaf = output.detach().requires_grad_(True)
        captured.append(leaf)
        return leaf

    handle = encoder.patch_embed.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            if isinstance(model, DefocusForImageClassification):
                logits = model(pixel_values).logits.float()
                target = logits.argmax(-1).detach() if labels is None else labels.to(logits.device)
                loss = F.cross_entropy(logits, target, reduction="sum")
            else:
                loss = encoder(pixel_values).pooler_output.float().norm(dim=-1).sum()
            (grad,) = torch.autograd.grad(loss, captured[0])
    finally:
        handle.remove()
    p = encoder.patch_embed.patch_size
    height, width = pixel_values.shape[-2] // p, pixel_values.shape[-1] // p
    return grad.float().norm(dim=-1).reshape(-1, height, width).cpu()
