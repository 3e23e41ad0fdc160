"""The vision warm-up: the offline stand-in for the pretrained encoder LLaVA starts from."""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import Any

from torch import nn
from transformers import TrainingArguments

from ..data.easy_vqa import load_easy_vqa_labels
from ..data.image_classification import (
    ImageClassificationCollator,
    ImageFolderDataset,
    ImageListDataset,
    PreprocessedImageDataset,
)
from ..encoder.modeling_defocus import DefocusForImageClassification
from ..llava import model_parts
from .arguments import LlavaTrainingArguments, ModelArguments
from .encoder_trainer import EncoderPretrainingTrainer

logger = logging.getLogger(__name__)

# The most memory the warm-up spends on holding its preprocessed images (easy-VQA's: 3,578 x 3 x 64 x 64 fp32, 176 MB).
PREPROCESS_ONCE_MAX_BYTES = 2 * 2**30


def warm_up_vision_tower(model: nn.Module, image_processor: Any, model_args: ModelArguments,
                         args: LlavaTrainingArguments) -> dict[str, float]:
    """Train the LLaVA's (fresh) vision tower in place as an image classifier, the offline stand-in for the
    pretrained encoder LLaVA starts from (docs/easy_vqa.md says why). Returns the warm-up's training metrics.

    The classes are easy-VQA's '<color> <shape>' labels (or the sub-folders of an image-folder tree), and the
    images go through the LLaVA processor's own preprocessing, so stage 2 sees the same inputs. Not for DeepSpeed
    runs.
    """
    if args.deepspeed or os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        raise ValueError("vision_warmup_epochs > 0 runs without DeepSpeed: warm the encoder up in a plain run (or with "
                         "recipes/pretrain_encoder.py) and pass the result as vision_tower")

    def transform(image):  # the LLaVA processor's own preprocessing, so stage 2 sees the same inputs
        return image_processor(image, return_tensors="pt")["pixel_values"][0]

    if model_args.vision_warmup_data == "easy-vqa":
        paths, labels, classes = load_easy_vqa_labels("train")
        dataset: Any = ImageListDataset(list(zip(paths, labels)), transform, classes)
    else:
        dataset = ImageFolderDataset(model_args.vision_warmup_data, transform)
    # The processor is deterministic, so each image is decoded and preprocessed once rather than once per epoch
    # (decoding is a large share of a tiny encoder's step: docs/easy_vqa.md), when the tensor fits the budget.
    if model_args.vision_warmup_epochs > 1 and PreprocessedImageDataset.num_bytes(dataset) <= PREPROCESS_ONCE_MAX_BYTES:
        dataset = PreprocessedImageDataset(dataset, show_progress=not args.disable_tqdm and args.process_index == 0)
    tower = model_parts(model)["vision_tower"][0]
    config = copy.deepcopy(tower.config)
    config.num_labels = len(dataset.classes)
    classifier = DefocusForImageClassification(config)
    classifier.defocus = tower  # shared, so training the classifier trains the LLaVA's tower in place
    warmup_args = TrainingArguments(
        output_dir=str(Path(args.output_dir) / "vision-warmup"), num_train_epochs=model_args.vision_warmup_epochs,
        learning_rate=model_args.vision_warmup_lr, per_device_train_batch_size=args.per_device_train_batch_size,
        lr_scheduler_type="cosine", warmup_steps=args.warmup_steps, weight_decay=0.0, seed=args.seed,
        logging_steps=args.logging_steps, save_strategy="no", report_to=args.report_to, use_cpu=args.use_cpu,
        bf16=args.bf16, dataloader_num_workers=args.dataloader_num_workers, disable_tqdm=args.disable_tqdm)
    trainer = EncoderPretrainingTrainer(model=classifier, args=warmup_args, train_dataset=dataset,
                                       data_collator=ImageClassificationCollator())
    logger.info("vision warm-up: %d images in %d classes, %.1f epochs", len(dataset), len(dataset.classes),
                model_args.vision_warmup_epochs)
    metrics = trainer.train().metrics
    return {f"vision_warmup_{k}": v for k, v in metrics.items()}


__all__ = ["warm_up_vision_tower"]
