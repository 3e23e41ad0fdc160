"""LLaVA-style multimodal models with a De-focus vision tower, on the stock `LlavaForConditionalGeneration`.

Nothing of the Llava modeling code is forked: the encoder is registered with `AutoModel`, so the stock classes build
it from `LlavaConfig.vision_config`. This module only assembles the pieces (encoder, projector, language model,
tokenizer with an `<image>` token, processor, chat template) and offers the freezing helpers the recipes use.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional, Union

import torch
from PIL import Image
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PretrainedConfig,
    PreTrainedModel,
)

from .encoder.configuration_defocus import DEFOCUS_PRESETS, DefocusVisionConfig
from .encoder.image_processing import DefocusImageProcessor
from .images import load_image, to_model
from .encoder.modeling_defocus import DefocusForImageClassification, DefocusVisionModel
from .files import naming_corrupt_files
from .prompts import (  # re-exported: these names have always been importable from here
    FLATTEN_CONTENT_PRELUDE,
    IMAGE_TOKEN,
    LETTER_ANSWER_INSTRUCTION,
    LLAVA_V1_CHAT_TEMPLATE,
    LLAVA_V1_SYSTEM,
    SHORT_ANSWER_INSTRUCTION,
    UNANSWERABLE_INSTRUCTION,
    build_prompt,
    with_instruction,
)

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]


def _is_dir(value: Any) -> bool:
    return isinstance(value, (str, os.PathLike)) and Path(value).is_dir()


def load_vision_tower(vision_tower: Union[str, PathLike, DefocusVisionConfig, nn.Module],
                      image_size: Optional[int] = None) -> DefocusVisionModel:
    """A `DefocusVisionModel` from a preset name, a config, a model (an image classifier gives its encoder) or a
    saved / converted directory (classifier checkpoints included: their heads are dropped).

    A tower from a preset or a directory gets no stochastic depth (`drop_path_rate=0`, no schedule): the presets'
    rates (up to 0.75) are for encoder pre-training, and a LLaVA tower trained in train mode should not drop blocks.
    Pass a `DefocusVisionConfig` (or a model) to keep a drop-path rate on purpose."""
    if isinstance(vision_tower, DefocusForImageClassification):
        model = vision_tower.defocus
    elif isinstance(vision_tower, DefocusVisionModel):
        model = vision_tower
    elif isinstance(vision_tower, DefocusVisionConfig):
        model = DefocusVisionModel(vision_tower)
    elif _is_dir(vision_tower):
        config = AutoConfig.from_pretrained(vision_tower)
        if not isinstance(config, DefocusVisionConfig):
            raise ValueError(f"{vision_tower} holds a {type(config).__name__}, not a De-focus encoder "
                             f"(model_type={getattr(config, 'model_type', None)!r})")
        # Saved classifiers keep their weights under `defocus.`; loading through the classifier finds them.
        arch = (config.architectures or [""])[0]
        with naming_corrupt_files(vision_tower, "weights file"):
            model = (DefocusForImageClassification.from_pretrained(vision_tower).defocus
                     if arch == "DefocusForImageClassification" else DefocusVisionModel.from_pretrained(vision_tower))
        _without_drop_path(model)
    elif isinstance(vision_tower, str) and vision_tower in DEFOCUS_PRESETS:
        model = DefocusVisionModel(DefocusVisionConfig.from_preset(vision_tower))
        _without_drop_path(model)
    else:
        raise ValueError(f"vision_tower={vision_tower!r} is neither a De-focus model, config, directory nor preset "
                         f"(presets: {', '.join(sorted(DEFOCUS_PRESETS))})")
    if image_size is not None:
        if image_size % model.config.patch_size:
            raise ValueError(f"image_size={image_size} is not a multiple of patch_size={model.config.patch_size}")
        model.config.image_size = image_size
    return model


def _without_drop_path(model: DefocusVisionModel) -> None:
    """Switch a tower's stochastic depth off, in its config (saved with the LLaVA model) and in its blocks."""
    model.config.drop_path_rate = 0.0
    model.config.min_drop_path_rate = 0.0
    model.config.use_scheduled_drop_path = False
    model.set_drop_path_rate(0.0)


@contextmanager
def _zero3_init_disabled():
    """Hide an active ZeRO-3 config from transformers for the duration (it is restored afterwards).

    While a ZeRO-3 `HfDeepSpeedConfig` is alive, transformers builds every sub-model of a config (`from_config`) under
    `deepspeed.zero.Init` and initialises its weights there; for the meta-device Llava shell that is both wasted work
    (a second random LM) and a crash (weight init copies out of meta tensors). The shell's parts are replaced anyway.
    """
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = getattr(hf_deepspeed, "_hf_deepspeed_config_weak_ref", None)
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def load_language_model(language_model: Union[PathLike, PretrainedConfig, nn.Module]) -> PreTrainedModel:
    """A causal LM from a config (randomly initialised), a model or a local directory."""
    if isinstance(language_model, PreTrainedModel):
        return language_model
    if isinstance(language_model, PretrainedConfig):
        return AutoModelForCausalLM.from_config(language_model)
    if _is_dir(language_model):
        with naming_corrupt_files(language_model, "weights file"):
            return AutoModelForCausalLM.from_pretrained(language_model)
    raise ValueError(f"language_model={language_model!r} is neither a causal LM, its config, nor a local directory")


def prepare_tokenizer(tokenizer: Any) -> Any:
    """Add the `<image>` token, a pad token and a chat template to `tokenizer` (in place; returned)."""
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    if tokenizer.pad_token is None:
        # LLaVA-1.5 pads Llama with <unk>; fall back to EOS (the attention mask hides pads either way).
        tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
    if tokenizer.eos_token is None:
        raise ValueError("The tokenizer has no EOS token; answers could never end. Set `tokenizer.eos_token`.")
    if getattr(tokenizer, "chat_template", None) is None:
        tokenizer.chat_template = LLAVA_V1_CHAT_TEMPLATE
    return tokenizer


def build_processor(tokenizer: Any, vision_config: DefocusVisionConfig,
                    image_processor: Optional[DefocusImageProcessor] = None) -> LlavaProcessor:
    """`LlavaProcessor` for a De-focus tower: one placeholder per patch plus one for the CLS token."""
    image_processor = image_processor or DefocusImageProcessor.from_vision_config(vision_config)
    template = tokenizer.chat_template
    if template != LLAVA_V1_CHAT_TEMPLATE and not template.startswith(FLATTEN_CONTENT_PRELUDE):
        template = FLATTEN_CONTENT_PRELUDE + template
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=vision_config.patch_size,
                          vision_feature_select_strategy="full", num_additional_image_tokens=1,
                          image_token=IMAGE_TOKEN, chat_template=template)


def build_llava(
    vision_tower: Union[str, PathLike, DefocusVisionConfig, nn.Module],
    language_model: Union[PathLike, PretrainedConfig, nn.Module],
    *,
    tokenizer: Any = None,
    image_processor: Optional[DefocusImageProcessor] = None,
    vision_feature_layer: int = -1,
    projector_hidden_act: str = "gelu",
    image_size: Optional[int] = None,
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Assemble a `LlavaForConditionalGeneration` from a De-focus encoder and a causal LM; returns `(model, processor)`.

    The encoder and LM keep their weights; the 2-layer GELU projector (LLaVA-1.5's `mlp2x_gelu`) is new. The tokenizer
    (loaded from `language_model` when it is a directory and none is given) gains `<image>`; the embeddings are
    resized to match. `vision_feature_layer=-1` feeds the projector the final LayerNorm output, which is well scaled
    (the raw residual stream of a deep pre-norm encoder is not).

    The encoder and projector take the language model's dtype (a checkpoint loads in its saved dtype, bf16 for every
    real LM; an LM built under ZeRO-3 init takes the DeepSpeed config's), so the model runs without autocast; the
    encoder keeps its residual stream in fp32 inside. Under ZeRO-3 the LM stays partitioned as loaded; the shell is
    built with ZeRO-3 init switched off (see `_zero3_init_disabled`).
    """
    vision = load_vision_tower(vision_tower, image_size=image_size)
    if tokenizer is None:
        if not _is_dir(language_model):
            raise ValueError("Pass `tokenizer=` when `language_model` is not a directory that holds one")
        tokenizer = AutoTokenizer.from_pretrained(language_model)
    lm = load_language_model(language_model)
    tokenizer = prepare_tokenizer(tokenizer)
    positions = getattr(lm.config, "max_position_embeddings", None)
    if positions and (tokenizer.model_max_length is None or tokenizer.model_max_length > positions):
        # Saved with the processor, so that a reloaded model knows how long a prompt may be (chat checks it).
        tokenizer.model_max_length = positions

    text_config = lm.config
    config = LlavaConfig(
        vision_config=vision.config,
        text_config=text_config,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        projector_hidden_act=projector_hidden_act,
        vision_feature_select_strategy="full",
        vision_feature_layer=vision_feature_layer,
        tie_word_embeddings=getattr(text_config, "tie_word_embeddings", False),
    )
    # Build the shell on the meta device, then move the real encoder / LM in: no second copy of a 7B LM in memory.
    with _zero3_init_disabled(), torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    model.model.vision_tower = vision.to(dtype=lm.dtype)
    model.model.language_model = lm.get_decoder() if hasattr(lm, "get_decoder") else lm.model
    model.lm_head = lm.get_output_embeddings()
    projector = type(model.model.multi_modal_projector)(config)
    model.model.multi_modal_projector = projector.to(dtype=lm.dtype)
    model.config.text_config = lm.config
    if len(tokenizer) != model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    if config.tie_word_embeddings:
        model.tie_weights()
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if tensor.device.type == "meta":
            raise RuntimeError(f"build_llava left {name} uninitialised (on the meta device); please report this")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    if getattr(tokenizer, "bos_token_id", None) is not None:
        model.generation_config.bos_token_id = tokenizer.bos_token_id
    processor = build_processor(tokenizer, vision.config, image_processor)
    return model, processor


def position_limit(model: nn.Module, tokenizer: Any = None) -> Optional[int]:
    """How many tokens (prompt, image tokens and answer) the language model can place: the smaller of its
    `max_position_embeddings` and the tokenizer's `model_max_length`; None when neither says."""
    text_config = getattr(getattr(model, "config", None), "text_config", None)
    limits = [getattr(text_config, "max_position_embeddings", None),
              getattr(tokenizer, "model_max_length", None) if tokenizer is not None else None]
    limits = [int(limit) for limit in limits if limit and limit < 1e9]  # transformers' "no limit" is 1e30
    return min(limits) if limits else None


def chat(model: LlavaForConditionalGeneration, processor: LlavaProcessor,
         image: Union[Image.Image, PathLike, None], question: str, **generate_kwargs: Any) -> str:
    """Answer `question` about `image` with the processor's chat template.

    `image` is a PIL image, a file path, an `http(s)://` URL (fetched as `transformers` fetches images), or None for a
    text-only question; all are read by `defocus_mllm.images.load_image`. Greedy decoding of at most 64 new tokens
    unless `generate_kwargs` say otherwise. A prompt that does not fit the language model's positions
    (`position_limit`) is refused with a `ValueError`; an answer that would run past them is cut short (warned).
    """
    images = None if image is None else [load_image(image)]
    prompt = build_prompt(processor, question, image=image is not None)
    inputs = to_model(processor(images=images, text=[prompt], return_tensors="pt"), model)
    generate_kwargs.setdefault("max_new_tokens", 64)
    generate_kwargs.setdefault("do_sample", False)
    limit, length = position_limit(model, processor.tokenizer), inputs["input_ids"].shape[1]
    if limit is not None:
        if length >= limit:
            raise ValueError(f"The prompt is {length} tokens long (image tokens included) but the language model has "
                             f"{limit} positions (model_max_length): shorten the question or use a smaller image size")
        if generate_kwargs["max_new_tokens"] > limit - length:
            logger.warning("max_new_tokens=%d would run past the language model's %d positions; the answer is cut "
                           "to %d new tokens", generate_kwargs["max_new_tokens"], limit, limit - length)
            generate_kwargs["max_new_tokens"] = limit - length
            if generate_kwargs.get("min_new_tokens", 0) > limit - length:
                generate_kwargs["min_new_tokens"] = limit - length
    with torch.no_grad():
        output = model.generate(**inputs, **generate_kwargs)
    new_tokens = output[0, inputs["input_ids"].shape[1]:]
    return processor.tokenizer.decode(new_tokens, skip_special_tokens=True).strip()


# ---------------------------------------------------------------------------------------------- freezing helpers

def _unwrap(model: nn.Module) -> LlavaForConditionalGeneration:
    """The Llava model under PEFT / DeepSpeed / DDP wrappers."""
    seen = 0
    while not isinstance(model, LlavaForConditionalGeneration):
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif hasattr(model, "module"):
            model = model.module
        else:
            raise TypeError(f"Expected a LlavaForConditionalGeneration (possibly wrapped), got {type(model).__name__}")
        seen += 1
        if seen > 8:
            raise TypeError("Could not unwrap the model to a LlavaForConditionalGeneration")
    return model


def model_parts(model: nn.Module) -> dict[str, list[nn.Module]]:
    """The three trainable groups of a LLaVA model: vision tower, projector, language model (with its LM head)."""
    llava = _unwrap(model)
    return {
        "vision_tower": [llava.model.vision_tower],
        "projector": [llava.model.multi_modal_projector],
        "language_model": [llava.model.language_model, llava.lm_head],
    }


def set_trainable(model: nn.Module, *, vision_tower: Optional[bool] = None, projector: Optional[bool] = None,
                  language_model: Optional[bool] = None) -> None:
    """Freeze (`False`) or unfreeze (`True`) each part; `None` leaves a part as it is."""
    wanted = {"vision_tower": vision_tower, "projector": projector, "language_model": language_model}
    for name, modules in model_parts(model).items():
        if wanted[name] is None:
            continue
        for module in modules:
            module.requires_grad_(wanted[name])


def freeze_vision_tower(model: nn.Module) -> None:
    set_trainable(model, vision_tower=False)


def freeze_language_model(model: nn.Module) -> None:
    set_trainable(model, language_model=False)


def apply_lora(model: LlavaForConditionalGeneration, r: int = 128, alpha: int = 256, dropout: float = 0.05,
               target_modules: Optional[list[str]] = None, train_vision_tower: bool = False) -> nn.Module:
    """Wrap `model` with PEFT LoRA on the language model's linear layers (LLaVA-1.5's LoRA recipe).

    The projector is a PEFT `modules_to_save` module: fully trainable and stored with the adapter. The vision tower
    is frozen unless `train_vision_tower`. `target_modules` are suffixes of LM linear layer names (default: all).
    """
    from peft import LoraConfig, get_peft_model

    llava = _unwrap(model)
    names = []
    for name, module in llava.model.language_model.named_modules():
        if isinstance(module, nn.Linear) and (target_modules is None or name.rsplit(".", 1)[-1] in target_modules):
            names.append(f"model.language_model.{name}")
    if not names:
        raise ValueError(f"No linear layer of the language model matches target_modules={target_modules}")
    set_trainable(llava, vision_tower=train_vision_tower)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=names,
                        modules_to_save=["multi_modal_projector"] + (["vision_tower"] if train_vision_tower else []))
    return get_peft_model(llava, config)


def count_trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """`(trainable, total)` parameter counts (shared / tied tensors counted once)."""
    seen: set[int] = set()
    trainable = total = 0
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        # DeepSpeed ZeRO-3 partitions parameters; `ds_numel` is the full size.
        numel = getattr(param, "ds_numel", param.numel())
        total += numel
        trainable += numel if param.requires_grad else 0
    return trainable, total


__all__ = [
    "IMAGE_TOKEN",
    "LETTER_ANSWER_INSTRUCTION",
    "SHORT_ANSWER_INSTRUCTION",
    "UNANSWERABLE_INSTRUCTION",
    "with_instruction",
    "apply_lora",
    "LLAVA_V1_CHAT_TEMPLATE",
    "build_llava",
    "build_processor",
    "chat",
    "count_trainable_parameters",
    "freeze_language_model",
    "freeze_vision_tower",
    "load_language_model",
    "load_vision_tower",
    "model_parts",
    "position_limit",
    "prepare_tokenizer",
    "set_trainable",
]
