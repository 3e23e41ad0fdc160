"""The steps of encoder pretraining between parsing and training (`recipes/pretrain_encoder.py`): transforms,
data, model and the learning-rate scaling."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Optional

from torch.utils.data import Dataset, Subset
from transformers import TrainingArguments

from ..data.augment import IMAGENET_MEAN, ImageClassificationTransform, load_augment_factory
from ..data.image_classification import HFImageClassificationDataset, ImageFolderDataset
from ..encoder.configuration_defocus import DefocusVisionConfig
from ..encoder.modeling_defocus import DefocusForImageClassification
from ..files import naming_corrupt_files
from .arguments import EncoderDataArguments, EncoderModelArguments, parse_overrides

logger = logging.getLogger(__name__)


def build_classification_datasets(data_args: EncoderDataArguments, train_tf: Callable, eval_tf: Callable
                                  ) -> tuple[Dataset, Optional[Dataset], list[str]]:
    """`(train dataset, eval dataset or None, class names)` from an image folder or a Hugging Face dataset."""
    if data_args.train_dir:
        train = ImageFolderDataset(data_args.train_dir, train_tf)
        evaluation = (ImageFolderDataset(data_args.validation_dir, eval_tf, classes=train.classes)
                      if data_args.validation_dir else None)
        classes = train.classes
    elif data_args.dataset_name:
        import datasets

        with naming_corrupt_files(data_args.dataset_name, "data file", recursive=True):
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
    return Subset(dataset, range(min(n, len(dataset))))


def build_classifier(model_args: EncoderModelArguments, classes: list[str]) -> DefocusForImageClassification:
    """A fresh preset, or a saved / converted model (new head when the classes differ), with the run's overrides."""
    overrides = parse_overrides(model_args.config_overrides)
    for name in ("image_size", "drop_path_rate", "min_drop_path_rate", "use_scheduled_drop_path", "aux_loss_mode"):
        if getattr(model_args, name) is not None:
            overrides[name] = getattr(model_args, name)
    overrides.update(num_labels=len(classes), id2label=dict(enumerate(classes)),
                     label2id={c: i for i, c in enumerate(classes)}, label_smoothing=model_args.label_smoothing)
    if model_args.model_name_or_path:
        config = DefocusVisionConfig.from_pretrained(model_args.model_name_or_path, **overrides)
        with naming_corrupt_files(model_args.model_name_or_path, "weights file"):
            return DefocusForImageClassification.from_pretrained(model_args.model_name_or_path, config=config,
                                                                 ignore_mismatched_sizes=True)
    return DefocusForImageClassification(DefocusVisionConfig.from_preset(model_args.preset, **overrides))


def encoder_image_size(model_args: EncoderModelArguments) -> int:
    """The training resolution: `--image_size`, else the config's."""
    if model_args.image_size:
        return model_args.image_size
    config = (DefocusVisionConfig.from_pretrained(model_args.model_name_or_path) if model_args.model_name_or_path
              else DefocusVisionConfig.from_preset(model_args.preset))
    return config.image_size


def build_classification_transforms(data_args: EncoderDataArguments, image_size: int
                                    ) -> tuple[ImageClassificationTransform, ImageClassificationTransform]:
    """`(train, eval)` transforms at `image_size`, normalised with the ImageNet mean / std the encoder is served with."""
    pil_augment = None
    if data_args.augment_fn:
        pil_augment = load_augment_factory(data_args.augment_fn)(image_size=image_size, mean=IMAGENET_MEAN)
    train_tf = ImageClassificationTransform(image_size, train=True, scale=(data_args.crop_scale_min, 1.0),
                                            hflip=data_args.hflip, color_jitter=data_args.color_jitter,
                                            pil_augment=pil_augment, random_erase=data_args.random_erase)
    return train_tf, ImageClassificationTransform(image_size, train=False)


def scale_learning_rate(args: TrainingArguments, reference_batch: Optional[int]) -> None:
    """Linear scaling: `learning_rate * global batch / reference_batch` (the release: 5e-4 per 512 images)."""
    if not reference_batch:
        return
    global_batch = args.per_device_train_batch_size * args.world_size * args.gradient_accumulation_steps
    scaled = args.learning_rate * global_batch / reference_batch
    logger.info("learning rate %.3g scaled to %.3g for a global batch of %d", args.learning_rate, scaled, global_batch)
    args.learning_rate = scaled


__all__ = [
    "build_classification_datasets",
    "build_classification_transforms",
    "build_classifier",
    "encoder_image_size",
    "scale_learning_rate",
]
