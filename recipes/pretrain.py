"""Stage 1 of LLaVA-1.5 (feature alignment) with a De-focus vision tower: only the projector trains.

    accelerate launch recipes/pretrain.py                                      # offline default: easy-VQA captions
    accelerate launch --config_file recipes/accelerate/zero2.yaml recipes/pretrain.py \\
        --config recipes/configs/pretrain_vicuna7b.yaml

The output directory holds the whole model (loadable with `AutoModelForImageTextToText`) and `projector.safetensors`;
stage 2 starts from either (`--model_name_or_path DIR` or `--pretrain_projector DIR`). With no `--config` the offline
default `recipes/configs/pretrain_easy_vqa.yaml` is used.
"""

from pathlib import Path
from typing import Any, Optional

from transformers import TrainerCallback, set_seed

from defocus_mllm.training import (
    DataArguments,
    LlavaTrainer,
    LlavaTrainingArguments,
    ModelArguments,
    StopOnSignal,
    build_llava_model,
    build_supervised_dataset,
    configure_trainable,
    distributed_exit,
    load_conversations,
    parse_recipe_args,
    resolve_resume_checkpoint,
    save_llava,
    setup_logging,
    use_cpu_threads,
    wants_vision_warmup,
    warm_up_vision_tower,
)

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "pretrain_easy_vqa.yaml"


def main(argv: Optional[list[str]] = None, callbacks: Optional[list[TrainerCallback]] = None) -> dict[str, Any]:
    model_args, data_args, args = parse_recipe_args((ModelArguments, DataArguments, LlavaTrainingArguments), argv,
                                                    default_config=str(DEFAULT_CONFIG))
    args.stage = "pretrain"
    setup_logging(args)
    use_cpu_threads(args, args.cpu_threads)
    set_seed(args.seed)

    # Image-text pairs, and the model whose projector learns to map the frozen encoder into the frozen LM.
    resume = resolve_resume_checkpoint(args)  # first: a wrong name fails before any data preparation
    conversations = load_conversations(data_args, seed=args.seed)
    model, processor = build_llava_model(model_args, data_args, conversations, resume=resume)
    metrics: dict[str, Any] = {}
    if wants_vision_warmup(model_args, resume):
        metrics.update(warm_up_vision_tower(model, processor.image_processor, model_args, args))
    dataset = build_supervised_dataset(conversations, model, processor, data_args, args)
    model = configure_trainable(model, args)  # the projector alone

    stop = StopOnSignal()  # SIGTERM: a checkpoint at the next step, then exit
    trainer = LlavaTrainer(model=model, args=args, train_dataset=dataset, data_collator=dataset.collator(),
                           processing_class=processor, projector_lr=args.projector_lr,
                           callbacks=[*(callbacks or []), stop])
    metrics.update(trainer.train(resume_from_checkpoint=resume).metrics)
    if stop.interrupted:
        return stop.report(trainer, metrics)
    save_llava(trainer, processor, dataset, args)
    metrics["skipped_samples"] = len(dataset.skipped)
    trainer.log_metrics("final", metrics)
    trainer.save_metrics("final", metrics)
    return metrics


if __name__ == "__main__":
    with distributed_exit():
        main()
