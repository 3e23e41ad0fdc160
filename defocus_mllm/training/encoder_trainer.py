"""Encoder pretraining on the Hugging Face `Trainer`: optimizer parameter groups (the release's weight-decay rule,
optional layer-wise lr decay), mixup / cutmix inside the loss, top-k metrics. Used by
`recipes/pretrain_encoder.py`; nothing here knows about files or configs.
"""

from __future__ import annotations

import re
from typing import Optional

import numpy as np
import torch
from torch import nn
from transformers import EvalPrediction, Trainer

from ..data.augment import MixupCutmix
from ..data.image_classification import RepeatedAugmentationSampler

# Parameters without weight decay besides every 1-D tensor and bias (the release: cls / position embeddings and the
# state-space parameters A_log and D; D, the rotary `freq` and all norms are 1-D anyway).
NO_WEIGHT_DECAY_NAMES = ("cls_token", "pos_embed", "A_log")
_BLOCK_RE = re.compile(r"(?:^|\.)blocks\.(\d+)\.")
_EMBED_RE = re.compile(r"(?:^|\.)(?:patch_embed|cls_token|pos_embed)(?:\.|$)")


def layer_id(name: str, num_layers: int) -> int:
    """Depth of a parameter for layer-wise lr decay: 0 for the embeddings, `i + 1` for block `i`,
    `num_layers + 1` for the final norm and the heads."""
    match = _BLOCK_RE.search(name)
    if match:
        return int(match.group(1)) + 1
    if _EMBED_RE.search(name):
        return 0
    return num_layers + 1


def encoder_param_groups(model: nn.Module, weight_decay: float, learning_rate: float,
                         layer_decay: float = 1.0) -> list[dict]:
    """AdamW parameter groups for a De-focus model.

    Weight decay skips 1-D tensors, biases and `NO_WEIGHT_DECAY_NAMES`. With `layer_decay < 1`, block `i` trains at
    `learning_rate * layer_decay ** (depth - i)` (embeddings lowest, heads at the full rate): BEiT-style layer-wise
    lr decay, useful when fine-tuning a pretrained encoder. Frozen parameters are left out.
    """
    if not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"layer_decay must lie in (0, 1], got {layer_decay}")
    num_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if num_layers is None:
        raise ValueError(f"{type(model).__name__} has no config.num_hidden_layers; cannot assign layer ids")
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = param.ndim <= 1 or name.endswith(".bias") or any(k in name.split(".") for k in NO_WEIGHT_DECAY_NAMES)
        depth = layer_id(name, num_layers) if layer_decay < 1.0 else num_layers + 1
        key = (depth, no_decay)
        if key not in groups:
            scale = layer_decay ** (num_layers + 1 - depth)
            groups[key] = {"params": [], "names": [], "weight_decay": 0.0 if no_decay else weight_decay,
                           "lr": learning_rate * scale}
        groups[key]["params"].append(param)
        groups[key]["names"].append(name)
    return [groups[k] for k in sorted(groups)]


def current_drop_path_rate(model: nn.Module) -> float:
    """The rate last passed to `set_drop_path_rate`: the deepest block's rate."""
    rates = [m.drop_path_rate for m in model.modules() if type(m).__name__ == "DefocusBlock"]
    return float(max(rates)) if rates else 0.0


def keep_main_logits(logits, labels) -> torch.Tensor:
    """`preprocess_logits_for_metrics`: keep the CLS-head logits, drop the (large) per-token aux logits."""
    return logits[0] if isinstance(logits, (tuple, list)) else logits


def top_k_accuracy(eval_pred: EvalPrediction, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """`compute_metrics` for classification: `{"top1": ..., "top5": ...}` in percent (`k` capped at the class count)."""
    logits = eval_pred.predictions[0] if isinstance(eval_pred.predictions, tuple) else eval_pred.predictions
    logits, labels = np.asarray(logits), np.asarray(eval_pred.label_ids)
    if labels.ndim != 1:
        raise ValueError(f"top-k accuracy needs class ids of shape [N], got labels of shape {labels.shape}")
    order = np.argsort(-logits, axis=-1)
    metrics = {}
    for k in ks:
        hits = (order[:, : min(k, logits.shape[-1])] == labels[:, None]).any(-1)
        metrics[f"top{k}"] = float(hits.mean() * 100.0)
    return metrics


class EncoderPretrainingTrainer(Trainer):
    """`Trainer` for `DefocusForImageClassification`: mixup / cutmix on training batches, the release's parameter
    groups (optionally with layer-wise lr decay), and the current drop-path rate in every training log.

    Args:
        mixup: applied to `(pixel_values, labels)` of training batches only (evaluation sees clean images).
        layer_decay: layer-wise lr decay factor (1.0: off).
        repeated_aug: DeiT repeated augmentation, copies of each image per epoch (1: off).
    """

    def __init__(self, *args, mixup: Optional[MixupCutmix] = None, layer_decay: float = 1.0, repeated_aug: int = 1,
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.mixup = mixup if mixup is not None and mixup.active else None
        self.layer_decay = layer_decay
        self.repeated_aug = repeated_aug
        # The model's loss is already a per-sample mean; the Trainer must not treat its **kwargs as a request for
        # `num_items_in_batch` (it would skip the gradient-accumulation average and rescale by the process count).
        self.model_accepts_loss_kwargs = False

    def create_optimizer(self, model: Optional[nn.Module] = None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            groups = encoder_param_groups(opt_model, self.args.weight_decay, self.args.learning_rate, self.layer_decay)
            for group in groups:
                group.pop("names")
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def _get_train_sampler(self, train_dataset=None):
        if self.repeated_aug <= 1:
            return super()._get_train_sampler(train_dataset)
        dataset = self.train_dataset if train_dataset is None else train_dataset
        return RepeatedAugmentationSampler(len(dataset), self.repeated_aug, seed=self.args.seed)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.mixup is not None and model.training:
            inputs = dict(inputs)
            inputs["pixel_values"], inputs["labels"] = self.mixup(inputs["pixel_values"], inputs["labels"])
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)

    def log(self, logs: dict[str, float], start_time: Optional[float] = None) -> None:
        if "loss" in logs:  # training logs (evaluation logs carry eval_loss)
            logs["drop_path_rate"] = current_drop_path_rate(self.model)
        super().log(logs, start_time)
