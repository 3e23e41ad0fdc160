"""`defocus-diagnose` and its Python form `diagnose`: models loaded from directories or presets, their maps, numbers
and figures on one image, written to `diagnostics.json` (docs/diagnostics.md)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

import torch
from torch import nn

from ..configuration_defocus import DEFOCUS_PRESETS, DefocusVisionConfig
from ..modeling_defocus import DefocusForImageClassification
from .figures import display_image, require_matplotlib, save_figures
from .maps import attention_maps, find_encoder, gradient_loss_name, gradient_map
from .metrics import TOP_GRADIENT_FRACTION, TOP_KEY_FRACTION, overfocus_metrics


def load_diagnostic_model(spec: str, seed: int = 0) -> tuple[nn.Module, Any]:
    """`(model, image_processor)` for a saved De-focus directory or a preset name.

    A directory loads with `AutoModelForImageClassification` when it holds a classifier and `AutoModel` otherwise;
    a preset (see `DEFOCUS_PRESETS`) builds a *randomly initialised* `DefocusForImageClassification` seeded with
    `seed` (a model at initialisation: useful to check the tooling or the filter's initial state).
    """
    from transformers import AutoConfig, AutoModel, AutoModelForImageClassification

    from ..image_processing import DefocusImageProcessor

    if os.path.isdir(spec):
        config = AutoConfig.from_pretrained(spec)
        if not isinstance(config, DefocusVisionConfig):
            raise ValueError(f"{spec} holds a {config.model_type!r} model, not a De-focus encoder (defocus_vision)")
        if "DefocusForImageClassification" in (config.architectures or []):
            model = AutoModelForImageClassification.from_pretrained(spec)
        else:
            model = AutoModel.from_pretrained(spec)
        if (Path(spec) / "preprocessor_config.json").is_file():
            processor = DefocusImageProcessor.from_pretrained(spec)
            processor.patch_size = config.patch_size
        else:
            processor = DefocusImageProcessor.from_vision_config(config)
    elif spec in DEFOCUS_PRESETS:
        config = DefocusVisionConfig.from_preset(spec)
        torch.manual_seed(seed)
        model = DefocusForImageClassification(config)
        processor = DefocusImageProcessor.from_vision_config(config)
    else:
        raise ValueError(f"--model {spec!r} is neither a directory nor a preset; presets: "
                         f"{', '.join(sorted(DEFOCUS_PRESETS))}")
    return model.eval(), processor


def diagnose(models: Sequence[Union[str, nn.Module, tuple[str, nn.Module, Any]]], image: Any,
             layers: Optional[Iterable[int]] = None, out_dir: Optional[Union[str, os.PathLike]] = None,
             image_size: Optional[int] = None, label: Optional[int] = None, seed: int = 0,
             figures: bool = True, device: Optional[Union[str, torch.device]] = None,
             top_key_fraction: float = TOP_KEY_FRACTION,
             top_gradient_fraction: float = TOP_GRADIENT_FRACTION) -> dict[str, Any]:
    """Attention maps, gradient maps and over-focus numbers of several models on one image.

    Args:
        models: directories / preset names (see `load_diagnostic_model`), or `(name, model, image_processor)`.
        image: a path or a PIL image.
        layers: block indices shown for every model (negative ones count from the end); all layers by default.
        out_dir: where `diagnostics.json` and (with `figures`) `attention_maps.png`, `cls_attention.png` and
            `gradient_maps.png` go; nothing is written when None.
        image_size: encoder input size (a multiple of the patch size); default: each model's `image_size`.
        device: where loaded models run (default: cuda when available); given models are moved only when it is set.
        label: class for the classifiers' gradient loss; default: each model's predicted class.

    Models are put in `eval()` mode. Returns the JSON-ready dictionary written to `diagnostics.json`.
    """
    from ...images import load_image, to_model

    if figures and out_dir is not None:
        require_matplotlib()  # fail before any model runs
    if not models:
        raise ValueError("diagnose needs at least one model")
    for option, fraction in (("top_key_fraction", top_key_fraction), ("top_gradient_fraction", top_gradient_fraction)):
        if not 0 < fraction <= 1:  # also refuses NaN
            raise ValueError(f"{option}={fraction!r} must be in (0, 1]")
    pil_image = load_image(image)  # a path, or a PIL image read by the same rule
    # rows of the figures and records of diagnostics.json are told apart by name: a folder name shared by several
    # models (`run1/final`, `run2/final`) gives way to the path as given
    folder_names = [Path(e).name if isinstance(e, str) and os.path.isdir(e) else None for e in models]
    results = []
    for entry, folder_name in zip(models, folder_names):
        if isinstance(entry, str):
            name = folder_name if folder_name and folder_names.count(folder_name) == 1 else entry
            model, processor = load_diagnostic_model(entry, seed=seed)
            model = model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        elif isinstance(entry, tuple):
            name, model, processor = entry
            if device is not None:
                model = model.to(device)
        else:
            raise TypeError("models must be directories / preset names or (name, model, image_processor) tuples")
        if image_size is not None:
            processor.set_image_size(image_size)
        model.eval()
        model_device = find_encoder(model).patch_embed.proj.weight.device
        pixel_values = to_model(processor(images=pil_image, return_tensors="pt"), model)["pixel_values"]
        encoder = find_encoder(model)
        maps = attention_maps(model, pixel_values, layers)
        labels = None if label is None else torch.tensor([label], device=model_device)
        gradient = gradient_map(model, pixel_values, labels)
        loss_name = gradient_loss_name(model, labels)
        metrics = overfocus_metrics(maps, gradient, top_key_fraction, top_gradient_fraction)
        config = encoder.config
        record = {
            "name": name, "mixer": config.mixer, "causal": bool(config.causal), "use_rope": bool(config.use_rope),
            "decay_mode": config.decay_mode if config.mixer != "mamba" else "input-dependent (delta * A)",
            "num_layers": len(encoder.blocks), "num_tokens": maps[next(iter(maps))].shape[-1],
            "grid": list(gradient.shape[-2:]), "image_size": list(pixel_values.shape[-2:]), "loss": loss_name,
            **metrics,
        }
        record["layers"] = {str(k): v for k, v in record["layers"].items()}
        if isinstance(model, DefocusForImageClassification):
            with torch.no_grad():
                record["predicted_class"] = int(model(pixel_values).logits.argmax(-1)[0])
        results.append({**record, "maps": maps, "gradient": gradient,
                        "image": display_image(pixel_values, processor), "metrics": metrics})
        del model  # the next model may need the memory
    report = {
        "image": str(image) if isinstance(image, (str, os.PathLike)) else None,
        "settings": {"top_key_fraction": top_key_fraction, "top_gradient_fraction": top_gradient_fraction,
                     "seed": seed, "label": label},
        "models": [{k: v for k, v in r.items() if k not in ("maps", "gradient", "image", "metrics")}
                   for r in results],
    }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if figures:
            report["figures"] = save_figures(results, out)
        (out / "diagnostics.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="defocus-diagnose",
        description="Attention maps, gradient maps and over-focus numbers of De-focus encoders on one image.")
    parser.add_argument("--model", action="append", required=True, metavar="DIR_OR_PRESET",
                        help="a saved encoder / classifier directory or a preset name (randomly initialised); "
                             "repeat for several models (one figure row each)")
    parser.add_argument("--image", required=True, help="image file")
    parser.add_argument("--layers", type=int, nargs="+", default=None,
                        help="block indices to show (negative: from the end); default: all")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--image-size", type=int, default=None, help="encoder input size (default: the model's)")
    parser.add_argument("--label", type=int, default=None,
                        help="class of the classifiers' gradient loss (default: the predicted class)")
    parser.add_argument("--seed", type=int, default=0, help="initialisation seed of preset models")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--no-figures", action="store_true", help="write only diagnostics.json (no matplotlib)")
    parser.add_argument("--top-key-fraction", type=float, default=TOP_KEY_FRACTION)
    parser.add_argument("--top-gradient-fraction", type=float, default=TOP_GRADIENT_FRACTION)
    args = parser.parse_args(argv)
    try:
        report = diagnose(args.model, args.image, layers=args.layers, out_dir=args.out, image_size=args.image_size,
                          label=args.label, seed=args.seed, figures=not args.no_figures, device=args.device,
                          top_key_fraction=args.top_key_fraction, top_gradient_fraction=args.top_gradient_fraction)
    except (ImportError, ValueError, FileNotFoundError, TypeError) as exc:
        print(f"defocus-diagnose: error: {exc}", file=sys.stderr)
        return 2
    for record in report["models"]:
        print(f"{record['name']}: mean entropy {record['mean_entropy']:.3f}, mean top-1% key share "
              f"{record['mean_top_key_share']:.3f}, gradient top-5% share {record['gradient_top_share']:.3f}")
    print(f"wrote {Path(args.out) / 'diagnostics.json'}" + "".join(f", {p}" for p in report.get("figures", [])))
    return 0
