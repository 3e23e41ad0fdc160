"""`ops.decay_attention`, the De-focus ViT's decay attention one tile of queries at a time (docs/method.md §3.4),
against the dense-bias SDPA path: outputs and every gradient, in the op alone and inside the mixer, fp32 and bf16,
and the memory it creates (no `[H, L, L]` tensor, forward or backward)."""

import pytest
import torch
import torch.nn.functional as F

import defocus_mllm.ops.decay_attention as decay_module
from defocus_mllm import DefocusVisionConfig
from defocus_mllm.encoder.mixers import DefocusAttentionMixer
from defocus_mllm.ops.decay_attention import decay_attention
from helpers import scramble_filter
from op_checks import max_tensor_numel

MIXER_VARIANTS = [
    {},                                                       # causal, learnable decay and rotation
    {"causal": False},                                        # symmetric decay |i - j| A_h over all keys
    {"rope_mode": "fixed", "decay_mode": "fixed", "rope_scale_factor": 2.0},  # buffers: no filter gradients
    {"use_rope": False},                                      # decay without rotation
    {"use_rope": False, "causal": False},
]


def dense_reference(q, k, v, log_decay, causal):
    """One SDPA call with the whole `[H, L, L]` bias (what the mixer's "sdpa" path computes), in q's dtype."""
    length = q.shape[-2]
    positions = torch.arange(length, dtype=torch.float32)
    distance = positions[:, None] - positions[None, :]
    bias = None
    if log_decay is not None:
        bias = (distance.clamp(min=0) if causal else distance.abs())[None] * log_decay[:, None, None]
    if causal:
        bias = (torch.zeros(1, length, length) if bias is None else bias).masked_fill(distance < 0, float("-inf"))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=None if bias is None else bias.to(q.dtype))


def op_inputs(batch=2, heads=3, length=37, head_dim=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, length, head_dim, generator=g) for _ in range(3))
    a_log = torch.randn(heads, generator=g) - 1.0  # A_h from ~-0.05 to ~-1: decays that matter over 37 tokens
    return [t.to(dtype).requires_grad_() for t in (q, k, v)] + [a_log.requires_grad_()]


def run_op(fn, inputs, with_decay, causal):
    """Output and the gradients of q, k, v, A_log for the loss `sum(out * w)` (a fixed, non-uniform weight)."""
    for t in inputs:
        t.grad = None
    q, k, v, a_log = inputs
    out = fn(q, k, v, -torch.exp(a_log) if with_decay else None, causal)
    weight = torch.linspace(-1.0, 1.0, out.numel()).view_as(out).to(out.dtype)
    (out * weight).float().sum().backward()
    grads = [t.grad for t in inputs[:3]] + [inputs[3].grad if with_decay else None]
    return [out.detach()] + grads


@pytest.fixture(params=["tiles", "autograd"])
def op_path(request, monkeypatch):
    """Each of the op's two ways: the SDPA tiles with their custom backward, and whole-matrix autograd ops (what
    short fp32 sequences under autograd take)."""
    monkeypatch.setattr(decay_module, "AUTOGRAD_MAX_KEYS", 0 if request.param == "tiles" else 10_000)
    return request.param


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("with_decay", [True, False])
@pytest.mark.parametrize("chunk_size", [5, 16, 64])  # 37 tokens: a partial tile, several tiles, one tile
def test_op_equals_dense_sdpa_output_and_gradients(causal, with_decay, chunk_size, op_path):
    inputs = op_inputs()
    expected = run_op(dense_reference, inputs, with_decay, causal)
    ours = run_op(lambda *a: decay_attention(*a, chunk_size=chunk_size), inputs, with_decay, causal)
    for name, got, want in zip(["out", "q", "k", "v", "A_log"], ours, expected):
        if want is None:
            assert got is None, name
            continue
        assert got.abs().max() > 0, name  # every gradient is exercised
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("causal", [True, False])
def test_op_in_bf16_is_as_close_to_fp32_as_dense_sdpa_in_bf16(causal):
    """bf16 inputs: both paths add the bias in bf16 (8 bits of mantissa: ~0.4% of `|(i - j) A_h|`) and round q, k, v
    the same way, so neither can be closer to the fp32 result than bf16's resolution. The tiled path must not add
    error of its own: within 1.5x the dense bf16 path's distance to fp32, plus bf16's rounding of the output."""
    inputs = op_inputs(length=45)
    exact = run_op(dense_reference, inputs, True, causal)
    low = op_inputs(length=45, dtype=torch.bfloat16)
    dense = run_op(dense_reference, low, True, causal)
    ours = run_op(lambda *a: decay_attention(*a, chunk_size=16), low, True, causal)
    for name, got, ref, want in zip(["out", "q", "k", "v", "A_log"], ours, dense, exact):
        assert got.dtype == ref.dtype, name
        scale = want.abs().max().item()
        err_ours = (got.float() - want).abs().max().item()
        err_dense = (ref.float() - want).abs().max().item()
        assert err_ours <= 1.5 * err_dense + 2 ** -8 * scale, (name, err_ours, err_dense)
        assert err_ours <= 0.05 * scale, (name, err_ours, scale)


@pytest.mark.parametrize("offset", [1, 20, 36])
@pytest.mark.parametrize("chunk_size", [5, 64])
def test_queries_at_an_offset_are_the_last_rows_of_the_dense_op(offset, chunk_size, op_path):
    # a chunk of a stream: its queries at positions offset.., the keys of the whole sequence so far
    q, k, v, a_log = op_inputs()
    tail = q.detach()[:, :, offset:].clone().requires_grad_()
    out = decay_attention(tail, k, v, -torch.exp(a_log), chunk_size=chunk_size, query_offset=offset)
    expected_out = dense_reference(q, k, v, -torch.exp(a_log), True)[:, :, offset:]
    torch.testing.assert_close(out, expected_out, rtol=1e-5, atol=1e-5)
    weight = torch.linspace(-1.0, 1.0, out.numel()).view_as(out)
    grads = torch.autograd.grad((out * weight).sum(), (tail, k, v, a_log))
    expected = torch.autograd.grad((expected_out * weight).sum(), (q, k, v, a_log))
    for name, got, want in zip(["q", "k", "v", "A_log"], grads, (expected[0][:, :, offset:], *expected[1:])):
        assert got.abs().max() > 0, name
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=name)


def test_an_offset_needs_causal_queries_and_keys_that_cover_it():
    q = torch.randn(1, 2, 5, 4)
    k = torch.randn(1, 2, 8, 4)
    assert decay_attention(q, k, k, None, query_offset=3).shape == q.shape
    with pytest.raises(ValueError, match="query_offset=2 needs causal=True"):
        decay_attention(q, k, k, None, causal=False, query_offset=2)
    with pytest.raises(ValueError, match=r"k, v: \[B, H, query_offset \+ L"):
        decay_attention(q, k, k, None, query_offset=2)


def test_short_fp32_sequences_under_autograd_take_autograd_ops_and_the_rest_the_tiles(monkeypatch):
    taken = []
    real = decay_module._autograd_decay_attention
    monkeypatch.setattr(decay_module, "_autograd_decay_attention", lambda *a: taken.append(a[0].shape[2]) or real(*a))
    a_log = torch.randn(3) - 1.0
    limit = decay_module.AUTOGRAD_MAX_KEYS
    short, long = (torch.randn(2, 3, n, 8) for n in (limit, limit + 1))
    for q, grad, dtype, want in [(short, True, torch.float32, [short.shape[2]]), (long, True, torch.float32, []),
                                 (short, False, torch.float32, []), (short, True, torch.bfloat16, [])]:
        taken.clear()
        q = q.to(dtype).requires_grad_(grad)
        out = decay_attention(q, q, q, -torch.exp(a_log))
        assert taken == want, (tuple(q.shape), grad, dtype)
        tolerance = 1e-2 if dtype == torch.bfloat16 else 1e-5
        torch.testing.assert_close(out.float(), dense_reference(q, q, q, -torch.exp(a_log), True).float(),
                                   rtol=tolerance, atol=tolerance)
    with torch.no_grad():
        taken.clear()
        decay_attention(short.requires_grad_(), short, short, None)
        assert taken == []


def test_op_rejects_bad_shapes_and_tile_sizes():
    q = torch.randn(1, 2, 5, 4)
    with pytest.raises(ValueError, match=r"decay_attention: q, k, v must be \[B, H, L, d\]"):
        decay_attention(q, q[..., :3, :], q, None)
    with pytest.raises(ValueError, match=r"log_decay must be \[H\] = \[2\]"):
        decay_attention(q, q, q, torch.full((3,), -0.1))
    with pytest.raises(ValueError, match="chunk_size=0 must be positive"):
        decay_attention(q, q, q, None, chunk_size=0)


# ------------------------------------------------------------------ inside the mixer


def attention_mixer(seed=0, **overrides):
    torch.manual_seed(seed)
    mixer = DefocusAttentionMixer(DefocusVisionConfig.from_preset("vit-tiny", **overrides))
    scramble_filter(mixer, torch.Generator().manual_seed(seed + 1))
    return mixer


def mixer_results(mixer, backend, hidden):
    mixer.attention_backend = backend
    mixer.zero_grad(set_to_none=True)
    hidden.grad = None
    out = mixer(hidden)
    (out * torch.linspace(-1.0, 1.0, out.shape[-1])).sum().backward()
    return {"out": out.detach(), "hidden": hidden.grad.clone(),
            **{name: p.grad.clone() for name, p in mixer.named_parameters()}}


@pytest.mark.parametrize("overrides", MIXER_VARIANTS)
def test_chunked_mixer_equals_sdpa_mixer_forward_and_backward(overrides, monkeypatch, op_path):
    monkeypatch.setattr(decay_module, "DEFAULT_CHUNK_SIZE", 16)  # 41 tokens: two full tiles and a partial one
    mixer = attention_mixer(**overrides)
    hidden = torch.randn(2, 41, 64, requires_grad=True)
    expected = mixer_results(mixer, "sdpa", hidden)
    ours = mixer_results(mixer, "chunked", hidden)
    assert set(ours) == set(expected)
    learnable = {"filter.A_log", "filter.freq"} & set(ours)
    assert learnable == {n for n in ("filter.A_log", "filter.freq")
                         if (n == "filter.A_log" and overrides.get("decay_mode", "learnable") == "learnable")
                         or (n == "filter.freq" and overrides.get("use_rope", True)
                             and overrides.get("rope_mode", "learnable") == "learnable")}
    for name, want in expected.items():
        torch.testing.assert_close(ours[name], want, rtol=1e-5, atol=1e-5, msg=name)
    for name in learnable:  # the filter's gradients are really reached through the tiles
        assert ours[name].abs().min() > 0, name


def test_auto_takes_the_chunked_path_on_cpu_and_the_name_is_validated():
    mixer = attention_mixer()
    q = torch.randn(1, 4, 9, 16)
    assert mixer.attention_backend == "auto" and mixer.uses_chunked(q) and not mixer.uses_flex(q)
    mixer.attention_backend = "sdpa"
    assert not mixer.uses_chunked(q)
    mixer.attention_backend = "chunked"
    assert mixer.uses_chunked(q) and not mixer.uses_flex(q)
    assert DefocusVisionConfig.from_preset("vit-tiny", attention_backend="chunked").attention_backend == "chunked"
    mixer.attention_backend = "tiles"
    with pytest.raises(ValueError, match="'chunked'"):
        mixer.uses_flex(q)


# ------------------------------------------------------------------ memory


@pytest.mark.parametrize("causal", [True, False])
def test_no_tensor_of_heads_times_length_squared_forward_or_backward(causal, monkeypatch):
    """The largest tensor any op creates (views included) over forward + backward of the mixer on 400 tokens with
    tiles of 16: a `[B, H, 16, L]` tile or the `qkv` projection `[B, L, 3 hidden]`, where the SDPA path builds its
    `[H, L, L]` bias."""
    chunk, length, batch, hidden_size = 16, 400, 1, 64
    monkeypatch.setattr(decay_module, "DEFAULT_CHUNK_SIZE", chunk)
    mixer = attention_mixer(causal=causal)
    heads = mixer.num_heads
    hidden = torch.randn(batch, length, hidden_size, requires_grad=True)

    def step(backend):
        mixer.attention_backend = backend
        mixer(hidden).square().sum().backward()

    dense_what, dense_numel = max_tensor_numel(lambda: step("sdpa"))
    assert dense_numel >= heads * length * length, dense_what  # the measurement sees the dense bias
    what, numel = max_tensor_numel(lambda: step("chunked"))
    assert numel <= max(batch * heads * chunk * length, batch * length * 3 * hidden_size), what
    assert numel < heads * length * length // 8, what
