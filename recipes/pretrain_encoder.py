"""Pretrain a De-focus encoder on image classification (SPEC §2.5): aux loss, scheduled drop path, mixup / cutmix.

    accelerate launch recipes/pretrain_encoder.py --config recipes/configs/encoder_tiny.yaml --train_dir DATA/train
    accelerate launch --config_file ACCELERATE.yaml recipes/pretrain_encoder.py --config recipes/configs/encoder_mamba_base_in1k.yaml

Every field of the dataclasses below and of `transformers.TrainingArguments` can be set in the YAML file and
overridden on the command line (`--learning_rate 1e-3`). The saved directory loads with
`AutoModelForImageClassification.from_pretrained` (after `import defocus_mllm`) and works as a LLaVA vision tower.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch.utils.data
import transformers
from transformers import TrainingArguments, set_seed
from transformers.trainer_utils import get_last_checkpoint

from defocus_mllm import DefocusForImageClassification, DefocusVisionConfig
from defocus_mllm.augment import IMAGENET_MEAN, ImageClassificationTransform, MixupCutmix, load_augment_factory
from defocus_mllm.callbacks import ScheduledDropPathCallback
from defocus_mllm.data.image_classification import (
    HFImageClassificationDataset,
    ImageClassificationCollator,
    ImageFolderDataset,
)
from defocus_mllm.encoder_pretraining import EncoderPretrainingTrainer, keep_main_logits, top_k_accuracy
from defocus_mllm.training import parse_overrides, parse_recipe_args

logger = logging.getLogger("pretrain_encoder")


@dataclass
class ModelArguments:
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


@dataclass
class DataArguments:
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
                "'defocus_mllm.augment:rand_augment' (the release's rand-m9-mstd0.5-inc1)"})
    random_erase: float = 0.25
    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    repeated_aug: int = field(default=1, metadata={"help": "DeiT repeated augmentation: copies per image (1: off)"})
    lr_reference_batch: Optional[int] = field(default=None, metadata={
        "help": "scale learning_rate linearly by global_batch / this (the release: 5e-4 per 512 images)"})


def parse_args(argv: Optional[list[str]] = None) -> tuple[ModelArguments, DataArguments, TrainingArguments]:
    """`--config FILE.yaml` gives defaults for any field; other command-line flags override them."""
    return parse_recipe_args((ModelArguments, DataArguments, TrainingArguments), argv)


def build_datasets(data_args: DataArguments, train_tf, eval_tf):
    """-> (train dataset, eval dataset or None, class names)."""
    if data_args.train_dir:
        train = ImageFolderDataset(data_args.train_dir, train_tf)
        evaluation = (ImageFolderDataset(data_args.validation_dir, eval_tf, classes=train.classes)
                      if data_args.validation_dir else None)
        classes = train.classes
    elif data_args.dataset_name:
        import datasets

        if Path(data_args.dataset_name).is_dir() and any(
                (Path(data_args.dataset_name) / f).exists() for f in ("dataset_dict.json", "state.json")):
            raw = datasets.load_from_disk(data_args.dataset_name)
        else:
            raw = datasets.load_dataset(data_args.dataset_name, data_args.dataset_config_name)
        if data_args.train_split not in raw:
            raise ValueError(f"Dataset {data_args.dataset_name} has no split {data_args.train_split!r}: {list(raw)}")
        columns = (data_args.image_column, data_args.label_column)
        train = HFImageClassificationDataset(raw[data_args.train_split], train_tf, *columns)
        evaluation = None
        if data_args.validation_split and data_args.validation_split in raw:
            evaluation = HFImageClassificationDataset(raw[data_args.validation_split], eval_tf, *columns)
        num_classes = train.classes and len(train.classes) or int(max(raw[data_args.train_split][data_args.label_column])) + 1
        classes = train.classes or [str(i) for i in range(num_classes)]
    else:
        raise ValueError("Give the training data: --train_dir (image folder) or --dataset_name (Hugging Face dataset)")
    if data_args.max_train_samples:
        train = _subset(train, data_args.max_train_samples)
    if evaluation is not None and data_args.max_eval_samples:
        evaluation = _subset(evaluation, data_args.max_eval_samples)
    return train, evaluation, classes


def _subset(dataset, n: int):
    return torch.utils.data.Subset(dataset, range(min(n, len(dataset))))


def build_model(model_args: ModelArguments, classes: list[str]) -> DefocusForImageClassification:
    overrides = parse_overrides(model_args.config_overrides)
    for name in ("image_size", "drop_path_rate", "min_drop_path_rate", "use_scheduled_drop_path", "aux_loss_mode"):
        if getattr(model_args, name) is not None:
            overrides[name] = getattr(model_args, name)
    overrides.update(num_labels=len(classes), id2label=dict(enumerate(classes)),
                     label2id={c: i for i, c in enumerate(classes)}, label_smoothing=model_args.label_smoothing)
    if model_args.model_name_or_path:
        config = DefocusVisionConfig.from_pretrained(model_args.model_name_or_path, **overrides)
        return DefocusForImageClassification.from_pretrained(model_args.model_name_or_path, config=config,
                                                             ignore_mismatched_sizes=True)
    return DefocusForImageClassification(DefocusVisionConfig.from_preset(model_args.preset, **overrides))


def main(argv: Optional[list[str]] = None) -> dict:
    model_args, data_args, training_args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        level=logging.INFO if training_args.should_log else logging.WARNING)
    transformers.utils.logging.set_verbosity(logging.INFO if training_args.should_log else logging.WARNING)
    logging.getLogger("defocus_mllm").setLevel(logging.INFO)
    set_seed(training_args.seed)

    # Train at the config's image size (or --image_size) with the ImageNet mean / std the encoder is served with.
    base_config = (DefocusVisionConfig.from_pretrained(model_args.model_name_or_path) if model_args.model_name_or_path
                   else DefocusVisionConfig.from_preset(model_args.preset))
    image_size = model_args.image_size or base_config.image_size
    pil_augment = None
    if data_args.augment_fn:
        pil_augment = load_augment_factory(data_args.augment_fn)(image_size=image_size, mean=IMAGENET_MEAN)
    train_tf = ImageClassificationTransform(image_size, train=True, scale=(data_args.crop_scale_min, 1.0),
                                            hflip=data_args.hflip, color_jitter=data_args.color_jitter,
                                            pil_augment=pil_augment, random_erase=data_args.random_erase)
    eval_tf = ImageClassificationTransform(image_size, train=False)
    train_dataset, eval_dataset, classes = build_datasets(data_args, train_tf, eval_tf)
    logger.info("%d training images, %s evaluation images, %d classes", len(train_dataset),
                len(eval_dataset) if eval_dataset is not None else "no", len(classes))

    model = build_model(model_args, classes)
    config = model.config
    if data_args.lr_reference_batch:
        global_batch = (training_args.per_device_train_batch_size * training_args.world_size
                        * training_args.gradient_accumulation_steps)
        scaled = training_args.learning_rate * global_batch / data_args.lr_reference_batch
        logger.info("learning rate %.3g scaled to %.3g for a global batch of %d", training_args.learning_rate, scaled,
                    global_batch)
        training_args.learning_rate = scaled

    callbacks = []
    if config.use_scheduled_drop_path:
        callbacks.append(ScheduledDropPathCallback(config.min_drop_path_rate, config.drop_path_rate))
    mixup = MixupCutmix(len(classes), data_args.mixup_alpha, data_args.cutmix_alpha, data_args.mixup_prob,
                        data_args.mixup_switch_prob, model_args.label_smoothing)
    trainer = EncoderPretrainingTrainer(
        model=model, args=training_args, train_dataset=train_dataset, eval_dataset=eval_dataset,
        data_collator=ImageClassificationCollator(), compute_metrics=top_k_accuracy,
        preprocess_logits_for_metrics=keep_main_logits, callbacks=callbacks, mixup=mixup,
        layer_decay=model_args.layer_decay, repeated_aug=data_args.repeated_aug)

    resume = training_args.resume_from_checkpoint
    if resume == "last":  # the newest checkpoint-* in output_dir, or a fresh start when there is none
        resume = get_last_checkpoint(training_args.output_dir) if os.path.isdir(training_args.output_dir) else None
    result = trainer.train(resume_from_checkpoint=resume)
    trainer.save_model()
    metrics = dict(result.metrics)
    if eval_dataset is not None:
        metrics.update(trainer.evaluate())
    trainer.log_metrics("all", metrics)
    trainer.save_metrics("all", metrics)
    trainer.save_state()
    return metrics


if __name__ == "__main__":
    main()
