"""The recipes' arguments: one dataclass per concern, every field settable in a YAML file (`--config`) and on the
command line (`--learning_rate 1e-3`), which overrides the file.

* LLaVA stages (`recipes/pretrain.py`, `recipes/finetune.py`): `ModelArguments`, `DataArguments`,
  `LlavaTrainingArguments` (extends `transformers.TrainingArguments`).
* Encoder pretraining (`recipes/pretrain_encoder.py`): `EncoderModelArguments`, `EncoderDataArguments`, and
  `transformers.TrainingArguments`.
* Semantic segmentation (`recipes/segment.py`): `SegmentationModelArguments`, `SegmentationDataArguments`, and
  `transformers.TrainingArguments`.
"""

from __future__ import annotations

import argparse
import json
import sys
import typing
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import yaml
from transformers import HfArgumentParser, TrainingArguments

PROJECTOR_FILE = "projector.safetensors"


def _check_fields(obj: Any, at_least: dict[str, float], choices: dict[str, tuple[str, ...]] = {},
                  fractions: tuple[str, ...] = ()) -> None:
    """Range and choice checks of a recipe's fields (unset optional ones pass), naming the field: a zero or negative
    size would otherwise fail far into data preparation or the model build, and an unknown mode be read as another.
    `fractions` are probabilities and shares, in [0, 1]."""
    for name, low in at_least.items():
        value = getattr(obj, name)
        if value is not None and not value >= low:  # `not >=` also refuses NaN
            raise ValueError(f"{name}={value!r} must be at least {low:g}")
    for name in fractions:
        value = getattr(obj, name)
        if value is not None and not 0 <= value <= 1:
            raise ValueError(f"{name}={value!r} must be in [0, 1]")
    for name, allowed in choices.items():
        if getattr(obj, name) not in allowed:
            raise ValueError(f"{name}={getattr(obj, name)!r} must be one of {', '.join(map(repr, allowed))}")


# ---------------------------------------------------------------------------------------------------- LLaVA stages

@dataclass
class ModelArguments:
    model_name_or_path: Optional[str] = field(default=None, metadata={
        "help": "a saved LLaVA directory to continue from (e.g. the stage-1 output); else one is built from "
                "vision_tower + language_model"})
    vision_tower: str = field(default="mamba-tiny", metadata={
        "help": "De-focus encoder: preset name, or a saved / converted directory"})
    language_model: Optional[str] = field(default=None, metadata={
        "help": "local directory of a causal LM (with its tokenizer); empty: a tiny Llama with a tokenizer trained "
                "on the training text (the offline default)"})
    vision_feature_layer: int = -1
    image_size: Optional[int] = field(default=None, metadata={"help": "encoder input size (default: the encoder's)"})
    pretrain_projector: Optional[str] = field(default=None, metadata={
        "help": f"stage-1 output directory or {PROJECTOR_FILE} to load the projector from"})
    tiny_lm_hidden_size: int = field(default=128, metadata={"help": "offline default: width of the tiny Llama"})
    tiny_lm_layers: int = field(default=2, metadata={"help": "offline default: depth of the tiny Llama"})
    tiny_vocab_size: int = field(default=400, metadata={"help": "offline default: BPE vocabulary size"})
    vision_overrides: Optional[str] = field(default=None, metadata={
        "help": "encoder config overrides for a preset tower, JSON or key=value,key=value"})
    vision_warmup_epochs: float = field(default=0.0, metadata={
        "help": "offline stand-in for LLaVA's pretrained vision encoder: before training LLaVA, train a freshly built "
                "preset tower as an image classifier for this many epochs (0: off; skipped for saved models)"})
    vision_warmup_data: str = field(default="easy-vqa", metadata={
        "help": "warm-up images: 'easy-vqa' (classes '<color> <shape>' read off the training answers) or an image "
                "folder tree <root>/<class>/<image>"})
    vision_warmup_lr: float = field(default=2e-3, metadata={"help": "warm-up learning rate"})

    def __post_init__(self) -> None:
        _check_fields(self, {"image_size": 1, "tiny_lm_hidden_size": 1, "tiny_lm_layers": 1, "tiny_vocab_size": 1,
                             "vision_warmup_epochs": 0, "vision_warmup_lr": 0})


@dataclass
class DataArguments:
    data_path: str = field(default="easy-vqa", metadata={
        "help": "'easy-vqa' (offline, from the easy-vqa package), a LLaVA .json/.jsonl file, or a Hugging Face "
                "dataset directory with messages/images columns"})
    image_folder: Optional[str] = field(default=None, metadata={"help": "root of the LLaVA JSON image paths"})
    dataset_split: str = "train"
    easy_vqa_turns: int = field(default=4, metadata={"help": "easy-VQA questions per conversation (per image)"})
    easy_vqa_captions: bool = field(default=False, metadata={"help": "easy-VQA as captions (stage-1 data)"})
    easy_vqa_curriculum: Optional[str] = field(default=None, metadata={
        "help": "easy-VQA in ordered phases, e.g. 'described*3, open, all*2': 'described' (text only, the image "
                "replaced by its description), 'open' (open questions alone), 'all'; '*N' passes; needs "
                "train_sampling_strategy=sequential"})
    easy_vqa_max_images: Optional[int] = field(default=None, metadata={
        "help": "easy-VQA: use the questions of the first N images only (every phase of a curriculum keeps them)"})
    easy_vqa_balance_yes_no: bool = field(default=False, metadata={
        "help": "keep as many 'yes' as 'no' answers (plain and negated questions apart), so that the question's form "
                "alone cannot answer them"})
    max_train_samples: Optional[int] = None
    model_max_length: int = 2048
    image_aspect_ratio: str = field(default="pad", metadata={"help": "'pad' (LLaVA-1.5: pad to square) or 'crop'"})
    skip_bad_samples: bool = field(default=False, metadata={"help": "drop bad samples (malformed lines, unknown "
                                                                     "speakers, unreadable or missing images...) and "
                                                                     "list them in skipped_samples.txt instead of "
                                                                     "stopping"})
    allow_images_outside_folder: bool = field(default=False, metadata={
        "help": "accept image paths in a LLaVA JSON file that are absolute or climb out of image_folder ('..')"})
    image_cache_gb: float = field(default=0.0, metadata={
        "help": "keep up to this many GiB of preprocessed training images in memory (in each dataloader process), so "
                "an image read again in a later epoch or curriculum phase is not decoded again; 0: off"})

    def __post_init__(self) -> None:
        _check_fields(self, {"easy_vqa_turns": 1, "easy_vqa_max_images": 1, "max_train_samples": 1,
                             "model_max_length": 1, "image_cache_gb": 0}, {"image_aspect_ratio": ("pad", "crop")})


@dataclass
class LlavaTrainingArguments(TrainingArguments):
    stage: Optional[str] = field(default=None, metadata={
        "help": "'pretrain' (stage 1: the projector, and the vision tower with train_vision_tower) or 'finetune' "
                "(stage 2); each LLaVA recipe fixes its own (pretrain.py: 'pretrain', finetune.py: 'finetune') and "
                "refuses another value, so there is no need to set it"})
    projector_lr: Optional[float] = field(default=None, metadata={"help": "learning rate of the projector "
                                                                          "(default: learning_rate)"})
    vision_tower_lr: Optional[float] = field(default=None, metadata={"help": "learning rate of an unfrozen encoder"})
    train_vision_tower: bool = False
    lora_enable: bool = False
    lora_r: int = 128
    lora_alpha: int = 256
    lora_dropout: float = 0.05
    eval_easy_vqa: bool = field(default=False, metadata={"help": "after training, answer the easy-VQA test "
                                                                 "questions and print the accuracy"})
    eval_limit: Optional[int] = None
    eval_batch_size: int = 64
    cpu_threads: Optional[int] = field(default=None, metadata={
        "help": "intra-op threads of a CPU run (default: every core this process may use when it is the only "
                "process and OMP_NUM_THREADS is unset or 1, which is what `accelerate launch` without a config sets)"})
    cpu_keep_freed_memory: bool = field(default=True, metadata={
        "help": "CPU runs on glibc: malloc keeps the memory each step frees for the next one instead of returning it "
                "to the kernel (fewer page faults; the process's memory stays near its peak)"})

    def __post_init__(self) -> None:
        _check_fields(self, {"eval_limit": 1, "eval_batch_size": 1, "cpu_threads": 1, "lora_r": 1},
                      {"stage": (None, "pretrain", "finetune")})
        super().__post_init__()


# What both LLaVA recipes parse, in the order `parse_recipe_args` / `start_recipe` return them.
LLAVA_ARGUMENTS = (ModelArguments, DataArguments, LlavaTrainingArguments)


# ------------------------------------------------------------------------------------------- encoder pretraining

@dataclass
class EncoderModelArguments:
    preset: str = field(default="mamba-tiny", metadata={"help": "DEFOCUS_PRESETS name to build a fresh encoder from"})
    model_name_or_path: Optional[str] = field(default=None, metadata={"help": "start from a saved / converted model "
                                                                               "directory instead of a preset"})
    config_overrides: Optional[str] = field(default=None, metadata={
        "help": "config fields to override: JSON ('{\"mixer\": \"attention\"}') or 'key=value,key=value'"})
    image_size: Optional[int] = field(default=None, metadata={"help": "training resolution (default: the config's)"})
    drop_path_rate: Optional[float] = field(default=None, metadata={"help": "final drop-path rate"})
    min_drop_path_rate: Optional[float] = field(default=None, metadata={"help": "first-epoch rate of the schedule"})
    use_scheduled_drop_path: Optional[bool] = field(default=None, metadata={"help": "grow the rate linearly per epoch"})
    aux_loss_mode: Optional[str] = field(default=None, metadata={"help": "per_token | pooled | none"})
    label_smoothing: float = field(default=0.1, metadata={"help": "folded into mixup targets, or the hard-label loss"})
    layer_decay: float = field(default=1.0, metadata={"help": "layer-wise lr decay (1.0: off)"})

    def __post_init__(self) -> None:
        _check_fields(self, {"image_size": 1, "drop_path_rate": 0, "min_drop_path_rate": 0},
                      {"aux_loss_mode": (None, "per_token", "pooled", "none")},
                      fractions=("drop_path_rate", "min_drop_path_rate", "label_smoothing"))
        if not 0 < self.layer_decay <= 1:
            raise ValueError(f"layer_decay={self.layer_decay!r} must be in (0, 1] (1.0: off)")


@dataclass
class EncoderDataArguments:
    train_dir: Optional[str] = field(default=None, metadata={"help": "image folder: train_dir/<class>/<image>"})
    validation_dir: Optional[str] = field(default=None, metadata={"help": "image folder with the same classes"})
    dataset_name: Optional[str] = field(default=None, metadata={"help": "Hugging Face dataset (name, or a directory "
                                                                         "saved with save_to_disk)"})
    dataset_config_name: Optional[str] = None
    train_split: str = "train"
    validation_split: Optional[str] = "validation"
    image_column: str = "image"
    label_column: str = "label"
    max_train_samples: Optional[int] = None
    max_eval_samples: Optional[int] = None
    crop_scale_min: float = field(default=0.08, metadata={"help": "random resized crop: smallest area fraction"})
    hflip: float = 0.5
    color_jitter: float = field(default=0.4, metadata={"help": "used only without augment_fn (as in timm)"})
    augment_fn: Optional[str] = field(default=None, metadata={
        "help": "stronger PIL augmentation, 'module:factory' called as factory(image_size=, mean=), e.g. "
                "'defocus_mllm.data.augment:rand_augment' (the release's rand-m9-mstd0.5-inc1)"})
    random_erase: float = 0.25
    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    repeated_aug: int = field(default=1, metadata={"help": "DeiT repeated augmentation: copies per image (1: off)"})
    lr_reference_batch: Optional[int] = field(default=None, metadata={
        "help": "scale learning_rate linearly by global_batch / this (the release: 5e-4 per 512 images)"})

    def __post_init__(self) -> None:
        _check_fields(self, {"max_train_samples": 1, "max_eval_samples": 1, "repeated_aug": 1, "lr_reference_batch": 1,
                             "mixup_alpha": 0, "cutmix_alpha": 0, "color_jitter": 0},
                      fractions=("crop_scale_min", "hflip", "random_erase", "mixup_prob", "mixup_switch_prob"))
        if not self.crop_scale_min > 0:
            raise ValueError(f"crop_scale_min={self.crop_scale_min!r} must be in (0, 1]")



# ------------------------------------------------------------------------------------------ semantic segmentation

@dataclass
class SegmentationModelArguments:
    backbone: str = field(default="mamba-tiny", metadata={
        "help": "De-focus encoder: DEFOCUS_PRESETS name (random init), or a saved / converted encoder directory"})
    backbone_overrides: Optional[str] = field(default=None, metadata={
        "help": "encoder config overrides, JSON or key=value,key=value (e.g. mixer=attention)"})
    out_indices: Optional[list[int]] = field(default=None, metadata={
        "help": "backbone stages fed to the head (0: the embedding, i: after block i); default: the last block of "
                "each quarter of the depth"})
    feature_pyramid: bool = field(default=True, metadata={
        "help": "ViTDet simple feature pyramid: the stride-p maps become strides p/4, p/2, p, 2p"})
    decode_hidden_size: int = field(default=32, metadata={"help": "UperNet's channel width (its default, 512, is "
                                                                  "sized for ImageNet-scale backbones)"})
    auxiliary_head: bool = field(default=False, metadata={
        "help": "UperNet's FCN auxiliary head on the third map (weighted auxiliary_loss_weight; needs 3+ maps)"})
    auxiliary_channels: int = 32
    auxiliary_loss_weight: float = 0.4

    def __post_init__(self) -> None:
        _check_fields(self, {"decode_hidden_size": 1, "auxiliary_channels": 1, "auxiliary_loss_weight": 0})


@dataclass
class SegmentationDataArguments:
    dataset: str = field(default="easy-vqa", metadata={
        "help": "'easy-vqa': easy-VQA's images with the shape's mask read off the colours (offline)"})
    image_size: Optional[int] = field(default=None, metadata={"help": "training resolution (default: the images')"})
    hflip: float = field(default=0.5, metadata={"help": "probability of a random horizontal flip (training)"})
    max_train_samples: Optional[int] = None
    max_eval_samples: Optional[int] = None
    figure_images: int = field(default=8, metadata={
        "help": "test images in the predictions figure saved to output_dir/predictions.png (0: none)"})

    def __post_init__(self) -> None:
        _check_fields(self, {"image_size": 1, "max_train_samples": 1, "max_eval_samples": 1, "figure_images": 0},
                      fractions=("hflip",))


# ------------------------------------------------------------------------------------------------------ parsing

def parse_recipe_args(dataclass_types: Sequence[type], argv: Optional[list[str]] = None,
                      default_config: Optional[str] = None) -> tuple:
    """Parse `--config FILE.yaml` (defaults for any field; `default_config` when none is given) and command-line
    overrides (`--learning_rate 1e-3`) into the dataclasses."""
    parser = HfArgumentParser(dataclass_types)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, rest = pre.parse_known_args(sys.argv[1:] if argv is None else argv)
    config = known.config or default_config
    if config:
        with open(config) as f:
            values = yaml.safe_load(f) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{config}: expected a mapping of argument names to values")
        actions = {action.dest: action for action in parser._actions}
        unknown = sorted(str(k) for k in values if k not in actions)
        if unknown:
            raise ValueError(f"{config}: unknown argument(s) {unknown}")
        list_fields = {name for t in dataclass_types for name, hint in typing.get_type_hints(t).items()
                       if "list" in str(hint).lower()}  # from the annotations: HfArgumentParser rewrites Field.type
        values = {k: _config_value(config, actions[k], v, k in list_fields) for k, v in values.items()}
        parser.set_defaults(**values)
    return parser.parse_args_into_dataclasses(args=rest)


def _config_value(config: str, action: argparse.Action, value: Any, takes_list: bool) -> Any:
    """A YAML value converted and checked as argparse checks the same value on the command line. argparse applies
    `type` only to string defaults, so without this `max_steps: 2.7` or `num_train_epochs: [1, 2]` would reach the
    Trainer unconverted and fail deep inside it, with no field named."""
    if value is None:
        return None
    if isinstance(value, dict):  # a mapping field (`lr_scheduler_kwargs`) reads JSON text; other types refuse it
        return _config_scalar(config, action, json.dumps(value))
    many = action.nargs in ("+", "*") or (isinstance(action.nargs, int) and action.nargs > 1)
    if isinstance(value, list):
        if not (many or takes_list):
            raise ValueError(f"{config}: {action.dest} takes one value, not the list {value!r}")
        return [_config_scalar(config, action, v) for v in value]
    converted = _config_scalar(config, action, value)
    return [converted] if many else converted


def _config_scalar(config: str, action: argparse.Action, value: Any) -> Any:
    if isinstance(value, (list, dict)):
        raise ValueError(f"{config}: {action.dest}: {value!r} is not a single value")
    if action.type is None:
        return value
    text = ("true" if value else "false") if isinstance(value, bool) else str(value)
    if action.choices:
        kind = "one of " + ", ".join(map(str, action.choices))
    else:
        kind = "a valid " + getattr(action.type, "__name__", "value").replace("string_to_bool", "boolean")
    try:
        converted = action.type(text)
    except (TypeError, ValueError, argparse.ArgumentTypeError):
        raise ValueError(f"{config}: {action.dest}: {value!r} is not {kind}") from None
    if action.choices is not None and converted not in action.choices:
        raise ValueError(f"{config}: {action.dest}: {value!r} is not {kind}")
    return converted


def parse_overrides(text: Optional[str]) -> dict[str, Any]:
    """`'{"a": 1}'` (JSON) or `'a=1,b=x'` (values read as YAML scalars) into a dict."""
    if not text:
        return {}
    if text.lstrip().startswith("{"):
        return json.loads(text)
    overrides = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"overrides: {item!r} is not key=value")
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides


__all__ = [
    "DataArguments",
    "EncoderDataArguments",
    "EncoderModelArguments",
    "LLAVA_ARGUMENTS",
    "LlavaTrainingArguments",
    "ModelArguments",
    "PROJECTOR_FILE",
    "SegmentationDataArguments",
    "SegmentationModelArguments",
    "parse_overrides",
    "parse_recipe_args",
]
