"""The mixer contract: what the De-focus block, the model's initialisation and the diagnostics need from a token
mixer (docs/method.md §3.3). Every class in `MIXER_CLASSES` derives from `TokenMixer`."""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from typing import Optional

import torch
from torch import nn


class TokenMixer(nn.Module, metaclass=ABCMeta):
    """A token mixer of the De-focus block: `x = x + drop_path(mixer(RMSNorm(x)))`.

    A mixer provides:

    * `__init__(config, layer_idx)`: built from the shared `DefocusVisionConfig` for block `layer_idx`.
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

    def __init__(self, config, layer_idx: int = 0) -> None:
        super().__init__()
        self.layer_idx = layer_idx

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


__all__ = ["TokenMixer"]
