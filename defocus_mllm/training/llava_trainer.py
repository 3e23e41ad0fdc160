"""`LlavaTrainer`: the Hugging Face `Trainer` with LLaVA's per-part learning rates and a resumable length-grouped
sampler."""

from __future__ import annotations

import functools
import inspect
import logging
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlavaForConditionalGeneration, Trainer
from transformers.trainer_pt_utils import LengthGroupedSampler

from ..data.supervised import IGNORE_INDEX
from ..files import naming_corrupt_files
from ..llava import _unwrap, model_parts

logger = logging.getLogger(__name__)

# A shared prompt shorter than this is computed with the rest (a second forward call costs more than it saves).
MIN_SHARED_PREFIX = 8


@functools.lru_cache(maxsize=None)
def _cache_argument(model_class: type) -> str:
    """The name a model's forward takes its KV cache by (`past_key_values` became `cache` in transformers 5.x)."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def _checkpointing(model: nn.Module) -> bool:
    """Whether the model recomputes its layers in the backward (the name changed in transformers 5.x)."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), name):
            return bool(getattr(model, name))
    return False


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
        if (return_outputs or "labels" not in inputs or self.label_smoother is not None or self.compute_loss_func
                or self.args.n_gpu > 1):  # DataParallel splits the batch the hook's positions index
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        return self.reply_token_loss(model, inputs, num_items_in_batch)

    def reply_token_loss(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None
                         ) -> torch.Tensor:
        """The stock causal-LM loss, computed with two cuts that change no number beyond float rounding.

        * The LM head runs only at the positions that predict a label. A LLaVA sample learns only its replies (a few
          percent of its tokens on easy-VQA: the prompt, the image tokens and the padding are `IGNORE_INDEX`), yet
          the stock forward computes `[B, T, vocab]` logits; here a hook cuts the head's input to those positions for
          one forward, so the logits are `[N, vocab]`.
        * The prompt every row of the batch starts with (the chat template's system message) runs once, for one row,
          and its keys and values are given to every row (:meth:`shared_prefix_length` says when).

        The loss is the stock one: shifted labels, fp32 cross entropy, a mean over the label tokens or a sum over
        `num_items_in_batch`, scaled across processes as `Trainer.compute_loss` does.
        """
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        targets = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]  # position t predicts token t + 1
        llava = _unwrap(model)
        prefix = self.shared_prefix_length(model, inputs, targets)
        if prefix:
            inputs.update(self._prefix_cache(model, llava, inputs, prefix))
            targets = targets[:, prefix:]
        rows, cols = (targets != IGNORE_INDEX).nonzero(as_tuple=True)

        def label_positions_only(module: nn.Module, args: tuple) -> tuple:
            return (args[0][rows, cols],)  # [B, T, hidden] -> [N, hidden]

        handle = llava.lm_head.register_forward_pre_hook(label_positions_only)
        try:
            logits = model(**inputs).logits  # [N, vocab]
        finally:
            handle.remove()
        by_items = self.model_accepts_loss_kwargs and num_items_in_batch is not None
        loss = F.cross_entropy(logits.float(), targets[rows, cols], reduction="sum" if by_items else "mean")
        if by_items:
            loss = loss / (num_items_in_batch.to(loss.device) if torch.is_tensor(num_items_in_batch)
                           else num_items_in_batch)
            if self.args.average_tokens_across_devices:
                loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        return loss

    def shared_prefix_length(self, model: nn.Module, inputs: dict[str, Any], targets: torch.Tensor) -> int:
        """How many leading tokens every row of the batch has in common, attends to and learns nothing from (no
        image token, no label predicted there); 0 when it is shorter than `MIN_SHARED_PREFIX` or the run's setup
        does not take a cache in training (DeepSpeed, FSDP, gradient checkpointing, embeddings given directly)."""
        ids, mask = inputs.get("input_ids"), inputs.get("attention_mask")
        llava = _unwrap(model)
        if (ids is None or ids.shape[0] < 2 or "inputs_embeds" in inputs or self.is_deepspeed_enabled
                or self.is_fsdp_enabled or self.args.gradient_checkpointing or _checkpointing(llava)):
            return 0
        shared = (ids == ids[:1]).all(0) & (ids[0] != llava.config.image_token_id)
        shared &= (targets == IGNORE_INDEX).all(0)
        if mask is not None:
            shared &= mask.bool().all(0)
        length = min(int(shared.long().cumprod(0).sum()), ids.shape[1] - 1)  # at least one token after the prefix
        return length if length >= MIN_SHARED_PREFIX else 0

    @staticmethod
    def _prefix_cache(model: nn.Module, llava: nn.Module, inputs: dict[str, Any], prefix: int) -> dict[str, Any]:
        """The inputs of the rest of the batch: its tokens after `prefix`, and the keys and values of the shared
        prefix, computed for one row and repeated for every row (gradients flow back through the repeat). `model`
        is what the Trainer calls (possibly wrapped), `llava` the model under the wrappers."""
        ids, mask = inputs["input_ids"], inputs.get("attention_mask")
        cache_name = _cache_argument(type(llava))
        head = model(input_ids=ids[:1, :prefix], attention_mask=None if mask is None else mask[:1, :prefix],
                     use_cache=True, logits_to_keep=1)
        cache = getattr(head, cache_name)
        cache.batch_repeat_interleave(ids.shape[0])
        return {"input_ids": ids[:, prefix:], cache_name: cache}

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
