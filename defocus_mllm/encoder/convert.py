"""Convert released De-focus Mamba checkpoints into Hugging Face model directories.

    defocus-convert SRC OUT_DIR [--ema] [--delta-scale-factor F] [--rope-scale-factor F] [--image-size N]
                    [--allow-non-finite]
    python -m defocus_mllm.convert SRC OUT_DIR ...

SRC may be a plain state dict, a training file `{"model": sd, "model_ema": sd, "optimizer": ..., "config": obj}`,
a detection file `{"state_dict": {"backbone.*": ...}}` (backbone only), or a `.safetensors` file. Sizes, depth,
classes and head type are read off the tensor shapes. Loading never executes pickled code: files that hold
pickled non-tensor objects (a training config, say) are read with an unpickler that only rebuilds tensors and
replaces every other object by an inert placeholder.

Nonsense is refused with an error naming it (exit status 2, no traceback): a truncated or unreadable file, a tensor
whose shape does not fit the architecture read off the others (the key and both shapes), NaN / infinite weights
(kept only with `--allow-non-finite`), and zero, negative or NaN scale factors and sizes.
"""

from __future__ import annotations

import argparse
import pickle
import re
import sys
import types
from pathlib import Path
from typing import Any, Optional

import torch

from .configuration_defocus import DefocusVisionConfig
from .mixers import mixer_class
from .modeling_defocus import DefocusForImageClassification, DefocusVisionModel


class CheckpointError(ValueError):
    """A checkpoint that cannot be converted; the message names the file and the problem."""


# --------------------------------------------------------------------------------------------- safe loading
class _Inert:
    """Stands in for any pickled object that is not a tensor: records what it is given, runs nothing."""

    def __new__(cls, *args: Any, **kwargs: Any) -> "_Inert":
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._args = args

    def __setstate__(self, state: Any) -> None:
        self._state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.__dict__.setdefault("_items", {})[key] = value

    def append(self, value: Any) -> None:
        self.__dict__.setdefault("_list", []).append(value)

    def extend(self, values: Any) -> None:
        self.__dict__.setdefault("_list", []).extend(values)


_SAFE_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_tensor_v3"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch.nn.parameter", "Parameter"),
    ("torch", "Size"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
}


class _TensorOnlyUnpickler(pickle.Unpickler):
    """Resolves only tensor-rebuilding globals; everything else becomes an `_Inert` placeholder class."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        return type(f"Inert[{module}.{name}]", (_Inert,), {})


_tensor_only_pickle = types.SimpleNamespace(
    __name__="defocus_tensor_only_pickle",
    Unpickler=_TensorOnlyUnpickler,
    load=lambda f, **kw: _TensorOnlyUnpickler(f, **kw).load(),
)


def load_checkpoint(path: str | Path) -> Any:
    """Load a checkpoint file without executing pickled code.

    `torch.load(weights_only=True)` first; if the file also holds pickled non-tensor objects, the tensors are
    extracted with an unpickler that never calls anything but PyTorch's tensor rebuilders.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # truncated / not a safetensors file
            raise CheckpointError(f"{path}: truncated or unreadable safetensors file ({type(exc).__name__}: {exc})") \
                from exc
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        pass  # non-tensor objects in the file: read them as inert placeholders below
    except Exception as exc:  # truncated / not a torch file
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: {exc})") from exc
    try:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_tensor_only_pickle)
    except Exception as exc:
        raise CheckpointError(f"{path}: could not extract tensors without executing pickled code "
                              f"({type(exc).__name__}: {exc})") from exc


def extract_state_dict(checkpoint: Any, use_ema: bool = False, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Find the encoder's state dict in a release training file, detection file or plain state dict."""
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{source}: expected a dict of tensors, got {type(checkpoint).__name__}")
    if use_ema:
        if "model_ema" not in checkpoint:
            raise CheckpointError(f"{source}: --ema asked for 'model_ema', the file has keys {sorted(checkpoint)}")
        sd = checkpoint["model_ema"]
    elif "model" in checkpoint and isinstance(checkpoint["model"], dict):
        sd = checkpoint["model"]
    elif "state_dict" in checkpoint and isinstance(checkpoint["state_dict"], dict):
        sd = {k[len("backbone."):]: v for k, v in checkpoint["state_dict"].items() if k.startswith("backbone.")}
        if not sd:
            raise CheckpointError(f"{source}: 'state_dict' has no 'backbone.*' keys")
    else:
        sd = checkpoint
    if isinstance(sd, _Inert) or not isinstance(sd, dict):
        raise CheckpointError(f"{source}: the weights entry is not a dict of tensors")
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{source}: entries that are not tensors: {bad[:5]}")
    if "patch_embed.proj.weight" not in sd:
        raise CheckpointError(f"{source}: no 'patch_embed.proj.weight': not a De-focus encoder checkpoint "
                              f"(first keys: {list(sd)[:5]})")
    return sd


# ------------------------------------------------------------------------------------------------- mapping
def infer_config(sd: dict[str, torch.Tensor], **overrides: Any) -> DefocusVisionConfig:
    """Read sizes, depth, classes and head type off the tensor shapes of a release-layout state dict."""
    patch_w = sd["patch_embed.proj.weight"]  # [hidden, C, p, p]
    depth = len({int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))})
    if depth == 0:
        raise CheckpointError("no 'blocks.{i}.*' keys")
    mixer = "blocks.0.mixer."
    if mixer + "A_log" not in sd:
        raise CheckpointError("blocks.0.mixer has no A_log: only the De-focus Mamba release layout is supported")
    inner, state = sd[mixer + "A_log"].shape
    kwargs: dict[str, Any] = dict(
        mixer="mamba",
        hidden_size=patch_w.shape[0],
        num_channels=patch_w.shape[1],
        patch_size=patch_w.shape[2],
        num_hidden_layers=depth,
        intermediate_size=inner,
        state_size=state,
        time_step_rank=sd[mixer + "dt_proj.weight"].shape[1],
        conv_kernel=sd[mixer + "conv1d.weight"].shape[-1],
        use_rope=mixer + "freq" in sd,
        group_norm_size=64,
    )
    if "pos_embed" in sd:
        grid = int(round(sd["pos_embed"].shape[1] ** 0.5))
        kwargs.update(use_abs_pos_embed=True, image_size=grid * patch_w.shape[2])
    if "head.weight" in sd:
        kwargs.update(head_type="linear", num_labels=sd["head.weight"].shape[0])
    elif "head.0.weight" in sd:
        kwargs.update(head_type="mlp", num_labels=sd["head.2.weight"].shape[0])
    has_aux = any(k.startswith("head2.") for k in sd)
    kwargs["aux_loss_mode"] = "per_token" if has_aux else "none"
    kwargs.update({k: v for k, v in overrides.items() if v is not None})
    try:
        config = DefocusVisionConfig(**kwargs)
        mixer_class(config).validate_config(config)  # the mixer's own fields (group_norm_size, ...)
    except ValueError as exc:
        raise CheckpointError(f"the inferred configuration is invalid: {exc}") from exc
    return config


def to_hf_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Release key names -> `DefocusForImageClassification` key names (the encoder lives under `defocus.`)."""
    return {k if k.startswith(("head.", "head2.")) else f"defocus.{k}": v for k, v in sd.items()}


def check_finite(sd: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Raise a `CheckpointError` naming the first floating-point tensor that holds NaN or infinite values."""
    for key, tensor in sd.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            nans, infs = int(torch.isnan(tensor).sum()), int(torch.isinf(tensor).sum())
            raise CheckpointError(f"{source}: tensor {key!r} holds {nans} NaN and {infs} infinite value(s); a model "
                                  f"converted from it would output NaN (pass --allow-non-finite, or "
                                  f"allow_non_finite=True, to convert it anyway)")


def check_shapes(weights: dict[str, torch.Tensor], model: torch.nn.Module, source: str = "checkpoint") -> None:
    """Raise a `CheckpointError` naming the first tensor whose shape differs from the model's, with both shapes."""
    expected = model.state_dict()
    for key, tensor in weights.items():
        if key in expected and tuple(tensor.shape) != tuple(expected[key].shape):
            name = key[len("defocus."):] if key.startswith("defocus.") else key
            raise CheckpointError(f"{source}: tensor {name!r} has shape {tuple(tensor.shape)} but the architecture "
                                  f"read off the other tensors expects {tuple(expected[key].shape)}")


def convert_checkpoint(src: str | Path, out_dir: Optional[str | Path] = None, *, use_ema: bool = False,
                       delta_scale_factor: Optional[float] = None, rope_scale_factor: Optional[float] = None,
                       image_size: Optional[int] = None, group_norm_size: Optional[int] = None,
                       allow_non_finite: bool = False):
    """Convert `src` and (when `out_dir` is given) save it as a Hugging Face directory; returns the model.

    A checkpoint with classification heads becomes a `DefocusForImageClassification`; a backbone-only file
    (detection) becomes a `DefocusVisionModel`. NaN / infinite weights are refused unless `allow_non_finite`.
    """
    sd = extract_state_dict(load_checkpoint(src), use_ema=use_ema, source=str(src))
    if not allow_non_finite:
        check_finite(sd, source=str(src))
    try:
        config = infer_config(sd, delta_scale_factor=delta_scale_factor, rope_scale_factor=rope_scale_factor,
                              image_size=image_size, group_norm_size=group_norm_size)
    except CheckpointError as exc:
        raise CheckpointError(f"{src}: {exc}") from exc
    has_head = any(k.startswith("head.") for k in sd)
    if has_head:
        model, weights = DefocusForImageClassification(config), to_hf_state_dict(sd)
    else:
        config.aux_loss_mode = "none"
        model, weights = DefocusVisionModel(config), {k: v for k, v in sd.items() if not k.startswith("head2.")}
    check_shapes(weights, model, source=str(src))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{src}: the weights do not fit the inferred architecture; missing {missing[:8]}, "
                              f"unexpected {unexpected[:8]}")
    model.eval()
    if out_dir is not None:
        out_dir = Path(out_dir)
        model.save_pretrained(out_dir)
        try:  # the matching preprocessing, when the image-processing module is present
            from .image_processing import DefocusImageProcessor

            DefocusImageProcessor.from_vision_config(config).save_pretrained(out_dir)
        except ImportError:
            pass
    return model


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="defocus-convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="release checkpoint (.pth / .pt / .bin / .safetensors)")
    parser.add_argument("out_dir", help="output Hugging Face model directory")
    parser.add_argument("--ema", action="store_true", help="convert the 'model_ema' weights of a training file")
    parser.add_argument("--delta-scale-factor", type=float, default=None,
                        help="divide Mamba's delta by F (the release uses 2 for 4x more tokens, e.g. 384px)")
    parser.add_argument("--rope-scale-factor", type=float, default=None,
                        help="divide rotary positions by F (the release uses 4 at 384px)")
    parser.add_argument("--image-size", type=int, default=None, help="preprocessing / default image size")
    parser.add_argument("--group-norm-size", type=int, default=None,
                        help="channels per group of the scan-output norm (not visible in shapes; release: 64)")
    parser.add_argument("--allow-non-finite", action="store_true",
                        help="convert weights that hold NaN / infinite values (refused by default)")
    args = parser.parse_args(argv)
    try:
        model = convert_checkpoint(args.src, args.out_dir, use_ema=args.ema,
                                   delta_scale_factor=args.delta_scale_factor,
                                   rope_scale_factor=args.rope_scale_factor, image_size=args.image_size,
                                   group_norm_size=args.group_norm_size, allow_non_finite=args.allow_non_finite)
    except CheckpointError as exc:
        print(f"defocus-convert: error: {exc}", file=sys.stderr)
        return 2
    n_params = sum(p.numel() for p in model.parameters())
    cfg = model.config
    print(f"converted {args.src} -> {args.out_dir}: {type(model).__name__}, {n_params / 1e6:.1f}M parameters, "
          f"hidden {cfg.hidden_size}, depth {cfg.num_hidden_layers}, D {cfg.intermediate_size}, "
          f"labels {cfg.num_labels if hasattr(model, 'head') else '-'}, head {cfg.head_type}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
