"""Check the CUDA fast paths against the pure-PyTorch path on a GPU machine, and time them.

    python benchmarks/check_cuda_kernels.py [--sweep] [--quick]
    python benchmarks/check_cuda_kernels.py --dry-run [--sweep]

Compares, on random inputs: `selective_scan` "cuda" (mamba-ssm) and "triton" (the sequential Triton kernels) vs
"torch" (forward and every gradient, fp32 and bf16 inputs), "triton" vs "cuda" when both run; the fused Triton mixer
(`mamba_mixer_core` backend "triton") inside a Mamba-Base mixer vs the same module in float64 on the PyTorch path
(output and the gradient of every parameter: `A_log`, `freq`, `D`, conv, `dt_proj`, the projections); the Triton
causal conv and causal-conv1d vs the PyTorch conv; and a whole De-focus Mamba-Base forward / backward with each
fast path vs `DEFOCUS_SCAN_BACKEND=torch`, in fp32 and under bf16 autocast. Prints the relative errors, the forward
and forward+backward timings and their ratios (the Triton scan's goal: at least 0.5x mamba-ssm's fwd+bwd speed).
Then the Triton scan's and the fused mixer's achieved memory bandwidth (bytes they must move / time) next to the
card's (a device-to-device copy, measured), Mamba-B inference with and without a CUDA graph, and the profile of a
Mamba-B inference forward (kernels by kind).
`--sweep` also times the Triton scan over a grid of launch configurations (block_d, checkpoint, num_warps).
The De-focus ViT's FlexAttention path (compiled) is compared with its SDPA + dense-bias path (output and every
gradient, fp32, causal and non-causal) and both are timed on a whole vit-base (`check_flex_attention`); at L = 785
both fp32 `A_log` gradients are also compared with the SDPA path run in float64, which says which one is off.

`--dry-run` needs no GPU: it re-runs itself with `TRITON_INTERPRET=1` and checks the Triton scan, the fused mixer and
the Triton conv on tiny CPU shapes in Triton's interpreter (no timings, no mamba-ssm, no model), so the script
itself can be tested anywhere.

Exits 1 if an fp32 comparison is off by more than 1e-4, or if no fast scan backend is available.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Optional

import torch

import defocus_mllm.ops.triton_scan  # noqa: F401 - registers the "triton" backend
from defocus_mllm import DefocusForImageClassification, DefocusVisionConfig, DefocusVisionModel
from defocus_mllm.encoder.mixers.mamba import DefocusMambaMixer
from defocus_mllm.ops import available_backends, causal_conv1d_silu, selective_scan
from defocus_mllm.ops.triton_conv import causal_conv1d_silu_triton
from defocus_mllm.ops.triton_scan import selective_scan_triton
from timing import mean_time

GPU_SHAPE = (8, 1536, 197, 16)  # Mamba-Base at 224 px: B, D, L (196 patches + class token), N
DRY_SHAPE = (2, 6, 21, 5)
SWEEP = [(block_d, ckpt, warps) for block_d in (8, 16, 32, 64, 128) for ckpt in (16, 32) for warps in (2, 4, 8)]
QUICK_SWEEP = [(16, 16, 2), (32, 16, 4), (64, 16, 4), (64, 32, 4), (128, 16, 8)]
# the bandwidth shapes: a Mamba-B/16 batch at 224 px and at 1024 px (B, D, L, N)
BANDWIDTH_SHAPES = [(64, 1536, 197, 16), (4, 1536, 4097, 16)]
NAMES = ["y", "du", "ddelta", "dA", "dB", "dC"]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


def scan_inputs(dtype: torch.dtype, shape: tuple[int, int, int, int], device: str) -> list[torch.Tensor]:
    b, d, l, n = shape
    g = torch.Generator(device=device).manual_seed(0)
    # channels-last memory (`[B, L, .]` transposed), the layout the mixer hands the scan
    mk = lambda *s: torch.randn(*s, device=device, generator=g)  # noqa: E731
    u = mk(b, l, d).to(dtype).transpose(1, 2)
    delta = (torch.rand(b, l, d, device=device, generator=g) * 0.1).to(dtype).transpose(1, 2)
    A = -torch.rand(d, n, device=device, generator=g) * n
    B, C = mk(b, l, n).to(dtype).transpose(1, 2), mk(b, l, n).to(dtype).transpose(1, 2)
    return [t.requires_grad_() for t in (u, delta, A, B, C)]


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
    return out, grads, mean_time(fwd), mean_time(step)


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
    for block_d, ckpt, warps in configs:
        name = f"block_d={block_d:3} checkpoint={ckpt:2} warps={warps}"

        def scan(*t, block_d=block_d, ckpt=ckpt, warps=warps):
            return selective_scan_triton(*t, block_d=block_d, checkpoint=ckpt, num_warps=warps)
        try:
            y, grads, t_fwd, t_step = run_scan(scan, torch.float32, shape, device, timing)
        except Exception as exc:  # noqa: BLE001 - e.g. out of registers / shared memory for this tile size
            print(f"  {name}: {type(exc).__name__}: {str(exc)[:120]}")
            continue
        err = max([rel(y, base[0])] + [rel(a, b) for a, b in zip(grads, base[1])])
        if err > 1e-4:
            failures.append(f"triton {name}: rel error {err:.2e}")
        times = f"fwd {t_fwd * 1e3:.3f} ms, fwd+bwd {t_step * 1e3:.3f} ms, " if timing else ""
        print(f"  {name}: {times}max rel error vs default {err:.1e}")
        if timing and (best is None or t_step < best[0]):
            best = (t_step, name)
    if best:
        print(f"  fastest fwd+bwd: {best[1]} ({best[0] * 1e3:.3f} ms)")


def check_conv(failures: list[str], device: str = "cuda") -> None:
    """The Triton conv (channels-last input, output and every gradient) and causal-conv1d vs the PyTorch conv."""
    shape = (4, 197, 256) if device == "cuda" else (2, 9, 6)
    g = torch.Generator(device=device).manual_seed(0)
    leaves = [torch.randn(*shape, device=device, generator=g).transpose(1, 2),
              torch.randn(shape[2], 1, 4, device=device, generator=g), torch.randn(shape[2], device=device, generator=g)]
    res = {}
    for name, fn in (("triton", causal_conv1d_silu_triton),
                     ("torch", lambda *t: causal_conv1d_silu(*t, backend="torch"))):
        ours = [t.detach().clone().requires_grad_() for t in leaves]
        y = fn(*ours)
        y.square().mean().backward()
        res[name] = [y.detach()] + [t.grad for t in ours]
    errors = [rel(a, b) for a, b in zip(res["triton"], res["torch"])]
    print("causal_conv1d_silu triton vs torch fp32 channels-last: "
          + "  ".join(f"{n}={e:.1e}" for n, e in zip(("y", "dx", "dweight", "dbias"), errors)))
    if max(errors) > 1e-4:
        failures.append(f"triton causal conv max rel error {max(errors):.2e}")
    if device != "cuda":
        return
    x, w, b = leaves[0].detach().contiguous(), leaves[1], leaves[2]
    try:
        err = rel(causal_conv1d_silu(x, w, b, backend="cuda"), causal_conv1d_silu(x, w, b, backend="torch"))
    except RuntimeError as exc:
        print(f"causal_conv1d: {exc}")
        return
    print(f"causal_conv1d_silu causal-conv1d vs torch fp32 rel error {err:.1e}")
    if err > 1e-4:
        failures.append(f"causal conv rel error {err:.2e}")


def check_mixer(failures: list[str], device: str) -> None:
    """The fused Triton mixer inside a `DefocusMambaMixer` (fp32) vs the same module in float64 on the PyTorch path:
    the output, the input gradient and the gradient of every parameter."""
    if device == "cuda":
        config, (batch, length) = DefocusVisionConfig.from_preset("mamba-base"), (4, 197)
    else:
        config, (batch, length) = DefocusVisionConfig.from_preset(
            "mamba-tiny", hidden_size=16, intermediate_size=32, group_norm_size=16, state_size=4, time_step_rank=4,
            rope_scale_factor=2.0, delta_scale_factor=3.0), (2, 9)
    torch.manual_seed(0)
    mixer = DefocusMambaMixer(config)
    mixer.init_weights()
    with torch.no_grad():  # off the initial values, so that a wrong index shows
        mixer.freq.copy_(torch.rand_like(mixer.freq))
        mixer.A_log.add_(0.3 * torch.randn_like(mixer.A_log))
        mixer.D.copy_(torch.randn_like(mixer.D))
    mixer.to(device)
    hidden = torch.randn(batch, length, config.hidden_size, device=device)
    res = {}
    for backend, dtype in (("triton", torch.float32), ("torch", torch.float64)):
        mixer.to(dtype)
        mixer.zero_grad(set_to_none=True)
        h = hidden.to(dtype).detach().requires_grad_()
        os.environ["DEFOCUS_MIXER_BACKEND"] = backend
        try:
            out = mixer(h)
        finally:
            os.environ.pop("DEFOCUS_MIXER_BACKEND")
        out.square().mean().backward()
        res[backend] = {"out": out.detach(), "d_hidden": h.grad,
                        **{f"d_{n}": p.grad for n, p in mixer.named_parameters()}}
    mixer.float()
    missing = [name for name, ref in res["torch"].items() if ref is not None and res["triton"][name] is None]
    if missing:
        failures.append(f"fused mixer: no gradient for {missing}")
    errors = {name: rel(res["triton"][name], ref) for name, ref in res["torch"].items()
              if ref is not None and res["triton"][name] is not None}
    print(f"mamba_mixer_core triton (fp32) vs torch (float64), B={batch} L={length} D={config.intermediate_size}: "
          + "  ".join(f"{n}={e:.1e}" for n, e in errors.items()))
    if max(errors.values()) > 1e-4:
        failures.append(f"fused mixer fp32 max rel error {max(errors.values()):.2e}")


def copy_bandwidth() -> float:
    """Bytes per second of a 2 GiB device-to-device copy (read + write): what this card's memory sustains."""
    src = torch.empty(2**29, device="cuda")
    dst = torch.empty_like(src)
    seconds = mean_time(lambda: dst.copy_(src), 10)
    return 2 * src.numel() * src.element_size() / seconds


def check_bandwidth(quick: bool) -> None:
    """Achieved GB/s of the Triton scan and of the fused mixer (inference, bf16 inputs, channels-last) at a Mamba-B
    batch at 224 and at 1024 px: the bytes each must move at least (its inputs read once, its output written once)
    over its time, next to the copy bandwidth."""
    from defocus_mllm.ops.triton_mixer import mamba_mixer_core_triton

    peak = copy_bandwidth()
    print(f"device-to-device copy: {peak / 1e9:.0f} GB/s (read + write)")
    for b, d, l, n in BANDWIDTH_SHAPES[:1] if quick else BANDWIDTH_SHAPES:
        g = torch.Generator(device="cuda").manual_seed(0)
        mk = lambda *s: torch.randn(*s, device="cuda", generator=g).bfloat16()  # noqa: E731
        x, z, dt = mk(b, l, d), mk(b, l, d), mk(b, l, d)
        delta = (torch.rand(b, l, d, device="cuda", generator=g) * 0.1).bfloat16()
        B, C = mk(b, l, n), mk(b, l, n)
        A = -torch.rand(d, n, device="cuda", generator=g) - 0.5
        dt_bias, D, freq = torch.randn(d, device="cuda"), torch.randn(d, device="cuda"), torch.rand(n, device="cuda")
        vec = b * l * d * 2  # one bf16 [B, L, D] tensor
        small = 2 * b * l * n * 2 + d * n * 4
        with torch.inference_mode():
            t_scan = mean_time(lambda: selective_scan_triton(x.transpose(1, 2), delta.transpose(1, 2), A,
                                                             B.transpose(1, 2), C.transpose(1, 2)), 10)
            t_mix = mean_time(lambda: mamba_mixer_core_triton(x, z, dt, dt_bias, A, B, C, D, freq,
                                                              group_norm_size=64, rope_scale_factor=1.0,
                                                              delta_scale_factor=1.0), 10)
        for name, seconds, nbytes in (("scan", t_scan, 3 * vec + small), ("fused mixer", t_mix, 4 * vec + small)):
            rate = nbytes / seconds
            print(f"  triton {name:11} B={b} D={d} L={l} N={n} inference: {seconds * 1e3:.3f} ms, {nbytes / 1e6:.0f} MB "
                  f"-> {rate / 1e9:.0f} GB/s = {rate / peak:.0%} of the copy bandwidth ({peak / rate:.1f}x from it)")
        leaves = [t.detach().requires_grad_() for t in (x, z, dt, dt_bias, A, B, C, D, freq)]

        def step():
            for t in leaves:
                t.grad = None
            mamba_mixer_core_triton(*leaves, group_norm_size=64).float().square().mean().backward()
        print(f"  triton fused mixer B={b} L={l} fwd+bwd: {mean_time(step, 5) * 1e3:.3f} ms")


def check_cuda_graphs(failures: list[str], quick: bool) -> None:
    """Mamba-B/16 bf16 inference with and without a CUDA graph of the whole forward (same kernels)."""
    from defocus_mllm.ops.cuda_graphs import CUDAGraphInference

    torch.manual_seed(0)
    config = DefocusVisionConfig.from_preset("mamba-base", drop_path_rate=0.0, use_scheduled_drop_path=False)
    model = DefocusVisionModel(config).cuda().bfloat16().eval()

    def forward(p):
        return model(pixel_values=p).last_hidden_state
    for size, batch in ((224, 64),) if quick else ((224, 64), (1024, 4)):
        pixels = torch.randn(batch, 3, size, size, device="cuda", dtype=torch.bfloat16)
        with torch.inference_mode():
            eager_out = forward(pixels)
            t_eager = mean_time(lambda: forward(pixels), 5)
        try:
            graph = CUDAGraphInference(forward, pixels)
        except Exception as exc:  # noqa: BLE001 - reported, the rest of the checks go on
            failures.append(f"CUDA graph capture at {size}px: {type(exc).__name__}: {str(exc)[:200]}")
            print(f"mamba-base {size}px: CUDA graph capture failed: {type(exc).__name__}: {str(exc)[:200]}")
            continue
        err = rel(graph(pixels), eager_out)
        t_graph = mean_time(lambda g=graph: g(pixels), 5)
        print(f"mamba-base {size}px B={batch} bf16 inference: eager {batch / t_eager:.0f} img/s, CUDA graph "
              f"{batch / t_graph:.0f} img/s ({t_eager / t_graph:.2f}x); graph vs eager rel error {err:.1e}")
        if err > 1e-2:
            failures.append(f"CUDA graph output differs from eager at {size}px: {err:.2e}")
        del graph


def profile_remaining(quick: bool) -> None:
    """Where a Mamba-B inference forward's time goes now (benchmarks/profile_encoder.py's grouping)."""
    from profile_encoder import profile_case

    for case in ["mamba-base:224:64:inference"] + ([] if quick else ["mamba-base:1024:4:inference"]):
        profile_case(case, "cuda", torch.bfloat16, rows=10, layers=0)


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
            results[backend, autocast] = (out.logits.detach(), out.aux_logits.detach(), grad, mean_time(step, 3))
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
            if length == 785:
                # which fp32 A_log gradient is off: both against the SDPA path in float64
                mixer.double()
                mixer.attention_backend = "sdpa"
                mixer.zero_grad(set_to_none=True)
                h64 = hidden.detach().double()
                mixer(h64).square().mean().backward()
                ref = mixer.filter.A_log.grad.clone()
                mixer.float()
                print(f"  d_A_log vs float64 SDPA, causal={causal!s:5} L=785: flex fp32 {rel(res['flex'][3], ref):.1e}, "
                      f"sdpa fp32 {rel(res['sdpa'][3], ref):.1e}")

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
                times[backend] = (mean_time(fwd, 3), mean_time(step, 3))
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
        sweep_triton(failures, DRY_SHAPE, "cpu", False, [(2, 4, 4), (8, 8, 2)])
    check_mixer(failures, "cpu")
    check_conv(failures, "cpu")
    print("FAILED: " + "; ".join(failures) if failures else
          "dry run: the Triton scan, the fused mixer and the Triton conv match the PyTorch path")
    return 1 if failures else 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny CPU shapes in Triton's interpreter, no GPU")
    parser.add_argument("--sweep", action="store_true", help="also time the Triton scan's launch configurations")
    parser.add_argument("--quick", action="store_true", help="fewer shapes and launch configurations (the one-run "
                                                             "device script, benchmarks/gpu_run.py's kernels part)")
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
        sweep_triton(failures, GPU_SHAPE, "cuda", True, QUICK_SWEEP if args.quick else SWEEP)
    check_conv(failures)
    if "triton" in backends:
        check_mixer(failures, "cuda")
    check_model(failures, backends)
    # each remaining part is reported on its own line; one failing must not hide the others' numbers
    for part in ([lambda: check_bandwidth(args.quick), lambda: check_cuda_graphs(failures, args.quick)]
                 if "triton" in backends else []) + [lambda: check_flex_attention(failures),
                                                      lambda: profile_remaining(args.quick)]:
        try:
            part()
        except Exception as exc:  # noqa: BLE001
            failures.append(f"{type(exc).__name__}: {str(exc)[:200]}")
            print(f"FAILED part: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
    print("FAILED: " + "; ".join(failures) if failures else "all CUDA paths match the PyTorch path")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
