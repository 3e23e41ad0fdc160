"""Benchmark De-focus Mamba-Small and De-focus ViT-Small against transformers' ViT-S/16: fp32 CPU inference.

    python benchmarks/bench_encoder.py [--sizes 224 448 896 --batches 8 4 2 --repeats 3]
    python benchmarks/bench_encoder.py --profile 896      # also print torch.profiler's top ops at 896 px
    python benchmarks/bench_encoder.py --quick            # tiny smoke run
    python benchmarks/bench_encoder.py --models vit --train   # De-focus ViT-S only; forward + backward too

All three encoders are built in this process with random weights (transformers' `ViTModel` with ViT-S/16 sizes:
hidden 384, 12 layers, 6 heads, MLP 1536, its default attention implementation; one per resolution, since its
position embedding fixes the grid). Each resolution runs the models interleaved, round after round, under
`torch.inference_mode`, and reports the best round's images/s (median in brackets): on a machine shared with other
work the best of interleaved rounds is the least disturbed estimate. Ratios are against ViT-S/16.

`--train` also times forward + backward (the loss `mean(last_hidden_state^2)`, gradients of every parameter) in
the same interleaved way and prints those ratios and peaks in a second table.

Peak memory is what one forward adds on top of the weights: the rise of the process's resident-set high-water
mark during the call (`timing.PeakMemory`), measured after all timing rounds.
"""

from __future__ import annotations

import argparse
import statistics
from typing import Callable

import torch
from transformers import ViTConfig, ViTModel

from defocus_mllm import DefocusVisionConfig, DefocusVisionModel
from defocus_mllm.ops import available_backends, available_causal_conv_backends, available_mamba_mixer_backends
from timing import PeakMemory, interleaved_rounds

BASELINE = "ViT-S/16 (transformers)"
# images/s goals for De-focus Mamba-S relative to ViT-S/16, by resolution
GOALS = {224: 0.7, 448: 1.0, 896: 1.5}
# De-focus ViT-S at 896 px: images/s relative to ViT-S/16, and its peak memory at most this multiple of ViT-S/16's
VIT_GOAL = {896: (0.8, 2.0)}
MODELS = {"mamba": "De-focus Mamba-S", "vit": "De-focus ViT-S"}


def vit_small(image_size: int, layers: int) -> ViTModel:
    config = ViTConfig(hidden_size=384, num_hidden_layers=layers, num_attention_heads=6, intermediate_size=1536,
                       image_size=image_size, patch_size=16)
    return ViTModel(config, add_pooling_layer=False).eval()


def defocus(preset: str, layers: int) -> DefocusVisionModel:
    overrides = {"num_hidden_layers": layers} if layers else {}
    return DefocusVisionModel(DefocusVisionConfig.from_preset(preset, **overrides)).eval()


def inference_call(model, pixels: torch.Tensor) -> Callable[[], None]:
    """The timed inference call: one forward under `torch.inference_mode`."""
    def run() -> None:
        with torch.inference_mode():
            model(pixel_values=pixels)
    return run


def train_call(model, pixels: torch.Tensor) -> Callable[[], None]:
    """The timed training call, in the model's current (eval) mode: forward + backward of `mean(output^2)`."""
    def run() -> None:
        model.zero_grad(set_to_none=True)
        model(pixel_values=pixels).last_hidden_state.square().mean().backward()
    return run


def goal_note(name: str, size: int, ratio: float, peak, base_peak) -> str:
    if name == MODELS["mamba"] and size in GOALS:
        return f"  >= {GOALS[size]:.1f}x: {'met' if ratio >= GOALS[size] else 'MISSED'}"
    if name == MODELS["vit"] and size in VIT_GOAL:
        speed, memory = VIT_GOAL[size]
        met = ratio >= speed and peak is not None and base_peak is not None and peak <= memory * base_peak
        return f"  >= {speed:.1f}x, peak <= {memory:.0f}x ViT-S: {'met' if met else 'MISSED'}"
    return ""


def run_rounds(run: dict, pixels: torch.Tensor, repeats: int, step) -> tuple[dict, dict]:
    """Best-of-interleaved-rounds times and peak memory of `step(model, pixels)` for every model in `run`."""
    # the warm-up round also compiles the CPU scan kernel if needed
    calls = {name: step(model, pixels) for name, model in run.items()}
    _, times = interleaved_rounds(calls, repeats)
    memory = PeakMemory("cpu")
    peaks = {name: memory.measure(call) for name, call in calls.items()}
    return times, peaks


def print_rows(times: dict, peaks: dict, size: int, batch: int, goals: bool) -> None:
    base = batch / min(times[BASELINE])
    for name, ts in times.items():
        ips, med = batch / min(ts), batch / statistics.median(ts)
        peak = f"{peaks[name]:>10.0f}" if peaks[name] is not None else f"{'n/a':>10}"
        goal = goal_note(name, size, ips / base, peaks[name], peaks[BASELINE]) if goals else ""
        print(f"{name:<26}{size:>5}{batch:>6}{ips:>8.2f}{f'({med:.2f})':>10}{ips / base:>9.2f}x{peak}{goal}",
              flush=True)


def profile(name: str, model, pixels: torch.Tensor, rows: int = 12) -> None:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    with torch.inference_mode(), torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        model(pixel_values=pixels)
    print(f"\n--- torch.profiler, {name}, {tuple(pixels.shape)}: top ops by self CPU time ---")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=40))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 448, 896])
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 4, 2])
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds after one warm-up round")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--profile", type=int, nargs="*", default=None,
                        help="resolutions to profile after timing (no value: all)")
    parser.add_argument("--quick", action="store_true", help="2-layer models, tiny images, one round (smoke test)")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=sorted(MODELS),
                        help="De-focus encoders to run beside ViT-S/16 (default: both)")
    parser.add_argument("--train", action="store_true", help="also time forward + backward (second table)")
    args = parser.parse_args()
    if len(args.sizes) != len(args.batches):
        parser.error("--sizes and --batches need the same number of values")
    layers = {"mamba": 24, "vit": 12}
    if args.quick:
        args.sizes, args.batches, args.repeats = [32, 64], [2, 1], 1
        layers = {"mamba": 2, "vit": 2}
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"fp32 CPU inference, threads={torch.get_num_threads()}, torch {torch.__version__}, "
          f"backends available: scan {', '.join(available_backends())}; Mamba mixer "
          f"{', '.join(available_mamba_mixer_backends())}; causal conv {', '.join(available_causal_conv_backends())}")
    models = {MODELS[key]: defocus(f"{key}-small", 0 if not args.quick else layers[key])
              for key in sorted(MODELS) if key in args.models}
    header = f"{'model':<26}{'px':>5}{'batch':>6}{'img/s':>8}{'(median)':>10}{'vs ViT-S':>10}{'peak MiB':>10}  goal"
    print(f"\n{header}", flush=True)
    train_rows, ratios = [], []
    for size, batch in zip(args.sizes, args.batches):
        run = {BASELINE: vit_small(size, layers["vit"]), **models}
        pixels = torch.randn(batch, 3, size, size)
        times, peaks = run_rounds(run, pixels, args.repeats, inference_call)
        print_rows(times, peaks, size, batch, goals=True)
        ratios.append((size, {name: min(times[BASELINE]) / min(ts) for name, ts in times.items()}, None))
        if args.train:  # eval mode (no drop path or dropout) with gradients: the same work in every round
            train_rows.append((size, batch, *run_rounds(run, pixels, args.repeats, train_call)))
            train_times = train_rows[-1][2]
            ratios[-1] = (size, ratios[-1][1], {name: min(train_times[BASELINE]) / min(ts)
                                               for name, ts in train_times.items()})
            for model in run.values():
                model.zero_grad(set_to_none=True)
        if args.profile is not None and (not args.profile or size in args.profile):
            for name, model in run.items():
                profile(name, model, pixels)
        del run
    if train_rows:
        print(f"\nforward + backward (mean(last_hidden_state^2), every parameter's gradient)\n{header}", flush=True)
        for size, batch, times, peaks in train_rows:
            print_rows(times, peaks, size, batch, goals=False)
    print(f"\nratios to {BASELINE} (images/s):")
    for size, inference, train in ratios:
        for name in models:
            fwd_bwd = f"{train[name]:.2f}x" if train is not None else "n/a (--train)"
            goal = goal_note(name, size, inference[name], None, None).strip() if name == MODELS["mamba"] else ""
            print(f"  {name:<18}{size:>5} px: inference {inference[name]:.2f}x, forward + backward {fwd_bwd}"
                  f"{'  (' + goal + ')' if goal else ''}")


if __name__ == "__main__":
    main()
