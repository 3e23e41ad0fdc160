"""Token mixers of the De-focus block, one file each; `build_mixer` picks one from the config.

`MIXER_CLASSES` is the single list of mixers: `build_mixer` refuses any other `mixer=` name. Every mixer fulfils the
contract of `base.TokenMixer` (docs/method.md §3.3) and validates its own fields of the configuration when built
(`TokenMixer.validate_config`); the configuration itself imports nothing from here.
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


def mixer_class(config) -> type[TokenMixer]:
    """The token mixer class named by `config.mixer`; a `ValueError` naming the field and the known mixers else."""
    try:
        return MIXER_CLASSES[config.mixer]
    except KeyError:
        raise ValueError(f"No token mixer registered under that name: mixer={config.mixer!r} must be one of "
                         f"{tuple(MIXER_CLASSES)}") from None


def build_mixer(config, layer_idx: int) -> TokenMixer:
    """Instantiate the token mixer named by `config.mixer` for layer `layer_idx` (it validates `config`)."""
    return mixer_class(config)(config, layer_idx)


__all__ = ["MIXER_CLASSES", "DefocusAttentionMixer", "DefocusMambaMixer", "DefocusRetentionMixer", "TokenMixer",
           "build_mixer", "mixer_class"]
