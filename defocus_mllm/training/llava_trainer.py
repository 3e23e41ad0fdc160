"""`LlavaTrainer`: the Hugging Face `Trainer` with LLaVA's per-part learning rates and a resumable length-grouped
sampler."""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch
from torch import nn
from transformers import LlavaForConditionalGeneration, Trainer
from transformers.trainer_pt_utils import LengthGroupedSampler

from ..files import naming_corrupt_files
from ..llava import model_parts

logger = logging.getLogger(__name__)


class SeededLengthGroupedSampler(LengthGroupedSampler):
    """Length-grouped order drawn from `(seed, epoch)` alone, so that a resumed run replays the same batches (the
    stock sampler draws from the global RNG, whose state at the start of an epoch a checkpoint does not hold)."""

    def __init__(self, batch_size: int, lengths: list[int], seed: int) -> None:
        super().__init__(batch_size, lengths=lengths)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        self.generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return super().__iter__()


class LlavaTrainer(Trainer):
    """`Trainer` with LLaVA's per-part learning rates, length grouping from the dataset's precomputed lengths (the
    stock sampler would otherwise read every sample, images included, to measure it), and the bad-sample bookkeeping
    of `SupervisedCollator` (skips listed once on the dataset, all-skipped batches as zero-loss steps)."""

    def __init__(self, *args: Any, projector_lr: Optional[float] = None, vision_tower_lr: Optional[float] = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.projector_lr = projector_lr
        self.vision_tower_lr = vision_tower_lr

    def _get_train_sampler(self, train_dataset=None):
        dataset = self.train_dataset if train_dataset is None else train_dataset
        if self.args.train_sampling_strategy == "group_by_length" and hasattr(dataset, "lengths"):
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            return SeededLengthGroupedSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                              dataset.lengths, seed)
        return super()._get_train_sampler(train_dataset)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Optional[nn.Module] = None) -> None:
        # Llava checkpoints are written in the original key layout ("language_model.lm_head.*") that the stock
        # resume path hands to `load_state_dict` unconverted, silently loading nothing. `from_pretrained` converts.
        model = self.model if model is None else model
        if self.is_deepspeed_enabled or self.is_fsdp_enabled or not isinstance(model, LlavaForConditionalGeneration):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        logger.info("Loading model weights from %s", resume_from_checkpoint)
        with naming_corrupt_files(resume_from_checkpoint, "checkpoint weights file"):
            loaded = type(model).from_pretrained(resume_from_checkpoint, dtype=model.dtype)
        model.load_state_dict(loaded.state_dict(), strict=True)

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None):
        # `SupervisedCollator`'s bookkeeping: skips found in dataloader workers are listed on the dataset here, in the
        # main process, and a batch of skipped samples only is a zero-loss step (every process still steps together).
        skipped = inputs.pop("skipped_samples", None)
        if skipped and hasattr(self.train_dataset, "record_skipped"):
            self.train_dataset.record_skipped(skipped)
        if inputs.pop("all_skipped", False):
            outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
            loss = outputs.logits.sum() * 0.0
            return (loss, outputs) if return_outputs else loss
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)

    def create_optimizer(self, model: Optional[nn.Module] = None) -> torch.optim.Optimizer:
        if self.optimizer is not None or (self.projector_lr is None and self.vision_tower_lr is None):
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(opt_model))
        special = {}
        for part, lr in (("projector", self.projector_lr), ("vision_tower", self.vision_tower_lr)):
            if lr is not None:
                for module in model_parts(opt_model)[part]:
                    for param in module.parameters():
                        special[id(param)] = lr
        # PEFT keeps a trainable copy of the projector under `modules_to_save`; match those by name as well.
        groups: dict[tuple[float, bool], list] = {}
        for name, param in opt_model.named_parameters():
            if not param.requires_grad:
                continue
            lr = special.get(id(param))
            if lr is None and "multi_modal_projector" in name and self.projector_lr is not None:
                lr = self.projector_lr
            if lr is None and "vision_tower" in name and self.vision_tower_lr is not None:
                lr = self.vision_tower_lr
            groups.setdefault((lr or self.args.learning_rate, name in decay), []).append(param)
        param_groups = [{"params": params, "lr": lr, "weight_decay": self.args.weight_decay if wd else 0.0}
                        for (lr, wd), params in groups.items()]
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        optimizer_kwargs.pop("lr", None)
        self.optimizer = optimizer_cls(param_groups, lr=self.args.learning_rate, **optimizer_kwargs)
        return self.optimizer


__all__ = ["LlavaTrainer", "SeededLengthGroupedSampler"]
