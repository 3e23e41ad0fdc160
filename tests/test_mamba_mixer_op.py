"""The fused-mixer op's contract: `mamba_mixer_core` equals the mixer written out op by op, its dispatch, and the
scan's carried state (a scan split in two with the state handed over equals the whole scan)."""

import pytest
import torch
import torch.nn.functional as F

from defocus_mllm import DefocusVisionConfig
from defocus_mllm.encoder.mixers.mamba import DefocusMambaMixer
from defocus_mllm.ops import mamba_mixer_core, register_mamba_mixer_backend, selective_scan
from defocus_mllm.ops import mamba_mixer as mixer_ops
from scan_reference import make_inputs, vector_reference


def written_out_mixer(mixer: DefocusMambaMixer, hidden: torch.Tensor) -> torch.Tensor:
    """The De-focus Mamba mixer as the release writes it, in float64, each step its own op (docs/method.md §2.3)."""
    m, cfg = mixer.double(), mixer.config
    h = hidden.double()
    x, z = m.in_proj(h).chunk(2, dim=-1)
    k = cfg.conv_kernel
    x = F.silu(F.conv1d(F.pad(x.transpose(1, 2), (k - 1, 0)), m.conv1d.weight, m.conv1d.bias, groups=x.shape[-1]))
    x = x.transpose(1, 2)  # [B, L, D]
    dt, B, C = torch.split(m.x_proj(x), [m.time_step_rank, m.state_size, m.state_size], dim=-1)
    delta = F.softplus(m.dt_proj(dt)) / cfg.delta_scale_factor
    pos = torch.arange(x.shape[1], dtype=torch.float64)[:, None] / cfg.rope_scale_factor
    theta = pos * m.freq.double()[None]  # [L, N]: element k turns by its own frequency
    def turn(v):
        pair = torch.stack((-v[..., 1::2], v[..., 0::2]), -1).flatten(-2)
        return v * theta.cos() + pair * theta.sin()
    B, C = turn(B), turn(C)
    y = vector_reference(x.transpose(1, 2), delta.transpose(1, 2), -torch.exp(m.A_log.double()),
                         B.transpose(1, 2), C.transpose(1, 2)).transpose(1, 2)
    g = cfg.group_norm_size
    groups = y.reshape(*y.shape[:2], -1, g)
    y = (groups * torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + 1e-6)).flatten(-2)
    return m.out_proj((y + x * m.D.double()) * F.silu(z))


def tiny_mixer(seed: int = 0) -> DefocusMambaMixer:
    cfg = DefocusVisionConfig.from_preset("mamba-tiny", hidden_size=16, intermediate_size=32, image_size=32,
                                          rope_scale_factor=2.0, delta_scale_factor=3.0)
    torch.manual_seed(seed)
    mixer = DefocusMambaMixer(cfg)
    mixer.init_weights()
    with torch.no_grad():  # off the initial values, so a wrong frequency or decay index shows
        mixer.freq.copy_(torch.rand_like(mixer.freq))
        mixer.A_log.add_(0.3 * torch.randn_like(mixer.A_log))
        mixer.D.copy_(torch.randn_like(mixer.D))
    return mixer


def test_the_mixer_through_the_op_equals_the_release_written_out():
    mixer = tiny_mixer()
    assert mixer.group_norm_size > 0 and mixer.config.use_rope
    hidden = torch.randn(2, 11, 16)
    ours = mixer(hidden)
    assert ((ours.double() - written_out_mixer(mixer, hidden)).abs().max() < 1e-5)


def core_inputs(seed=0, batch=2, length=9, dim=8, n=4):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return dict(x=r(batch, length, dim), z=r(batch, length, dim), dt=r(batch, length, dim), dt_bias=r(dim),
                A=-(torch.rand(dim, n, generator=g) + 0.1), B=r(batch, length, n), C=r(batch, length, n), D=r(dim),
                freq=torch.rand(n, generator=g))


def test_a_stream_split_in_two_with_offset_and_state_equals_the_whole():
    kw = dict(delta_scale_factor=2.0, rope_scale_factor=1.5, group_norm_size=4)
    inputs = core_inputs()
    whole, whole_state = mamba_mixer_core(**inputs, **kw, return_final_state=True)
    cut = 4
    first = {k: (v[:, :cut] if k in "xzdtBC" and v.dim() == 3 else v) for k, v in inputs.items()}
    rest = {k: (v[:, cut:] if k in "xzdtBC" and v.dim() == 3 else v) for k, v in inputs.items()}
    y1, s1 = mamba_mixer_core(**first, **kw, return_final_state=True)
    y2, s2 = mamba_mixer_core(**rest, **kw, position_offset=cut, initial_state=s1, return_final_state=True)
    torch.testing.assert_close(torch.cat([y1, y2], 1), whole, rtol=0, atol=1e-5)
    torch.testing.assert_close(s2, whole_state, rtol=0, atol=1e-5)
    # without the offset the second half is rotated as if it started the image: a different answer
    y2_wrong = mamba_mixer_core(**rest, **kw, initial_state=s1)
    assert (y2_wrong - y2).abs().max() > 1e-3


@pytest.mark.parametrize("grad", [False, True])
def test_the_scan_carries_its_state_across_a_split(grad):
    u, delta, A, B, C = make_inputs(length=10)
    leaves = [t.clone().requires_grad_(grad) for t in (u, delta, A, B, C)]
    y, s = selective_scan(*leaves, backend="torch", return_final_state=True)
    cut = 6
    part = lambda t, sl: t[..., sl]  # noqa: E731
    y1, s1 = selective_scan(*(part(t, slice(0, cut)) if t.dim() == 3 else t for t in leaves), backend="torch",
                            return_final_state=True)
    y2, s2 = selective_scan(*(part(t, slice(cut, None)) if t.dim() == 3 else t for t in leaves), backend="torch",
                            initial_state=s1, return_final_state=True)
    torch.testing.assert_close(torch.cat([y1, y2], -1), y, rtol=0, atol=1e-5)
    torch.testing.assert_close(s2, s, rtol=0, atol=1e-5)
    ref = vector_reference(*(t.double() for t in (u, delta, A, B, C)))
    torch.testing.assert_close(y.double(), ref, rtol=0, atol=1e-5)
    if grad:  # the split scan's gradients, through the handed-over state, equal the whole scan's
        weights = torch.randn_like(y)
        whole_grads = torch.autograd.grad((y * weights).sum() + s.sum(), leaves)
        split = (torch.cat([y1, y2], -1) * weights).sum() + s2.sum()
        for g_whole, g_split in zip(whole_grads, torch.autograd.grad(split, leaves)):
            torch.testing.assert_close(g_split, g_whole, rtol=0, atol=1e-5)


def test_gradcheck_through_the_initial_and_final_state():
    u, delta, A, B, C = (t.double().requires_grad_() for t in make_inputs(length=5))
    s0 = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)

    def scan(u, delta, A, B, C, s0):
        y, s = selective_scan(u, delta, A, B, C, backend="torch", initial_state=s0, return_final_state=True)
        return y, s

    assert torch.autograd.gradcheck(scan, (u, delta, A, B, C, s0))


def test_the_scan_refuses_a_state_of_the_wrong_shape_and_continues_a_stateless_backend_by_linearity():
    from defocus_mllm.ops.selective_scan import _REGISTRY, register_selective_scan_backend

    u, delta, A, B, C = make_inputs(length=9)
    with pytest.raises(ValueError, match="initial_state must be"):
        selective_scan(u, delta, A, B, C, initial_state=torch.zeros(2, 3, 5))
    calls = []

    def stateless(*t):
        calls.append(len(t))
        return selective_scan(*t, backend="torch")

    register_selective_scan_backend("stateless", stateless)
    try:
        s0 = torch.randn(2, 3, 4)
        y, s = selective_scan(u, delta, A, B, C, backend="stateless", initial_state=s0, return_final_state=True)
        y_ref, s_ref = selective_scan(u, delta, A, B, C, backend="torch", initial_state=s0, return_final_state=True)
        assert calls == [5]  # called without the state: the state's part is added around it
        torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-5)
        torch.testing.assert_close(s, s_ref, rtol=0, atol=1e-5)
    finally:
        _REGISTRY.fns.pop("stateless"), _REGISTRY.availability.pop("stateless")


def test_the_dispatch_prefers_a_registered_device_backend_and_routes_streams_to_one_that_carries_state(monkeypatch):
    monkeypatch.delenv("DEFOCUS_SCAN_BACKEND", raising=False)
    monkeypatch.delenv("DEFOCUS_MIXER_BACKEND", raising=False)
    calls = []

    def fake_cpu(*args, **kwargs):
        calls.append(kwargs)
        return mixer_ops.mamba_mixer_core_torch(*args, **kwargs)

    monkeypatch.setitem(mixer_ops._REGISTRY.fns, "cpu", fake_cpu)
    monkeypatch.setitem(mixer_ops._REGISTRY.availability, "cpu", lambda: True)
    monkeypatch.setattr(mixer_ops._REGISTRY, "carries_state", {"torch"})
    inputs = core_inputs()
    out = mamba_mixer_core(**inputs)
    assert len(calls) == 1
    torch.testing.assert_close(out, mamba_mixer_core(**inputs, backend="torch"), rtol=0, atol=0)
    mamba_mixer_core(**inputs, return_final_state=True)  # a stream: the state-carrying reference, not "cpu"
    assert len(calls) == 1
    with pytest.raises(ValueError, match="does not carry a stream's state"):
        mamba_mixer_core(**inputs, position_offset=3, backend="cpu")
    monkeypatch.setenv("DEFOCUS_SCAN_BACKEND", "torch")  # a forced scan backend means the reference composition
    mamba_mixer_core(**inputs)
    assert len(calls) == 1
    with pytest.raises(ValueError, match="unknown backend"):
        mamba_mixer_core(**inputs, backend="nope")


def test_a_registered_backend_is_used_and_shapes_are_checked():
    inputs = core_inputs()
    seen = []
    register_mamba_mixer_backend("recording", lambda *a, **k: seen.append(1) or mixer_ops.mamba_mixer_core_torch(*a, **k))
    try:
        mamba_mixer_core(**inputs, backend="recording")
        assert seen == [1]
    finally:
        mixer_ops._REGISTRY.fns.pop("recording"), mixer_ops._REGISTRY.availability.pop("recording")
    bad = dict(inputs, B=inputs["B"][:, :-1])
    with pytest.raises(ValueError, match="B must be"):
        mamba_mixer_core(**bad)
    with pytest.raises(ValueError, match="does not divide"):
        mamba_mixer_core(**inputs, group_norm_size=3)


def test_cuda_tensors_dispatch_to_the_fused_triton_mixer_unless_mamba_ssm_or_a_forced_scan(monkeypatch):
    from types import SimpleNamespace

    monkeypatch.delenv("DEFOCUS_MIXER_BACKEND", raising=False)
    monkeypatch.delenv("DEFOCUS_SCAN_BACKEND", raising=False)
    monkeypatch.setitem(mixer_ops._REGISTRY.fns, "triton", mixer_ops.mamba_mixer_core_torch)
    monkeypatch.setitem(mixer_ops._REGISTRY.availability, "triton", lambda: True)
    scan_backends = ["torch", "triton"]
    monkeypatch.setattr(mixer_ops, "available_scan_backends", lambda: scan_backends)
    cuda_x = SimpleNamespace(is_cuda=True, dtype=torch.bfloat16, device=SimpleNamespace(type="cuda"))
    assert mixer_ops._default_backend(cuda_x, carrying_state=False) == "triton"
    assert mixer_ops._default_backend(cuda_x, carrying_state=True) == "triton"  # it carries streams too
    monkeypatch.setenv("DEFOCUS_SCAN_BACKEND", "triton")  # the Triton path, i.e. the fused mixer
    assert mixer_ops._default_backend(cuda_x, carrying_state=False) == "triton"
    monkeypatch.setenv("DEFOCUS_SCAN_BACKEND", "torch")
    assert mixer_ops._default_backend(cuda_x, carrying_state=False) == "torch"
    monkeypatch.delenv("DEFOCUS_SCAN_BACKEND")
    scan_backends.append("cuda")  # mamba-ssm imports: its scan inside the PyTorch composition
    assert mixer_ops._default_backend(cuda_x, carrying_state=False) == "torch"
    monkeypatch.setenv("DEFOCUS_MIXER_BACKEND", "triton")
    assert mixer_ops._default_backend(cuda_x, carrying_state=False) == "triton"


def test_the_triton_mixer_is_registered_as_a_state_carrying_backend():
    import defocus_mllm.ops.triton_mixer  # noqa: F401 - registers "triton"

    from defocus_mllm.ops.triton_scan import _interpreted

    assert "triton" in mixer_ops._REGISTRY.fns and "triton" in mixer_ops._REGISTRY.carries_state
    available = mixer_ops._REGISTRY.availability["triton"]()
    assert available == (torch.cuda.is_available() or _interpreted())
    if not available:  # without a GPU and without Triton's interpreter, naming it says so
        with pytest.raises(RuntimeError, match="not available here"):
            mamba_mixer_core(**core_inputs(), backend="triton")


def test_cuda_graph_helper_refuses_cpu_inputs_with_a_clear_error():
    from defocus_mllm.ops.cuda_graphs import CUDAGraphInference

    with pytest.raises(ValueError, match="example input 0 must be a CUDA tensor"):
        CUDAGraphInference(lambda t: t * 2, torch.ones(2))
    with pytest.raises(ValueError, match="at least one example input"):
        CUDAGraphInference(lambda: None)
