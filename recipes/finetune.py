"""Stage 2 of LLaVA-1.5 (instruction tuning) with a De-focus vision tower: projector + language model, full or LoRA.

    accelerate launch recipes/finetune.py                                      # offline default: easy-VQA on CPU
    accelerate launch --config_file recipes/accelerate/zero3.yaml recipes/finetune.py \\
        --config recipes/configs/finetune_vicuna7b.yaml

With no `--config` the offline default `recipes/configs/finetune_easy_vqa.yaml` is used: a tiny De-focus encoder and
a tiny Llama with a tokenizer trained on easy-VQA's text, trained on the CPU, saved, then scored on the 9,673 easy-VQA
test questions. Any field of `defocus_mllm.training.{ModelArguments, DataArguments, LlavaTrainingArguments}` (the
last extends `transformers.TrainingArguments`) can be set in the YAML file and overridden on the command line.
"""

import time
from pathlib import Path
from typing import Any, Optional

from transformers import TrainerCallback, set_seed

from defocus_mllm.evaluation import run_benchmark
from defocus_mllm.llava import count_trainable_parameters
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

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "finetune_easy_vqa.yaml"


def main(argv: Optional[list[str]] = None, callbacks: Optional[list[TrainerCallback]] = None) -> dict[str, Any]:
    started = time.time()
    model_args, data_args, args = parse_recipe_args((ModelArguments, DataArguments, LlavaTrainingArguments), argv,
                                                    default_config=str(DEFAULT_CONFIG))
    args.stage = "finetune"
    setup_logging(args)
    use_cpu_threads(args, args.cpu_threads)
    set_seed(args.seed)

    # Data and model: a saved directory (e.g. the stage-1 output), or an encoder + LM joined by `build_llava`.
    resume = resolve_resume_checkpoint(args)  # first: a wrong name fails before any data preparation
    conversations = load_conversations(data_args, seed=args.seed)
    model, processor = build_llava_model(model_args, data_args, conversations, resume=resume)
    metrics: dict[str, Any] = {}
    if wants_vision_warmup(model_args, resume):
        metrics.update(warm_up_vision_tower(model, processor.image_processor, model_args, args))
    dataset = build_supervised_dataset(conversations, model, processor, data_args, args)
    model = configure_trainable(model, args)
    trainable, total = count_trainable_parameters(model)
    print(f"finetune: {len(dataset)} conversations; {trainable / 1e6:.2f}M of {total / 1e6:.2f}M parameters trainable")

    # Train (SIGTERM: a checkpoint at the next step, then exit), save (LoRA merged), and score on easy-VQA with the
    # same code `eval/run.py` runs.
    stop = StopOnSignal()
    trainer = LlavaTrainer(model=model, args=args, train_dataset=dataset, data_collator=dataset.collator(),
                           processing_class=processor, projector_lr=args.projector_lr,
                           vision_tower_lr=args.vision_tower_lr, callbacks=[*(callbacks or []), stop])
    metrics.update(trainer.train(resume_from_checkpoint=resume).metrics)
    if stop.interrupted:
        return stop.report(trainer, metrics)
    model = save_llava(trainer, processor, dataset, args)
    metrics.update(skipped_samples=len(dataset.skipped), train_time_s=time.time() - started)
    if args.eval_easy_vqa:
        report = run_benchmark(model.eval(), processor, "easy-vqa", limit=args.eval_limit,
                               batch_size=args.eval_batch_size, output_dir=Path(args.output_dir) / "eval-easy-vqa",
                               show_progress=args.process_index == 0)
        metrics.update(easy_vqa_accuracy=report["metrics"]["accuracy"], easy_vqa_questions=report["num_questions"],
                       easy_vqa_vqa_accuracy=report["metrics"]["vqa_accuracy"])
    metrics["total_time_s"] = time.time() - started
    trainer.log_metrics("final", metrics)
    trainer.save_metrics("final", metrics)
    if "easy_vqa_accuracy" in metrics and trainer.is_world_process_zero():
        print(f"easy-VQA accuracy: {metrics['easy_vqa_accuracy']:.2f}% on {metrics['easy_vqa_questions']} test "
              f"questions (VQA accuracy {metrics['easy_vqa_vqa_accuracy']:.2f}); {metrics['total_time_s'] / 60:.1f} "
              f"min in total; model saved to {args.output_dir}")
    return metrics


if __name__ == "__main__":
    with distributed_exit():
        main()
