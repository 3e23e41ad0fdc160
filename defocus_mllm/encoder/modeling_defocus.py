"""De-focus Attention Network: a 1D causal vision encoder as a Hugging Face model (docs/method.md §2)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import ModelOutput

from .configuration_defocus import DefocusVisionConfig
from .mixers import TokenMixer, build_mixer
from .stream_state import DefocusStreamOutput, DefocusStreamState


class DefocusRMSNorm(nn.Module):
    """RMSNorm computed in fp32 with a learnable weight."""

    def __init__(self, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = hidden_states.float()
        if hasattr(F, "rms_norm"):  # torch >= 2.4: one fused pass instead of five elementwise ones
            if self.weight.dtype == torch.float32:
                return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
            x = F.rms_norm(x, (x.shape[-1],), None, self.eps)
        else:
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(self.weight.dtype)


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop the whole residual branch per sample with probability `rate`."""
    if rate <= 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
    return x * mask / keep


class DefocusPatchEmbed(nn.Module):
    """`Conv2d(patch, stride=patch)` then row-major flatten: `[B, C, H, W] -> [B, H/p * W/p, hidden]`; a video
    `[B, T, C, H, W]` gives its frames' tokens one frame after the other, `[B, T * H/p * W/p, hidden]`."""

    def __init__(self, config: DefocusVisionConfig) -> None:
        super().__init__()
        self.patch_size = config.patch_size
        self.proj = nn.Conv2d(config.num_channels, config.hidden_size, kernel_size=config.patch_size,
                              stride=config.patch_size, bias=True)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.dim() == 5:  # video [B, T, C, H, W]: the frames one after the other, one sequence
            batch, frames = pixel_values.shape[:2]
            tokens = self(pixel_values.flatten(0, 1))
            return tokens.reshape(batch, frames * tokens.shape[1], tokens.shape[2])
        if pixel_values.dim() != 4:
            raise ValueError(f"pixel_values must be [batch, channels, height, width] (or [batch, frames, channels, "
                             f"height, width] for a video), got {tuple(pixel_values.shape)}")
        height, width = pixel_values.shape[-2:]
        p = self.patch_size
        if height < p or width < p or height % p or width % p:
            raise ValueError(f"Image size {height}x{width} is not a positive multiple of the patch size {p}")
        if pixel_values.shape[1] != self.proj.in_channels:
            raise ValueError(f"pixel_values has {pixel_values.shape[1]} channels, the encoder expects "
                             f"{self.proj.in_channels}")
        x = self.proj(pixel_values.to(self.proj.weight.dtype))  # [B, hidden, H/p, W/p]
        return x.flatten(2).transpose(1, 2)


class DefocusMLP(nn.Module):
    """The feed-forward sub-block of the attention / retention variants: `Linear -> GELU -> Linear`."""

    def __init__(self, hidden_size: int, inner_size: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, inner_size)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(inner_size, hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(hidden_states)))


class DefocusBlock(GradientCheckpointingLayer):
    """`x = x + drop_path(mixer(RMSNorm(x)))` with the residual stream in fp32.

    Mixers whose `has_feed_forward` is True (attention, retention) get a second pre-norm sub-block
    `x = x + drop_path(mlp(RMSNorm(x)))` when `config.mlp_ratio > 0`; Mamba's gated projection is its own MLP.
    """

    def __init__(self, config: DefocusVisionConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.norm = DefocusRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mixer = build_mixer(config, layer_idx)
        self.norm2 = self.mlp = None
        if self.mixer.has_feed_forward and config.mlp_ratio > 0:
            self.norm2 = DefocusRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            self.mlp = DefocusMLP(config.hidden_size, int(config.hidden_size * config.mlp_ratio))
        self.drop_path_rate = 0.0  # set at run time by `DefocusPreTrainedModel.set_drop_path_rate`

    def forward(self, hidden_states: torch.Tensor, layer_state: Optional[object] = None,
                position_offset: Optional[int] = None) -> Union[torch.Tensor, tuple[torch.Tensor, object]]:
        """The block; with `position_offset` (a stream's chunk, docs/streaming.md) the mixer continues from
        `layer_state` and `(hidden_states, new_layer_state)` is returned."""
        residual = hidden_states.float()
        if position_offset is None:
            out = self.mixer(self.norm(hidden_states))
        else:
            out, layer_state = self.mixer.forward_stream(self.norm(hidden_states), layer_state, position_offset)
        hidden_states = residual + drop_path(out, self.drop_path_rate, self.training).float()
        if self.mlp is not None:
            out = self.mlp(self.norm2(hidden_states))
            hidden_states = hidden_states + drop_path(out, self.drop_path_rate, self.training).float()
        return hidden_states if position_offset is None else (hidden_states, layer_state)


class DefocusPreTrainedModel(PreTrainedModel):
    config_class = DefocusVisionConfig
    base_model_prefix = "defocus"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["DefocusBlock"]
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.trunc_normal_(module.weight, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, (nn.Conv1d, nn.Conv2d)):
            # PyTorch's default conv init, which the release keeps for the patch embedding and the causal conv
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                # from the module's attributes: under ZeRO-3 the weight tensor itself may be an empty shard
                fan_in = module.in_channels // module.groups * math.prod(module.kernel_size)
                init.uniform_(module.bias, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, DefocusRMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, DefocusVisionModel):
            init.trunc_normal_(module.cls_token, std=std)
            if module.pos_embed is not None:
                init.trunc_normal_(module.pos_embed, std=std)
        elif isinstance(module, TokenMixer):
            # the mixer's own parameters (docs/method.md §3.3); `apply` visits children first, so its Linears are
            # already done
            module.init_weights()

    def set_drop_path_rate(self, rate: float) -> list[float]:
        """Set the stochastic-depth rate of the last layer; layer `i` gets `rate * i / (depth - 1)`.

        Called at run time by the scheduled-drop-path callback. Returns the per-layer rates.
        """
        blocks = [m for m in self.modules() if isinstance(m, DefocusBlock)]
        depth = len(blocks)
        rates = [rate * i / (depth - 1) if depth > 1 else 0.0 for i in range(depth)]
        for block, r in zip(blocks, rates):
            block.drop_path_rate = r
        return rates


class DefocusVisionModel(DefocusPreTrainedModel):
    """The encoder: patch embedding, CLS appended last, De-focus blocks, final LayerNorm over all tokens.

    Causal configurations also encode a stream in chunks with a carried state (`past_state`, `use_cache`,
    `finalize`; `encode_rows` for an image's patch rows, `encode_video` for frames), equal to the whole forward.
    """

    def __init__(self, config: DefocusVisionConfig) -> None:
        super().__init__(config)
        self.patch_size = config.patch_size  # read by LlavaModel when image sizes are given
        self.patch_embed = DefocusPatchEmbed(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        if config.use_abs_pos_embed:
            grid = config.image_size // config.patch_size
            self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid, config.hidden_size))
        else:
            self.pos_embed = None
        self.blocks = nn.ModuleList([DefocusBlock(config, i) for i in range(config.num_hidden_layers)])
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()
        self.set_drop_path_rate(config.drop_path_rate)

    def get_input_embeddings(self) -> nn.Module:
        return self.patch_embed

    def _patch_tokens(self, pixel_values: torch.Tensor, position_offset: int = 0,
                      whole_frames: bool = True) -> torch.Tensor:
        """Patch tokens `[B, l, hidden]` with the absolute position embedding when configured.

        The position embedding is spatial: token `t` of the stream gets entry `t mod grid^2`, so every frame of a
        video gets the same embedding and the rows of a chunk get their rows' entries.
        """
        x = self.patch_embed(pixel_values)
        if self.pos_embed is None:
            return x
        grid = self.pos_embed.shape[1]
        side = math.isqrt(grid)
        width = pixel_values.shape[-1] // self.patch_size
        frame_tokens = x.shape[1] // pixel_values.shape[1] if pixel_values.dim() == 5 else x.shape[1]
        if width != side or (whole_frames and frame_tokens != grid):
            raise ValueError(f"use_abs_pos_embed=True fixes the grid to {side}x{side} patches, the image gives "
                             f"{frame_tokens // width}x{width}")
        index = torch.arange(position_offset, position_offset + x.shape[1], device=x.device) % grid
        return x + self.pos_embed[:, index]

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Patch tokens plus the appended CLS token, `[B, L, hidden]` with `L = (H/p)(W/p) + 1` (`T (H/p)(W/p) + 1`
        for a video `[B, T, C, H, W]`, its frames one after the other)."""
        x = self._patch_tokens(pixel_values)
        cls = self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype)
        return torch.cat([x, cls], dim=1)

    def forward(
        self,
        pixel_values: Optional[torch.Tensor] = None,
        output_hidden_states: Optional[Union[bool, int, list]] = None,
        return_dict: Optional[bool] = None,
        past_state: Optional[DefocusStreamState] = None,
        use_cache: Optional[bool] = None,
        finalize: Optional[bool] = None,
        **kwargs,
    ) -> Union[tuple, BaseModelOutputWithPooling, DefocusStreamOutput]:
        r"""
        Returns `last_hidden_state` `[B, L, hidden]` (final LayerNorm, CLS token last), `pooler_output` (the last
        token) and, when asked, `hidden_states`: the embedding output, the residual stream after each block but the
        last, and the final normalised output (HF decoder convention, so `hidden_states[-1]` is well scaled).

        `output_hidden_states` may also be a layer index or list of indices (as `LlavaModel` passes its
        `vision_feature_layer`); any such request returns all hidden states.

        `pixel_values` is an image `[B, C, H, W]` or a video `[B, T, C, H, W]` (its frames encoded as one causal
        sequence, frame after frame, positions continuing the 1D index; one CLS token after the last frame).

        Streaming (docs/streaming.md): with a `past_state`, or `use_cache=True, finalize=False` to start a stream
        (`use_cache=True` alone, as LLaVA passes it, is the whole forward), `pixel_values` is the next chunk of
        the stream (patch rows `[B, C, h, W]` of an image, frames `[B, T, C, H, W]`, or None to only finalize); its
        tokens continue the positions of `past_state` (a new stream when None), no CLS token is appended unless
        `finalize=True`, and a `DefocusStreamOutput` with the chunk's tokens and the updated `past_state` (the same
        object, updated in place) is returned. The chunks' outputs concatenated equal the whole forward's.
        """
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        want_hidden = output_hidden_states is not None and output_hidden_states is not False
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        # `use_cache=True` alone is what LlavaModel and `generate` pass every vision tower: a whole forward. A stream
        # starts with `use_cache=True, finalize=False` and goes on with its `past_state`.
        if past_state is not None or (use_cache and finalize is False):
            return self._forward_stream(pixel_values, past_state, bool(finalize), want_hidden, return_dict)
        if finalize is False:
            raise ValueError("finalize=False (a stream left open for more tokens) needs use_cache=True")
        if pixel_values is None:
            raise ValueError("pixel_values is required (None only finalizes a stream passed as past_state)")

        hidden = self.embed(pixel_values)
        all_hidden = [hidden] if want_hidden else None
        for i, block in enumerate(self.blocks):
            hidden = block(hidden)
            if want_hidden and i < len(self.blocks) - 1:
                # the residual stream stays fp32 here; the returned copy has the parameters' dtype (a bf16 projector
                # reads it when `vision_feature_layer` is not -1)
                all_hidden.append(hidden.to(self.norm.weight.dtype))
        hidden = self.norm(hidden.to(self.norm.weight.dtype))
        if want_hidden:
            all_hidden.append(hidden)
        pooled = hidden[:, -1]
        if not return_dict:
            return tuple(v for v in (hidden, pooled, tuple(all_hidden) if want_hidden else None) if v is not None)
        return BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=pooled,
                                          hidden_states=tuple(all_hidden) if want_hidden else None)

    def _forward_stream(self, pixel_values: Optional[torch.Tensor], past_state: Optional[DefocusStreamState],
                        finalize: bool, want_hidden: bool, return_dict: bool) -> Union[tuple, DefocusStreamOutput]:
        if not self.config.causal:
            raise ValueError("causal=False: a non-causal encoder cannot encode a stream in chunks")
        if past_state is None:
            past_state = DefocusStreamState(len(self.blocks))
        elif len(past_state.layers) != len(self.blocks):
            raise ValueError(f"past_state has {len(past_state.layers)} layers, the model {len(self.blocks)}")
        if past_state.finalized:
            raise ValueError("past_state is finalized (its CLS token was appended): start a new stream")
        offset = past_state.position_offset
        parts = []
        if pixel_values is not None:
            parts.append(self._patch_tokens(pixel_values, offset, whole_frames=False))
        if finalize:
            if not parts and offset == 0:
                raise ValueError("finalize=True on an empty stream: pass pixel_values")
            batch = parts[0].shape[0] if parts else past_state.tensors()[0].shape[0]
            dtype = parts[0].dtype if parts else self.patch_embed.proj.weight.dtype
            parts.append(self.cls_token.expand(batch, -1, -1).to(dtype))
        if not parts:
            raise ValueError("a stream chunk needs pixel_values, finalize=True, or both")
        hidden = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        all_hidden = [hidden] if want_hidden else None
        for i, block in enumerate(self.blocks):
            hidden, past_state.layers[i] = block(hidden, past_state.layers[i], position_offset=offset)
            if want_hidden and i < len(self.blocks) - 1:
                all_hidden.append(hidden.to(self.norm.weight.dtype))
        hidden = self.norm(hidden.to(self.norm.weight.dtype))
        if want_hidden:
            all_hidden.append(hidden)
        past_state.position_offset = offset + hidden.shape[1]
        past_state.finalized = finalize
        pooled = hidden[:, -1] if finalize else None
        all_hidden = tuple(all_hidden) if want_hidden else None
        if not return_dict:
            return tuple(v for v in (hidden, pooled, all_hidden, past_state) if v is not None)
        return DefocusStreamOutput(last_hidden_state=hidden, pooler_output=pooled, hidden_states=all_hidden,
                                   past_state=past_state)

    def finalize(self, past_state: DefocusStreamState) -> DefocusStreamOutput:
        """Append the CLS token to a stream: its output (`last_hidden_state [B, 1, hidden]`, `pooler_output`)."""
        return self(None, past_state=past_state, finalize=True, return_dict=True)

    def encode_rows(self, pixel_values: torch.Tensor, rows_per_chunk: int,
                    past_state: Optional[DefocusStreamState] = None, finalize: bool = True,
                    output_hidden_states: Optional[bool] = None) -> DefocusStreamOutput:
        """Encode an image `[B, C, H, W]` `rows_per_chunk` patch rows at a time, as they would arrive from a
        scanner; equals `forward(pixel_values)` (the last chunk may hold fewer rows).

        The chunks' outputs are concatenated here; a caller that consumes tokens as they come calls `forward`
        with `past_state` itself and keeps only the (constant-size, for Mamba and RetNet) state. `finalize=False`
        leaves the stream open (no CLS token) for more rows or images.
        """
        if pixel_values.dim() != 4:
            raise ValueError(f"encode_rows: pixel_values must be [batch, channels, height, width], got "
                             f"{tuple(pixel_values.shape)}")
        if rows_per_chunk < 1:
            raise ValueError(f"encode_rows: rows_per_chunk={rows_per_chunk} must be positive")
        step = rows_per_chunk * self.patch_size
        height = pixel_values.shape[-2]
        chunks = [pixel_values[:, :, top:top + step] for top in range(0, height, step)]
        return self._encode_chunks(chunks, past_state, finalize, output_hidden_states)

    def encode_video(self, frames: torch.Tensor, frames_per_chunk: int = 1,
                     past_state: Optional[DefocusStreamState] = None, finalize: bool = True,
                     output_hidden_states: Optional[bool] = None) -> DefocusStreamOutput:
        """Encode a video `[B, T, C, H, W]` `frames_per_chunk` frames at a time as one causal sequence (positions
        continue the 1D index across frames; one CLS token after the last frame); equals `forward(frames)`."""
        if frames.dim() != 5:
            raise ValueError(f"encode_video: frames must be [batch, frames, channels, height, width], got "
                             f"{tuple(frames.shape)}")
        if frames_per_chunk < 1:
            raise ValueError(f"encode_video: frames_per_chunk={frames_per_chunk} must be positive")
        chunks = [frames[:, t:t + frames_per_chunk] for t in range(0, frames.shape[1], frames_per_chunk)]
        return self._encode_chunks(chunks, past_state, finalize, output_hidden_states)

    def _encode_chunks(self, chunks: list[torch.Tensor], past_state: Optional[DefocusStreamState], finalize: bool,
                       output_hidden_states: Optional[bool]) -> DefocusStreamOutput:
        outputs = []
        if past_state is None:  # a state from the start: a single finalizing chunk is a stream too
            past_state = DefocusStreamState(len(self.blocks))
        for i, chunk in enumerate(chunks):
            out = self(chunk, past_state=past_state, use_cache=True, finalize=finalize and i == len(chunks) - 1,
                       output_hidden_states=output_hidden_states, return_dict=True)
            past_state = out.past_state
            outputs.append(out)
        hidden_states = None
        if outputs[0].hidden_states is not None:
            hidden_states = tuple(torch.cat(layer, dim=1) for layer in zip(*(o.hidden_states for o in outputs)))
        return DefocusStreamOutput(last_hidden_state=torch.cat([o.last_hidden_state for o in outputs], dim=1),
                                   pooler_output=outputs[-1].pooler_output, hidden_states=hidden_states,
                                   past_state=past_state)


@dataclass
class DefocusImageClassifierOutput(ModelOutput):
    """`logits [B, C]` from the CLS head; `aux_logits` `[B, L-1, C]` ("per_token") or `[B, C]` ("pooled")."""

    loss: Optional[torch.FloatTensor] = None
    logits: Optional[torch.FloatTensor] = None
    aux_logits: Optional[torch.FloatTensor] = None
    hidden_states: Optional[tuple[torch.FloatTensor, ...]] = None


def _make_head(config: DefocusVisionConfig) -> nn.Module:
    if config.head_type == "mlp":
        return nn.Sequential(nn.Linear(config.hidden_size, 3 * config.hidden_size), nn.Tanh(),
                             nn.Linear(3 * config.hidden_size, config.num_labels))
    return nn.Linear(config.hidden_size, config.num_labels)


def classification_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy for hard labels `[B]` or soft (mixup / cutmix) targets `[B, C]`; `logits` may carry extra
    token dims before the class dim (`[B, T, C]`), in which case every token is scored against its sample's label."""
    num_classes = logits.shape[-1]
    if logits.dim() == 3:
        tokens = logits.shape[1]
        labels = labels.unsqueeze(1).expand(-1, tokens, *labels.shape[1:])
    logits = logits.reshape(-1, num_classes).float()
    if labels.is_floating_point():
        return torch.sum(-labels.reshape(-1, num_classes) * F.log_softmax(logits, dim=-1), dim=-1).mean()
    return F.cross_entropy(logits, labels.reshape(-1), label_smoothing=label_smoothing)


class DefocusForImageClassification(DefocusPreTrainedModel):
    """The encoder with the CLS head and the auxiliary head of the paper; loss = (main + aux) / 2."""

    def __init__(self, config: DefocusVisionConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.defocus = DefocusVisionModel(config)
        self.head = _make_head(config)
        self.head2 = _make_head(config) if config.aux_loss_mode != "none" else None
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        **kwargs,
    ) -> Union[tuple, DefocusImageClassifierOutput]:
        r"""
        labels (`torch.LongTensor` of shape `[B]` or soft targets `torch.FloatTensor` of shape `[B, num_labels]`):
            Classification targets; the loss is the mean of the CLS-head loss and the aux-head loss.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.defocus(pixel_values, output_hidden_states=output_hidden_states, return_dict=True)
        tokens = outputs.last_hidden_state
        logits = self.head(tokens[:, -1])
        aux_logits = None
        if self.head2 is not None:
            image_tokens = tokens[:, :-1]
            if self.config.aux_loss_mode == "pooled":
                image_tokens = image_tokens.mean(1)
            aux_logits = self.head2(image_tokens)
        loss = None
        if labels is not None:
            smoothing = self.config.label_smoothing
            loss = classification_loss(logits, labels, smoothing)
            if aux_logits is not None:
                loss = (loss + classification_loss(aux_logits, labels, smoothing)) / 2
        if not return_dict:
            return tuple(v for v in (loss, logits, aux_logits, outputs.hidden_states) if v is not None)
        return DefocusImageClassifierOutput(loss=loss, logits=logits, aux_logits=aux_logits,
                                            hidden_states=outputs.hidden_states)


__all__ = [
    "DefocusBlock",
    "DefocusForImageClassification",
    "DefocusImageClassifierOutput",
    "DefocusMLP",
    "DefocusPreTrainedModel",
    "DefocusRMSNorm",
    "DefocusStreamOutput",
    "DefocusStreamState",
    "DefocusVisionModel",
    "classification_loss",
    "drop_path",
]
