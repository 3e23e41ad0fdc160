"""The native CPU Mamba mixer core and causal conv (``cpu_scan.cpp``) against the PyTorch reference.

Every output and every gradient of `mamba_mixer_core(backend="cpu")` is compared with the PyTorch composition
(`backend="torch"`) run in float64 on the same values, for inputs laid out as the mixer passes them: `x`, `z` halves
of one `in_proj` output, `B`, `C` slices of one `x_proj` output (channels-last views, not contiguous).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from defocus_mllm import DefocusVisionConfig, DefocusVisionModel
from defocus_mllm.ops import causal_conv, cpu_scan, mamba_mixer_core, selective_scan
from defocus_mllm.ops import mamba_mixer as mixer_ops
from defocus_mllm.ops.causal_conv import causal_conv1d_silu
from op_checks import rel_err
from scan_reference import make_inputs

REPO = Path(__file__).resolve().parents[1]
NAMES = ("x", "z", "dt", "dt_bias", "A", "B", "C", "D", "freq")


@pytest.fixture(scope="module", autouse=True)
def kernel():
    if shutil.which(os.environ.get("CXX") or "c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler here: the kernel cannot be built (the fallback is tested in a subprocess)")
    cpu_scan._reset()
    assert cpu_scan.load_library() is not None, cpu_scan._failure


@pytest.fixture(autouse=True)
def default_dispatch(monkeypatch):
    for name in ("DEFOCUS_SCAN_BACKEND", "DEFOCUS_MIXER_BACKEND", "DEFOCUS_CONV_BACKEND", "DEFOCUS_DISABLE_CPU_KERNEL"):
        monkeypatch.delenv(name, raising=False)


def mixer_inputs(batch, length, dim, n, rotate=True, seed=0, dtype=torch.float32):
    """The op's inputs as views of the projections' outputs, the way `DefocusMambaMixer.forward` passes them."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    xz = r(batch, length, 2 * dim).to(dtype)  # in_proj output
    x, z = xz.chunk(2, dim=-1)
    dbc = r(batch, length, 3 + 2 * n).to(dtype)  # x_proj output: [dt rank 3 | B | C]
    _, B, C = torch.split(dbc, [3, n, n], dim=-1)
    dt = (0.5 * r(batch, length, dim)).to(dtype)
    return dict(x=x, z=z, dt=dt, dt_bias=r(dim) - 1.0, A=-(torch.rand(dim, n, generator=g) + 0.1), B=B, C=C,
                D=r(dim), freq=torch.rand(n, generator=g) if rotate else None)


def run(inputs, backend, grad_out=None, grad_state=None, double=False, **kw):
    """Output (and final state) and the gradients of all tensor inputs for a random cotangent."""
    leaves = {}
    for k, v in inputs.items():
        if v is None:
            leaves[k] = None
            continue
        v = v.detach().double() if double else v.detach()
        leaves[k] = v.requires_grad_()
    result = mamba_mixer_core(**leaves, backend=backend, **kw)
    out, final = result if isinstance(result, tuple) else (result, None)
    loss = (out.double() * grad_out.double()).sum()
    if final is not None and grad_state is not None:
        loss = loss + (final.double() * grad_state.double()).sum()
    loss.backward()
    grads = {k: v.grad for k, v in leaves.items() if v is not None}
    return out, final, grads


def assert_matches_reference(inputs, tol, **kw):
    batch, length, dim = inputs["x"].shape
    g = torch.Generator().manual_seed(123)
    grad_out = torch.randn(batch, length, dim, generator=g)
    grad_state = torch.randn(batch, dim, inputs["A"].shape[1], generator=g)
    out, final, grads = run(inputs, "cpu", grad_out, grad_state, **kw)
    ref, ref_final, ref_grads = run(inputs, "torch", grad_out, grad_state, double=True, **kw)
    assert out.dtype == inputs["x"].dtype and out.shape == (batch, length, dim)
    assert rel_err(out.float(), ref) < tol, "out"
    if final is not None:
        assert final.dtype == torch.float32 and rel_err(final, ref_final) < tol, "final state"
    for name, ref_grad in ref_grads.items():
        ours = grads[name]
        assert ours is not None and ours.dtype == inputs[name].dtype and ours.shape == ref_grad.shape, name
        assert rel_err(ours.float(), ref_grad) < tol, name


# (batch, L, D, N, group_norm_size, rotate): with and without norm and rotation; odd L, D and N; N past one register
# block of 64 states; L shorter than the kernel's 8-step blocks
SHAPES = [(2, 9, 8, 4, 4, True), (2, 9, 8, 4, 0, True), (1, 13, 7, 5, 0, False), (2, 11, 9, 6, 3, True),
          (1, 3, 16, 16, 16, False), (2, 5, 6, 70, 2, True), (3, 17, 32, 16, 8, True)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-L{}-D{}-N{}-G{}-{}".format(*s[:5], "rot" if s[5] else "plain"))
def test_the_native_mixer_equals_the_reference_in_every_output_and_gradient_fp32(shape):
    batch, length, dim, n, group, rotate = shape
    inputs = mixer_inputs(batch, length, dim, n, rotate, seed=sum(shape))
    assert not inputs["x"].is_contiguous() and not inputs["B"].is_contiguous()
    assert_matches_reference(inputs, 1e-5, delta_scale_factor=2.0, rope_scale_factor=1.5, group_norm_size=group)


def test_the_initial_state_and_final_state_take_part_in_autograd():
    inputs = mixer_inputs(2, 10, 8, 4, seed=4)
    inputs["initial_state"] = torch.randn(2, 8, 4)
    assert_matches_reference(inputs, 1e-5, group_norm_size=4, position_offset=7, return_final_state=True)


# Groups that fill whole 8-lane vectors of channels (a group size that is a multiple of 8; without norm, blocks of 16
# channels when D is a multiple of 16) take the forward's lane-parallel scan: its unrolled 16-state form and the
# generic one (24, 72 states), several 16-step blocks, a carried state in and out.
@pytest.mark.parametrize("n", [16, 24, 72])
def test_the_lane_parallel_forward_scan_carries_the_state_and_equals_the_reference(n):
    inputs = mixer_inputs(2, 37, 16, n, seed=n)
    inputs["initial_state"] = torch.randn(2, 16, n)
    assert_matches_reference(inputs, 1e-5, group_norm_size=8, position_offset=3, return_final_state=True)


def test_a_growing_state_equals_the_reference():
    # one A > 0 makes delta * A positive: 2^x must also hold for exponents above 0 (k > 0 added to p's bits)
    inputs = mixer_inputs(1, 20, 16, 16, seed=5)
    inputs["A"][3, 5] = 0.05
    assert_matches_reference(inputs, 1e-5, group_norm_size=16)


def with_low_rank_dt(inputs, rank, seed=0):
    """`inputs` with `dt` replaced by `dt_proj`'s input, the first `rank` columns of an `x_proj`-like output (a
    strided view), and `dt_proj_weight` [D, rank]: the op applies the projection itself."""
    g = torch.Generator().manual_seed(seed)
    batch, length, dim = inputs["x"].shape
    xproj = torch.randn(batch, length, rank + 5, generator=g).to(inputs["x"].dtype)
    weight = torch.randn(dim, rank, generator=g) * rank**-0.5
    return {**inputs, "dt": xproj[..., :rank], "dt_proj_weight": weight}


# (batch, L, D, N, group_norm_size, rank): the lane-parallel forward with whole 64-channel blocks of the projection
# (D 128, group 64), a part of one (group 24) and both (group 160), the per-group forward (group 3), no norm (blocks
# of 16 channels)
LOW_RANK = [(2, 21, 128, 16, 64, 8), (2, 19, 48, 8, 24, 5), (1, 9, 160, 8, 160, 4), (2, 11, 9, 6, 3, 4),
            (1, 17, 16, 16, 0, 3)]


@pytest.mark.parametrize("shape", LOW_RANK, ids=lambda s: "B{}-L{}-D{}-N{}-G{}-R{}".format(*s))
def test_dt_proj_applied_in_the_kernel_equals_the_reference_in_every_output_and_gradient(shape):
    batch, length, dim, n, group, rank = shape
    inputs = with_low_rank_dt(mixer_inputs(batch, length, dim, n, seed=dim), rank, seed=length)
    assert not inputs["dt"].is_contiguous()
    inputs["initial_state"] = torch.randn(batch, dim, n)
    assert_matches_reference(inputs, 1e-5, delta_scale_factor=2.0, group_norm_size=group, position_offset=2,
                             return_final_state=True)


def test_dt_proj_in_the_kernel_with_bfloat16_activations():
    inputs = with_low_rank_dt(mixer_inputs(2, 12, 64, 8, seed=7, dtype=torch.bfloat16), 6)
    assert_matches_reference(inputs, 1e-2, group_norm_size=32)


def test_the_dispatch_projects_dt_for_a_backend_that_does_not(monkeypatch):
    seen = []
    reference = mixer_ops._REGISTRY.fns["torch"]
    monkeypatch.setitem(mixer_ops._REGISTRY.fns, "torch", lambda *a, **k: seen.append((a[2].shape, k)) or
                        reference(*a, **k))
    inputs = with_low_rank_dt(mixer_inputs(1, 6, 8, 4), 3)
    out = mamba_mixer_core(**inputs, backend="torch", group_norm_size=4)
    (dt_shape, options), = seen
    assert dt_shape == (1, 6, 8) and "dt_proj_weight" not in options
    projected = {**inputs, "dt": torch.nn.functional.linear(inputs["dt"], inputs["dt_proj_weight"]),
                 "dt_proj_weight": None}
    torch.testing.assert_close(out, mamba_mixer_core(**projected, backend="cpu", group_norm_size=4))


def test_a_low_rank_dt_of_the_wrong_shape_is_refused_naming_the_shapes():
    inputs = with_low_rank_dt(mixer_inputs(1, 6, 8, 4), 3)
    with pytest.raises(ValueError, match=r"dt must be \[B, L, R\].*dt \(1, 6, 2\).*dt_proj_weight \(8, 3\)"):
        mamba_mixer_core(**{**inputs, "dt": inputs["dt"][..., :2]})


def test_bfloat16_activations_give_outputs_and_gradients_in_bfloat16():
    """bf16 x, z, dt, B, C with fp32 parameters, as under autocast. The kernel reads the bf16 values exactly and
    accumulates in fp32; what separates it from the float64 reference is one bf16 rounding of each output and
    gradient (relative 2^-8 = 0.4%) and the reference's own bf16 rounding of delta, so 1% of the largest value."""
    inputs = mixer_inputs(2, 12, 16, 8, seed=6, dtype=torch.bfloat16)
    assert_matches_reference(inputs, 1e-2, delta_scale_factor=2.0, group_norm_size=8)


def test_a_stream_split_with_offset_and_state_equals_the_whole_in_outputs_and_gradients():
    inputs = mixer_inputs(2, 14, 8, 4, seed=8)
    kw = dict(delta_scale_factor=2.0, rope_scale_factor=1.5, group_norm_size=4)
    leaves = {k: (None if v is None else v.detach().clone().requires_grad_()) for k, v in inputs.items()}
    whole, whole_state = mamba_mixer_core(**leaves, backend="cpu", return_final_state=True, **kw)
    cut = 5
    seq = ("x", "z", "dt", "B", "C")
    first = {k: (v[:, :cut] if k in seq else v) for k, v in leaves.items()}
    rest = {k: (v[:, cut:] if k in seq else v) for k, v in leaves.items()}
    y1, s1 = mamba_mixer_core(**first, backend="cpu", return_final_state=True, **kw)
    y2, s2 = mamba_mixer_core(**rest, backend="cpu", position_offset=cut, initial_state=s1, return_final_state=True,
                              **kw)
    torch.testing.assert_close(torch.cat([y1, y2], 1), whole, rtol=0, atol=1e-5)
    torch.testing.assert_close(s2, whole_state, rtol=0, atol=1e-5)
    weights = torch.randn_like(whole)
    tensors = [v for v in leaves.values() if v is not None]
    g_whole = torch.autograd.grad((whole * weights).sum() + whole_state.sum(), tensors)
    g_split = torch.autograd.grad((torch.cat([y1, y2], 1) * weights).sum() + s2.sum(), tensors)
    for a, b in zip(g_split, g_whole):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_inference_keeps_nothing_for_backward_and_agrees_with_training_mode():
    inputs = mixer_inputs(2, 9, 8, 4, seed=2)
    kw = dict(group_norm_size=4, rope_scale_factor=2.0)
    with torch.inference_mode():
        y_inf = mamba_mixer_core(**inputs, backend="cpu", **kw)
    leaves = {k: (None if v is None else v.clone().requires_grad_()) for k, v in inputs.items()}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        y = mamba_mixer_core(**leaves, backend="cpu", **kw)
    assert y_inf.grad_fn is None and torch.equal(y_inf, y.detach())
    # the inputs and the rotated, padded B and C: no [L, B, D, N] states
    assert max(saved) <= 2 * 9 * 8 and len(saved) <= 12


def test_the_default_dispatch_on_cpu_is_the_native_mixer(monkeypatch):
    calls = []
    reference = mixer_ops._REGISTRY.fns["torch"]
    monkeypatch.setitem(mixer_ops._REGISTRY.fns, "cpu", lambda *a, **k: calls.append(k) or reference(*a, **k))
    inputs = mixer_inputs(1, 4, 4, 4)
    mamba_mixer_core(**inputs)
    mamba_mixer_core(**inputs, position_offset=2, return_final_state=True)  # it carries a stream's state
    assert len(calls) == 2
    monkeypatch.setenv("DEFOCUS_MIXER_BACKEND", "torch")
    mamba_mixer_core(**inputs)
    assert len(calls) == 2


def test_the_whole_model_with_the_native_kernels_equals_the_pytorch_path(monkeypatch):
    cfg = DefocusVisionConfig.from_preset("mamba-tiny", hidden_size=32, num_hidden_layers=2, intermediate_size=64,
                                          image_size=32)
    torch.manual_seed(0)
    model = DefocusVisionModel(cfg)
    pixels = torch.randn(2, 3, 32, 32)

    def forward_backward():
        model.zero_grad()
        out = model(pixel_values=pixels).last_hidden_state
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    calls = []
    native = mixer_ops._REGISTRY.fns["cpu"]
    monkeypatch.setitem(mixer_ops._REGISTRY.fns, "cpu", lambda *a, **k: calls.append(1) or native(*a, **k))
    out, grads = forward_backward()
    assert len(calls) == cfg.num_hidden_layers
    monkeypatch.setenv("DEFOCUS_MIXER_BACKEND", "torch")
    monkeypatch.setenv("DEFOCUS_CONV_BACKEND", "torch")
    ref, ref_grads = forward_backward()
    assert len(calls) == cfg.num_hidden_layers
    assert rel_err(out, ref) < 1e-5
    assert grads.keys() == ref_grads.keys() and any("freq" in n for n in grads)
    for name, g in grads.items():
        assert rel_err(g, ref_grads[name]) < 1e-4, name


def test_the_plain_scan_kernel_carries_the_state_with_gradients():
    u, delta, A, B, C = make_inputs(2, 5, 11, 6, seed=3)
    s0 = torch.randn(2, 5, 6)
    results = []
    for backend in ("cpu", "torch"):
        leaves = [t.clone().requires_grad_() for t in (u, delta, A, B, C, s0)]
        y, s = selective_scan(*leaves[:5], backend=backend, initial_state=leaves[5], return_final_state=True)
        (y.square().sum() + (s * s0).sum()).backward()
        results.append([y.detach(), s.detach(), *(t.grad for t in leaves)])
    for name, ours, ref in zip("y final u delta A B C s0".split(), *results):
        assert rel_err(ours, ref) < 1e-5, name
    with torch.inference_mode():
        y, s = selective_scan(u, delta, A, B, C, backend="cpu", initial_state=s0, return_final_state=True)
    assert rel_err(y, results[1][0]) < 1e-5 and rel_err(s, results[1][1]) < 1e-5


@pytest.mark.parametrize("length,bias,dtype", [(1, True, torch.float32), (3, False, torch.float32),
                                               (19, True, torch.float32), (19, True, torch.bfloat16)])
def test_the_native_causal_conv_equals_the_reference_on_channels_last_input(length, bias, dtype):
    g = torch.Generator().manual_seed(length)
    xz = torch.randn(2, length, 2 * 7, generator=g).to(dtype)
    w = torch.randn(7, 1, 4, generator=g)
    b = torch.randn(7, generator=g) if bias else None
    gout = torch.randn(2, 7, length, generator=g)
    results = []
    for backend, cast in (("cpu", lambda t: t.detach().clone()), ("torch", lambda t: t.detach().double())):
        x = cast(xz).requires_grad_()
        params = [cast(t).requires_grad_() for t in (w, b) if t is not None]
        out = causal_conv1d_silu(x[..., :7].transpose(1, 2), params[0], params[1] if bias else None,
                                 backend=backend)
        (out.double() * gout.double()).sum().backward()
        results.append([out, x.grad, *(p.grad for p in params)])
    (out, *grads), (ref, *ref_grads) = results
    assert out.dtype == dtype and out.transpose(1, 2).is_contiguous()  # channels-last in, channels-last out
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: one rounding of the output / of grad x (2^-8)
    assert rel_err(out.float(), ref) < tol
    for ours, theirs in zip(grads, ref_grads):
        assert rel_err(ours.float(), theirs) < tol


def test_the_conv_dispatch_defaults_to_the_native_kernel_and_honours_the_override(monkeypatch):
    calls = []
    for name in ("cpu", "torch"):
        fn = causal_conv._REGISTRY.fns[name]
        monkeypatch.setitem(causal_conv._REGISTRY.fns, name, lambda *a, _n=name, _f=fn: calls.append(_n) or _f(*a))
    x, w = torch.randn(1, 4, 6), torch.randn(4, 1, 4)
    causal_conv1d_silu(x, w, None)
    causal_conv1d_silu(x.double(), w.double(), None)  # float64 keeps the float64 reference
    monkeypatch.setenv("DEFOCUS_CONV_BACKEND", "torch")
    causal_conv1d_silu(x, w, None)
    assert calls == ["cpu", "torch", "torch"]
    with pytest.raises(ValueError, match="unknown backend"):
        causal_conv1d_silu(x, w, None, backend="nope")
    # the causal-conv1d import is tried once per process, not on every call
    causal_conv._causal_conv1d_fn.cache_clear()
    for _ in range(3):
        causal_conv._causal_conv1d_fn()
    assert causal_conv._causal_conv1d_fn.cache_info().misses == 1


_NO_COMPILER_SCRIPT = r"""
import json, logging, sys, torch
logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(name)s %(levelname)s %(message)s")
from defocus_mllm import DefocusVisionConfig, DefocusVisionModel
from defocus_mllm.ops import available_backends, available_mamba_mixer_backends, available_causal_conv_backends
cfg = DefocusVisionConfig.from_preset("mamba-tiny", hidden_size=32, num_hidden_layers=2, intermediate_size=64,
                                      image_size=32)
torch.manual_seed(0)
model = DefocusVisionModel(cfg)
pixels = torch.randn(1, 3, 32, 32)
out = model(pixel_values=pixels).last_hidden_state
out.sum().backward()
print(json.dumps({"out": out.detach().flatten()[:64].tolist(), "scan": available_backends(),
                  "mixer": available_mamba_mixer_backends(), "conv": available_causal_conv_backends()}))
"""


def test_without_a_compiler_one_log_line_and_the_pytorch_path(tmp_path):
    env = dict(os.environ, CXX="/nonexistent", TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"),
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    for name in ("DEFOCUS_SCAN_BACKEND", "DEFOCUS_MIXER_BACKEND", "DEFOCUS_CONV_BACKEND", "DEFOCUS_DISABLE_CPU_KERNEL"):
        env.pop(name, None)
    outs = []
    for extra in ({}, {"DEFOCUS_MIXER_BACKEND": "torch", "DEFOCUS_CONV_BACKEND": "torch",
                       "DEFOCUS_SCAN_BACKEND": "torch"}):
        proc = subprocess.run([sys.executable, "-c", _NO_COMPILER_SCRIPT], env={**env, **extra}, cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        outs.append((json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr))
    (result, log), (reference, _) = outs
    lines = [line for line in log.splitlines() if line.startswith("defocus_mllm")]
    assert len(lines) == 1 and "WARNING" in lines[0] and "/nonexistent" in lines[0], log
    assert "cpu" not in result["scan"] + result["mixer"] + result["conv"]
    assert not (tmp_path / "ext").exists() or not list((tmp_path / "ext").rglob("*.so"))
    assert result["out"] == reference["out"]
