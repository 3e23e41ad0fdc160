"""The mixer contract: what the De-focus block, the model's initialisation and the diagnostics need from a token
mixer (docs/method.md §3.3). Every class in `MIXER_CLASSES` derives from `TokenMixer`."""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from typing import Optional

import torch
from torch import nn

from ..filters import validate_filter_modes


def refuse_unless(ok: bool, message: str) -> None:
    """Raise the configuration's `ValueError` (`"DefocusVisionConfig: <message>"`) when `ok` is false."""
    if not ok:
        raise ValueError(f"DefocusVisionConfig: {message}")


def validate_heads(config) -> None:
    """The checks of a mixer that splits the hidden width into `num_attention_heads` heads."""
    heads, hidden = config.num_attention_heads, config.hidden_size
    refuse_unless(isinstance(heads, int) and not isinstance(heads, bool) and heads > 0,
                  f"num_attention_heads={heads!r} must be positive")
    refuse_unless(hidden % heads == 0, f"hidden_size={hidden} is not a multiple of num_attention_heads={heads}")
    refuse_unless(not config.use_rope or (hidden // heads) % 2 == 0,
                  f"the head width hidden_size / num_attention_heads = {hidden}/{heads} must be even for the rotary "
                  "filter (use_rope=True)")


class TokenMixer(nn.Module, metaclass=ABCMeta):
    """A token mixer of the De-focus block: `x = x + drop_path(mixer(RMSNorm(x)))`.

    A mixer provides:

    * `__init__(config, layer_idx)`: built from the shared `DefocusVisionConfig` for block `layer_idx`; it first calls
      `validate_config(config)`, which refuses the fields this mixer cannot be built from (the configuration knows
      nothing of its mixers, so these checks happen when the model is built).
    * `supports_non_causal`: `True` when `config.causal=False` is defined for the mixer (attention only).
    * `forward(hidden_states)`: `[B, L, hidden] -> [B, L, hidden]`, causal unless its config says otherwise; the
      input is the block's normed residual stream, the output goes (through drop path) onto the fp32 residual.
    * `has_feed_forward`: `True` when the block should add a pre-norm GELU MLP after the mixer (attention and
      retention, when `config.mlp_ratio > 0`); Mamba's gated projections are its own feed-forward part.
    * `init_weights()`: the release's initial values of the mixer's own parameters (its filter, Mamba's `dt_proj`
      and `D`, ...). The model-wide `_init_weights` initialises every `Linear` / `Conv` first and calls this once
      per mixer, after the mixer's submodules.
    * `attention_map(hidden_states)`: `[B, H, L, L]`, non-negative, `0` above the diagonal of a causal mixer: the
      attention each query pays to each key, per head, from the same input as `forward`. Attention gives its
      softmax weights (rows sum to 1); retention and Mamba their implicit attention `|alpha[i, j]|` (not
      row-normalised). Mamba's would be `[B, D, L, L]` over its `D` channels, so it returns their mean as one
      head (`H = 1`), computed a chunk of channels at a time. The diagnostics average over `H` and normalise rows.
    * `forward_stream(hidden_states, state, position_offset)` (causal mixers, docs/streaming.md): the same map for
      the next `L` tokens of a stream whose first token sits at `position_offset`, given the mixer's carried
      `state` (None at the start) and returning `(output, new_state)`; a stream fed in chunks equals `forward`
      on the concatenated tokens.
    """

    has_feed_forward: bool = False
    supports_non_causal: bool = False

    def __init__(self, config, layer_idx: int = 0) -> None:
        super().__init__()
        self.validate_config(config)
        self.layer_idx = layer_idx

    @classmethod
    def validate_config(cls, config) -> None:
        """Raise a `ValueError` naming the field when `config` cannot build this mixer; subclasses extend it."""
        refuse_unless(config.causal or cls.supports_non_causal,
                      f"causal=False is not defined for mixer={config.mixer!r} (only for a mixer that supports it, "
                      "e.g. 'attention')")
        validate_filter_modes(config)
        if cls.has_feed_forward:
            refuse_unless(config.mlp_ratio >= 0, f"mlp_ratio={config.mlp_ratio} must be >= 0 (0: no MLP)")

    @abstractmethod
    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """`[B, L, hidden] -> [B, L, hidden]`."""

    def forward_stream(self, hidden_states: torch.Tensor, state: Optional[object], position_offset: int
                       ) -> tuple[torch.Tensor, object]:
        """`[B, L, hidden]` tokens at positions `position_offset ..` with the carried `state` -> `(output, state)`."""
        raise NotImplementedError(f"{type(self).__name__} does not implement forward_stream: it cannot encode a "
                                  f"stream in chunks")

    def init_weights(self) -> None:
        """Initialise the mixer's own parameters (beyond the model-wide `Linear` / `Conv` initialisation)."""

    @abstractmethod
    def attention_map(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """`[B, H, L, L]` non-negative attention of each query on each key (see the class docstring)."""


__all__ = ["TokenMixer", "refuse_unless", "validate_heads"]
