"""Benchmark the implementations of the De-focus ViT attention inside a whole encoder, in one process.

    python benchmarks/bench_attention.py [--preset vit-small --sizes 224 448 896 --batches 8 4 2 --repeats 3]
    python benchmarks/bench_attention.py --quick           # tiny smoke run (no compilation)
    python benchmarks/bench_attention.py --train           # forward + backward (on CPU: --paths sdpa chunked)

Paths (`attention_backend` of every attention mixer): `sdpa` (`scaled_dot_product_attention` with the dense
`[H, L, L]` decay + mask bias), `chunked` (`ops.decay_attention`: SDPA one tile of queries at a time, the bias
built per tile), `flex` (FlexAttention under `torch.compile`: the decay as a `score_mod`, causality as a
block mask) and `flex_eager` (FlexAttention without compiling: PyTorch's unfused reference). For every image size the
paths run interleaved, round after round, and each reports its best time (on a shared machine the best of several
interleaved runs is the least disturbed estimate), as images per second, and its ratio to `sdpa`. The first call of
each path is not timed; for `flex` it includes compiling for that sequence length, reported as `first call`. Each
path's output is also compared with `sdpa`'s (`max|diff|`).

Inference runs under `torch.inference_mode` in the model's dtype (fp32 by default).
"""

from __future__ import annotations

import argparse
import warnings

import torch

from defocus_mllm import DefocusVisionConfig, DefocusVisionModel
from defocus_mllm.encoder.mixers import DefocusAttentionMixer
from defocus_mllm.encoder.mixers.attention import flex_attention_available
from timing import interleaved_rounds

PATHS = ("sdpa", "chunked", "flex", "flex_eager")


def set_backend(model: torch.nn.Module, backend: str) -> None:
    for module in model.modules():
        if isinstance(module, DefocusAttentionMixer):
            module.attention_backend = backend


def run(model: DefocusVisionModel, pixels: torch.Tensor, train: bool) -> torch.Tensor:
    if not train:
        with torch.inference_mode():
            return model(pixels).last_hidden_state
    out = model(pixels).last_hidden_state
    out.float().square().mean().backward()
    return out.detach()


def bench_size(model: DefocusVisionModel, size: int, batch: int, paths: list[str], repeats: int, device: str,
               dtype: torch.dtype, train: bool) -> dict[str, dict[str, float]]:
    pixels = torch.randn(batch, 3, size, size, device=device, dtype=dtype)
    outputs = {}

    def call(path: str):
        def step() -> None:
            set_backend(model, path)
            model.zero_grad(set_to_none=True)
            outputs[path] = run(model, pixels, train)
        return step

    # the first calls (compilation, block masks, allocator warm-up) are reported apart
    first, times = interleaved_rounds({path: call(path) for path in paths}, repeats, device)
    results = {path: {"first": first[path], "times": times[path]} for path in paths}
    reference = outputs.get("sdpa")
    for path in paths:
        best = min(results[path]["times"])
        results[path].update(best=best, img_s=batch / best)
        if reference is not None:
            results[path]["max_diff"] = (outputs[path].float() - reference.float()).abs().max().item()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="vit-small")
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 448, 896])
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 4, 2], help="one per size")
    parser.add_argument("--paths", nargs="+", default=None, choices=PATHS,
                        help="default: all four (--quick: sdpa, chunked and flex_eager)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU intra-op threads (default: torch's; --quick: 1, tiny ops only lose to a second thread)")
    parser.add_argument("--train", action="store_true", help="time forward + backward instead of inference")
    parser.add_argument("--quick", action="store_true", help="vit-tiny at 32 px, no compilation")
    args = parser.parse_args(argv)

    if args.quick:
        args.preset, args.sizes, args.batches, args.repeats = "vit-tiny", [32], [2], 1
        args.paths = args.paths or ["sdpa", "chunked", "flex_eager"]
        args.threads = args.threads or 1
    if args.threads:
        torch.set_num_threads(args.threads)
    paths = args.paths or list(PATHS)
    if len(args.batches) != len(args.sizes):
        parser.error("give one batch size per image size")
    if not flex_attention_available():
        print("this torch has no FlexAttention: sdpa and chunked only")
        paths = [p for p in paths if p in ("sdpa", "chunked")]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.train and device == "cpu" and any(p.startswith("flex") for p in paths):
        parser.error("FlexAttention has no backward on CPU in PyTorch: --train on CPU needs --paths sdpa chunked")
    dtype = getattr(torch, args.dtype)
    warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")

    torch.manual_seed(0)
    config = DefocusVisionConfig.from_preset(args.preset)
    model = DefocusVisionModel(config).to(device=device, dtype=dtype)
    model.train(False)
    device_name = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{args.preset} ({config.num_hidden_layers} layers, {config.num_attention_heads} heads, causal="
          f"{config.causal}, decay={config.decay_mode}), {args.dtype}, "
          f"{'forward + backward' if args.train else 'inference'}, {device_name}, torch {torch.__version__}")
    header = f"{'size':>5} {'batch':>5} {'tokens':>6}  " + "  ".join(f"{p + ' img/s':>16}" for p in paths)
    header += "  " + "  ".join(f"{p + '/sdpa':>15}" for p in paths if p != "sdpa")
    header += "  first call (s)  max|diff| vs sdpa"
    print(header)
    for size, batch in zip(args.sizes, args.batches):
        res = bench_size(model, size, batch, paths, args.repeats, device, dtype, args.train)
        tokens = (size // config.patch_size) ** 2 + 1
        row = f"{size:>5} {batch:>5} {tokens:>6}  " + "  ".join(f"{res[p]['img_s']:>16.2f}" for p in paths)
        if "sdpa" in res:
            row += "  " + "  ".join(f"{res[p]['img_s'] / res['sdpa']['img_s']:>14.2f}x" for p in paths if p != "sdpa")
        row += "  " + " ".join(f"{p}={res[p]['first']:.1f}" for p in paths)
        row += "  " + " ".join(f"{p}={res[p].get('max_diff', float('nan')):.1e}" for p in paths if p != "sdpa")
        print(row, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
