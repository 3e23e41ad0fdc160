"""The De-focus encoder as a Hugging Face backbone: feature maps for dense prediction heads (UperNet, DPT, ...).

`DefocusBackbone` follows transformers' `BackboneMixin` conventions (`stage_names`, `out_features`, `out_indices`,
`channels`, a `BackboneOutput` with `feature_maps`) and is what `AutoBackbone` builds for a `DefocusVisionConfig`
after `import defocus_mllm`, so stock heads such as `UperNetForSemanticSegmentation` take it as their backbone.

A feature map is the residual stream after one block (stage `i` = after block `i`, `"stem"` = the embedding
output), put through the encoder's final LayerNorm (`config.apply_layernorm`, on by default: the residual stream is
fp32 and grows with depth, and the LayerNorm is the one the encoder was trained to read its last stage with), with
the CLS token -- appended last in this model -- dropped, and the image tokens put back on their grid:
`[B, hidden, H/p, W/p]` for any image whose sides are multiples of the patch size `p`. The last stage's map is
therefore exactly the encoder's `last_hidden_state`. `config.backbone_feature_pyramid` adds the ViTDet simple
feature pyramid (strides `p/4, p/2, p, 2p`) for heads that fuse several scales.

The encoder lives under `defocus.` as in `DefocusForImageClassification`, so a saved or converted encoder directory
(`defocus-convert`, classification or detection checkpoint) loads with no missing encoder weights.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn
from transformers import initialization as init
from transformers.modeling_outputs import BackboneOutput

from .configuration_defocus import DefocusVisionConfig
from .modeling_defocus import DefocusPreTrainedModel, DefocusVisionModel

try:
    from transformers.backbone_utils import BackboneMixin
except ImportError:  # older releases keep it under `utils`
    from transformers.utils.backbone_utils import BackboneMixin

PYRAMID_SCALES = (4.0, 2.0, 1.0, 0.5)


class DefocusLayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a `[B, C, H, W]` map (ViTDet's norm between its two deconvolutions)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class DefocusSimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid: stride-`p` maps to strides `p/4` (two 2x2 deconvolutions with a LayerNorm
    and GELU between), `p/2` (one deconvolution), `p` (as is) and `2p` (2x2 max pooling); the width stays `hidden`.

    Given one map, every scale is made from it (ViTDet); given four, the `i`-th map makes the `i`-th scale, so the
    shallowest selected stage becomes the finest map (BEiT's and DPT's use of intermediate layers).
    """

    def __init__(self, config: DefocusVisionConfig) -> None:
        super().__init__()
        width = config.hidden_size
        self.scales = nn.ModuleList([
            nn.Sequential(nn.ConvTranspose2d(width, width, 2, stride=2),
                          DefocusLayerNorm2d(width, eps=config.layer_norm_eps), nn.GELU(),
                          nn.ConvTranspose2d(width, width, 2, stride=2)),
            nn.ConvTranspose2d(width, width, 2, stride=2),
            nn.Identity(),
            nn.MaxPool2d(2, stride=2, ceil_mode=True),  # ceil: a 1x1 map (an image of one patch) stays 1x1
        ])

    def forward(self, feature_maps: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        if len(feature_maps) == 1:
            feature_maps = feature_maps * len(self.scales)
        if len(feature_maps) != len(self.scales):
            raise ValueError(f"the simple feature pyramid takes 1 or {len(self.scales)} feature maps, got "
                             f"{len(feature_maps)}")
        return tuple(scale(x) for scale, x in zip(self.scales, feature_maps))


class DefocusBackbone(BackboneMixin, DefocusPreTrainedModel):
    """The De-focus encoder returning the feature maps of `config.out_features` (see the module docstring)."""

    has_attentions = False

    def __init__(self, config: DefocusVisionConfig) -> None:
        super().__init__(config)
        self.defocus = DefocusVisionModel(config)
        self.num_features = [config.hidden_size] * (config.num_hidden_layers + 1)
        self.feature_pyramid = None
        if config.backbone_feature_pyramid:
            if not config.reshape_hidden_states:
                raise ValueError("backbone_feature_pyramid=True needs reshape_hidden_states=True (it works on maps)")
            if len(self.out_features) not in (1, len(PYRAMID_SCALES)):
                raise ValueError(f"backbone_feature_pyramid=True needs 1 or {len(PYRAMID_SCALES)} out_features, got "
                                 f"{self.out_features}")
            self.feature_pyramid = DefocusSimpleFeaturePyramid(config)
        self.post_init()

    @property
    def channels(self) -> list[int]:
        """Width of each returned feature map (four with the feature pyramid, whatever `out_features` holds)."""
        if self.feature_pyramid is not None:
            return [self.config.hidden_size] * len(PYRAMID_SCALES)
        return [self.out_feature_channels[name] for name in self.out_features]

    def get_input_embeddings(self) -> nn.Module:
        return self.defocus.patch_embed

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, nn.ConvTranspose2d):  # PyTorch's default init, as for the encoder's convolutions
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                fan_in = module.out_channels // module.groups * math.prod(module.kernel_size)
                init.uniform_(module.bias, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        **kwargs,
    ) -> BackboneOutput | tuple:
        r"""
        Returns `feature_maps`, one per `out_features` stage (four with the feature pyramid): `[B, hidden, H/p, W/p]`
        (or `[B, (H/p)(W/p), hidden]` when `reshape_hidden_states=False`), and when asked the encoder's
        `hidden_states` exactly as `DefocusVisionModel` returns them (the last one after the final LayerNorm).
        """
        if output_attentions:
            raise ValueError("DefocusBackbone has no attention maps to return (has_attentions=False)")
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        encoder = self.defocus
        batch, _, height, width = pixel_values.shape
        grid = (height // self.config.patch_size, width // self.config.patch_size)

        # The residual stream after the embedding and after every block (fp32, un-normalised).
        residuals = [encoder.embed(pixel_values)]
        for block in encoder.blocks:
            residuals.append(block(residuals[-1]))
        norm = encoder.norm
        last = norm(residuals[-1].to(norm.weight.dtype))

        feature_maps = []
        for index, stage in enumerate(self.stage_names):
            if stage not in self.out_features:
                continue
            hidden = residuals[index]
            if self.config.apply_layernorm:
                hidden = last if index == len(residuals) - 1 else norm(hidden.to(norm.weight.dtype))
            hidden = hidden[:, :-1]  # drop the CLS token, which is the last token
            if self.config.reshape_hidden_states:
                hidden = hidden.reshape(batch, *grid, -1).permute(0, 3, 1, 2).contiguous()
            feature_maps.append(hidden)
        feature_maps = tuple(feature_maps)
        if self.feature_pyramid is not None:
            feature_maps = self.feature_pyramid(feature_maps)

        hidden_states = tuple(residuals[:-1]) + (last,) if output_hidden_states else None
        if not return_dict:
            return (feature_maps,) + ((hidden_states,) if hidden_states is not None else ())
        return BackboneOutput(feature_maps=feature_maps, hidden_states=hidden_states)


__all__ = ["DefocusBackbone", "DefocusLayerNorm2d", "DefocusSimpleFeaturePyramid", "PYRAMID_SCALES"]
