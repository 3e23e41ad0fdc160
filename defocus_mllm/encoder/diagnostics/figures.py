"""The diagnostics' figures (matplotlib, the `viz` extra): attention maps, CLS attention and gradient maps, one
row per model."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch


def display_image(pixel_values: torch.Tensor, processor: Any) -> np.ndarray:
    """`[H, W, 3]` in [0, 1]: one preprocessed image with the normalisation undone."""
    mean = torch.tensor(processor.image_mean, dtype=torch.float32)[:, None, None]
    std = torch.tensor(processor.image_std, dtype=torch.float32)[:, None, None]
    image = pixel_values[0].detach().float().cpu() * std + mean
    return image.clamp(0, 1).permute(1, 2, 0).numpy()


def require_matplotlib():
    try:
        import matplotlib  # noqa: F401
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError("defocus-diagnose draws its figures with matplotlib, which is not installed: "
                          "pip install 'defocus-mllm[viz]' (or pass --no-figures for the JSON only)") from err
    return Figure


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


def save_figures(results: list[dict[str, Any]], out_dir: Path) -> list[str]:
    Figure = require_matplotlib()
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
