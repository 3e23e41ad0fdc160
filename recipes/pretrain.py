"""Stage 1 of LLaVA-1.5 (feature alignment) with a De-focus vision tower: only the projector trains.

    accelerate launch recipes/pretrain.py                                      # offline default: easy-VQA captions
    accelerate launch --config_file recipes/accelerate/zero2.yaml recipes/pretrain.py \\
        --config recipes/configs/pretrain_vicuna7b.yaml

The output directory holds the whole model (loadable with `AutoModelForImageTextToText`) and `projector.safetensors`;
stage 2 starts from either (`--model_name_or_path DIR` or `--pretrain_projector DIR`). With no `--config` the offline
default `recipes/configs/pretrain_easy_vqa.yaml` is used. The fields are those of `recipes/finetune.py`; this recipe
fixes `stage: pretrain` (another value is refused: stage 2 is `recipes/finetune.py`), trains the encoder too only with
`train_vision_tower` (at `vision_tower_lr`, as stage 2 does) and refuses `lora_enable` (the LM stays frozen).
"""

from pathlib import Path
from typing import Any, Optional

from transformers import TrainerCallback

from defocus_mllm.training import (LLAVA_ARGUMENTS, build_llava_model, build_llava_trainer, build_supervised_dataset,
                                   distributed_exit, load_conversations, run_training, save_llava, start_recipe,
                                   warm_up_fresh_vision_tower)

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "pretrain_easy_vqa.yaml"


def main(argv: Optional[list[str]] = None, callbacks: Optional[list[TrainerCallback]] = None) -> dict[str, Any]:
    model_args, data_args, args, resume = start_recipe(LLAVA_ARGUMENTS, argv, DEFAULT_CONFIG, stage="pretrain")

    # Image-text pairs, and the model whose projector learns to map the frozen encoder into the frozen LM.
    conversations = load_conversations(data_args, seed=args.seed)
    model, processor = build_llava_model(model_args, data_args, conversations, resume=resume)
    metrics: dict[str, Any] = warm_up_fresh_vision_tower(model, processor, model_args, args, resume)
    dataset = build_supervised_dataset(conversations, model, processor, data_args, args)

    trainer = build_llava_trainer(model, processor, dataset, args, callbacks)  # the projector (+ encoder if asked)
    metrics.update(run_training(trainer, resume))  # SIGTERM: a checkpoint at the next step, then exit
    if "interrupted_at_step" in metrics:
        return metrics
    save_llava(trainer, processor, dataset, args)
    metrics["skipped_samples"] = len(dataset.skipped)
    trainer.log_metrics("final", metrics)
    trainer.save_metrics("final", metrics)
    return metrics


if __name__ == "__main__":
    with distributed_exit():
        main()
