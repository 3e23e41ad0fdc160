"""Over-focus diagnostics of De-focus encoders: attention maps, gradient maps and the numbers of docs/method.md §5.

* `maps.py`: `attention_maps(model, pixel_values, layers)` (one row-normalised `[B, L, L]` map per layer) and
  `gradient_map(model, pixel_values)` (`|d loss / d patch embedding|` on the image grid, `[B, h, w]`).
* `metrics.py`: `overfocus_metrics(maps, gradient)`, the numbers that say "over-focused": the mean normalised row
  entropy of each map, the share of all attention mass that the top 1% of key tokens receive, and the share of the
  gradient held by the top 5% of image tokens.
* `figures.py`: the figures, several models side by side (PNG, needs the `viz` extra).
* `cli.py`: `diagnose(...)` and the `defocus-diagnose` command (`main`), which write the numbers to
  `diagnostics.json`.
"""

from ..mixers.mamba import mamba_attention_kernel
from .cli import diagnose, load_diagnostic_model, main
from .maps import (
    attention_maps,
    find_encoder,
    gradient_loss_name,
    gradient_map,
    implicit_mamba_attention,
    mixer_attention_map,
    row_normalize,
)
from .metrics import (
    TOP_GRADIENT_FRACTION,
    TOP_KEY_FRACTION,
    attention_entropy,
    gradient_top_share,
    is_causal_map,
    overfocus_metrics,
    top_key_share,
)

__all__ = [
    "TOP_GRADIENT_FRACTION",
    "TOP_KEY_FRACTION",
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
    "main",
    "mamba_attention_kernel",
    "mixer_attention_map",
    "overfocus_metrics",
    "row_normalize",
    "top_key_share",
]
