#!/usr/bin/env python
"""Miniature, offline over-focus study: the De-focus paper's comparison at CPU scale.

    python eval/overfocus_study.py --out docs/figures            # the run in docs/overfocus_study.md (~15 min)
    python eval/overfocus_study.py --quick --out /tmp/smoke      # a few seconds: checks the pipeline only
    python eval/overfocus_study.py --models vit-causal defocus-vit --steps 400 --out out/study

Five encoders of one size (width 64, depth 4, 64 tokens + CLS) are trained with the same seed, data, data order,
optimizer and number of steps on the majority-colour task (`defocus_mllm.data.synthetic`: the label is the colour
that occurs most often, so every object in the image counts), then evaluated on held-out images and diagnosed with
`defocus_mllm.encoder.diagnostics`. Training runs on the encoder pretraining `Trainer` (`EncoderPretrainingTrainer`) with the
scheduled drop-path callback for the De-focus models, as `recipes/pretrain_encoder.py` does.

Writes to `--out`: `overfocus_study.json` (settings and every number), `overfocus_table.md` (the table),
`overfocus_attention.png`, `overfocus_cls_attention.png`, `overfocus_gradient.png` (the diagnostics figures of all
models on one test image), `overfocus_layers.png` (entropy / top-1% key share per layer, averaged over test images)
and `overfocus_loss.png` (training loss curves).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from transformers import PrinterCallback, TrainingArguments, set_seed

from defocus_mllm import DefocusForImageClassification, DefocusVisionConfig
from defocus_mllm.data.augment import ImageClassificationTransform
from defocus_mllm.training.callbacks import ScheduledDropPathCallback
from defocus_mllm.data.image_classification import ImageClassificationCollator
from defocus_mllm.data.synthetic import (
    MAJORITY_COLOUR_NAMES,
    TensorImageDataset,
    majority_colour_images,
    partial_view_accuracy,
)
from defocus_mllm.encoder.diagnostics import attention_maps, diagnose, gradient_map, overfocus_metrics
from defocus_mllm.training.encoder_trainer import EncoderPretrainingTrainer, keep_main_logits
from defocus_mllm.encoder.image_processing import DefocusImageProcessor

# The paper's training strategies for the De-focus models (scaled to depth 4 as in recipes/configs/encoder_tiny.yaml:
# drop path scheduled 0.05 -> 0.3, aux loss on every image token); the baselines get DeiT's constant 0.1 and no aux
# loss, as the `*-base-causal` / `*-base-noncausal` presets do.
DEFOCUS_STRATEGY = dict(drop_path_rate=0.3, min_drop_path_rate=0.05, use_scheduled_drop_path=True,
                        aux_loss_mode="per_token")
BASELINE_STRATEGY = dict(drop_path_rate=0.1, use_scheduled_drop_path=False, aux_loss_mode="none")
# study name -> (preset, overrides); the order is the table's
STUDY_MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "vit-noncausal": ("vit-tiny-noncausal", BASELINE_STRATEGY),
    "vit-causal": ("vit-tiny-causal", BASELINE_STRATEGY),
    "mamba-causal": ("mamba-tiny-causal", BASELINE_STRATEGY),
    "defocus-vit": ("vit-tiny", DEFOCUS_STRATEGY),
    "defocus-mamba": ("mamba-tiny", DEFOCUS_STRATEGY),
}
# Optional ablations (`--models`, not in the default five): the bandpass filter alone, trained like the baselines,
# separates what the filter does from what the training strategies do within the budget.
ABLATION_MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "defocus-vit-filter-only": ("vit-tiny", BASELINE_STRATEGY),
    "defocus-mamba-filter-only": ("mamba-tiny", BASELINE_STRATEGY),
}
ALL_MODELS = {**STUDY_MODELS, **ABLATION_MODELS}
FIGURES = {"attention_maps.png": "overfocus_attention.png", "cls_attention.png": "overfocus_cls_attention.png",
           "gradient_maps.png": "overfocus_gradient.png"}


@dataclass
class StudySettings:
    steps: int = 800
    batch_size: int = 32
    learning_rate: float = 1e-3
    weight_decay: float = 0.05
    warmup: float = 0.1  # fraction of the steps
    label_smoothing: float = 0.1
    train_size: int = 8192
    test_size: int = 2000
    diag_images: int = 32  # test images the table's over-focus numbers are averaged over
    image_size: int = 32
    patch_size: int = 4  # 8 x 8 patches + CLS = 65 tokens, as the 64px / patch-8 presets
    grid: int = 4  # 4 x 4 object cells of 2 x 2 patches
    min_objects: int = 5
    max_objects: int = 11
    margin_one_share: float = 0.6
    min_object_size: int = 3  # objects of 3-7 px: a colour's pixel area says little about its object count
    seed: int = 0


QUICK = dict(steps=4, batch_size=16, train_size=64, test_size=32, diag_images=4)


def build_model(name: str, settings: StudySettings) -> DefocusForImageClassification:
    """The study's `name` model, initialised from `settings.seed` (the same seed for every model)."""
    preset, strategy = ALL_MODELS[name]
    config = DefocusVisionConfig.from_preset(
        preset, image_size=settings.image_size, patch_size=settings.patch_size,
        num_labels=len(MAJORITY_COLOUR_NAMES), id2label=dict(enumerate(MAJORITY_COLOUR_NAMES)),
        label2id={c: i for i, c in enumerate(MAJORITY_COLOUR_NAMES)}, label_smoothing=settings.label_smoothing,
        **strategy)
    set_seed(settings.seed)
    return DefocusForImageClassification(config)


def build_data(settings: StudySettings):
    """(train dataset, test dataset, test samples): fixed images from `(seed, 0)` and `(seed, 1)`."""
    task = dict(image_size=settings.image_size, grid=settings.grid, min_objects=settings.min_objects,
                max_objects=settings.max_objects, margin_one_share=settings.margin_one_share,
                min_object_size=settings.min_object_size)
    # the evaluation transform without a crop: every object must stay in the picture
    transform = ImageClassificationTransform(settings.image_size, train=False, crop_pct=1.0)
    train_samples = majority_colour_images(settings.train_size, (settings.seed, 0), **task)
    test_samples = majority_colour_images(settings.test_size, (settings.seed, 1), **task)
    return (TensorImageDataset.from_samples(train_samples, transform),
            TensorImageDataset.from_samples(test_samples, transform), test_samples)


def train_model(model: DefocusForImageClassification, train_dataset, settings: StudySettings,
                work_dir: Path) -> tuple[list[dict], float]:
    """Train for `settings.steps` on the encoder pretraining Trainer; returns (log history, seconds)."""
    args = TrainingArguments(
        output_dir=str(work_dir), max_steps=settings.steps, per_device_train_batch_size=settings.batch_size,
        learning_rate=settings.learning_rate, weight_decay=settings.weight_decay, lr_scheduler_type="cosine",
        warmup_steps=settings.warmup, max_grad_norm=1.0, logging_steps=max(1, settings.steps // 40),
        save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True, seed=settings.seed,
        dataloader_num_workers=0, use_cpu=True)
    config = model.config
    callbacks = ([ScheduledDropPathCallback(config.min_drop_path_rate, config.drop_path_rate)]
                 if config.use_scheduled_drop_path else [])
    if not config.use_scheduled_drop_path:
        model.set_drop_path_rate(config.drop_path_rate)
    # no mixup / cutmix: mixing two images changes the object counts, so the mixed label would be wrong
    trainer = EncoderPretrainingTrainer(model=model, args=args, train_dataset=train_dataset,
                                        data_collator=ImageClassificationCollator(), callbacks=callbacks)
    trainer.remove_callback(PrinterCallback)  # the losses go to the JSON and the loss figure, not to stdout
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    return trainer.state.log_history, seconds


@torch.no_grad()
def predict(model: DefocusForImageClassification, dataset: TensorImageDataset, batch_size: int = 250) -> np.ndarray:
    """Predicted class of the CLS head for every image (eval mode)."""
    model.eval()
    predictions = []
    for start in range(0, len(dataset), batch_size):
        logits = keep_main_logits(model(dataset.pixel_values[start:start + batch_size]).logits, None)
        predictions.append(logits.argmax(-1).numpy())
    return np.concatenate(predictions)


def measure_overfocus(model: DefocusForImageClassification, dataset: TensorImageDataset, count: int) -> dict:
    """`overfocus_metrics` on the first `count` test images, against their true labels."""
    model.eval()
    pixels, labels = dataset.pixel_values[:count], dataset.labels[:count]
    maps = attention_maps(model, pixels)
    gradient = gradient_map(model, pixels, labels)
    return overfocus_metrics(maps, gradient)


def _percent(correct: np.ndarray) -> float:
    """Accuracy in percent of a boolean array (NaN when empty: a subset the test set happens not to hold)."""
    return float(correct.mean() * 100) if correct.size else float("nan")


def pick_figure_image(samples) -> int:
    """The first test image that is hard (a lead of one) and busy (at least 8 objects): every object matters."""
    for index, sample in enumerate(samples):
        if sample.margin == 1 and len(sample.cells) >= 8:
            return index
    return 0


def format_table(rows: list[dict]) -> str:
    header = ("| model | preset | params | test acc. (%) | acc. on lead-of-one images (%) | entropy, mean / last layer "
              "| top-1% key share, mean / last layer | gradient top-5% share | train time (s) |\n"
              "|---|---|---:|---:|---:|---:|---:|---:|---:|\n")
    lines = []
    for r in rows:
        lines.append(
            f"| {r['name']} | `{r['preset']}` | {r['params'] / 1e3:.0f}k | {r['accuracy']:.1f} "
            f"| {r['accuracy_margin_one']:.1f} | {r['mean_entropy']:.3f} / {r['last_entropy']:.3f} "
            f"| {r['mean_top_key_share']:.3f} / {r['last_top_key_share']:.3f} | {r['gradient_top_share']:.3f} "
            f"| {r['train_seconds']:.0f} |")
    return header + "\n".join(lines) + "\n"


def save_summary_figures(rows: list[dict], histories: dict[str, list[dict]], out: Path) -> list[str]:
    from matplotlib.figure import Figure

    written = []
    fig = Figure(figsize=(9, 3.2), layout="constrained")
    ax_h, ax_k = fig.subplots(1, 2)
    for r in rows:
        layers = sorted(int(k) for k in r["layers"])
        style = "-" if r["name"].startswith("defocus") else "--"
        ax_h.plot(layers, [r["layers"][str(k)]["entropy"] for k in layers], style, marker="o", label=r["name"])
        ax_k.plot(layers, [r["layers"][str(k)]["top_key_share"] for k in layers], style, marker="o", label=r["name"])
    ax_h.set(xlabel="layer", ylabel="normalised row entropy", title="attention entropy (higher: less focused)")
    ax_k.set(xlabel="layer", ylabel="share of attention mass", title="top-1% key share (higher: more focused)")
    for ax in (ax_h, ax_k):
        ax.set_xticks(sorted(int(k) for k in rows[0]["layers"]))
        ax.grid(alpha=0.3)
    ax_k.legend(fontsize=7)
    path = out / "overfocus_layers.png"
    fig.savefig(path, dpi=110)
    written.append(str(path))

    fig = Figure(figsize=(5.5, 3.2), layout="constrained")
    ax = fig.subplots()
    for name, history in histories.items():
        points = [(h["step"], h["loss"]) for h in history if "loss" in h]
        if points:
            ax.plot(*zip(*points), "-" if name.startswith("defocus") else "--", label=name)
    ax.set(xlabel="step", ylabel="training loss", title="training loss ((main + aux) / 2 with the aux loss)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    path = out / "overfocus_loss.png"
    fig.savefig(path, dpi=110)
    written.append(str(path))
    return written


def run_study(models: list[str], settings: StudySettings, out: Path, command: str = "") -> dict:
    """Train, evaluate and diagnose every model in `models`; write the outputs to `out`; return the report."""
    unknown = [m for m in models if m not in ALL_MODELS]
    if unknown:
        raise ValueError(f"unknown study model(s) {unknown}; choose from {list(ALL_MODELS)}")
    out.mkdir(parents=True, exist_ok=True)
    study_start = time.perf_counter()
    train_dataset, test_dataset, test_samples = build_data(settings)
    margins = np.array([s.margin for s in test_samples])
    labels = test_dataset.labels.numpy()
    partial = {f"last_{r}_rows": partial_view_accuracy(test_samples, r) * 100 for r in range(1, settings.grid)}
    rows, histories, trained = [], {}, []
    with tempfile.TemporaryDirectory() as work:
        for name in models:
            model = build_model(name, settings)
            history, seconds = train_model(model, train_dataset, settings, Path(work) / name)
            histories[name] = history
            predictions = predict(model, test_dataset)
            correct = predictions == labels
            metrics = measure_overfocus(model, test_dataset, settings.diag_images)
            last = str(max(metrics["layers"]))
            layers = {str(k): v for k, v in metrics["layers"].items()}
            row = {
                "name": name, "preset": ALL_MODELS[name][0], "overrides": ALL_MODELS[name][1],
                "params": sum(p.numel() for p in model.parameters()),
                "accuracy": float(correct.mean() * 100),
                "accuracy_margin_one": _percent(correct[margins == 1]),
                "accuracy_margin_two_plus": _percent(correct[margins > 1]),
                "mean_entropy": metrics["mean_entropy"], "last_entropy": layers[last]["entropy"],
                "mean_top_key_share": metrics["mean_top_key_share"],
                "last_top_key_share": layers[last]["top_key_share"],
                "gradient_top_share": metrics["gradient_top_share"], "layers": layers,
                "train_seconds": seconds, "train_loss_mean": next((h["train_loss"] for h in reversed(history)
                                                                  if "train_loss" in h), None),
            }
            rows.append(row)
            processor = DefocusImageProcessor.from_vision_config(model.config, do_pad=True)
            trained.append((name, model, processor))
            print(f"{name}: {row['accuracy']:.1f}% test accuracy, entropy {row['mean_entropy']:.3f}, top-1% key "
                  f"share {row['mean_top_key_share']:.3f}, gradient top-5% share {row['gradient_top_share']:.3f}, "
                  f"trained in {seconds:.0f} s", flush=True)
        # the diagnostics figures: all models on one hard test image, gradient of the true label's loss
        index = pick_figure_image(test_samples)
        diag_dir = Path(work) / "diagnose"
        diagnose(trained, test_samples[index].image, out_dir=diag_dir, label=int(test_samples[index].label))
        figures = []
        for source, target in FIGURES.items():
            shutil.copyfile(diag_dir / source, out / target)
            figures.append(str(out / target))
    figures += save_summary_figures(rows, histories, out)
    report = {
        "command": command,
        "settings": vars(settings),
        "task": {"name": "majority colour", "classes": list(MAJORITY_COLOUR_NAMES),
                 "test_share_margin_one": float((margins == 1).mean()),
                 "test_label_counts": np.bincount(labels, minlength=len(MAJORITY_COLOUR_NAMES)).tolist(),
                 "partial_view_accuracy": partial, "figure_image_index": index},
        "torch_threads": torch.get_num_threads(),
        "models": rows,
        "figures": figures,
        "total_seconds": time.perf_counter() - study_start,
    }
    (out / "overfocus_study.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "overfocus_table.md").write_text(format_table(rows))
    return report


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--out", default="outputs/overfocus_study", help="output folder")
    p.add_argument("--models", nargs="+", default=list(STUDY_MODELS), choices=list(ALL_MODELS),
                   help="models to train (default: the five of the comparison; the *-filter-only ablations train "
                        "the De-focus filter with the baselines' strategy)")
    p.add_argument("--steps", type=int, default=None, help=f"training steps per model (default {StudySettings.steps})")
    p.add_argument("--seed", type=int, default=0, help="one seed for the data, the data order and every model's init")
    p.add_argument("--quick", action="store_true", help="tiny smoke run (a few steps, a few images)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.getLogger("transformers").setLevel(logging.WARNING)
    overrides = dict(QUICK) if args.quick else {}
    if args.steps is not None:
        overrides["steps"] = args.steps
    settings = StudySettings(seed=args.seed, **overrides)
    command = " ".join(["python", "eval/overfocus_study.py", *(sys.argv[1:] if argv is None else argv)])
    report = run_study(args.models, settings, Path(args.out), command)
    print(format_table(report["models"]))
    print(f"wrote {Path(args.out) / 'overfocus_study.json'}, {Path(args.out) / 'overfocus_table.md'} and "
          f"{len(report['figures'])} figures in {report['total_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
