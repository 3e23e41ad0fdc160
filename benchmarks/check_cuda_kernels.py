"""Check the CUDA fast paths against the pure-PyTorch path on a GPU machine, and time them.

    python benchmarks/check_cuda_kernels.py [--sweep]
    python benchmarks/check_cuda_kernels.py --dry-run [--sweep]

Compares, on random inputs: `selective_scan` "cuda" (mamba-ssm) and "triton" (the Triton kernels) vs "torch"
(forward and every gradient, fp32 and bf16 inputs), "triton" vs "cuda" when both run, `causal_conv1d_silu` with and
without causal-conv1d, and a whole De-focus Mamba-Base forward / backward with each fast scan vs with
`DEFOCUS_SCAN_BACKEND=torch`, in fp32 and under bf16 autocast. Prints the relative errors, the forward and
forward+backward timings and their ratios (the Triton scan's goal: at least 0.5x mamba-ssm's fwd+bwd speed).
`--sweep` also times the Triton scan over a grid of launch configurations (chunk, block_d, num_warps).
The De-focus ViT's FlexAttention path (compiled) is compared with its SDPA + dense-bias path (output and every
gradient, fp32, causal and non-causal) and both are timed on a whole vit-base (`check_flex_attention`).

`--dry-run` needs no GPU: it re-runs itself with `TRITON_INTERPRET=1` and checks the Triton scan on tiny CPU shapes
in Triton's interpreter (no timings, no mamba-ssm, no model), so the script itself can be tested anywhere.

Exits 1 if an fp32 comparison is off by more than 1e-4, or if no fast scan backend is available.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable, Optional

import torch

import defocus_mllm.ops.triton_scan  # noqa: F401 - registers the "triton" backend
from defocus_mllm import DefocusForImageClassification, DefocusVisionConfig
from defocus_mllm.ops import available_backends, causal_conv1d_silu, selective_scan
from defocus_mllm.ops.triton_scan import selective_scan_triton

GPU_SHAPE = (8, 1536, 197, 16)  # Mamba-Base at 224 px: B, D, L (196 patches + class token), N
DRY_SHAPE = (2, 6, 21, 5)
SWEEP = [(chunk, block_d, warps) for chunk in (32, 64, 128, 256) for block_d in (1, 2, 4) for warps in (4, 8)]
NAMES = ["y", "du", "ddelta", "dA", "dB", "dC"]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


def timed(fn: Callable[[], object], repeats: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def scan_inputs(dtype: torch.dtype, shape: tuple[int, int, int, int], device: str) -> list[torch.Tensor]:
    b, d, l, n = shape
    g = torch.Generator(device=device).manual_seed(0)
    mk = lambda *s: torch.randn(*s, device=device, generator=g)  # noqa: E731
    u, delta = mk(b, d, l).to(dtype), (torch.rand(b, d, l, device=device, generator=g) * 0.1).to(dtype)
    A = -torch.rand(d, n, device=device, generator=g) * n
    return [t.requires_grad_() for t in (u, delta, A, mk(b, n, l).to(dtype), mk(b, n, l).to(dtype))]


def run_scan(scan: Callable[..., torch.Tensor], dtype: torch.dtype, shape: tuple[int, int, int, int], device: str,
             timing: bool) -> tuple[torch.Tensor, list[torch.Tensor], Optional[float], Optional[float]]:
    """Output, gradients of `mean(y^2)`, and (on a GPU) the forward and forward+backward times of one scan."""
    inputs = scan_inputs(dtype, shape, device)
    y = scan(*inputs)
    y.float().square().mean().backward()
    out, grads = y.detach(), [t.grad for t in inputs]
    if not timing:
        return out, grads, None, None

    def fwd():
        with torch.no_grad():
            scan(*inputs)

    def step():
        for t in inputs:
            t.grad = None
        scan(*inputs).float().square().mean().backward()
    return out, grads, timed(fwd), timed(step)


def check_scan(failures: list[str], backends: list[str], shape: tuple[int, int, int, int], device: str,
               timing: bool) -> None:
    label = "B={} D={} L={} N={}".format(*shape)
    for dtype in (torch.float32, torch.bfloat16):
        res = {name: run_scan(lambda *t, name=name: selective_scan(*t, backend=name), dtype, shape, device, timing)
               for name in ["torch"] + backends}
        pairs = [(name, "torch") for name in backends]
        if {"triton", "cuda"} <= set(res):
            pairs.append(("triton", "cuda"))
        for ours, ref in pairs:
            errors = [rel(res[ours][0], res[ref][0])] + [rel(a, b) for a, b in zip(res[ours][1], res[ref][1])]
            print(f"selective_scan {ours:6} vs {ref:5} {str(dtype):14} "
                  + "  ".join(f"{n}={e:.1e}" for n, e in zip(NAMES, errors)))
            if dtype == torch.float32 and max(errors) > 1e-4:
                failures.append(f"selective_scan {ours} vs {ref} fp32 max rel error {max(errors):.2e}")
        if timing:
            print(f"  {label} {str(dtype)}: " + ", ".join(
                f"{name} fwd {r[2] * 1e3:.3f} ms / fwd+bwd {r[3] * 1e3:.3f} ms" for name, r in res.items()))
            if {"triton", "cuda"} <= set(res):
                print(f"  triton speed relative to mamba-ssm: fwd {res['cuda'][2] / res['triton'][2]:.2f}x, "
                      f"fwd+bwd {res['cuda'][3] / res['triton'][3]:.2f}x (goal >= 0.5x)")


def sweep_triton(failures: list[str], shape: tuple[int, int, int, int], device: str, timing: bool,
                 configs: list[tuple[int, int, int]]) -> None:
    """Every launch configuration against the default one (fp32), with its timings on a GPU."""
    base = run_scan(selective_scan_triton, torch.float32, shape, device, False)
    best = None
    for chunk, block_d, warps in configs:
        def scan(*t, chunk=chunk, block_d=block_d, warps=warps):
            return selective_scan_triton(*t, chunk=chunk, block_d=block_d, num_warps=warps)
        try:
            y, grads, t_fwd, t_step = run_scan(scan, torch.float32, shape, device, timing)
        except Exception as exc:  # noqa: BLE001 - e.g. out of registers / shared memory for this tile size
            print(f"  chunk={chunk:3} block_d={block_d} warps={warps}: {type(exc).__name__}: {str(exc)[:120]}")
            continue
        err = max([rel(y, base[0])] + [rel(a, b) for a, b in zip(grads, base[1])])
        if err > 1e-4:
            failures.append(f"triton chunk={chunk} block_d={block_d} warps={warps}: rel error {err:.2e}")
        times = f"fwd {t_fwd * 1e3:.3f} ms, fwd+bwd {t_step * 1e3:.3f} ms, " if timing else ""
        print(f"  chunk={chunk:3} block_d={block_d} warps={warps}: {times}max rel error vs default {err:.1e}")
        if timing and (best is None or t_step < best[0]):
            best = (t_step, chunk, block_d, warps)
    if best:
        print(f"  fastest fwd+bwd: chunk={best[1]} block_d={best[2]} warps={best[3]} ({best[0] * 1e3:.3f} ms)")


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


def check_model(failures: list[str], backends: list[str]) -> None:
    torch.manual_seed(0)
    config = DefocusVisionConfig.from_preset("mamba-base")
    model = DefocusForImageClassification(config).cuda().eval()
    pixels = torch.randn(8, 3, 224, 224, device="cuda")
    labels = torch.randint(0, 1000, (8,), device="cuda")
    results = {}
    for backend in ["torch"] + backends:
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
    for backend in backends:
        for autocast in (False, True):
            t, c = results["torch", autocast], results[backend, autocast]
            errs = [rel(c[0], t[0]), rel(c[1], t[1]), rel(c[2], t[2])]
            mode = "bf16 autocast" if autocast else "fp32"
            print(f"mamba-base B=8 224px {backend:6} {mode:13}: logits {errs[0]:.1e}, aux {errs[1]:.1e}, grad "
                  f"{errs[2]:.1e}; fwd+bwd torch {t[3] * 1e3:.0f} ms, {backend} {c[3] * 1e3:.0f} ms "
                  f"({t[3] / c[3]:.1f}x)")
            if not autocast and max(errs) > 1e-4:
                failures.append(f"model {backend} {mode} max rel error {max(errs):.2e}")
        bf16_vs_fp32 = rel(results[backend, True][0], results[backend, False][0])
        print(f"bf16 autocast vs fp32 logits ({backend}): {bf16_vs_fp32:.1e}")


def check_flex_attention(failures: list[str]) -> None:
    """De-focus ViT attention: FlexAttention (compiled; decay as score_mod, causal block mask) vs the SDPA + dense
    bias path. Agreement of outputs and every gradient (fp32, causal and non-causal), then whole-model timings."""
    from defocus_mllm import DefocusVisionModel
    from defocus_mllm.encoder.mixers import DefocusAttentionMixer
    from defocus_mllm.encoder.mixers.attention import flex_attention_available

    if not flex_attention_available():
        print("FlexAttention: not in this torch, skipped")
        return
    for causal in (True, False):
        torch.manual_seed(0)
        mixer = DefocusAttentionMixer(DefocusVisionConfig.from_preset("vit-base", causal=causal)).cuda()
        with torch.no_grad():  # move the filter off its init so that every head differs
            mixer.filter.A_log.add_(torch.randn_like(mixer.filter.A_log))
            mixer.filter.freq.mul_(torch.rand_like(mixer.filter.freq) + 0.5)
        for length in (197, 785):
            hidden = torch.randn(8, length, 768, device="cuda", requires_grad=True)
            res = {}
            for backend in ("sdpa", "flex"):
                mixer.attention_backend = backend
                mixer.zero_grad(set_to_none=True)
                hidden.grad = None
                out = mixer(hidden)
                out.float().square().mean().backward()
                res[backend] = [out.detach(), hidden.grad, mixer.qkv.weight.grad, mixer.filter.A_log.grad,
                                mixer.filter.freq.grad]
            errors = [rel(a, b) for a, b in zip(res["flex"], res["sdpa"])]
            names = ["out", "d_hidden", "d_qkv", "d_A_log", "d_freq"]
            print(f"attention flex vs sdpa fp32 causal={causal!s:5} L={length}: "
                  + "  ".join(f"{n}={e:.1e}" for n, e in zip(names, errors)))
            if max(errors) > 1e-4:
                failures.append(f"flex attention causal={causal} L={length} fp32 max rel error {max(errors):.2e}")
            if not (res["flex"][3].abs().min() > 0 and res["flex"][4].abs().sum() > 0):
                failures.append(f"flex attention causal={causal}: no gradient reaches A_log / freq")

    torch.manual_seed(0)
    model = DefocusVisionModel(DefocusVisionConfig.from_preset("vit-base")).cuda()
    auto = model.blocks[0].mixer.uses_flex(torch.empty(1, device="cuda"))
    print(f"vit-base attention_backend='auto' takes {'flex' if auto else 'sdpa'} on CUDA")
    for size, batch in ((224, 64), (448, 16), (896, 4)):
        pixels = torch.randn(batch, 3, size, size, device="cuda")
        for autocast in (False, True):
            times = {}
            for backend in ("sdpa", "flex"):
                for module in model.modules():
                    if isinstance(module, DefocusAttentionMixer):
                        module.attention_backend = backend

                def fwd():
                    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                        model(pixels)

                def step():
                    model.zero_grad(set_to_none=True)
                    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                        model(pixels).last_hidden_state.float().square().mean().backward()
                times[backend] = (timed(fwd, 3), timed(step, 3))
            mode = "bf16 autocast" if autocast else "fp32"
            s_f, s_s = times["sdpa"]
            f_f, f_s = times["flex"]
            print(f"vit-base {size}px B={batch} {mode:13}: inference sdpa {batch / s_f:.0f} img/s, flex "
                  f"{batch / f_f:.0f} img/s ({s_f / f_f:.2f}x); fwd+bwd sdpa {batch / s_s:.0f} img/s, flex "
                  f"{batch / f_s:.0f} img/s ({s_s / f_s:.2f}x)")


def dry_run(args: argparse.Namespace) -> int:
    """The Triton scan on tiny CPU shapes in Triton's interpreter: exercises this script without a GPU."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        # triton.jit picks the interpreter when the kernels are decorated (at import): start over with it set
        os.execve(sys.executable, [sys.executable, *sys.argv], dict(os.environ, TRITON_INTERPRET="1"))
    print("dry run on CPU (Triton interpreter), backends:", available_backends())
    if "triton" not in available_backends():
        print("the 'triton' backend is not available: is triton installed?")
        return 1
    failures: list[str] = []
    check_scan(failures, ["triton"], DRY_SHAPE, "cpu", timing=False)
    if args.sweep:
        sweep_triton(failures, DRY_SHAPE, "cpu", False, [(8, 1, 4), (16, 4, 8)])
    print("FAILED: " + "; ".join(failures) if failures else "dry run: the Triton scan matches the PyTorch path")
    return 1 if failures else 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny CPU shapes in Triton's interpreter, no GPU")
    parser.add_argument("--sweep", action="store_true", help="also time the Triton scan's launch configurations")
    args = parser.parse_args(argv)
    if args.dry_run:
        return dry_run(args)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check (--dry-run checks the Triton scan on CPU)")
        return 0
    backends = [name for name in ("cuda", "triton") if name in available_backends()]
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "backends:", available_backends())
    if "cuda" not in backends:
        print("mamba-ssm is not importable: install the `cuda` extra (checking the other backends)")
    if not backends:
        print("no fast scan backend: install the `cuda` extra")
        return 1
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    failures: list[str] = []
    check_scan(failures, backends, GPU_SHAPE, "cuda", timing=True)
    if args.sweep and "triton" in backends:
        print("Triton launch configurations, fp32 " + "B={} D={} L={} N={}".format(*GPU_SHAPE))
        sweep_triton(failures, GPU_SHAPE, "cuda", True, SWEEP)
    check_conv(failures)
    check_model(failures, backends)
    check_flex_attention(failures)
    print("FAILED: " + "; ".join(failures) if failures else "all CUDA paths match the PyTorch path")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
