"""Configuration of the De-focus vision encoder (all token mixers share it)."""

from __future__ import annotations

import copy
from typing import Any

from transformers import PretrainedConfig

try:
    from transformers.backbone_utils import BackboneConfigMixin
except ImportError:  # older releases keep it under `utils`
    from transformers.utils.backbone_utils import BackboneConfigMixin

AUX_LOSS_MODES = ("per_token", "pooled", "none")
HEAD_TYPES = ("linear", "mlp")
# Sizes, counts and scale factors: zero or negative values build no model (or a silently empty one).
POSITIVE_FIELDS = ("hidden_size", "num_hidden_layers", "intermediate_size", "state_size", "time_step_rank",
                   "conv_kernel", "patch_size", "image_size", "num_channels", "rope_scale_factor", "delta_scale_factor")


class DefocusVisionConfig(BackboneConfigMixin, PretrainedConfig):
    r"""
    Configuration of [`DefocusVisionModel`] and [`DefocusForImageClassification`].

    An image is cut into `patch_size` patches, flattened row-major into a 1D sequence, and a CLS token is
    *appended* (the last token of a causal model is the only one that sees the whole image). The blocks are
    `x = x + drop_path(mixer(RMSNorm(x)))`; the mixer is chosen by `mixer`.

    Args:
        mixer (`str`): `"mamba"` (the released De-focus Mamba), `"attention"` (De-focus ViT) or `"retention"`
            (De-focus RetNet). The mixer checks its own fields (this one included) when the model is built: the
            configuration imports nothing of the model.
        hidden_size, num_hidden_layers: width and depth of the residual stream.
        intermediate_size (`int`): Mamba's inner width `D` (2x hidden in the release); for `mixer="retention"` the
            width of the values and the gate (2x hidden in RetNet).
        state_size (`int`): Mamba's state size `N`.
        time_step_rank (`int`): rank `R` of the `dt` projection.
        conv_kernel (`int`): width of the causal depthwise convolution.
        group_norm_size (`int`): channels per group of the weightless RMS group norm on the scan output.
        use_rope (`bool`): the rotary (high-pass) half of the bandpass filter.
        rope_mode (`str`): `"learnable"` or `"fixed"` rotary frequencies (ignored when `use_rope=False`).
        decay_mode (`str`): for attention / retention, `"learnable"`, `"fixed"` or `"none"` decay (low-pass half).
        rope_scale_factor (`float`): positions are divided by it (the release uses 4 at 384px for 4x more tokens).
        delta_scale_factor (`float`): Mamba's `delta` is divided by it (2 at 384px in the release).
        causal (`bool`): causal token mixing; `False` only makes sense for `mixer="attention"` (non-causal ViT).
        num_attention_heads (`int`): heads of the attention / retention mixers.
        attention_backend (`str`): how `mixer="attention"` computes softmax attention: `"sdpa"`
            (`scaled_dot_product_attention` with a dense `[H, L, L]` decay + mask bias), `"chunked"` (SDPA one tile
            of queries at a time, the bias built per tile: memory linear in the length), `"flex"` (FlexAttention under
            `torch.compile`: the decay as a `score_mod`, causality as a block mask), `"flex_eager"` (FlexAttention
            without compiling, for debugging) or `"auto"` (`"flex"` on CUDA, `"chunked"` elsewhere; docs/method.md
            §3.4).
            The same numbers either way; a run-time choice, also settable per mixer (`mixer.attention_backend`).
        mlp_ratio (`float`): width of the feed-forward block of the attention / retention variants (0: none).
        patch_size, image_size, num_channels: the patch embedding; any multiple of `patch_size` works at run time,
            `image_size` is the training / preprocessing size.
        use_abs_pos_embed (`bool`): optional learnable absolute position embedding (off in the release).
        drop_path_rate (`float`): drop-path rate of the last layer; layer `i` gets `rate * i / (depth - 1)`.
        min_drop_path_rate, use_scheduled_drop_path: the paper's schedule (rate grows linearly from
            `min_drop_path_rate` to `drop_path_rate` over training; set at run time by the recipes).
        aux_loss_mode (`str`): `"per_token"` (the release: aux head on every image token), `"pooled"`
            (the paper's figure: average-pool then the aux head) or `"none"`.
        head_type (`str`): `"linear"` (ImageNet-1k heads) or `"mlp"` (Linear-Tanh-Linear, 3x hidden; 21k-style).
        label_smoothing (`float`): used by the classification loss for hard labels.
        rms_norm_eps, layer_norm_eps: block RMSNorm and final LayerNorm epsilons.
        initializer_range (`float`): std of the truncated-normal init of every Linear.
        time_step_min, time_step_max, time_step_floor, time_step_scale: `dt` initialisation.
        out_features (`list[str]`), out_indices (`list[int]`): the stages [`DefocusBackbone`] returns, named after
            `stage_names` = `["stem", "stage1", ..., "stageN"]` (the embedding output, then each block); either
            one sets the other (default: the last stage), as in every Hugging Face backbone config.
        apply_layernorm (`bool`): the backbone's feature maps go through the encoder's final LayerNorm (the
            residual stream is fp32 and grows with depth); `False` returns the raw residual stream.
        reshape_hidden_states (`bool`): feature maps `[B, hidden, H/p, W/p]` (CLS token dropped); `False`: the image
            tokens `[B, (H/p)(W/p), hidden]`.
        backbone_feature_pyramid (`bool`): the ViTDet simple feature pyramid on top of the backbone: the stride-`p`
            maps become maps at strides `p/4, p/2, p, 2p` (one selected stage feeds all four scales; four
            selected stages get one scale each, shallowest finest), for heads with an FPN such as UperNet.
    """

    model_type = "defocus_vision"

    def __init__(
        self,
        mixer: str = "mamba",
        hidden_size: int = 768,
        num_hidden_layers: int = 24,
        intermediate_size: int = 1536,
        state_size: int = 16,
        time_step_rank: int = 48,
        conv_kernel: int = 4,
        group_norm_size: int = 64,
        use_rope: bool = True,
        rope_mode: str = "learnable",
        decay_mode: str = "learnable",
        rope_scale_factor: float = 1.0,
        delta_scale_factor: float = 1.0,
        causal: bool = True,
        num_attention_heads: int = 12,
        attention_backend: str = "auto",
        mlp_ratio: float = 4.0,
        patch_size: int = 16,
        image_size: int = 224,
        num_channels: int = 3,
        use_abs_pos_embed: bool = False,
        drop_path_rate: float = 0.0,
        min_drop_path_rate: float = 0.0,
        use_scheduled_drop_path: bool = False,
        aux_loss_mode: str = "per_token",
        head_type: str = "linear",
        label_smoothing: float = 0.0,
        rms_norm_eps: float = 1e-5,
        layer_norm_eps: float = 1e-6,
        initializer_range: float = 0.02,
        time_step_min: float = 1e-3,
        time_step_max: float = 0.1,
        time_step_floor: float = 1e-4,
        time_step_scale: float = 1.0,
        out_features: list[str] | None = None,
        out_indices: list[int] | None = None,
        apply_layernorm: bool = True,
        reshape_hidden_states: bool = True,
        backbone_feature_pyramid: bool = False,
        **kwargs: Any,
    ) -> None:
        self.mixer = mixer
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.intermediate_size = intermediate_size
        self.state_size = state_size
        self.time_step_rank = time_step_rank
        self.conv_kernel = conv_kernel
        self.group_norm_size = group_norm_size
        self.use_rope = use_rope
        self.rope_mode = rope_mode
        self.decay_mode = decay_mode
        self.rope_scale_factor = rope_scale_factor
        self.delta_scale_factor = delta_scale_factor
        self.causal = causal
        self.num_attention_heads = num_attention_heads
        self.attention_backend = attention_backend
        self.mlp_ratio = mlp_ratio
        self.patch_size = patch_size
        self.image_size = image_size
        self.num_channels = num_channels
        self.use_abs_pos_embed = use_abs_pos_embed
        self.drop_path_rate = drop_path_rate
        self.min_drop_path_rate = min_drop_path_rate
        self.use_scheduled_drop_path = use_scheduled_drop_path
        self.aux_loss_mode = aux_loss_mode
        self.head_type = head_type
        self.label_smoothing = label_smoothing
        self.rms_norm_eps = rms_norm_eps
        self.layer_norm_eps = layer_norm_eps
        self.initializer_range = initializer_range
        self.time_step_min = time_step_min
        self.time_step_max = time_step_max
        self.time_step_floor = time_step_floor
        self.time_step_scale = time_step_scale
        self.validate_sizes()  # before anything (the backbone stages, say) is derived from them
        self.apply_layernorm = apply_layernorm
        self.reshape_hidden_states = reshape_hidden_states
        self.backbone_feature_pyramid = backbone_feature_pyramid
        kwargs.pop("stage_names", None)  # derived from the depth (see `stage_names`)
        super().__init__(**kwargs)
        self.set_output_features_output_indices(out_features=out_features, out_indices=out_indices)
        self.validate_fields()

    def validate_sizes(self) -> None:
        """Raise a `ValueError` naming the first size, count or scale factor that is not a positive number."""
        for name in POSITIVE_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or value == float("inf"):
                raise ValueError(f"DefocusVisionConfig: {name}={value!r} must be positive")

    def validate_fields(self) -> None:
        """Raise a `ValueError` that names the field when the configuration cannot describe a model.

        Only what the configuration knows by itself: the fields of a token mixer (`mixer` included) are checked by
        the mixer's `validate_config` when the model is built.
        """
        self.validate_sizes()
        checks = [
            (self.aux_loss_mode in AUX_LOSS_MODES, f"aux_loss_mode={self.aux_loss_mode!r} must be one of {AUX_LOSS_MODES}"),
            (self.head_type in HEAD_TYPES, f"head_type={self.head_type!r} must be one of {HEAD_TYPES}"),
            (self.image_size % self.patch_size == 0, f"image_size={self.image_size} is not a multiple of patch_size={self.patch_size}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"DefocusVisionConfig: {message}")

    @property
    def stage_names(self) -> list[str]:
        """The backbone's stages: `"stem"` (the embedding output) and `"stage{i}"` (after block `i`)."""
        return ["stem"] + [f"stage{i}" for i in range(1, self.num_hidden_layers + 1)]

    @property
    def num_image_tokens(self) -> int:
        """Tokens the encoder emits at `image_size`: the patches plus the CLS token."""
        return (self.image_size // self.patch_size) ** 2 + 1

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "DefocusVisionConfig":
        """Build a configuration from a named preset (see `DEFOCUS_PRESETS`), with keyword overrides."""
        if name not in DEFOCUS_PRESETS:
            raise ValueError(f"Unknown De-focus preset {name!r}; available: {', '.join(sorted(DEFOCUS_PRESETS))}")
        kwargs = copy.deepcopy(DEFOCUS_PRESETS[name])
        kwargs.update(overrides)
        return cls(**kwargs)


def _mamba(hidden: int, depth: int, **extra: Any) -> dict[str, Any]:
    preset = dict(mixer="mamba", hidden_size=hidden, num_hidden_layers=depth, intermediate_size=2 * hidden,
                  state_size=16, time_step_rank=48, conv_kernel=4, group_norm_size=64, use_rope=True,
                  num_labels=1000)
    preset.update(extra)
    return preset


def _vit(hidden: int, depth: int, heads: int, **extra: Any) -> dict[str, Any]:
    preset = dict(mixer="attention", hidden_size=hidden, num_hidden_layers=depth, num_attention_heads=heads,
                  mlp_ratio=4.0, use_rope=True, rope_mode="learnable", decay_mode="learnable", num_labels=1000)
    preset.update(extra)
    return preset


def _retnet(hidden: int, depth: int, heads: int, **extra: Any) -> dict[str, Any]:
    # RetNet's 2x-wide values and gate; an MLP of 2.4x lands the base size on the paper's 92.7M (1k head)
    preset = dict(mixer="retention", hidden_size=hidden, num_hidden_layers=depth, num_attention_heads=heads,
                  intermediate_size=2 * hidden, mlp_ratio=2.4, use_rope=True, rope_mode="learnable",
                  decay_mode="learnable", num_labels=1000)
    preset.update(extra)
    return preset


# Plain baselines of the paper's comparison: no learnable filter, no aux loss, DeiT's constant drop path.
_NO_FILTER = dict(use_rope=False, decay_mode="none", aux_loss_mode="none")
_DEFOCUS_DROP_PATH = dict(drop_path_rate=0.75, min_drop_path_rate=0.1, use_scheduled_drop_path=True)
# The miniature study's size: `mamba-tiny`'s width (64), depth (4), patch and image size, with 4 heads.
_TINY = dict(patch_size=8, image_size=64, num_labels=10)

# The released De-focus Mamba sizes (docs/method.md §2.5). `*-causal` presets are the plain causal baselines
# of the paper's comparison: the same network without the learnable bandpass filter.
DEFOCUS_PRESETS: dict[str, dict[str, Any]] = {
    "mamba-small": _mamba(384, 24, drop_path_rate=0.3),
    "mamba-base": _mamba(768, 24, drop_path_rate=0.75, min_drop_path_rate=0.1, use_scheduled_drop_path=True),
    "mamba-large": _mamba(1024, 48, drop_path_rate=0.7, min_drop_path_rate=0.1, use_scheduled_drop_path=True,
                          head_type="mlp"),
    "mamba-large-384": _mamba(1024, 48, head_type="mlp", image_size=384, delta_scale_factor=2.0,
                              rope_scale_factor=4.0),
    "mamba-base-causal": _mamba(768, 24, use_rope=False, aux_loss_mode="none"),
    # A few-million-parameter encoder for CPU work (tests, offline recipes, the miniature study).
    "mamba-tiny": dict(mixer="mamba", hidden_size=64, num_hidden_layers=4, intermediate_size=128, state_size=16,
                       time_step_rank=8, group_norm_size=32, patch_size=8, image_size=64, num_labels=10),
    # De-focus ViT (docs/method.md §2.6) and its baselines: DeiT sizes, no absolute position embedding.
    "vit-small": _vit(384, 12, 6, drop_path_rate=0.3),
    "vit-base": _vit(768, 12, 12, **_DEFOCUS_DROP_PATH),
    "vit-base-causal": _vit(768, 12, 12, drop_path_rate=0.1, **_NO_FILTER),
    "vit-base-noncausal": _vit(768, 12, 12, causal=False, drop_path_rate=0.1, **_NO_FILTER),
    # De-focus RetNet; the causal RetNet baseline keeps RetNet's fixed multi-scale decay but no learnable filter.
    "retnet-base": _retnet(768, 12, 12, **_DEFOCUS_DROP_PATH),
    "retnet-base-causal": _retnet(768, 12, 12, use_rope=False, decay_mode="fixed", aux_loss_mode="none",
                                  drop_path_rate=0.1),
    "vit-tiny": _vit(64, 4, 4, **_TINY),
    "vit-tiny-causal": _vit(64, 4, 4, **_TINY, **_NO_FILTER),
    "vit-tiny-noncausal": _vit(64, 4, 4, causal=False, **_TINY, **_NO_FILTER),
    "retnet-tiny": _retnet(64, 4, 4, **_TINY),
    "retnet-tiny-causal": _retnet(64, 4, 4, use_rope=False, decay_mode="fixed", aux_loss_mode="none", **_TINY),
}
DEFOCUS_PRESETS["mamba-tiny-causal"] = dict(DEFOCUS_PRESETS["mamba-tiny"], use_rope=False, aux_loss_mode="none")


def __getattr__(name: str) -> Any:
    # The value lists moved to the modules that own them (a configuration imports nothing of its model); the old
    # names stay importable from here, resolved only when asked for.
    if name == "FILTER_MODES":
        from .filters import FILTER_MODES

        return FILTER_MODES
    if name == "ATTENTION_BACKENDS":
        from .mixers.attention import ATTENTION_BACKENDS

        return ATTENTION_BACKENDS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
