"""The `throughput` part of the one-GPU run (docs/gpu.md), run as `gpu_run.py --child throughput`: bf16 encoder
throughput by resolution, De-focus Mamba-Base against `transformers`' ViT-B/16 and the CLIP ViT-L/14 tower shape,
random weights, one JSON row per measurement. `timing.py` times each cell.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from gpu_plan import DRY_VISION, Plan


def encoder_specs(dry_run: bool) -> dict[str, tuple[Any, dict[str, Any]]]:
    """`name -> (config, forward kwargs)` of the three encoders, random weights."""
    from transformers import CLIPVisionConfig, ViTConfig

    from defocus_mllm import DefocusVisionConfig
    from defocus_mllm.training.arguments import parse_overrides

    if dry_run:
        mamba = DefocusVisionConfig.from_preset("mamba-tiny", **parse_overrides(DRY_VISION))
        vit = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        patch_size=8, image_size=32)
        clip = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                patch_size=8, image_size=32)
    else:
        # stochastic depth off: the timed forward+backward runs in train mode and must run every block
        mamba = DefocusVisionConfig.from_preset("mamba-base", drop_path_rate=0.0, use_scheduled_drop_path=False)
        vit = ViTConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                        patch_size=16, image_size=224)
        clip = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                num_attention_heads=16, patch_size=14, image_size=336, projection_dim=768)
    return {"defocus-mamba-base": (mamba, {}), "vit-b16": (vit, {"interpolate_pos_encoding": True}),
            "clip-vit-l14": (clip, {"interpolate_pos_encoding": True})}


def build_encoder(name: str, config: Any, device: str):
    """The encoder `name` of `encoder_specs`, seeded random weights, in bf16 on `device` (the two baselines on SDPA)."""
    import torch
    from transformers import CLIPVisionModel, ViTModel

    from defocus_mllm import DefocusVisionModel

    torch.manual_seed(0)
    if name == "defocus-mamba-base":
        model = DefocusVisionModel(config)
    elif name == "vit-b16":
        model = ViTModel._from_config(config, attn_implementation="sdpa", add_pooling_layer=False)
    else:
        model = CLIPVisionModel._from_config(config, attn_implementation="sdpa")
    return model.to(device=device, dtype=torch.bfloat16)


def tokens_per_image(config: Any, resolution: int) -> int:
    """Tokens the encoder mixes at `resolution`: the patches (the conv drops a remainder) plus one CLS token."""
    return (resolution // config.patch_size) ** 2 + 1


def measure_encoder(model, forward_kwargs: dict[str, Any], config: Any, name: str, resolution: int, batch: int,
                    mode: str, plan: Plan, device: str, cuda_graph: bool = False) -> dict[str, Any]:
    """One row: images/s, tokens/s and peak memory of `model` at `resolution` in `mode` ("inference" | "train").

    `cuda_graph`: the inference forward captured once as a CUDA graph and replayed (`ops.cuda_graphs`); the row is
    named `name + "+graph"`.
    """
    import torch
    from timing import PeakMemory, adaptive_mean_time, encoder_step

    cuda = device == "cuda"
    row: dict[str, Any] = {"model": name + ("+graph" if cuda_graph else ""), "resolution": resolution,
                           "mode": mode, "batch": batch, "tokens": tokens_per_image(config, resolution)}
    pixels = torch.randn(batch, 3, resolution, resolution, device=device, dtype=torch.bfloat16)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())

    measured: dict[str, Any] = {}

    def timed_loop() -> None:
        fn = encoder_step(model, pixels, mode, **forward_kwargs)
        if cuda_graph:
            if mode != "inference" or not cuda:
                raise ValueError("measure_encoder: cuda_graph is for inference on CUDA")
            from defocus_mllm.ops.cuda_graphs import CUDAGraphInference

            graph = CUDAGraphInference(lambda p: model(pixel_values=p, **forward_kwargs).last_hidden_state, pixels)
            fn = lambda: graph(pixels)  # noqa: E731 - the graph's memory pool goes when this call returns
        measured["seconds"], measured["iters"] = adaptive_mean_time(fn, device, plan.warmup, plan.min_iters,
                                                                    plan.max_iters, plan.target_s)

    try:
        if cuda:
            torch.cuda.empty_cache()
            # this model's weights plus everything its measurement allocated on top of what was resident
            row["peak_mem_gib"] = round((PeakMemory(device).measure(timed_loop) * 2**20 + weight_bytes) / 2**30, 3)
        else:
            timed_loop()
        seconds = measured["seconds"]
        row.update(status="ok", ms_per_batch=round(seconds * 1e3, 3), iters=measured["iters"],
                   images_per_s=round(batch / seconds, 2), tokens_per_s=round(batch * row["tokens"] / seconds, 1))
    except torch.cuda.OutOfMemoryError:
        row["status"] = "oom"
    except Exception as exc:  # noqa: BLE001 - one failing cell must not lose the others
        row["status"] = f"error: {type(exc).__name__}: {str(exc)[:200]}"
    finally:
        model.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.empty_cache()
    return row


def run_throughput(plan: Plan, out_file: Path, env_file: Path, cuda_graphs: bool = True) -> None:
    """Child of the `throughput` part: one JSON line per measurement, written as it completes."""
    import torch

    from defocus_mllm.ops import available_backends

    device = "cpu" if plan.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_run: no CUDA device (use --dry-run on a CPU machine)")
    wanted = os.environ.get("DEFOCUS_SCAN_BACKEND", "default")
    # The recipes' processes only `import defocus_mllm`: whether that alone registers the wanted backend matters.
    env = {"device": device, "scan_backend": wanted, "scan_backends_available": available_backends(),
           "scan_backend_registered_by_import": wanted == "default" or wanted in available_backends(),
           "torch_cuda": torch.version.cuda}
    if not env["scan_backend_registered_by_import"] and importlib.util.find_spec("defocus_mllm.ops.triton_scan"):
        importlib.import_module("defocus_mllm.ops.triton_scan")  # registers "triton" for the measurements here
        env["scan_backends_available"] = available_backends()
        print(f"gpu_run: WARNING: `import defocus_mllm` does not register scan backend {wanted!r}; the recipe "
              "launches will fail to find it", flush=True)
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   capability=f"{props.major}.{props.minor}", multiprocessors=props.multi_processor_count)
    env_file.write_text(json.dumps(env, indent=1))
    specs = encoder_specs(plan.dry_run)
    models = {name: build_encoder(name, config, device) for name, (config, _) in specs.items()}
    env["attn_implementation"] = {n: getattr(m.config, "_attn_implementation", None) for n, m in models.items()}
    env["encoder_parameters"] = {n: sum(p.numel() for p in m.parameters()) for n, m in models.items()}
    env_file.write_text(json.dumps(env, indent=1))
    with out_file.open("a") as f:
        for resolution in plan.resolutions:
            for name, model in models.items():
                config, kwargs = specs[name]
                runs = [("inference", False), ("train", False)]
                if cuda_graphs and device == "cuda" and name == "defocus-mamba-base":
                    runs.insert(1, ("inference", True))
                for mode, graph in runs:
                    row = measure_encoder(model, kwargs, config, name, resolution, plan.batch[resolution], mode,
                                          plan, device, cuda_graph=graph)
                    print(json.dumps(row), flush=True)
                    f.write(json.dumps(row) + "\n")
                    f.flush()

