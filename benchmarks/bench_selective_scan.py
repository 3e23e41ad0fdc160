"""Benchmark `selective_scan` backends against a plain per-step autograd loop, in one process.

    python benchmarks/bench_selective_scan.py [--batch 8 --dim 1536 --length 197 --state 16 --repeats 5]
    python benchmarks/bench_selective_scan.py --quick        # tiny smoke run

Two measurements per variant: training (forward + backward of `y.square().mean()`) and inference (forward under
`torch.inference_mode`). The variants run interleaved, round after round, in the same process, and each reports
its best time (the median in brackets): on a machine shared with other work the best of several interleaved runs
is the least disturbed estimate. Ratios are against the per-step loop and against the "torch" backend.

Peak memory (`timing.PeakMemory`): on CUDA the allocator's peak; on CPU the rise of the process's resident-set
high-water mark during one run. Memory runs come after all timing runs.
"""

from __future__ import annotations

import argparse
import statistics
from typing import Callable

import torch

from defocus_mllm.ops import available_backends, selective_scan
from timing import PeakMemory, interleaved_rounds


def per_step_loop(u, delta, A, B, C):
    """The baseline: the recurrence written step by step and differentiated by autograd."""
    s = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for t in range(u.shape[-1]):
        s = torch.exp(delta[:, :, t, None] * A) * s + (delta[:, :, t] * u[:, :, t])[..., None] * B[:, None, :, t]
        ys.append((s * C[:, None, :, t]).sum(-1))
    return torch.stack(ys, dim=-1)


def make_inputs(batch: int, dim: int, length: int, state: int, device: str) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(batch, dim, length, generator=g), torch.rand(batch, dim, length, generator=g) * 0.1,
               -torch.rand(dim, state, generator=g) * state, torch.randn(batch, state, length, generator=g),
               torch.randn(batch, state, length, generator=g)]
    return [t.to(device).requires_grad_() for t in tensors]


def variant_fn(name: str):
    if name == "per-step loop":
        return per_step_loop
    return lambda *x: selective_scan(*x, backend=name)


def step(fn, inputs: list[torch.Tensor], mode: str) -> Callable[[], None]:
    """One training (fwd + bwd) or inference (fwd) run of `fn`, the input gradients cleared after it."""
    def run() -> None:
        if mode == "train":
            fn(*inputs).square().mean().backward()
        else:
            with torch.inference_mode():
                fn(*inputs)
        for t in inputs:
            t.grad = None
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dim", type=int, default=1536)
    parser.add_argument("--length", type=int, default=197)
    parser.add_argument("--state", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds after one warm-up round")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny shapes and one round (smoke test)")
    args = parser.parse_args()
    if args.quick:
        args.batch, args.dim, args.length, args.state, args.repeats = 2, 8, 12, 5, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    on_device = [b for b in available_backends() if (b in ("cuda", "triton")) == (device == "cuda") or b == "torch"]
    names = ["per-step loop"] + on_device
    print(f"selective_scan  B={args.batch} D={args.dim} L={args.length} N={args.state}  device={device}  "
          f"threads={torch.get_num_threads()}  torch {torch.__version__}")
    inputs = make_inputs(args.batch, args.dim, args.length, args.state, device)
    # round 0 warms up (and compiles the CPU kernel if needed)
    calls = {(n, m): step(variant_fn(n), inputs, m) for n in names for m in ("train", "infer")}
    _, times = interleaved_rounds(calls, args.repeats, device)
    memory = PeakMemory(device)
    peaks = {key: memory.measure(call) for key, call in calls.items()}

    def row(name: str, mode: str) -> str:
        best, med = min(times[(name, mode)]), statistics.median(times[(name, mode)])
        vs_loop = min(times[("per-step loop", mode)]) / best
        vs_torch = min(times[("torch", mode)]) / best
        peak = peaks[(name, mode)]
        mem = f"{peak:>9.1f}" if peak is not None else f"{'n/a':>9}"
        return (f"{name:<15}{best * 1e3:>10.1f}{f'({med * 1e3:.1f})':>11}{vs_loop:>10.2f}x{vs_torch:>10.2f}x"
                f"{mem}")

    for mode, title in (("train", "training: forward + backward"), ("infer", "inference: forward, inference_mode")):
        print(f"\n{title}")
        print(f"{'variant':<15}{'best ms':>10}{'(median)':>11}{'vs loop':>11}{'vs torch':>11}{'peak MiB':>9}")
        for name in names:
            print(row(name, mode))


if __name__ == "__main__":
    main()
