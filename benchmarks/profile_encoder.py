"""Where an encoder's time goes: torch.profiler's kernels grouped by kind, for De-focus encoders and a ViT peer.

    python benchmarks/profile_encoder.py                       # on CUDA: Mamba-B/16 and ViT-B/16, bf16, the cases below
    python benchmarks/profile_encoder.py --case mamba-base:224:64:inference --case vit-b16:224:64:inference
    python benchmarks/profile_encoder.py --scan-shapes 64x197 4x4097   # also time the Triton scan's launch configs
    python benchmarks/profile_encoder.py --quick               # tiny CPU smoke run

A case is `MODEL:PX:BATCH:MODE` with MODEL a De-focus preset (`mamba-base`, `vit-small`, ...) or `vit-b16`
(transformers' `ViTModel`, SDPA), MODE `inference` or `train` (forward + backward of the mean output). Each case is
warmed up, then one call is profiled; kernels are grouped into scan / matmul / elementwise / copy / norm / conv /
other by name, and the shares printed with the top kernels, so that a missed speed goal (docs/gpu.md,
docs/kernels.md) comes with the profile that shows why.
"""

from __future__ import annotations

import argparse
import re

import torch

from defocus_mllm import DefocusVisionConfig, DefocusVisionModel
from timing import encoder_step, mean_time, synchronize

GPU_CASES = ["mamba-base:224:64:inference", "mamba-base:1024:4:inference", "mamba-base:224:64:train",
             "vit-b16:224:64:inference", "vit-b16:1024:4:inference"]
QUICK_CASES = ["mamba-tiny:32:2:inference", "mamba-tiny:32:2:train", "vit-b16:32:2:inference"]
# (kind, pattern on the lower-cased kernel / op name), first match wins
KINDS = [
    ("scan", r"scan|_ssm_"),  # the Triton scan / fused mixer kernels are _ssm_fwd_kernel, _ssm_bwd_kernel
    ("matmul", r"gemm|matmul|\bmm\b|addmm|nvjet|cutlass|sm90_xmma|linear|bmm|flash|attention|sdpa|fmha"),
    ("conv", r"conv"),
    ("norm", r"norm|rsqrt"),
    ("copy", r"copy|transpose|contiguous|cat|clone|permute|index|fill|memset|memcpy"),
    ("elementwise", r"elementwise|vectorized|unrolled|silu|softplus|exp|mul|add|div|sigmoid|pow|mean|reduce|sum"),
]


def kind_of(name: str) -> str:
    lowered = name.lower()
    for kind, pattern in KINDS:
        if re.search(pattern, lowered):
            return kind
    return "other"


def build(model_name: str, size: int, device: str, dtype: torch.dtype, layers: int = 0) -> torch.nn.Module:
    torch.manual_seed(0)
    if model_name == "vit-b16":
        from transformers import ViTConfig, ViTModel

        config = ViTConfig(hidden_size=768, num_hidden_layers=layers or 12, num_attention_heads=12,
                           intermediate_size=3072, patch_size=16, image_size=size)
        model = ViTModel._from_config(config, attn_implementation="sdpa", add_pooling_layer=False)
    else:
        overrides = dict(drop_path_rate=0.0, use_scheduled_drop_path=False)
        if layers:
            overrides["num_hidden_layers"] = layers
        model = DefocusVisionModel(DefocusVisionConfig.from_preset(model_name, **overrides))
    return model.to(device=device, dtype=dtype)


def profile_case(case: str, device: str, dtype: torch.dtype, rows: int, layers: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    model_name, size, batch, mode = case.split(":")
    size, batch = int(size), int(batch)
    model = build(model_name, size, device, dtype, layers)
    pixels = torch.randn(batch, 3, size, size, device=device, dtype=dtype)
    fn = encoder_step(model, pixels, mode)
    wall = mean_time(fn, repeats=1, device=device, warmup=2)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        synchronize(device)
    events = prof.key_averages()
    # on CUDA the kernels (device time); on the CPU the leaf operators (self CPU time)
    if device == "cuda":
        rows_ = [(e.key, e.self_device_time_total, e.count) for e in events
                 if e.self_device_time_total > 0 and e.device_type == torch.autograd.DeviceType.CUDA]
    else:
        rows_ = [(e.key, e.self_cpu_time_total, e.count) for e in events if e.self_cpu_time_total > 0]
    total = sum(t for _, t, _ in rows_) or 1.0
    shares: dict[str, float] = {}
    for name, t, _ in rows_:
        shares[kind_of(name)] = shares.get(kind_of(name), 0.0) + t
    where = "GPU kernel" if device == "cuda" else "CPU op"
    print(f"\n=== {case} ({dtype}, {device}): {wall * 1e3:.1f} ms per call unprofiled, {batch / wall:.1f} img/s; "
          f"{where} time {total / 1e3:.1f} ms, {sum(c for *_, c in rows_)} launches")
    print("  by kind: " + ", ".join(f"{k} {v / total:.1%}" for k, v in sorted(shares.items(), key=lambda kv: -kv[1])))
    for name, t, count in sorted(rows_, key=lambda r: -r[1])[:rows]:
        print(f"  {t / total:6.1%} {t / 1e3:8.2f} ms {count:5d}x  [{kind_of(name)}] {name[:110]}")
    del model, pixels
    if device == "cuda":
        torch.cuda.empty_cache()


def scan_configs(shapes: list[str], dim: int, n_state: int) -> None:
    """Times the Triton scan (bf16 inputs, inference and forward + backward) per launch configuration."""
    from defocus_mllm.ops.triton_scan import selective_scan_triton

    configs = [(None, None, None), (16, 16, 2), (32, 16, 4), (64, 16, 4), (64, 32, 4), (128, 16, 8)]
    for shape in shapes:
        batch, length = map(int, shape.split("x"))
        g = torch.Generator(device="cuda").manual_seed(0)
        # channels-last memory, as the mixer holds it: the layout the sequential kernels read coalesced
        u = torch.randn(batch, length, dim, device="cuda", generator=g).bfloat16().transpose(1, 2)
        delta = (torch.rand(batch, length, dim, device="cuda", generator=g) * 0.1).bfloat16().transpose(1, 2)
        A = -torch.rand(dim, n_state, device="cuda", generator=g) - 0.5
        B, C = (torch.randn(batch, length, n_state, device="cuda", generator=g).bfloat16().transpose(1, 2)
                for _ in range(2))
        print(f"\n=== Triton scan B={batch} D={dim} L={length} N={n_state}, bf16 inputs")
        for block_d, checkpoint, warps in configs:
            kw = dict(block_d=block_d, checkpoint=checkpoint, num_warps=warps)

            def fwd() -> None:
                with torch.inference_mode():
                    selective_scan_triton(u, delta, A, B, C, **kw)

            def fwd_bwd() -> None:
                leaves = [t.detach().requires_grad_() for t in (u, delta, A, B, C)]
                selective_scan_triton(*leaves, **kw).float().sum().backward()

            times = [mean_time(fn, repeats=5, device="cuda") * 1e3 for fn in (fwd, fwd_bwd)]
            name = "default" if block_d is None else f"block_d={block_d} checkpoint={checkpoint} warps={warps}"
            print(f"  {name:32} inference {times[0]:7.3f} ms  fwd+bwd {times[1]:7.3f} ms")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", action="append", help="MODEL:PX:BATCH:MODE (repeatable; default: the GPU set)")
    parser.add_argument("--rows", type=int, default=12, help="top kernels printed per case")
    parser.add_argument("--scan-shapes", nargs="*", default=[], help="BATCHxLENGTH shapes for the Triton scan sweep")
    parser.add_argument("--quick", action="store_true", help="tiny CPU smoke run (2 layers, fp32)")
    args = parser.parse_args(argv)
    device = "cpu" if args.quick or not torch.cuda.is_available() else "cuda"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    cases = args.case or (QUICK_CASES if args.quick else GPU_CASES)
    print(f"device {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}, torch {torch.__version__}")
    for case in cases:
        profile_case(case, device, dtype, args.rows, layers=2 if args.quick else 0)
    if args.scan_shapes and device == "cuda":
        scan_configs(args.scan_shapes, dim=1536, n_state=16)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
