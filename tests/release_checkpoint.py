"""A random encoder state dict in the release checkpoints' key layout, and its sizes (test_convert and the tests
that convert one)."""

from __future__ import annotations

import torch

HIDDEN, DEPTH, INNER, STATE, RANK, GROUP, PATCH, CLASSES = 32, 2, 64, 8, 4, 16, 8, 5


def release_state_dict(seed=0, head="linear", aux=True):
    """A random state dict in the release's key layout (no `defocus.` prefix)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape, s=0.2: torch.randn(*shape, generator=g) * s  # noqa: E731
    sd = {"patch_embed.proj.weight": r(HIDDEN, 3, PATCH, PATCH, s=0.05), "patch_embed.proj.bias": r(HIDDEN),
          "cls_token": r(1, 1, HIDDEN), "norm.weight": 1 + r(HIDDEN), "norm.bias": r(HIDDEN)}
    for i in range(DEPTH):
        p = f"blocks.{i}."
        sd.update({
            p + "norm.weight": 1 + r(HIDDEN), p + "mixer.in_proj.weight": r(2 * INNER, HIDDEN),
            p + "mixer.conv1d.weight": r(INNER, 1, 4, s=0.4), p + "mixer.conv1d.bias": r(INNER),
            p + "mixer.x_proj.weight": r(RANK + 2 * STATE, INNER), p + "mixer.dt_proj.weight": r(INNER, RANK, s=0.5),
            p + "mixer.dt_proj.bias": r(INNER, s=1.0) - 3, p + "mixer.A_log": r(INNER, STATE, s=0.5) + 0.5,
            p + "mixer.D": 1 + r(INNER), p + "mixer.out_proj.weight": r(HIDDEN, INNER),
            p + "mixer.freq": torch.rand(STATE, generator=g),
        })
    heads = ["head"] + (["head2"] if aux else [])
    for h in heads:
        if head == "linear":
            sd.update({f"{h}.weight": r(CLASSES, HIDDEN), f"{h}.bias": r(CLASSES)})
        else:
            sd.update({f"{h}.0.weight": r(3 * HIDDEN, HIDDEN), f"{h}.0.bias": r(3 * HIDDEN),
                       f"{h}.2.weight": r(CLASSES, 3 * HIDDEN), f"{h}.2.bias": r(CLASSES)})
    return sd
