"""What every recipe does around the Trainer: logging set up as transformers does, and which checkpoint to resume."""

from __future__ import annotations

import logging
import os
from typing import Optional

from transformers import TrainingArguments
from transformers.trainer_utils import get_last_checkpoint


def setup_logging(args: TrainingArguments) -> None:
    """INFO logs on the main process, warnings elsewhere (transformers' convention)."""
    import transformers

    level = logging.INFO if args.should_log else logging.WARNING
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=level)
    transformers.utils.logging.set_verbosity(level)
    logging.getLogger("defocus_mllm").setLevel(level)


def resolve_resume_checkpoint(args: TrainingArguments) -> Optional[str]:
    """`--resume_from_checkpoint last`: the newest `checkpoint-*` in `output_dir` (a fresh start when there is none);
    any other value is passed through."""
    resume = args.resume_from_checkpoint
    if resume == "last":
        resume = get_last_checkpoint(args.output_dir) if os.path.isdir(args.output_dir) else None
    return resume


__all__ = ["resolve_resume_checkpoint", "setup_logging"]
