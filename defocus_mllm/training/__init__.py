"""Training: LLaVA's two stages, encoder pretraining and semantic segmentation on the Hugging Face `Trainer`.

One module per idea: `arguments` (the recipes' dataclasses and YAML parsing), `runtime` (logging, resume, stop on SIGTERM),
`llava_setup` / `encoder_setup` / `segmentation` (the steps of each recipe), `llava_trainer` / `encoder_trainer`
(the `Trainer` subclasses), `callbacks` (scheduled drop path), `warmup` (the offline vision warm-up) and `tiny_lm` (the offline
default's tiny Llama and tokenizer). The recipes in `recipes/` call these steps in order.
"""

from .arguments import (
    PROJECTOR_FILE,
    DataArguments,
    EncoderDataArguments,
    EncoderModelArguments,
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
    build_supervised_dataset,
    configure_trainable,
    load_conversations,
    load_projector,
    save_llava,
    save_projector,
    wants_vision_warmup,
)
from .llava_trainer import LlavaTrainer
from .runtime import StopOnSignal, distributed_exit, resolve_resume_checkpoint, setup_logging, use_cpu_threads
from .warmup import warm_up_vision_tower

__all__ = [
    "PROJECTOR_FILE",
    "DataArguments",
    "EncoderDataArguments",
    "EncoderModelArguments",
    "EncoderPretrainingTrainer",
    "LlavaTrainer",
    "LlavaTrainingArguments",
    "ModelArguments",
    "ScheduledDropPathCallback",
    "StopOnSignal",
    "SegmentationDataArguments",
    "SegmentationModelArguments",
    "build_llava_model",
    "build_supervised_dataset",
    "configure_trainable",
    "distributed_exit",
    "load_conversations",
    "load_projector",
    "parse_overrides",
    "parse_recipe_args",
    "resolve_resume_checkpoint",
    "save_llava",
    "save_projector",
    "setup_logging",
    "use_cpu_threads",
    "wants_vision_warmup",
    "warm_up_vision_tower",
]
