"""Benchmark `selective_scan` (forward + backward) against a plain per-step autograd loop.

    python benchmarks/bench_selective_scan.py [--batch 8 --dim 1536 --length 197 --state 16 --repeats 3]

Prints the time and peak memory of each backend next to the baseline loop, run in the same process, and the
ratio. Peak memory is the process's resident-set high-water mark for CPU runs (measured in a fresh child
process per variant so that one variant's peak does not hide another's) and `torch.cuda.max_memory_allocated`
on CUDA.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import time

import torch

from defocus_mllm.ops import available_backends, selective_scan


def per_step_loop(u, delta, A, B, C):
    """The baseline: the recurrence written step by step and differentiated by autograd."""
    s = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for t in range(u.shape[-1]):
        s = torch.exp(delta[:, :, t, None] * A) * s + (delta[:, :, t] * u[:, :, t])[..., None] * B[:, None, :, t]
        ys.append((s * C[:, None, :, t]).sum(-1))
    return torch.stack(ys, dim=-1)


def make_inputs(args, device):
    g = torch.Generator().manual_seed(0)
    b, d, l, n = args.batch, args.dim, args.length, args.state
    tensors = [torch.randn(b, d, l, generator=g), torch.rand(b, d, l, generator=g) * 0.1,
               -torch.rand(d, n, generator=g) * n, torch.randn(b, n, l, generator=g), torch.randn(b, n, l, generator=g)]
    return [t.to(device).requires_grad_() for t in tensors]


def run_variant(name, args, device):
    fn = per_step_loop if name == "per-step loop" else (lambda *x: selective_scan(*x, backend=name))
    inputs = make_inputs(args, device)
    times = []
    for i in range(args.repeats + 1):  # the first run warms up
        if device == "cuda":
            torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        y = fn(*inputs)
        y.square().mean().backward()
        if device == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - start)
        for t in inputs:
            t.grad = None
    if device == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return min(times), peak_mb


def _child(name, args, device, queue):
    torch.set_num_threads(args.threads or torch.get_num_threads())
    queue.put(run_variant(name, args, device))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dim", type=int, default=1536)
    parser.add_argument("--length", type=int, default=197)
    parser.add_argument("--state", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    names = ["per-step loop"] + [b for b in available_backends() if args.device == "cuda" or b != "cuda"]
    print(f"selective_scan fwd+bwd  B={args.batch} D={args.dim} L={args.length} N={args.state}  device={args.device}")
    results = {}
    ctx = mp.get_context("spawn")
    for name in names:
        if args.device == "cpu":
            queue = ctx.Queue()
            proc = ctx.Process(target=_child, args=(name, args, args.device, queue))
            proc.start(); results[name] = queue.get(); proc.join()
        else:
            results[name] = run_variant(name, args, args.device)
    base_t, base_m = results["per-step loop"]
    print(f"{'variant':<16}{'time (s)':>10}{'peak MiB':>11}{'speed-up':>10}{'memory ratio':>14}")
    for name, (t, m) in results.items():
        print(f"{name:<16}{t:>10.3f}{m:>11.0f}{base_t / t:>9.2f}x{m / base_m:>13.2f}x")


if __name__ == "__main__":
    main()
