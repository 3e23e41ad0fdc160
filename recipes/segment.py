"""Semantic segmentation with a De-focus backbone and the stock UperNet head (`UperNetForSemanticSegmentation`).

    python recipes/segment.py                                   # offline default: easy-VQA shape masks on CPU
    python recipes/segment.py --backbone_overrides mixer=attention --num_train_epochs 2
    accelerate launch recipes/segment.py --backbone ./defocus-mamba-base --image_size 512 ...

With no `--config` the offline default `recipes/configs/segment_easy_vqa.yaml` is used: a tiny De-focus Mamba backbone
with the simple feature pyramid and a narrow UperNet head, trained from scratch on the shape masks of easy-VQA's
4,000 training images (read off the colours: `defocus_mllm.data.segmentation`), then scored on the 1,000 test images
(mean and per-class IoU). Any field of `defocus_mllm.training.{SegmentationModelArguments,
SegmentationDataArguments}` and of `transformers.TrainingArguments` can be set in the YAML file and overridden on the
command line. docs/segmentation.md has the design and the measured run.
"""

import time
from pathlib import Path
from typing import Any, Optional

from transformers import Trainer, TrainerCallback, TrainingArguments

from defocus_mllm.training import (SegmentationDataArguments, SegmentationModelArguments, distributed_exit,
                                   run_training, start_recipe)
from defocus_mllm.training.segmentation import (SegmentationMetrics, argmax_logits, build_segmentation_datasets,
                                                build_segmentation_model, save_prediction_figure)

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "segment_easy_vqa.yaml"


def main(argv: Optional[list[str]] = None, callbacks: Optional[list[TrainerCallback]] = None) -> dict[str, Any]:
    started, cpu_started = time.time(), time.process_time()
    model_args, data_args, args, resume = start_recipe(
        (SegmentationModelArguments, SegmentationDataArguments, TrainingArguments), argv, DEFAULT_CONFIG)

    # Data (images with their masks) and the model: UperNet on a De-focus backbone, built from configs.
    train_dataset, eval_dataset, labels = build_segmentation_datasets(data_args)
    model = build_segmentation_model(model_args, labels)
    backbone = model.config.backbone_config
    print(f"segment: {len(train_dataset)} training / {len(eval_dataset)} test images; {backbone.mixer} backbone, "
          f"stages {backbone.out_features}{' + feature pyramid' if backbone.backbone_feature_pyramid else ''}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")

    # Train (SIGTERM: a checkpoint at the next step, then exit), save, and score on the test images: per-class IoU
    # and their mean.
    trainer = Trainer(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                      compute_metrics=SegmentationMetrics(labels), preprocess_logits_for_metrics=argmax_logits,
                      callbacks=callbacks)
    metrics = run_training(trainer, resume)
    if "interrupted_at_step" in metrics:
        return metrics
    trainer.save_model()
    metrics.update(trainer.evaluate())
    if data_args.figure_images and trainer.is_world_process_zero():
        save_prediction_figure(model, eval_dataset, Path(args.output_dir) / "predictions.png", data_args.figure_images)
    metrics.update(total_time_s=time.time() - started, total_cpu_time_s=time.process_time() - cpu_started)
    trainer.log_metrics("final", metrics)
    trainer.save_metrics("final", metrics)
    if trainer.is_world_process_zero():
        per_class = ", ".join(f"{name} {metrics[f'eval_iou_{name}']:.3f}" for name in labels)
        print(f"segmentation: mIoU {metrics['eval_mean_iou']:.3f} ({per_class}) on {len(eval_dataset)} test images; "
              f"{metrics['total_time_s'] / 60:.1f} min in total ({metrics['total_cpu_time_s'] / 60:.1f} CPU-min); "
              f"model saved to {args.output_dir}")
    return metrics


if __name__ == "__main__":
    with distributed_exit():
        main()
