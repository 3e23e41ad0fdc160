"""Pretrain a De-focus encoder on image classification: aux loss, scheduled drop path, mixup / cutmix
(docs/method.md, "Training strategies").

    accelerate launch recipes/pretrain_encoder.py --config recipes/configs/encoder_tiny.yaml --train_dir DATA/train
    accelerate launch --config_file ACCELERATE.yaml recipes/pretrain_encoder.py --config recipes/configs/encoder_mamba_base_in1k.yaml

Every field of `defocus_mllm.training.{EncoderModelArguments, EncoderDataArguments}` and of
`transformers.TrainingArguments` can be set in the YAML file and overridden on the command line
(`--learning_rate 1e-3`). The saved directory loads with `AutoModelForImageClassification.from_pretrained` (after
`import defocus_mllm`) and works as a LLaVA vision tower.
"""

from typing import Any, Optional

from transformers import TrainerCallback, TrainingArguments

from defocus_mllm.data.augment import MixupCutmix
from defocus_mllm.data.image_classification import ImageClassificationCollator
from defocus_mllm.training import (EncoderDataArguments, EncoderModelArguments, EncoderPretrainingTrainer,
                                   ScheduledDropPathCallback, distributed_exit, run_training, start_recipe)
from defocus_mllm.training.encoder_setup import (build_classification_datasets, build_classification_transforms,
                                                 build_classifier, encoder_image_size, scale_learning_rate)
from defocus_mllm.training.encoder_trainer import keep_main_logits, top_k_accuracy


def main(argv: Optional[list[str]] = None, callbacks: Optional[list[TrainerCallback]] = None) -> dict[str, Any]:
    model_args, data_args, args, resume = start_recipe((EncoderModelArguments, EncoderDataArguments,
                                                        TrainingArguments), argv)

    # Data at the training resolution, and the model (a fresh preset or a saved directory) with one class per label.
    train_tf, eval_tf = build_classification_transforms(data_args, encoder_image_size(model_args))
    train_dataset, eval_dataset, classes = build_classification_datasets(data_args, train_tf, eval_tf)
    print(f"{len(train_dataset)} training images, {len(eval_dataset) if eval_dataset is not None else 'no'} "
          f"evaluation images, {len(classes)} classes")
    model = build_classifier(model_args, classes)
    scale_learning_rate(args, data_args.lr_reference_batch)

    # The release's training strategies: scheduled drop path, mixup / cutmix, repeated augmentation, layer decay.
    config = model.config
    callbacks = list(callbacks or [])
    if config.use_scheduled_drop_path:
        callbacks.append(ScheduledDropPathCallback(config.min_drop_path_rate, config.drop_path_rate))
    mixup = MixupCutmix(len(classes), data_args.mixup_alpha, data_args.cutmix_alpha, data_args.mixup_prob,
                        data_args.mixup_switch_prob, model_args.label_smoothing)
    trainer = EncoderPretrainingTrainer(
        model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
        data_collator=ImageClassificationCollator(), compute_metrics=top_k_accuracy,
        preprocess_logits_for_metrics=keep_main_logits, callbacks=callbacks, mixup=mixup,
        layer_decay=model_args.layer_decay, repeated_aug=data_args.repeated_aug)

    metrics = run_training(trainer, resume)  # SIGTERM: a checkpoint at the next step, then exit
    if "interrupted_at_step" in metrics:
        return metrics
    trainer.save_model()
    if eval_dataset is not None:
        metrics.update(trainer.evaluate())
    trainer.log_metrics("all", metrics)
    trainer.save_metrics("all", metrics)
    trainer.save_state()
    return metrics


if __name__ == "__main__":
    with distributed_exit():
        main()
