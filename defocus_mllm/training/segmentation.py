"""The steps of semantic segmentation (`recipes/segment.py`): data, the UperNet model on a De-focus backbone, the
IoU metrics and the figure of predictions.

The model is the stock `transformers.UperNetForSemanticSegmentation` built from a `UperNetConfig` whose
`backbone_config` is a `DefocusVisionConfig`: `import defocus_mllm` registers `DefocusBackbone` with
`AutoBackbone`, which is how UperNet builds its backbone.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw
from transformers import EvalPrediction, UperNetConfig, UperNetForSemanticSegmentation

from ..data.segmentation import EASY_VQA_SEGMENTATION_LABELS, SegmentationDataset, easy_vqa_segmentation
from ..encoder.backbone import DefocusBackbone
from ..encoder.configuration_defocus import DefocusVisionConfig
from .arguments import SegmentationDataArguments, SegmentationModelArguments, parse_overrides


def build_segmentation_datasets(data_args: SegmentationDataArguments
                                ) -> tuple[SegmentationDataset, SegmentationDataset, tuple[str, ...]]:
    """`(train, test, label names)`: easy-VQA's 4,000 training and 1,000 test images with their shape masks."""
    if data_args.dataset != "easy-vqa":
        raise ValueError(f"dataset={data_args.dataset!r}: the segmentation recipe knows 'easy-vqa' only")
    train_images, train_masks, _ = easy_vqa_segmentation("train", data_args.max_train_samples)
    test_images, test_masks, _ = easy_vqa_segmentation("test", data_args.max_eval_samples)
    train = SegmentationDataset(train_images, train_masks, data_args.image_size, hflip=data_args.hflip)
    test = SegmentationDataset(test_images, test_masks, data_args.image_size)
    return train, test, EASY_VQA_SEGMENTATION_LABELS


def default_out_indices(depth: int) -> list[int]:
    """The last block of each quarter of the depth (`[3, 6, 9, 12]` for 12 blocks, as ViT UperNets take), or the
    last block alone for encoders shallower than 4."""
    return [depth * k // 4 for k in range(1, 5)] if depth >= 4 else [depth]


def build_segmentation_model(model_args: SegmentationModelArguments, labels: Sequence[str]
                             ) -> UperNetForSemanticSegmentation:
    """UperNet on a De-focus backbone: a fresh preset, or a saved / converted encoder directory whose weights are
    loaded into the backbone (the head starts from scratch)."""
    overrides = parse_overrides(model_args.backbone_overrides)
    pretrained = Path(model_args.backbone).is_dir()
    if pretrained:
        backbone_config = DefocusVisionConfig.from_pretrained(model_args.backbone, **overrides)
    else:
        backbone_config = DefocusVisionConfig.from_preset(model_args.backbone, **overrides)
    backbone_config.out_indices = list(model_args.out_indices or default_out_indices(
        backbone_config.num_hidden_layers))
    backbone_config.backbone_feature_pyramid = model_args.feature_pyramid
    num_maps = 4 if model_args.feature_pyramid else len(backbone_config.out_indices)
    if model_args.auxiliary_head and num_maps < 3:
        raise ValueError(f"UperNet's auxiliary head reads the third feature map; the backbone gives {num_maps} "
                         "(add out_indices, turn on feature_pyramid, or set auxiliary_head=False)")
    config = UperNetConfig(
        backbone_config=backbone_config, num_labels=len(labels), id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)}, hidden_size=model_args.decode_hidden_size,
        use_auxiliary_head=model_args.auxiliary_head, auxiliary_channels=model_args.auxiliary_channels,
        auxiliary_loss_weight=model_args.auxiliary_loss_weight)
    model = UperNetForSemanticSegmentation(config)
    if pretrained:
        model.backbone = DefocusBackbone.from_pretrained(model_args.backbone, config=model.config.backbone_config)
    return model


# ------------------------------------------------------------------------------------------------------ metrics

def confusion_matrix(predictions: np.ndarray, labels: np.ndarray, num_labels: int) -> np.ndarray:
    """`[num_labels, num_labels]` pixel counts, rows the true class and columns the predicted one; labels outside
    `[0, num_labels)` (ignore index 255, the Trainer's padding -100) are left out."""
    predictions, labels = np.asarray(predictions).ravel(), np.asarray(labels).ravel()
    keep = (labels >= 0) & (labels < num_labels)
    index = labels[keep].astype(np.int64) * num_labels + predictions[keep].astype(np.int64)
    return np.bincount(index, minlength=num_labels * num_labels).reshape(num_labels, num_labels)


def iou_metrics(confusion: np.ndarray, label_names: Sequence[str]) -> dict[str, float]:
    """Per-class IoU over the whole set (intersection and union summed over every image), their mean (`mean_iou`,
    classes absent from both truth and prediction left out) and the pixel accuracy."""
    confusion = confusion.astype(np.float64)
    intersection = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - intersection
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = intersection / union
    metrics = {"mean_iou": float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan"),
               "pixel_accuracy": float(intersection.sum() / max(confusion.sum(), 1.0))}
    metrics.update({f"iou_{name}": float(value) for name, value in zip(label_names, iou)})
    return metrics


class SegmentationMetrics:
    """`compute_metrics` for the Trainer: `iou_metrics` of the predicted class maps (see `argmax_logits`)."""

    def __init__(self, label_names: Sequence[str]) -> None:
        self.label_names = list(label_names)

    def __call__(self, eval_prediction: EvalPrediction) -> dict[str, float]:
        predictions = eval_prediction.predictions
        predictions = predictions[0] if isinstance(predictions, tuple) else predictions
        confusion = confusion_matrix(predictions, eval_prediction.label_ids, len(self.label_names))
        return iou_metrics(confusion, self.label_names)


def argmax_logits(logits: torch.Tensor | tuple, labels: torch.Tensor) -> torch.Tensor:
    """`preprocess_logits_for_metrics`: keep the class map `[B, H, W]`, not the logits, between evaluation steps."""
    logits = logits[0] if isinstance(logits, tuple) else logits
    return logits.argmax(1)


# ------------------------------------------------------------------------------------------------------- figure

@torch.no_grad()
def predict_masks(model: UperNetForSemanticSegmentation, pixel_values: torch.Tensor, batch_size: int = 64
                  ) -> torch.Tensor:
    """Class maps `[N, H, W]` of a stack of normalised images."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = [model(pixel_values=pixel_values[i:i + batch_size].to(device)).logits.argmax(1).cpu()
           for i in range(0, len(pixel_values), batch_size)]
    model.train(was_training)
    return torch.cat(out)


def save_prediction_figure(model: UperNetForSemanticSegmentation, dataset: SegmentationDataset,
                           path: str | os.PathLike, count: int = 8, scale: int = 3) -> Path:
    """A PNG of the first `count` images of `dataset`: the image, the ground truth and the prediction in three rows,
    masks white on black, with each prediction's IoU written under it (of the foreground class for two classes,
    else the image's mean IoU)."""
    count = min(count, len(dataset))
    names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    predictions = predict_masks(model, dataset.pixel_values[:count]).numpy()
    truths = dataset.labels[:count].numpy()
    size = truths.shape[-1]
    images = [np.asarray(Image.fromarray(img).resize((size, size), Image.BILINEAR)) for img in dataset.images[:count]]
    cell, pad, caption = size * scale, 4, 14
    label_width = 64
    figure = Image.new("RGB", (label_width + count * (cell + pad), 3 * (cell + pad + caption)), "white")
    draw = ImageDraw.Draw(figure)
    for row, name in enumerate(("image", "truth", "prediction")):
        top = row * (cell + pad + caption)
        draw.text((4, top + cell // 2), name, fill="black")
        for col in range(count):
            if row == 0:
                tile = Image.fromarray(images[col])
            else:
                mask = truths[col] if row == 1 else predictions[col]
                tile = Image.fromarray((mask > 0).astype(np.uint8) * 255).convert("RGB")
            left = label_width + col * (cell + pad)
            figure.paste(tile.resize((cell, cell), Image.NEAREST), (left, top))
            if row == 2:
                ious = iou_metrics(confusion_matrix(predictions[col], truths[col], len(names)), names)
                text = f"{names[1]} IoU {ious['iou_' + names[1]]:.2f}" if len(names) == 2 else \
                    f"mIoU {ious['mean_iou']:.2f}"
                draw.text((left, top + cell + 1), text, fill="black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.save(path)
    return path


__all__ = [
    "SegmentationMetrics",
    "argmax_logits",
    "build_segmentation_datasets",
    "build_segmentation_model",
    "confusion_matrix",
    "default_out_indices",
    "iou_metrics",
    "predict_masks",
    "save_prediction_figure",
]
