"""The selective scan and causal conv against literal implementations written here; the benchmark scripts run."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from defocus_mllm.ops import causal_conv1d_silu, register_selective_scan_backend, selective_scan
from defocus_mllm.ops.selective_scan import _REGISTRY
from helpers import load_script
from op_checks import max_tensor_numel, outputs_with_and_without_grad, rel_err
from scan_reference import literal_scan, make_inputs, vector_reference


def test_forward_and_gradients_match_literal_recurrence():
    inputs = make_inputs()
    ref_in = [t.double().requires_grad_() for t in inputs]
    our_in = [t.clone().requires_grad_() for t in inputs]
    y_ref = literal_scan(*ref_in)
    y = selective_scan(*our_in, backend="torch")
    assert y.dtype == torch.float32 and y.shape == (2, 3, 7)
    assert rel_err(y, y_ref) < 1e-5
    grad_out = torch.randn_like(y)
    y_ref.backward(grad_out.double())
    y.backward(grad_out)
    for name, ours, ref in zip("u delta A B C".split(), our_in, ref_in):
        assert rel_err(ours.grad, ref.grad) < 1e-5, name


def test_gradcheck_in_float64():
    inputs = [t.double().requires_grad_() for t in make_inputs(batch=1, dim=2, length=5, n_state=2)]
    assert torch.autograd.gradcheck(lambda *x: selective_scan(*x, backend="torch"), inputs)


def test_stable_for_long_sequences_and_strongly_negative_decay():
    length = 4096
    inputs = make_inputs(batch=1, dim=2, length=length, n_state=3, delta_scale=20.0, a_scale=50.0)
    y = selective_scan(*[t.clone().requires_grad_() for t in inputs], backend="torch")
    assert torch.isfinite(y).all()
    assert rel_err(y, vector_reference(*[t.double() for t in inputs])) < 1e-5
    # a mix of tiny and huge decays over a long sequence keeps gradients finite too
    mixed = make_inputs(batch=1, dim=2, length=length, n_state=3, seed=1)
    mixed[2][0] *= 1e4
    leaves = [t.clone().requires_grad_() for t in mixed]
    selective_scan(*leaves).square().mean().backward()
    assert all(torch.isfinite(t.grad).all() for t in leaves)


def test_inference_path_keeps_only_the_running_state():
    """Without gradients the PyTorch scan updates one [B, D, N] state in place: same output, no [L, B, D, N]."""
    inputs = make_inputs(batch=2, dim=4, length=64, n_state=8, seed=2)
    with_grad, y, y_ng = outputs_with_and_without_grad(lambda *x: selective_scan(*x, backend="torch"), inputs)
    assert y.grad_fn is None and y_ng.grad_fn is None
    assert rel_err(y, with_grad.detach()) < 1e-6 and torch.equal(y, y_ng)
    assert rel_err(y, vector_reference(*[t.double() for t in inputs])) < 1e-5
    what, numel = max_tensor_numel(lambda: selective_scan(*inputs, backend="torch"))
    assert numel <= max(t.numel() for t in inputs) < 64 * 2 * 4 * 8, what  # states: [64, 2, 4, 8]
    # the training path does store the states, which is what the check above would catch
    leaves = [t.clone().requires_grad_() for t in inputs]
    assert max_tensor_numel(lambda: selective_scan(*leaves, backend="torch"))[1] >= 64 * 2 * 4 * 8


def test_bfloat16_inputs_accumulate_in_float32():
    inputs = make_inputs(length=33)
    y32 = selective_scan(*inputs)
    y16 = selective_scan(*[t.bfloat16() for t in inputs])
    assert y16.dtype == torch.bfloat16
    assert rel_err(y16.float(), y32) < 3e-2


def test_shape_errors_name_the_argument():
    u, delta, A, B, C = make_inputs()
    with pytest.raises(ValueError, match="B must be"):
        selective_scan(u, delta, A, B[:, :-1], C)
    with pytest.raises(ValueError, match="A must be"):
        selective_scan(u, delta, A[:-1], B, C)


def test_backend_dispatch():
    inputs = make_inputs()
    with pytest.raises(ValueError, match="unknown backend"):
        selective_scan(*inputs, backend="nope")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="not available"):
            selective_scan(*inputs, backend="cuda")
    calls = []

    def counting_backend(*args):
        calls.append(1)
        return selective_scan(*args, backend="torch")

    register_selective_scan_backend("counting", counting_backend)
    try:
        y = selective_scan(*inputs, backend="counting")
        assert calls and torch.equal(y, selective_scan(*inputs, backend="torch"))
    finally:
        _REGISTRY.fns.pop("counting"), _REGISTRY.availability.pop("counting")


def test_causal_conv_matches_literal_convolution():
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(2, 5, 9, generator=g), torch.randn(5, 1, 4, generator=g), torch.randn(5, generator=g)
    out = causal_conv1d_silu(x, w, b)
    expected = torch.zeros_like(x)
    for t in range(9):
        for k in range(4):  # tap k looks back 3 - k steps
            if t - (3 - k) >= 0:
                expected[:, :, t] += w[:, 0, k] * x[:, :, t - (3 - k)]
    expected = torch.nn.functional.silu(expected + b[:, None])
    assert torch.allclose(out, expected, atol=1e-6)


@pytest.mark.parametrize("length", [1, 2, 9])
def test_causal_conv_of_channels_last_input_matches_the_contiguous_one_with_gradients(length):
    # the Mamba mixer hands the conv a [B, D, L] view of [B, L, D] memory, which takes the shifted multiply-add path
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, length, 6, generator=g)
    w, b = torch.randn(6, 1, 4, generator=g), torch.randn(6, generator=g)
    results = []
    for make in (lambda t: t.transpose(1, 2), lambda t: t.transpose(1, 2).contiguous()):
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        out = causal_conv1d_silu(make(leaves[0]), leaves[1], leaves[2])
        out.square().sum().backward()
        results.append([out.detach(), *(t.grad for t in leaves)])
    for channels_last, contiguous in zip(*results):
        torch.testing.assert_close(channels_last, contiguous, rtol=1e-5, atol=1e-6)


REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script", ["bench_selective_scan.py", "bench_encoder.py"])
def test_benchmark_scripts_run_quick(script):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), "--quick"], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "vs" in proc.stdout, proc.stdout


def test_profile_encoder_groups_kernels_and_runs_quick():
    profile_encoder = load_script(REPO / "benchmarks" / "profile_encoder.py", "profile_encoder")
    # kernel names as torch.profiler reported them on an H100 (docs/gpu.md)
    assert profile_encoder.kind_of("_scan_fwd_kernel") == "scan"
    assert profile_encoder.kind_of("_ssm_bwd_kernel") == "scan"  # the sequential scan / fused mixer kernels
    assert profile_encoder.kind_of("nvjet_sm90_tst_192x192_64x4_2x1_v_bz_coopB_TNN") == "matmul"
    assert profile_encoder.kind_of("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7") == "matmul"
    assert profile_encoder.kind_of("void at::native::elementwise_kernel<128, 4, at::native::gpu_kernel_impl_nocast"
                                   "<at::native::direct_copy_kernel_cuda") == "copy"
    assert profile_encoder.kind_of("void at::native::vectorized_layer_norm_kernel<c10::BFloat16, float>") == "norm"
    assert profile_encoder.kind_of("void at::native::(anonymous namespace)::conv_depthwise2d_forward_kernel") == "conv"
    assert profile_encoder.kind_of("void at::native::vectorized_elementwise_kernel<4, CUDAFunctor_add<float>>") == \
        "elementwise"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "profile_encoder.py"), "--quick", "--rows", "3"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cases = [line for line in proc.stdout.splitlines() if line.startswith("=== ")]
    assert len(cases) == len(profile_encoder.QUICK_CASES), proc.stdout
    shares = [line for line in proc.stdout.splitlines() if line.strip().startswith("by kind:")]
    assert len(shares) == len(cases) and "matmul" in shares[-1], proc.stdout


def test_a_backend_registry_registers_overrides_prefers_and_names_what_is_wrong(monkeypatch):
    from defocus_mllm.ops.registry import BackendRegistry

    registry = BackendRegistry("op", "DEFOCUS_TEST_BACKEND", {"cpu": ("fast", "native")}, unavailable_hint="; hint")
    registry.register("torch", lambda: "torch", carries_state=True)
    registry.register("fast", lambda: "fast", lambda: False)
    registry.register("native", lambda: "native")
    assert registry.available() == ["torch", "native"] and registry.carries_state == {"torch"}
    x = torch.zeros(2)
    monkeypatch.delenv("DEFOCUS_TEST_BACKEND", raising=False)
    assert registry.default(x) == "native"  # the first available name of the device's list
    assert registry.preferred(x, usable=lambda name: name in registry.carries_state) == "torch"
    assert registry.default(x.double()) == "torch"  # float64 stays with the reference
    monkeypatch.setenv("DEFOCUS_TEST_BACKEND", "fast")
    assert registry.default(x) == "fast"
    with pytest.raises(RuntimeError, match=r"op: backend 'fast' is not available here \(available: \['torch', "
                                           r"'native'\]\); hint"):
        registry.resolve("fast")
    with pytest.raises(ValueError, match=r"op: unknown backend 'nope'; registered: \['fast', 'native', 'torch'\]"):
        registry.resolve("nope")
    assert registry.resolve("native")() == "native"
    registry.register("torch", lambda: "torch")  # registering again replaces, state support included
    assert registry.carries_state == set()
