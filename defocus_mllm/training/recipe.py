"""What every recipe does before its data and around its `Trainer`: `start_recipe` (arguments, logging, CPU threads,
seed, the checkpoint to resume) and `run_training` (train, or stop cleanly on SIGTERM). A recipe in `recipes/` is
then its own steps, top to bottom: parse, data, model, trainer, train, save, evaluate."""

from __future__ import annotations

import logging
import os
from typing import Any, Optional, Sequence

from transformers import Trainer, set_seed

from .arguments import parse_recipe_args
from .runtime import StopOnSignal, keep_freed_memory, resolve_resume_checkpoint, setup_logging, use_cpu_threads

logger = logging.getLogger(__name__)


def fix_fields(args: Any, fixed: dict[str, Any]) -> None:
    """Set the fields a recipe owns (the LLaVA recipes' `stage`). A field the user left unset (None) takes the
    recipe's value; a different value is refused, naming the field, rather than silently replaced."""
    for name, value in fixed.items():
        given = getattr(args, name)
        if given is not None and given != value:
            raise ValueError(f"{name}={given!r}: this recipe fixes {name}={value!r}; leave {name} unset (or "
                             f"{value!r}), or run the recipe whose {name} is {given!r}")
        setattr(args, name, value)


def start_recipe(argument_types: Sequence[type], argv: Optional[list[str]] = None,
                 default_config: Optional[str | os.PathLike] = None, **fixed: Any) -> tuple:
    """A recipe's preamble. Parse `--config FILE.yaml` (else `default_config`) and the command line into
    `argument_types` (the last one a `TrainingArguments`), set the fields the recipe owns (`fixed`, see
    :func:`fix_fields`), set up logging, the CPU threads and allocator (`cpu_threads`, `cpu_keep_freed_memory` where
    the arguments have them) and the seed, and find the checkpoint to resume from: before any data preparation, so
    that a wrong name fails at once.

    Returns the parsed dataclasses followed by the checkpoint to resume from (None for a fresh start)."""
    *others, args = parse_recipe_args(argument_types, argv,
                                      default_config=None if default_config is None else str(default_config))
    fix_fields(args, fixed)
    setup_logging(args)
    use_cpu_threads(args, getattr(args, "cpu_threads", None))
    if args.device.type == "cpu" and getattr(args, "cpu_keep_freed_memory", False) and keep_freed_memory():
        logger.info("CPU run: freed memory kept for reuse (cpu_keep_freed_memory)")
    set_seed(args.seed)
    return (*others, args, resolve_resume_checkpoint(args))


def run_training(trainer: Trainer, resume: Optional[str] = None) -> dict[str, Any]:
    """`trainer.train()` (from `resume` when given) with a clean stop on SIGTERM (:class:`StopOnSignal`: a checkpoint
    at the next step, then the run ends). Returns the training metrics; a stopped run's hold `interrupted_at_step`,
    and the main process has printed where its checkpoint is, so the recipe returns them at once."""
    stop = StopOnSignal()
    trainer.add_callback(stop)  # after the recipe's own callbacks: it sees a signal they send at the same step
    metrics = dict(trainer.train(resume_from_checkpoint=resume).metrics)
    return stop.report(trainer, metrics) if stop.interrupted else metrics


__all__ = ["fix_fields", "run_training", "start_recipe"]
