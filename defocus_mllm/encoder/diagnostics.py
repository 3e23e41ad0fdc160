"""Over-focus diagnostics of De-focus encoders: attention maps, gradient maps and the numbers of docs/method.md §5.

* `attention_maps(model, pixel_values, layers)` gives one `[B, L, L]` map per layer, head / channel averaged and
  row-normalised: the softmax weights of attention mixers, and the implicit attention of retention
  (`|lambda^(i-j) q_i . k_j|`) and of Mamba (`implicit_mamba_attention`).
* `gradient_map(model, pixel_values)` gives `|d loss / d patch embedding|` per token on the image grid, `[B, h, w]`.
* `overfocus_metrics(maps, gradient)` gives the numbers that say "over-focused": the mean normalised row entropy of
  each map, the share of all attention mass that the top 1% of key tokens receive, and the share of the gradient
  held by the top 5% of image tokens.
* `diagnose(...)` / the `defocus-diagnose` command draw them for several models side by side (PNG, needs the `viz`
  extra) and write the numbers to `diagnostics.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .configuration_defocus import DEFOCUS_PRESETS, DefocusVisionConfig
from .mixers import DefocusMambaMixer, TokenMixer
from .mixers.mamba import mamba_attention_kernel
from .modeling_defocus import DefocusForImageClassification, DefocusVisionModel

TOP_KEY_FRACTION = 0.01
TOP_GRADIENT_FRACTION = 0.05


# --------------------------------------------------------------------------------------------------- attention maps


def find_encoder(model: nn.Module) -> DefocusVisionModel:
    """The `DefocusVisionModel` inside `model` (the model itself, a classifier's `.defocus`, a LLaVA vision tower)."""
    if isinstance(model, DefocusVisionModel):
        return model
    for module in model.modules():
        if isinstance(module, DefocusVisionModel):
            return module
    raise TypeError(f"{type(model).__name__} contains no DefocusVisionModel")


@torch.no_grad()
def implicit_mamba_attention(mixer: DefocusMambaMixer, hidden_states: torch.Tensor,
                             channel_chunk: Optional[int] = None) -> torch.Tensor:
    """Channel-averaged `|alpha|` of a Mamba mixer, `[B, L, L]` fp32, not row-normalised (docs/method.md §5.1).

    The mixer's `attention_map` without its head dim: `hidden_states` is the mixer's input (the block's normed
    residual stream), and the `D` channels are processed `channel_chunk` at a time, so `[B, D, L, L]` never exists.
    """
    return mixer.attention_map(hidden_states, channel_chunk=channel_chunk)[:, 0]


def row_normalize(attention: torch.Tensor) -> torch.Tensor:
    """Divide every row (last dim) by its sum; all-zero rows stay zero."""
    return attention / attention.sum(-1, keepdim=True).clamp_min(torch.finfo(attention.dtype).tiny)


@torch.no_grad()
def mixer_attention_map(mixer: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """One layer's row-normalised, head / channel-averaged map `[B, L, L]` from its mixer input.

    Every mixer gives `attention_map(h) -> [B, H, L, L]` (the mixer contract, docs/method.md §3.3): softmax rows
    already sum to 1; retention's `|scores|` and Mamba's channel-averaged `|alpha|` (one head) are averaged over the
    heads first, then normalised (docs/method.md §5.1).
    """
    if not isinstance(mixer, TokenMixer):
        raise TypeError(f"{type(mixer).__name__} is not a De-focus token mixer (mixers.TokenMixer)")
    return row_normalize(mixer.attention_map(hidden_states).float().mean(1))


def _layer_indices(layers: Optional[Iterable[int]], depth: int) -> list[int]:
    if layers is None:
        return list(range(depth))
    indices = []
    for layer in layers:
        if not -depth <= layer < depth:
            raise ValueError(f"Layer {layer} is out of range for an encoder of {depth} layers")
        indices.append(layer % depth)
    return sorted(set(indices))


@torch.no_grad()
def attention_maps(model: nn.Module, pixel_values: torch.Tensor,
                   layers: Optional[Iterable[int]] = None) -> dict[int, torch.Tensor]:
    """Per-layer maps `{layer: [B, L, L]}` (rows sum to 1, CLS token last) of a De-focus encoder on `pixel_values`.

    `layers`: block indices (negative ones count from the end); all layers by default. One forward pass captures
    each requested block's mixer input with a hook; the maps are then computed one layer at a time.
    """
    encoder = find_encoder(model)
    indices = _layer_indices(layers, len(encoder.blocks))
    inputs: dict[int, torch.Tensor] = {}

    def capture(layer: int):
        def hook(module: nn.Module, args: tuple) -> None:
            inputs[layer] = args[0].detach()
        return hook

    handles = [encoder.blocks[i].mixer.register_forward_pre_hook(capture(i)) for i in indices]
    try:
        encoder(pixel_values)
    finally:
        for handle in handles:
            handle.remove()
    maps = {}
    for i in indices:
        maps[i] = mixer_attention_map(encoder.blocks[i].mixer, inputs.pop(i)).cpu()
    return maps


# --------------------------------------------------------------------------------------------------- gradient maps


def gradient_loss_name(model: nn.Module, labels: Optional[torch.Tensor] = None) -> str:
    """What `gradient_map` differentiates for this model (see there)."""
    if isinstance(model, DefocusForImageClassification):
        return "cross_entropy(predicted class)" if labels is None else "cross_entropy(labels)"
    return "norm(pooled output)"


def gradient_map(model: nn.Module, pixel_values: torch.Tensor,
                 labels: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`[B, h, w]` fp32: the L2 norm of `d loss / d patch_embedding_output` per image token, on the image grid.

    The loss: for `DefocusForImageClassification`, the cross-entropy of the CLS head against `labels`, or against its
    own predicted class when `labels` is None; for a bare encoder (or any other module holding one), the L2 norm of
    the pooled (last, CLS) token. Losses are summed over the batch, so each sample's map does not depend on the
    others. No parameter `.grad` is touched. Call `model.eval()` first (drop path would randomise the map).
    """
    encoder = find_encoder(model)
    captured: list[torch.Tensor] = []

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        # a fresh leaf: the gradient stops here, so frozen models work and no weight gradient is computed
        leaf = output.detach().requires_grad_(True)
        captured.append(leaf)
        return leaf

    handle = encoder.patch_embed.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            if isinstance(model, DefocusForImageClassification):
                logits = model(pixel_values).logits.float()
                target = logits.argmax(-1).detach() if labels is None else labels.to(logits.device)
                loss = F.cross_entropy(logits, target, reduction="sum")
            else:
                loss = encoder(pixel_values).pooler_output.float().norm(dim=-1).sum()
            (grad,) = torch.autograd.grad(loss, captured[0])
    finally:
        handle.remove()
    p = encoder.patch_embed.patch_size
    height, width = pixel_values.shape[-2] // p, pixel_values.shape[-1] // p
    return grad.float().norm(dim=-1).reshape(-1, height, width).cpu()


# --------------------------------------------------------------------------------------------------- numbers


def _top_count(n: int, fraction: float) -> int:
    return min(n, max(1, round(fraction * n)))


def is_causal_map(attention: torch.Tensor) -> bool:
    """True when nothing lies above the diagonal of the `[..., L, L]` map."""
    return bool(torch.triu(attention, diagonal=1).abs().max() == 0)


def attention_entropy(attention: torch.Tensor, causal: Optional[bool] = None) -> float:
    """Mean normalised row entropy of row-normalised maps `[..., L, L]`, in [0, 1] (1: uniform rows).

    Row `i` is normalised by the log of the number of keys it can see: `i + 1` for a causal map, `L` otherwise, so a
    causal and a bidirectional model are on one scale. Rows that see a single key carry no information and are left
    out. `causal=None` reads it off the map (nothing above the diagonal).
    """
    attention = attention.double()
    length = attention.shape[-1]
    if causal is None:
        causal = is_causal_map(attention)
    visible = torch.arange(1, length + 1, dtype=torch.float64) if causal else torch.full((length,), float(length),
                                                                                       dtype=torch.float64)
    entropy = -torch.special.xlogy(attention, attention).sum(-1)  # [..., L]
    keep = visible > 1
    normalised = entropy[..., keep] / visible[keep].log()
    return float(normalised.mean())


def top_key_share(attention: torch.Tensor, fraction: float = TOP_KEY_FRACTION) -> float:
    """Share of all attention mass (summed over rows) received by the top `fraction` of key tokens (at least one),
    averaged over the leading dims of `[..., L, L]`."""
    mass = attention.double().sum(-2)  # per key: [..., L]
    k = _top_count(mass.shape[-1], fraction)
    share = mass.topk(k, dim=-1).values.sum(-1) / mass.sum(-1).clamp_min(1e-300)
    return float(share.mean())


def gradient_top_share(gradient: torch.Tensor, fraction: float = TOP_GRADIENT_FRACTION) -> float:
    """Share of the summed per-token gradient norm held by the top `fraction` of image tokens (at least one),
    averaged over the batch of `[B, h, w]` (or `[B, n]`) maps."""
    flat = gradient.double().reshape(gradient.shape[0], -1)
    k = _top_count(flat.shape[-1], fraction)
    share = flat.topk(k, dim=-1).values.sum(-1) / flat.sum(-1).clamp_min(1e-300)
    return float(share.mean())


def overfocus_metrics(attention: Union[Mapping[int, torch.Tensor], torch.Tensor],
                      gradient: Optional[torch.Tensor] = None, top_key_fraction: float = TOP_KEY_FRACTION,
                      top_gradient_fraction: float = TOP_GRADIENT_FRACTION) -> dict[str, Any]:
    """The over-focus numbers of docs/method.md §5.3 for maps from `attention_maps` (a dict, or one `[B, L, L]` map) and an
    optional gradient map from `gradient_map`.

    Returns `{"layers": {layer: {"entropy", "top_key_share"}}, "mean_entropy", "mean_top_key_share"}` plus
    `"gradient_top_share"` when a gradient map is given. Over-focused models have low entropy and high shares.
    """
    if isinstance(attention, torch.Tensor):
        attention = {0: attention}
    per_layer = {layer: {"entropy": attention_entropy(m), "top_key_share": top_key_share(m, top_key_fraction)}
                 for layer, m in attention.items()}
    result: dict[str, Any] = {"layers": per_layer}
    if per_layer:
        result["mean_entropy"] = float(np.mean([v["entropy"] for v in per_layer.values()]))
        result["mean_top_key_share"] = float(np.mean([v["top_key_share"] for v in per_layer.values()]))
    if gradient is not None:
        result["gradient_top_share"] = gradient_top_share(gradient, top_gradient_fraction)
    return result


# --------------------------------------------------------------------------------------------------- models, images


def load_diagnostic_model(spec: str, seed: int = 0) -> tuple[nn.Module, Any]:
    """`(model, image_processor)` for a saved De-focus directory or a preset name.

    A directory loads with `AutoModelForImageClassification` when it holds a classifier and `AutoModel` otherwise;
    a preset (see `DEFOCUS_PRESETS`) builds a *randomly initialised* `DefocusForImageClassification` seeded with
    `seed` (a model at initialisation: useful to check the tooling or the filter's initial state).
    """
    from transformers import AutoConfig, AutoModel, AutoModelForImageClassification

    from .image_processing import DefocusImageProcessor

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


def _display_image(pixel_values: torch.Tensor, processor: Any) -> np.ndarray:
    """`[H, W, 3]` in [0, 1]: one preprocessed image with the normalisation undone."""
    mean = torch.tensor(processor.image_mean, dtype=torch.float32)[:, None, None]
    std = torch.tensor(processor.image_std, dtype=torch.float32)[:, None, None]
    image = pixel_values[0].detach().float().cpu() * std + mean
    return image.clamp(0, 1).permute(1, 2, 0).numpy()


def _require_matplotlib():
    try:
        import matplotlib  # noqa: F401
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError("defocus-diagnose draws its figures with matplotlib, which is not installed: "
                          "pip install 'defocus-mllm[viz]' (or pass --no-figures for the JSON only)") from err
    return Figure


# --------------------------------------------------------------------------------------------------- figures


def _map_panels(axes: np.ndarray, results: Sequence[Mapping[str, Any]], cols: int):
    """`(row, column, ax, result, layer, map)` for each panel of a models x layers grid; spare panels are hidden."""
    for r, res in enumerate(results):
        for c in range(cols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(res["maps"]):
                ax.set_axis_off()
                continue
            layer, amap = list(res["maps"].items())[c]
            yield r, c, ax, res, layer, amap


def _save_figures(results: list[dict[str, Any]], out_dir: Path) -> list[str]:
    Figure = _require_matplotlib()
    from matplotlib.colors import LogNorm

    written = []
    rows = len(results)
    cols = max(len(r["maps"]) for r in results)
    cmap = "viridis"

    # 1. [L, L] maps: rows = models, columns = layers (paper Fig. 1 style); log colours show the long tails
    fig = Figure(figsize=(2.6 * cols + 0.8, 2.7 * rows), layout="constrained")
    axes = np.array(fig.subplots(rows, cols, squeeze=False))
    norm = LogNorm(vmin=1e-4, vmax=1.0)
    image_artist = None
    for r, c, ax, res, layer, amap in _map_panels(axes, results, cols):
        data = amap[0].numpy().copy()
        data[data <= 0] = np.nan  # masked (future) keys are blank, not the darkest colour
        image_artist = ax.imshow(data, cmap=cmap, norm=norm, interpolation="nearest")
        numbers = res["metrics"]["layers"][layer]
        ax.set_title(f"layer {layer}\nH={numbers['entropy']:.2f}  top1%={numbers['top_key_share']:.2f}",
                     fontsize=8)
        if c == 0:
            ax.set_ylabel(f"{res['name']}\nquery token", fontsize=8)
        if r == rows - 1:
            ax.set_xlabel("key token", fontsize=8)
    fig.colorbar(image_artist, ax=axes, shrink=0.8, label="attention (row-normalised)")
    fig.suptitle("Attention maps (CLS token last); H: normalised row entropy, top1%: mass on the top 1% of keys",
                 fontsize=9)
    path = out_dir / "attention_maps.png"
    fig.savefig(path, dpi=110)
    written.append(str(path))

    # 2. the CLS (last) token's attention over the image grid, per layer; one linear scale from 0 for every panel,
    # so that a near-uniform map looks flat instead of having its tiny variations stretched
    fig = Figure(figsize=(2.4 * cols + 1.2, 2.5 * rows), layout="constrained")
    axes = np.array(fig.subplots(rows, cols, squeeze=False))
    vmax = max(float(m[0, -1, :-1].max()) for res in results for m in res["maps"].values())
    image_artist = None
    for r, c, ax, res, layer, amap in _map_panels(axes, results, cols):
        h, w = res["grid"]
        cls_row = amap[0, -1, :-1].reshape(h, w).numpy()
        ax.imshow(res["image"], extent=(0, w, h, 0))
        image_artist = ax.imshow(cls_row, cmap="magma", alpha=0.75, vmin=0.0, vmax=vmax, extent=(0, w, h, 0),
                                 interpolation="nearest")
        ax.set_title(f"layer {layer}", fontsize=8)
        if c == 0:
            ax.set_ylabel(res["name"], fontsize=8)
    fig.colorbar(image_artist, ax=axes, shrink=0.8, label="CLS attention weight")
    fig.suptitle("CLS-token attention over the image patches (brighter: more attention)", fontsize=9)
    path = out_dir / "cls_attention.png"
    fig.savefig(path, dpi=110)
    written.append(str(path))

    # 3. gradient maps: rows = models; the input, the map on the grid, the map over the image
    fig = Figure(figsize=(7.5, 2.6 * rows), layout="constrained")
    axes = np.array(fig.subplots(rows, 3, squeeze=False))
    for r, res in enumerate(results):
        h, w = res["grid"]
        grad = res["gradient"][0].numpy()
        share = res["metrics"]["gradient_top_share"]
        panels = axes[r]
        for ax in panels:
            ax.set_xticks([])
            ax.set_yticks([])
        panels[0].imshow(res["image"])
        panels[0].set_ylabel(res["name"], fontsize=8)
        panels[0].set_title("input", fontsize=8)
        # per-model scale (losses differ), but from 0 so that a flat map looks flat
        artist = panels[1].imshow(grad, cmap="inferno", vmin=0.0, interpolation="nearest")
        panels[1].set_title(f"|d loss / d patch emb|\ntop5% share={share:.2f}", fontsize=8)
        fig.colorbar(artist, ax=panels[1], shrink=0.8)
        panels[2].imshow(res["image"], extent=(0, w, h, 0))
        panels[2].imshow(grad, cmap="inferno", vmin=0.0, alpha=0.6, extent=(0, w, h, 0), interpolation="nearest")
        panels[2].set_title("over the image", fontsize=8)
    fig.suptitle(f"Gradient maps ({results[0]['loss']})", fontsize=9)
    path = out_dir / "gradient_maps.png"
    fig.savefig(path, dpi=110)
    written.append(str(path))
    return written


# --------------------------------------------------------------------------------------------------- driver


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
    from ..images import load_image

    if figures and out_dir is not None:
        _require_matplotlib()  # fail before any model runs
    if not models:
        raise ValueError("diagnose needs at least one model")
    for option, fraction in (("top_key_fraction", top_key_fraction), ("top_gradient_fraction", top_gradient_fraction)):
        if not 0 < fraction <= 1:  # also refuses NaN
            raise ValueError(f"{option}={fraction!r} must be in (0, 1]")
    pil_image = load_image(image) if isinstance(image, (str, os.PathLike)) else image
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
        pixel_values = processor(images=pil_image, return_tensors="pt")["pixel_values"].to(model_device)
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
                        "image": _display_image(pixel_values, processor), "metrics": metrics})
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
            report["figures"] = _save_figures(results, out)
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


__all__ = [
    "attention_entropy",
    "attention_maps",
    "diagnose",
    "find_encoder",
    "gradient_loss_name",
    "gradient_map",
    "gradient_top_share",
    "implicit_mamba_attention",
    "is_causal_map",
    "load_diagnostic_model",
    "mamba_attention_kernel",
    "mixer_attention_map",
    "overfocus_metrics",
    "row_normalize",
    "top_key_share",
]


if __name__ == "__main__":
    sys.exit(main())
