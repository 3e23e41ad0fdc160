"""Check the CUDA fast paths against the pure-PyTorch path on a GPU machine, and time them.

    python benchmarks/check_cuda_kernels.py

Compares, on random inputs: `selective_scan` "cuda" (mamba-ssm) vs "torch" (forward and every gradient, fp32 and
bf16 inputs), `causal_conv1d_silu` with and without causal-conv1d, and a whole De-focus Mamba-Base forward /
backward with the kernels vs with `DEFOCUS_SCAN_BACKEND=torch`, in fp32 and under bf16 autocast. Prints the
relative errors and the timings with their ratio. Exits 1 if an fp32 comparison is off by more than 1e-4.
"""

from __future__ import annotations

import os
import sys
import time

import torch

from defocus_mllm import DefocusForImageClassification, DefocusVisionConfig
from defocus_mllm.ops import available_backends, causal_conv1d_silu, selective_scan


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


def timed(fn, repeats: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def scan_inputs(dtype, b=8, d=1536, l=197, n=16):
    g = torch.Generator(device="cuda").manual_seed(0)
    mk = lambda *s: torch.randn(*s, device="cuda", generator=g)  # noqa: E731
    u, delta = mk(b, d, l).to(dtype), (torch.rand(b, d, l, device="cuda", generator=g) * 0.1).to(dtype)
    A = -torch.rand(d, n, device="cuda", generator=g) * n
    return [t.requires_grad_() for t in (u, delta, A, mk(b, n, l).to(dtype), mk(b, n, l).to(dtype))]


def check_scan(failures: list[str]) -> None:
    for dtype in (torch.float32, torch.bfloat16):
        outs, grads, times = {}, {}, {}
        for backend in ("torch", "cuda"):
            inputs = scan_inputs(dtype)
            y = selective_scan(*inputs, backend=backend)
            y.float().square().mean().backward()
            outs[backend], grads[backend] = y.detach(), [t.grad for t in inputs]

            def step():
                for t in inputs:
                    t.grad = None
                selective_scan(*inputs, backend=backend).float().square().mean().backward()
            times[backend] = timed(step)
        errors = [rel(outs["cuda"], outs["torch"])] + [rel(a, b) for a, b in zip(grads["cuda"], grads["torch"])]
        names = ["y", "du", "ddelta", "dA", "dB", "dC"]
        print(f"selective_scan {str(dtype):15} " + "  ".join(f"{n}={e:.1e}" for n, e in zip(names, errors)))
        print(f"  fwd+bwd B=8 D=1536 L=197 N=16: torch {times['torch'] * 1e3:.2f} ms, cuda "
              f"{times['cuda'] * 1e3:.2f} ms ({times['torch'] / times['cuda']:.1f}x)")
        if dtype == torch.float32 and max(errors) > 1e-4:
            failures.append(f"selective_scan fp32 max rel error {max(errors):.2e}")


def check_conv(failures: list[str]) -> None:
    x = torch.randn(4, 256, 197, device="cuda")
    w, b = torch.randn(256, 1, 4, device="cuda"), torch.randn(256, device="cuda")
    try:
        err = rel(causal_conv1d_silu(x, w, b, backend="cuda"), causal_conv1d_silu(x, w, b, backend="torch"))
    except RuntimeError as exc:
        print(f"causal_conv1d: {exc}")
        return
    print(f"causal_conv1d_silu fp32 rel error {err:.1e}")
    if err > 1e-4:
        failures.append(f"causal conv rel error {err:.2e}")


def check_model(failures: list[str]) -> None:
    torch.manual_seed(0)
    config = DefocusVisionConfig.from_preset("mamba-base")
    model = DefocusForImageClassification(config).cuda().eval()
    pixels = torch.randn(8, 3, 224, 224, device="cuda")
    labels = torch.randint(0, 1000, (8,), device="cuda")
    results = {}
    for backend in ("torch", "cuda"):
        os.environ["DEFOCUS_SCAN_BACKEND"] = backend
        for autocast in (False, True):
            model.zero_grad()
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                out = model(pixels, labels=labels)
            out.loss.backward()
            grad = model.defocus.blocks[0].mixer.in_proj.weight.grad.clone()

            def step():
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                    model(pixels, labels=labels).loss.backward()
            results[backend, autocast] = (out.logits.detach(), out.aux_logits.detach(), grad, timed(step, 3))
    os.environ.pop("DEFOCUS_SCAN_BACKEND")
    for autocast in (False, True):
        t, c = results["torch", autocast], results["cuda", autocast]
        errs = [rel(c[0], t[0]), rel(c[1], t[1]), rel(c[2], t[2])]
        mode = "bf16 autocast" if autocast else "fp32"
        print(f"mamba-base B=8 224px {mode:13}: logits {errs[0]:.1e}, aux {errs[1]:.1e}, grad {errs[2]:.1e}; "
              f"fwd+bwd torch {t[3] * 1e3:.0f} ms, kernels {c[3] * 1e3:.0f} ms ({t[3] / c[3]:.1f}x)")
        if not autocast and max(errs) > 1e-4:
            failures.append(f"model fp32 {mode} max rel error {max(errs):.2e}")
    bf16_vs_fp32 = rel(results["cuda", True][0], results["cuda", False][0])
    print(f"bf16 autocast vs fp32 logits (kernels): {bf16_vs_fp32:.1e}")


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 0
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "backends:", available_backends())
    if "cuda" not in available_backends():
        print("mamba-ssm is not importable: install the `cuda` extra")
        return 1
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    failures: list[str] = []
    check_scan(failures)
    check_conv(failures)
    check_model(failures)
    print("FAILED: " + "; ".join(failures) if failures else "all CUDA paths match the PyTorch path")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
