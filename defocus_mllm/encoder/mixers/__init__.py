"""Token mixers of the De-focus block, one file each; `build_mixer` picks one from the config.

`MIXER_CLASSES` is the single list of mixers (the configuration validates `mixer=` against it). Every mixer
fulfils the contract of `base.TokenMixer` (docs/method.md §3.3).
"""

from __future__ import annotations

from .attention import DefocusAttentionMixer
from .base import TokenMixer
from .mamba import DefocusMambaMixer
from .retention import DefocusRetentionMixer

MIXER_CLASSES: dict[str, type[TokenMixer]] = {
    "mamba": DefocusMambaMixer,
    "attention": DefocusAttentionMixer,
    "retention": DefocusRetentionMixer,
}


def build_mixer(config, layer_idx: int) -> TokenMixer:
    """Instantiate the token mixer named by `config.mixer` for layer `layer_idx`."""
    try:
        cls = MIXER_CLASSES[config.mixer]
    except KeyError:
        raise ValueError(f"No token mixer registered for mixer={config.mixer!r}; known: {sorted(MIXER_CLASSES)}") from None
    return cls(config, layer_idx)


__all__ = ["MIXER_CLASSES", "DefocusAttentionMixer", "DefocusMambaMixer", "DefocusRetentionMixer", "TokenMixer",
           "build_mixer"]
