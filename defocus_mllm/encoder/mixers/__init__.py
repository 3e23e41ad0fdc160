"""Token mixers of the De-focus block, one file each; `build_mixer` picks one from the config."""

from __future__ import annotations

from typing import Callable

from torch import nn

from .attention import DefocusAttentionMixer
from .mamba import DefocusMambaMixer
from .retention import DefocusRetentionMixer

MIXER_CLASSES: dict[str, Callable[..., nn.Module]] = {
    "mamba": DefocusMambaMixer,
    "attention": DefocusAttentionMixer,
    "retention": DefocusRetentionMixer,
}


def build_mixer(config, layer_idx: int) -> nn.Module:
    """Instantiate the token mixer named by `config.mixer` for layer `layer_idx`."""
    try:
        cls = MIXER_CLASSES[config.mixer]
    except KeyError:
        raise ValueError(f"No token mixer registered for mixer={config.mixer!r}; known: {sorted(MIXER_CLASSES)}") from None
    return cls(config, layer_idx)


__all__ = ["MIXER_CLASSES", "DefocusAttentionMixer", "DefocusMambaMixer", "DefocusRetentionMixer", "build_mixer"]
