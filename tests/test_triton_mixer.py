"""The fused Triton mixer (`mamba_mixer_core`'s "triton" backend) against the PyTorch composition, and the Triton
causal conv against `conv1d`: every output and every gradient, run through Triton's interpreter.

As in test_triton_scan.py, the kernels must be built with `TRITON_INTERPRET=1` set before the package is first
imported, so the checks run in a child process (this file is its script: `python tests/test_triton_mixer.py`
prints the measured errors as JSON) and the parent asserts case by case.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from triton_helpers import triton_interpreter_results

MIXER_INPUTS = ("x", "z", "dt", "dt_bias", "A", "B", "C", "D", "freq")
# name: (batch, length, dim, n_state, group_norm_size, rotate, position_offset, with state, dtype, a_scale)
MIXER_CASES = {
    # the released layout: rotation, group norm over whole channel blocks (two groups of 8 -> two programs), two
    # checkpointed chunks of 16 steps (the last one partial)
    "fp32_rope_groupnorm": (2, 18, 16, 8, 8, True, 0, False, "float32", 1.0),
    # a stream continued mid-image: position offset, initial state in, final state out (and in the loss)
    "fp32_stream_state": (2, 9, 8, 4, 4, True, 5, True, "float32", 1.0),
    # no rotation, no norm, channel count off the block size (masked lanes), fast decays
    "fp32_plain_padded": (1, 11, 6, 3, 0, False, 0, False, "float32", 8.0),
    "bf16_rope_groupnorm": (2, 7, 8, 4, 4, True, 0, False, "bfloat16", 1.0),
}
MIXER_TOLERANCE = {"float32": 1e-5, "bfloat16": 3e-2}
# name: (batch, length, dim, kernel, bias, channels-last input, block_l)
CONV_CASES = {
    "fp32_channels_last": (2, 11, 6, 4, True, True, 4),
    "fp32_contiguous_no_bias": (1, 5, 3, 4, False, False, 16),
    "fp32_k2_single_step": (1, 1, 4, 2, True, True, 16),
}


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12)).item()


def mixer_inputs(batch, length, dim, n_state, rotate, dtype, a_scale, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    low = getattr(torch, dtype)
    inputs = dict(x=r(batch, length, dim).to(low), z=r(batch, length, dim).to(low), dt=r(batch, length, dim).to(low),
                  dt_bias=r(dim), A=-(torch.rand(dim, n_state, generator=g) + 0.1) * a_scale,
                  B=r(batch, length, n_state).to(low), C=r(batch, length, n_state).to(low), D=r(dim),
                  freq=torch.rand(n_state, generator=g) if rotate else None)
    return inputs


def run_mixer_case(batch, length, dim, n_state, group, rotate, offset, stateful, dtype, a_scale) -> dict:
    from defocus_mllm.ops import mamba_mixer_core

    inputs = mixer_inputs(batch, length, dim, n_state, rotate, dtype, a_scale)
    names = [k for k in MIXER_INPUTS if inputs[k] is not None]
    if stateful:
        inputs["initial_state"] = torch.randn(batch, dim, n_state, generator=torch.Generator().manual_seed(3))
        names.append("initial_state")
    kw = dict(delta_scale_factor=3.0, rope_scale_factor=2.0, group_norm_size=group, position_offset=offset,
              return_final_state=True)

    def run(backend, cast):
        leaves = {k: (cast(v).requires_grad_() if k in names else v) for k, v in inputs.items()}
        out, final = mamba_mixer_core(**leaves, **kw, backend=backend)
        return leaves, out, final

    ours, out, final = run("triton", lambda t: t.clone())
    # the reference in float64 (the PyTorch composition keeps it), so its own rounding does not count
    ref, out_ref, final_ref = run("torch", lambda t: t.double())
    gen = torch.Generator().manual_seed(1)
    g_out = torch.randn(out.shape, generator=gen)
    g_final = torch.randn(final.shape, generator=gen) if stateful else torch.zeros(final.shape)
    torch.autograd.backward([out, final], [g_out.to(out.dtype), g_final])
    torch.autograd.backward([out_ref, final_ref], [g_out.double(), g_final.double()])
    with torch.no_grad():
        out_no_grad, _ = mamba_mixer_core(**inputs, **kw, backend="triton")
    errors = {"out": rel_err(out, out_ref), "final_state": rel_err(final, final_ref)}
    errors.update({f"d_{k}": rel_err(ours[k].grad, ref[k].grad) for k in names})
    return {"errors": errors, "no_grad_matches": torch.equal(out_no_grad, out.detach()),
            "dtypes_ok": out.dtype == inputs["x"].dtype and all(ours[k].grad.dtype == ours[k].dtype for k in names)}


def run_conv_case(batch, length, dim, kernel, with_bias, channels_last, block_l) -> dict:
    from defocus_mllm.ops.triton_conv import causal_conv1d_silu_triton

    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, length, dim, generator=g).transpose(1, 2) if channels_last else \
        torch.randn(batch, dim, length, generator=g)
    leaves = [x, torch.randn(dim, 1, kernel, generator=g)] + ([torch.randn(dim, generator=g)] if with_bias else [])
    ours = [t.detach().clone().requires_grad_() for t in leaves]
    ref = [t.detach().double().requires_grad_() for t in leaves]
    y = causal_conv1d_silu_triton(ours[0], ours[1], ours[2] if with_bias else None, block_l=block_l, block_d=4)
    y_ref = F.silu(F.conv1d(F.pad(ref[0], (kernel - 1, 0)), ref[1], ref[2] if with_bias else None, groups=dim))
    grad = torch.randn(y.shape, generator=g)
    y.backward(grad)
    y_ref.backward(grad.double())
    errors = {"out": rel_err(y, y_ref)}
    errors.update({f"d_{n}": rel_err(a.grad, b.grad) for n, a, b in zip(("x", "weight", "bias"), ours, ref)})
    return {"errors": errors, "shape_ok": y.shape == x.shape}


def run_cases() -> dict:
    from defocus_mllm.ops import available_mamba_mixer_backends
    from defocus_mllm.ops.triton_scan import _interpreted

    return {"interpreted": _interpreted(), "available": "triton" in available_mamba_mixer_backends(),
            "mixer": {name: run_mixer_case(*case) for name, case in MIXER_CASES.items()},
            "conv": {name: run_conv_case(*case) for name, case in CONV_CASES.items()}}


@pytest.fixture(scope="module")
def child_results() -> dict:
    return triton_interpreter_results(__file__, timeout=900)


def test_mixer_backend_runs_in_the_interpreter(child_results):
    assert child_results["interpreted"], "kernels were not built for Triton's interpreter despite TRITON_INTERPRET=1"
    assert child_results["available"], "the mixer's 'triton' backend is not registered as available"


@pytest.mark.parametrize("case", sorted(MIXER_CASES))
def test_fused_mixer_matches_the_pytorch_composition(child_results, case):
    result = child_results["mixer"][case]
    assert result["dtypes_ok"], "output / gradient dtype differs from the inputs'"
    assert result["no_grad_matches"], "the forward under torch.no_grad differs from the differentiable one"
    tolerance = MIXER_TOLERANCE[MIXER_CASES[case][8]]
    bad = {name: err for name, err in result["errors"].items() if not err < tolerance}
    assert not bad, f"{case}: relative errors above {tolerance:g}: {bad}"


@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_triton_conv_matches_conv1d(child_results, case):
    result = child_results["conv"][case]
    assert result["shape_ok"]
    bad = {name: err for name, err in result["errors"].items() if not err < 1e-5}
    assert not bad, f"{case}: relative errors above 1e-5: {bad}"


def test_the_triton_conv_is_the_cuda_default_after_causal_conv1d_and_leaves_other_layouts_to_pytorch():
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (the `dev` extra installs it)")
    from defocus_mllm.ops import causal_conv, triton_conv

    assert causal_conv._REGISTRY.fns["triton"] is triton_conv._conv_triton
    assert causal_conv._REGISTRY.preference["cuda"] == ("cuda", "triton")
    channels_last = torch.randn(2, 7, 4).transpose(1, 2)
    assert triton_conv._handles(channels_last) and not triton_conv._handles(torch.randn(2, 4, 7))
    assert not triton_conv._handles(channels_last.double())
    # a layout the kernel is not for takes the PyTorch conv, unchanged
    x, w, b = torch.randn(2, 4, 7), torch.randn(4, 1, 4), torch.randn(4)
    torch.testing.assert_close(triton_conv._conv_triton(x, w.reshape(4, -1), b),
                               causal_conv.causal_conv1d_silu(x, w, b, backend="torch"), rtol=0, atol=0)


def test_the_kernel_check_script_runs_the_fused_path_in_its_dry_run():
    """benchmarks/check_cuda_kernels.py --dry-run (the device script's checks on CPU shapes, interpreter)."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (the `dev` extra installs it)")
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                          "check_cuda_kernels.py")
    env = {k: v for k, v in os.environ.items() if k not in ("DEFOCUS_MIXER_BACKEND", "DEFOCUS_SCAN_BACKEND")}
    proc = subprocess.run([sys.executable, script, "--dry-run"], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "mamba_mixer_core triton (fp32) vs torch (float64)" in proc.stdout and "d_freq=" in proc.stdout
    assert "causal_conv1d_silu triton vs torch" in proc.stdout
    assert "the fused mixer and the Triton conv match the PyTorch path" in proc.stdout


if __name__ == "__main__":
    print(json.dumps(run_cases()))
