"""The carried state of a stream encoded in chunks, and the output of one streamed chunk (docs/streaming.md).

`DefocusVisionModel(chunk, past_state=..., use_cache=True, finalize=...)` returns a `DefocusStreamOutput` whose
`past_state` is a `DefocusStreamState`; each mixer keeps its own layer state in it (`MambaStreamState`,
`RetentionStreamState`, `AttentionKVCache`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from transformers.utils import ModelOutput


class DefocusStreamState:
    """The carried state of a stream encoded in chunks (docs/streaming.md), `past_state` of `DefocusVisionModel`.

    `layers[i]` is block `i`'s mixer state, `None` before the first chunk:

    * Mamba (`MambaStreamState`): the causal conv's window, the last `conv_kernel - 1` inputs `[B, K - 1, D]`, and
      the scan state `[B, D, N]` fp32;
    * RetNet (`RetentionStreamState`): the recurrent state `[B, H, d_k, d_v]` fp32;
    * De-focus ViT (`AttentionKVCache`): the rotated keys and the values of every token seen, `[B, H, n, d]` each.

    `position_offset` is the number of tokens seen, i.e. the 1D position of the next one, which the rotation (and
    the attention's decay bias) needs. Mamba's and RetNet's states do not grow with the stream; the ViT's cache
    grows by one key and one value per token per layer, as a transformer's does. `finalized` is set once the CLS
    token has been appended; the stream then accepts no more tokens.
    """

    def __init__(self, num_layers: int) -> None:
        self.layers: list[Optional[object]] = [None] * num_layers
        self.position_offset = 0
        self.finalized = False

    def get_seq_length(self) -> int:
        """Tokens encoded so far (the HF cache's name for it)."""
        return self.position_offset

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the state holds."""
        return [t for layer in self.layers if layer is not None for t in vars(layer).values()
                if isinstance(t, torch.Tensor)]

    def num_bytes(self) -> int:
        """Memory the state holds, in bytes."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def __repr__(self) -> str:
        return (f"DefocusStreamState(layers={len(self.layers)}, position_offset={self.position_offset}, "
                f"finalized={self.finalized}, bytes={self.num_bytes()})")


@dataclass
class DefocusStreamOutput(ModelOutput):
    """Output of a streamed chunk: the chunk's tokens after the final LayerNorm (`last_hidden_state [B, l, hidden]`,
    the CLS token last in the finalizing chunk), `pooler_output` (the CLS token's output once finalized, else None),
    the chunk's `hidden_states` when asked, and `past_state`, the carried state to pass with the next chunk."""

    last_hidden_state: Optional[torch.FloatTensor] = None
    pooler_output: Optional[torch.FloatTensor] = None
    hidden_states: Optional[tuple[torch.FloatTensor, ...]] = None
    past_state: Optional[DefocusStreamState] = None


__all__ = ["DefocusStreamOutput", "DefocusStreamState"]
