"""The native CPU selective-scan kernel: against the literal recurrence, its inference path, fallback and dispatch.

The kernel is compiled once per machine (cached in the torch extensions directory); the first test here pays that
(a few seconds), the rest load it.
"""

import logging
import shutil

import pytest
import torch

from defocus_mllm.ops import available_backends, cpu_scan, selective_scan
from defocus_mllm.ops.selective_scan import _REGISTRY

from op_checks import max_tensor_numel, outputs_with_and_without_grad, rel_err
from scan_reference import literal_scan, make_inputs, vector_reference


@pytest.fixture(scope="module")
def kernel():
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler here: the kernel cannot be built (the fallback is tested below)")
    cpu_scan._reset()
    assert cpu_scan.load_library() is not None, cpu_scan._failure
    return cpu_scan


@pytest.fixture
def fresh_loader(monkeypatch):
    """Forget the loaded kernel for one test and again afterwards, so that later tests load it anew."""
    cpu_scan._reset()
    yield monkeypatch
    monkeypatch.undo()
    cpu_scan._reset()


def _forward_backward(fn, inputs, grad_out=None):
    leaves = [t.clone().requires_grad_() for t in inputs]
    y = fn(*leaves)
    grad_out = torch.randn_like(y, dtype=torch.float32) if grad_out is None else grad_out
    y.backward(grad_out.to(y.dtype))
    return y, [t.grad for t in leaves], grad_out


@pytest.mark.parametrize("shape", [(2, 3, 7, 4), (1, 3, 1, 1), (2, 3, 13, 1), (2, 3, 13, 7), (1, 3, 13, 16),
                                   (1, 3, 5, 64)], ids=lambda s: "B{}-D{}-L{}-N{}".format(*s))
def test_matches_literal_recurrence_fp32(kernel, shape):
    inputs = make_inputs(*shape, seed=sum(shape))
    y, grads, grad_out = _forward_backward(lambda *x: selective_scan(*x, backend="cpu"), inputs)
    y_ref, ref_grads, _ = _forward_backward(literal_scan, [t.double() for t in inputs], grad_out.double())
    assert y.dtype == torch.float32 and y.shape == shape[:2] + shape[2:3]
    assert rel_err(y, y_ref) < 1e-5
    for name, ours, ref in zip("u delta A B C".split(), grads, ref_grads):
        assert ours.dtype == torch.float32 and ours.shape == ref.shape, name
        assert rel_err(ours, ref) < 1e-5, name


@pytest.mark.parametrize("n_state", [70, 130])
def test_more_states_than_one_register_block(kernel, n_state):
    """N > 64 runs in blocks of 64 states whose contributions add up."""
    inputs = make_inputs(2, 3, 9, n_state, seed=n_state)
    y, grads, grad_out = _forward_backward(lambda *x: selective_scan(*x, backend="cpu"), inputs)
    y_ref, ref_grads, _ = _forward_backward(vector_reference, [t.double() for t in inputs], grad_out.double())
    assert rel_err(y, y_ref) < 1e-5
    for name, ours, ref in zip("u delta A B C".split(), grads, ref_grads):
        assert rel_err(ours, ref) < 1e-5, name


def test_bfloat16_inputs_give_outputs_and_grads_in_each_dtype(kernel):
    inputs = make_inputs(2, 3, 21, 16, seed=3)
    # bf16 activations with an fp32 A, as under autocast
    mixed = [t.bfloat16() for t in inputs[:2]] + [inputs[2]] + [t.bfloat16() for t in inputs[3:]]
    y, grads, grad_out = _forward_backward(lambda *x: selective_scan(*x, backend="cpu"), mixed)
    y_ref, ref_grads, _ = _forward_backward(vector_reference, [t.double() for t in mixed], grad_out.double())
    assert y.dtype == torch.bfloat16
    assert rel_err(y.float(), y_ref) < 2e-2
    for name, ours, inp, ref in zip("u delta A B C".split(), grads, mixed, ref_grads):
        assert ours.dtype == inp.dtype, name
        assert rel_err(ours.float(), ref) < 2e-2, name


def test_strided_inputs_and_thread_counts_agree(kernel):
    """B, C as the model passes them ([B, N, L] views of [B, L, N]), u a slice; 1 vs 2 threads."""
    u, delta, A, B, C = make_inputs(2, 6, 40, 16, seed=5)
    wide = torch.cat([u, u], dim=1)[:, ::2]  # non-contiguous u
    Bv, Cv = B.transpose(1, 2).contiguous().transpose(1, 2), C.transpose(1, 2).contiguous().transpose(1, 2)
    args = [wide, delta, A, Bv, Cv]
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(_forward_backward(lambda *x: selective_scan(*x, backend="cpu"), args,
                                             torch.ones(2, 6, 40)))
    finally:
        torch.set_num_threads(threads)
    ref = vector_reference(*[t.double() for t in (wide, delta, A, B, C)])
    (y1, grads1, _), (y2, grads2, _) = results
    assert rel_err(y1, ref) < 1e-5 and rel_err(y1, y2) < 1e-6
    assert all(rel_err(a, b) < 1e-6 for a, b in zip(grads1, grads2))


def test_channels_last_inputs_are_read_in_place(kernel):
    """u, delta as [B, D, L] views of [B, L, D] memory: no copies, and y comes back in the same layout."""
    u, delta, A, B, C = make_inputs(2, 5, 19, 16, seed=9)
    u_cl, d_cl = u.transpose(1, 2).contiguous().transpose(1, 2), delta.transpose(1, 2).contiguous().transpose(1, 2)
    calls = []
    with torch.inference_mode():
        y = selective_scan(u_cl, d_cl, A, B, C, backend="cpu")
        max_tensor_numel(lambda: selective_scan(u_cl, d_cl, A, B, C, backend="cpu"), calls)
    assert y.transpose(1, 2).is_contiguous()
    assert rel_err(y, vector_reference(*[t.double() for t in (u, delta, A, B, C)])) < 1e-5
    u_sized = [op for op, numel in calls if numel == u.numel()]
    assert u_sized == ["aten.empty.memory_format"], u_sized  # y itself, no copy of u or delta


def test_long_sequence_with_strongly_negative_decay_stays_finite(kernel):
    inputs = make_inputs(batch=1, dim=2, length=2048, n_state=3, delta_scale=20.0, a_scale=50.0)
    y = selective_scan(*inputs, backend="cpu")
    assert rel_err(y, vector_reference(*[t.double() for t in inputs])) < 1e-5
    mixed = make_inputs(batch=1, dim=2, length=2048, n_state=3, seed=1)
    mixed[2][0] *= 1e4  # decays that underflow to exactly 0
    _, grads, _ = _forward_backward(lambda *x: selective_scan(*x, backend="cpu"), mixed)
    assert all(torch.isfinite(g).all() for g in grads)


def test_inference_path_matches_and_saves_nothing(kernel):
    inputs = make_inputs(2, 4, 64, 8, seed=7)
    with_grad, y_inf, y_ng = outputs_with_and_without_grad(lambda *x: selective_scan(*x, backend="cpu"), inputs)
    assert y_inf.grad_fn is None and y_ng.grad_fn is None
    assert torch.equal(y_inf, with_grad.detach()) and torch.equal(y_ng, y_inf)
    # no tensor larger than the largest input (B, C: 1024) is created; the states would be 4096
    biggest, numel = max_tensor_numel(lambda: selective_scan(*inputs, backend="cpu"))
    assert numel <= max(t.numel() for t in inputs) < 64 * 2 * 4 * 8, biggest


def test_training_forward_saves_only_the_inputs(kernel):
    """The backward recomputes states inside the kernel: autograd keeps nothing of size [L, B, D, N]."""
    saved = []
    leaves = [t.requires_grad_() for t in make_inputs(2, 4, 64, 8)]
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        y = selective_scan(*leaves, backend="cpu")
    y.sum().backward()
    assert saved and max(saved) <= max(t.numel() for t in leaves) < 64 * 2 * 4 * 8


def test_default_dispatch_picks_the_kernel_on_cpu(kernel, monkeypatch):
    monkeypatch.delenv("DEFOCUS_SCAN_BACKEND", raising=False)
    u = torch.zeros(1, 2, 3)
    assert "cpu" in available_backends()
    assert _REGISTRY.default(u) == "cpu"
    assert _REGISTRY.default(u.bfloat16()) == "cpu"
    assert _REGISTRY.default(u.double()) == "torch"  # float64 keeps float64 accumulation
    monkeypatch.setenv("DEFOCUS_SCAN_BACKEND", "torch")
    assert _REGISTRY.default(u) == "torch"


def test_cached_build_is_reused(kernel):
    path = cpu_scan.library_path()
    assert path.exists() and path.parent.name == "defocus_cpu_scan"


def test_disabled_kernel_falls_back_with_one_warning(fresh_loader, caplog):
    fresh_loader.setenv("DEFOCUS_DISABLE_CPU_KERNEL", "1")
    fresh_loader.delenv("DEFOCUS_SCAN_BACKEND", raising=False)
    inputs = make_inputs(length=9)
    with caplog.at_level(logging.WARNING, logger="defocus_mllm.ops.cpu_scan"):
        y1 = selective_scan(*inputs)
        y2 = selective_scan(*[t.clone().requires_grad_() for t in inputs])
        assert "cpu" not in available_backends()
    warnings = [r for r in caplog.records if r.name == "defocus_mllm.ops.cpu_scan"]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    assert "DEFOCUS_DISABLE_CPU_KERNEL" in warnings[0].getMessage()
    assert torch.equal(y1, selective_scan(*inputs, backend="torch")) and torch.equal(y1, y2.detach())
    with pytest.raises(RuntimeError, match="not available"):
        selective_scan(*inputs, backend="cpu")


def test_missing_compiler_falls_back_with_one_warning(fresh_loader, caplog, tmp_path):
    fresh_loader.setenv("PATH", str(tmp_path))  # no compiler on PATH
    fresh_loader.delenv("CXX", raising=False)
    fresh_loader.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))  # and no cached build
    fresh_loader.delenv("DEFOCUS_SCAN_BACKEND", raising=False)
    inputs = make_inputs(length=5)
    with caplog.at_level(logging.WARNING, logger="defocus_mllm.ops.cpu_scan"):
        y = selective_scan(*inputs)
        selective_scan(*inputs)
    warnings = [r for r in caplog.records if r.name == "defocus_mllm.ops.cpu_scan"]
    assert len(warnings) == 1 and "no C++ compiler" in warnings[0].getMessage()
    assert torch.equal(y, selective_scan(*inputs, backend="torch"))
