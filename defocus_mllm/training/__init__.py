"""Training: LLaVA's two stages, encoder pretraining and semantic segmentation on the Hugging Face `Trainer`.

One module per idea: `arguments` (the recipes' dataclasses and YAML parsing), `recipe` (the preamble every recipe
starts with, and its training run), `runtime` (logging, resume, stop on SIGTERM), `llava_setup` / `encoder_setup` /
`segmentation` (the steps of each recipe), `llava_trainer` / `encoder_trainer` (the `Trainer` subclasses), `callbacks`
(scheduled drop path), `warmup` (the offline vision warm-up) and `tiny_lm` (the offline default's tiny Llama and
tokenizer). The recipes in `recipes/` call these steps in order.
"""

from .arguments import (
    PROJECTOR_FILE,
    DataArguments,
    EncoderDataArguments,
    EncoderModelArguments,
    LLAVA_ARGUMENTS,
    LlavaTrainingArguments,
    ModelArguments,
    SegmentationDataArguments,
    SegmentationModelArguments,
    parse_overrides,
    parse_recipe_args,
)
from .callbacks import ScheduledDropPathCallback
from .encoder_trainer import EncoderPretrainingTrainer
from .llava_setup import (
    build_llava_model,
    build_llava_trainer,
    build_supervised_dataset,
    configure_trainable,
    load_conversations,
    load_projector,
    save_llava,
    save_projector,
    wants_vision_warmup,
    warm_up_fresh_vision_tower,
)
from .llava_trainer import LlavaTrainer
from .recipe import fix_fields, run_training, start_recipe
from .runtime import StopOnSignal, distributed_exit, resolve_resume_checkpoint, setup_logging, use_cpu_threads
from .warmup import warm_up_vision_tower

__all__ = [
    "PROJECTOR_FILE",
    "DataArguments",
    "EncoderDataArguments",
    "EncoderModelArguments",
    "EncoderPretrainingTrainer",
    "LLAVA_ARGUMENTS",
    "LlavaTrainer",
    "LlavaTrainingArguments",
    "ModelArguments",
    "ScheduledDropPathCallback",
    "StopOnSignal",
    "SegmentationDataArguments",
    "SegmentationModelArguments",
    "build_llava_model",
    "build_llava_trainer",
    "build_supervised_dataset",
    "configure_trainable",
    "distributed_exit",
    "fix_fields",
    "load_conversations",
    "load_projector",
    "parse_overrides",
    "parse_recipe_args",
    "resolve_resume_checkpoint",
    "run_training",
    "save_llava",
    "save_projector",
    "setup_logging",
    "start_recipe",
    "use_cpu_threads",
    "wants_vision_warmup",
    "warm_up_fresh_vision_tower",
    "warm_up_vision_tower",
]
