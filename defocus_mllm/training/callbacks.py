"""Trainer callbacks for De-focus encoder training (docs/method.md §4)."""

from __future__ import annotations

import logging
import math

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

logger = logging.getLogger(__name__)


def scheduled_drop_path_rate(epoch: int, num_epochs: int, min_rate: float, max_rate: float) -> float:
    """The paper's schedule: `min + (max - min) * e / (E - 1)` at epoch `e` of `E` (the max for a 1-epoch run)."""
    if num_epochs <= 1:
        return max_rate
    epoch = min(max(epoch, 0), num_epochs - 1)
    return min_rate + (max_rate - min_rate) * epoch / (num_epochs - 1)


class ScheduledDropPathCallback(TrainerCallback):
    """At the start of every epoch, set the model's drop-path rate from the linear schedule and log it.

    The model must have `set_drop_path_rate(rate)` (every De-focus model does: layer `i` then gets
    `rate * i / (depth - 1)`). The rate goes to the Python log and, as `{"epoch", "drop_path_rate", "step"}`, into
    `trainer.state.log_history` (hence `trainer_state.json`); `history` keeps `(epoch, rate)` pairs.

    Args:
        min_rate: rate of the first epoch (the release: 0.1 for Mamba-Base).
        max_rate: rate of the last epoch (the release: 0.75).
    """

    def __init__(self, min_rate: float, max_rate: float) -> None:
        if not (0.0 <= min_rate < 1.0 and 0.0 <= max_rate < 1.0):
            raise ValueError(f"drop-path rates must lie in [0, 1), got min={min_rate}, max={max_rate}")
        self.min_rate, self.max_rate = min_rate, max_rate
        self.rate: float | None = None
        self.history: list[tuple[int, float]] = []

    def on_epoch_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None,
                       **kwargs) -> None:
        if model is None:
            raise ValueError("ScheduledDropPathCallback needs the model (the Trainer passes it to callbacks)")
        if not hasattr(model, "set_drop_path_rate"):
            raise TypeError(f"{type(model).__name__} has no set_drop_path_rate(rate); the schedule cannot be applied")
        # `state.epoch` is the fractional progress, so a run resumed mid-epoch gets the rate of the epoch it is in
        epoch = int(math.floor((state.epoch or 0.0) + 1e-6))
        num_epochs = state.num_train_epochs or math.ceil(args.num_train_epochs)
        self.rate = scheduled_drop_path_rate(epoch, num_epochs, self.min_rate, self.max_rate)
        model.set_drop_path_rate(self.rate)
        self.history.append((epoch, self.rate))
        state.log_history.append({"epoch": epoch, "drop_path_rate": self.rate, "step": state.global_step})
        if state.is_world_process_zero:
            logger.info("epoch %d/%d: drop_path_rate = %.4f", epoch, num_epochs, self.rate)
