"""Stage 2 of LLaVA-1.5 (instruction tuning) with a De-focus vision tower: projector + language model, full or LoRA.

    accelerate launch recipes/finetune.py                                      # offline default: easy-VQA on CPU
    accelerate launch --config_file recipes/accelerate/zero3.yaml recipes/finetune.py \\
        --config recipes/configs/finetune_vicuna7b.yaml

With no `--config` the offline default `recipes/configs/finetune_easy_vqa.yaml` is used: a tiny De-focus encoder and
a tiny Llama with a tokenizer trained on easy-VQA's text, trained on the CPU, saved, then scored on the 9,673 easy-VQA
test questions. Any field of `defocus_mllm.training.{ModelArguments, DataArguments, LlavaTrainingArguments}` (the
last extends `transformers.TrainingArguments`) can be set in the YAML file and overridden on the command line, except
`stage`, which this recipe fixes to `finetune` (another value is refused: stage 1 is `recipes/pretrain.py`).
"""

import time
from pathlib import Path
from typing import Any, Optional

from transformers import TrainerCallback

from defocus_mllm.evaluation import run_benchmark
from defocus_mllm.llava import count_trainable_parameters
from defocus_mllm.training import (LLAVA_ARGUMENTS, build_llava_model, build_llava_trainer, build_supervised_dataset,
                                   distributed_exit, load_conversations, run_training, save_llava, start_recipe,
                                   warm_up_fresh_vision_tower)

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "finetune_easy_vqa.yaml"


def main(argv: Optional[list[str]] = None, callbacks: Optional[list[TrainerCallback]] = None) -> dict[str, Any]:
    started = time.time()
    model_args, data_args, args, resume = start_recipe(LLAVA_ARGUMENTS, argv, DEFAULT_CONFIG, stage="finetune")

    # Data and model: a saved directory (e.g. the stage-1 output), or an encoder + LM joined by `build_llava`.
    conversations = load_conversations(data_args, seed=args.seed)
    model, processor = build_llava_model(model_args, data_args, conversations, resume=resume)
    metrics: dict[str, Any] = warm_up_fresh_vision_tower(model, processor, model_args, args, resume)
    dataset = build_supervised_dataset(conversations, model, processor, data_args, args)

    # Train (projector + LM, full or LoRA; SIGTERM: a checkpoint at the next step, then exit), save (LoRA merged),
    # and score on easy-VQA with the same code `eval/run.py` runs.
    trainer = build_llava_trainer(model, processor, dataset, args, callbacks)
    trainable, total = count_trainable_parameters(trainer.model)
    print(f"finetune: {len(dataset)} conversations; {trainable / 1e6:.2f}M of {total / 1e6:.2f}M parameters trainable")
    metrics.update(run_training(trainer, resume))
    if "interrupted_at_step" in metrics:
        return metrics
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
