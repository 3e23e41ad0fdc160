"""The token mixers alone: De-focus ViT attention against its explicit formula, the three forms of retention, the
attention maps, and the mixer contract and registry. The filter alone: tests/test_filters.py; the mixers inside the
model (causality, presets, save / load): tests/test_modeling.py."""

import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from defocus_mllm import DefocusVisionConfig, DefocusVisionModel
from defocus_mllm.encoder.mixers import (
    MIXER_CLASSES,
    DefocusAttentionMixer,
    DefocusRetentionMixer,
    TokenMixer,
    build_mixer,
)
from defocus_mllm.encoder.mixers.attention import flex_attention_available
from helpers import scramble_filter, tiny_config as tiny


def explicit_attention_reference(mixer, hidden, causal):
    """docs/method.md §2.6 written out: logits `q_i . R(theta (i-j)) k_j / sqrt(d) + decay`, with the relative rotation applied
    as a complex phase per pair, then a plain softmax."""
    batch, length, width = hidden.shape
    heads, d = mixer.num_heads, mixer.head_dim
    q, k, v = mixer.qkv(hidden).view(batch, length, 3, heads, d).permute(2, 0, 3, 1, 4)  # unrotated [B, H, L, d]
    qc = torch.complex(q[..., 0::2].double(), q[..., 1::2].double())
    kc = torch.complex(k[..., 0::2].double(), k[..., 1::2].double())
    i = torch.arange(length, dtype=torch.float64)
    distance = i[:, None] - i[None, :]  # i - j
    freq = mixer.filter.freq.double() / mixer.filter.rope_scale_factor  # [H, d/2]
    phase = torch.exp(1j * distance[None, :, :, None] * freq[:, None, None, :])  # [H, L, L, d/2]
    logits = torch.einsum("bhim,bhjm,hijm->bhij", qc, kc.conj(), phase).real / math.sqrt(d)
    A = -torch.exp(mixer.filter.A_log.double())  # log(lambda_h) < 0
    logits = logits + (distance if causal else distance.abs())[None] * A[:, None, None]
    if causal:
        logits = logits.masked_fill(distance < 0, float("-inf"))
    weights = logits.softmax(-1)
    out = (weights @ v.double()).transpose(1, 2).reshape(batch, length, width)
    return weights, mixer.proj(out.float())


@pytest.mark.parametrize("causal", [True, False])
def test_sdpa_attention_equals_the_explicit_formula(causal):
    torch.manual_seed(0)
    config = tiny(causal=causal, rope_scale_factor=2.0)
    mixer = DefocusAttentionMixer(config)
    scramble_filter(mixer, torch.Generator().manual_seed(1))
    hidden = torch.randn(2, 17, 64)
    weights, expected = explicit_attention_reference(mixer, hidden, causal)
    torch.testing.assert_close(mixer(hidden), expected, rtol=0, atol=1e-5)
    attention_map = mixer.attention_map(hidden)
    torch.testing.assert_close(attention_map.double(), weights, rtol=0, atol=1e-5)
    torch.testing.assert_close(attention_map.sum(-1), torch.ones(2, 4, 17))
    if causal:
        assert attention_map.triu(1).abs().max() == 0


@pytest.mark.parametrize("overrides", [{}, {"use_rope": False, "decay_mode": "fixed"}, {"decay_mode": "none"},
                                       {"rope_scale_factor": 4.0}])
def test_retention_parallel_recurrent_and_chunkwise_forms_agree(overrides):
    torch.manual_seed(0)
    mixer = DefocusRetentionMixer(tiny("retnet-tiny", **overrides))
    scramble_filter(mixer, torch.Generator().manual_seed(2))
    hidden = torch.randn(2, 65, 64)  # 8x8 grid + CLS
    parallel = mixer(hidden)
    torch.testing.assert_close(mixer.recurrent_forward(hidden), parallel, rtol=0, atol=1e-5)
    for chunk in (1, 7, 64, 100):
        torch.testing.assert_close(mixer.chunkwise_forward(hidden, chunk), parallel, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="chunk_size"):
        mixer.chunkwise_forward(hidden, 0)


def test_retention_map_is_the_decay_masked_score_and_matches_the_parallel_form():
    torch.manual_seed(0)
    mixer = DefocusRetentionMixer(tiny("retnet-tiny"))
    scramble_filter(mixer, torch.Generator().manual_seed(3))
    hidden = torch.randn(1, 9, 64)
    q, k, v = mixer.queries_keys_values(hidden)
    lam = torch.exp(-torch.exp(mixer.filter.A_log))
    signed = torch.zeros(1, 4, 9, 9)
    for i in range(9):
        for j in range(i + 1):
            signed[:, :, i, j] = lam ** (i - j) * (q[:, :, i] * k[:, :, j]).sum(-1)
    attention_map = mixer.attention_map(hidden)
    torch.testing.assert_close(attention_map, signed.abs().detach(), rtol=1e-5, atol=1e-6)
    # the signed map applied to the values, normed and gated, is the mixer's output
    torch.testing.assert_close(mixer._output(signed @ v, hidden), mixer(hidden), rtol=0, atol=1e-5)


def test_attention_without_decay_has_no_bias_and_is_plain_attention():
    noncausal = DefocusAttentionMixer(tiny("vit-tiny-noncausal"))
    assert noncausal.attention_bias(9, torch.device("cpu"), torch.float32) is None
    causal = DefocusAttentionMixer(tiny("vit-tiny-causal"))
    bias = causal.attention_bias(9, torch.device("cpu"), torch.float32)
    assert torch.all(bias.tril() == 0) and torch.all(bias.triu(1)[bias.triu(1) != 0] == float("-inf"))
    hidden = torch.randn(2, 9, 64)
    q, k, v = causal.qkv(hidden).view(2, 9, 3, 4, 16).permute(2, 0, 3, 1, 4)
    scores = (q @ k.transpose(-1, -2) / 4.0).masked_fill(torch.ones(9, 9, dtype=torch.bool).triu(1), float("-inf"))
    expected = causal.proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 9, 64))
    torch.testing.assert_close(causal(hidden), expected, rtol=0, atol=1e-5)


# ------------------------------------------------------------------ FlexAttention vs SDPA (docs/method.md §3.4)

needs_flex = pytest.mark.skipif(not flex_attention_available(), reason="this torch has no FlexAttention")
ATTENTION_VARIANTS = [
    {},                                               # causal, learnable decay and rotation
    {"causal": False},                                # symmetric decay |i - j| A_h, no mask
    {"decay_mode": "none"},                           # causal mask only
    {"decay_mode": "none", "causal": False, "use_rope": False},  # plain non-causal attention
    {"decay_mode": "fixed", "rope_mode": "fixed", "rope_scale_factor": 2.0},
]


def attention_mixer(seed=0, **overrides):
    torch.manual_seed(seed)
    mixer = DefocusAttentionMixer(tiny(**overrides))
    scramble_filter(mixer, torch.Generator().manual_seed(seed + 1))
    return mixer


def run_backend(mixer, backend, hidden):
    mixer.attention_backend = backend
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        return mixer(hidden)


@pytest.fixture
def flex_backward_on_cpu(monkeypatch):
    """PyTorch refuses FlexAttention's backward on CPU in an input check only; its unfused reference (what
    "flex_eager" runs) differentiates on any device. Lifting the check lets the CPU tests compare the gradients of the
    `score_mod` / block-mask formulation with SDPA's; the fused kernels' backward is checked on CUDA by
    benchmarks/check_cuda_kernels.py."""
    import torch.nn.attention.flex_attention as flex_module

    if not hasattr(flex_module, "_validate_device"):
        pytest.skip("this torch validates FlexAttention devices elsewhere")
    monkeypatch.setattr(flex_module, "_validate_device", lambda *args: None)


@needs_flex
@pytest.mark.parametrize("overrides", ATTENTION_VARIANTS)
def test_flex_and_sdpa_paths_agree_forward_and_backward(overrides, flex_backward_on_cpu):
    mixer = attention_mixer(**overrides)
    hidden = torch.randn(2, 41, 64, requires_grad=True)  # 41 tokens: a partial FlexAttention block
    weight = torch.linspace(-1.0, 1.0, 64)
    results = {}
    for backend in ("sdpa", "flex_eager"):
        mixer.zero_grad(set_to_none=True)
        hidden.grad = None
        out = run_backend(mixer, backend, hidden)
        (out * weight).sum().backward()
        results[backend] = {"out": out.detach(), "hidden": hidden.grad.clone(),
                            **{n: p.grad.clone() for n, p in mixer.named_parameters()}}
    assert mixer.uses_flex(hidden) and set(results["sdpa"]) == set(results["flex_eager"])
    for name, expected in results["sdpa"].items():
        torch.testing.assert_close(results["flex_eager"][name], expected, rtol=1e-5, atol=1e-5, msg=name)
    if "filter.A_log" in results["flex_eager"]:  # learnable decay / rotation: gradients reach both under flex
        assert results["flex_eager"]["filter.A_log"].abs().min() > 0
    if "filter.freq" in results["flex_eager"]:
        assert results["flex_eager"]["filter.freq"].abs().sum() > 0


@needs_flex
def test_flex_path_inside_the_model_and_under_bf16():
    torch.manual_seed(0)
    model = DefocusVisionModel(tiny("vit-tiny")).eval()
    pixels = torch.randn(2, 3, 40, 48)  # 5x6 grid + CLS
    with torch.no_grad():
        expected = model(pixels).last_hidden_state
        for block in model.blocks:
            block.mixer.attention_backend = "flex_eager"
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
            torch.testing.assert_close(model(pixels).last_hidden_state, expected, rtol=0, atol=1e-5)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                low = model(pixels).last_hidden_state
    torch.testing.assert_close(low.float(), expected, rtol=0, atol=0.15)


@needs_flex
@pytest.mark.slow
def test_compiled_flex_agrees_with_sdpa_on_cpu():
    """The fused kernel itself (torch.compile, ~30 s per variant on a 2-core CPU): inference only on CPU."""
    mixer = attention_mixer()
    hidden = torch.randn(2, 41, 64)
    with torch.no_grad():
        torch.testing.assert_close(run_backend(mixer, "flex", hidden), run_backend(mixer, "sdpa", hidden),
                                   rtol=0, atol=1e-5)


def test_auto_backend_takes_no_flex_on_cpu_and_bad_names_are_errors():
    mixer = attention_mixer()
    q = torch.randn(1, 4, 9, 16)
    assert mixer.attention_backend == "auto" and not mixer.uses_flex(q)
    mixer.attention_backend = "sdpa"
    assert not mixer.uses_flex(q)
    mixer.attention_backend = "triton"
    with pytest.raises(ValueError, match="attention_backend"):
        mixer.uses_flex(q)
    with pytest.raises(ValueError, match="attention_backend"):
        DefocusVisionModel(tiny(attention_backend="xformers"))
    assert tiny(attention_backend="sdpa").attention_backend == "sdpa"


def test_attention_benchmark_runs_quick():
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(repo / "benchmarks" / "bench_attention.py"), "--quick"], cwd=repo,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 3 and "sdpa img/s" in lines[1] and lines[2].split()[:3] == ["32", "2", "17"], proc.stdout
    assert "chunked img/s" in lines[1] and float(lines[2].split("chunked=")[-1].split()[0]) < 1e-5, proc.stdout

@pytest.mark.parametrize("name", ["mamba-tiny", "vit-tiny", "vit-tiny-noncausal", "retnet-tiny"])
def test_every_registered_mixer_fulfils_the_contract(name):
    config = tiny(name)
    mixer = build_mixer(config, 2)
    mixer.init_weights()  # outside a model nothing else initialises Mamba's `D` (an empty tensor until then)
    assert isinstance(mixer, TokenMixer) and type(mixer) is MIXER_CLASSES[config.mixer] and mixer.layer_idx == 2
    assert mixer.has_feed_forward == (config.mixer != "mamba")
    hidden = torch.randn(2, 9, 64)
    assert mixer(hidden).shape == hidden.shape
    attention_map = mixer.attention_map(hidden)
    heads = 1 if config.mixer == "mamba" else config.num_attention_heads
    assert attention_map.shape == (2, heads, 9, 9) and attention_map.min() >= 0
    assert (attention_map.triu(1).abs().max() == 0) == config.causal
    # init_weights puts the filter (and Mamba's scan parameters) back to the release's initial values
    names = {"A_log", "freq", "D", "bias"}  # the filter, Mamba's skip and dt_proj.bias (Linear biases are zeroed)
    initial = {k: v.clone() for k, v in mixer.state_dict().items()
               if k.split(".")[-1] in names and not k.endswith(("qkv.bias", "proj.bias", "conv1d.bias"))}
    with torch.no_grad():
        for key in initial:
            mixer.get_parameter(key).add_(0.5)
    mixer.init_weights()
    for key, value in initial.items():
        torch.testing.assert_close(mixer.state_dict()[key], value, rtol=0, atol=0, msg=key)


def test_mixer_names_are_validated_against_the_registry():
    assert set(MIXER_CLASSES) == {"mamba", "attention", "retention"}
    with pytest.raises(ValueError, match="mixer='transformer' must be one of .*'retention'"):
        DefocusVisionModel(tiny(mixer="transformer"))
    with pytest.raises(ValueError, match="No token mixer registered"):
        build_mixer(type("Config", (), {"mixer": "transformer"})(), 0)


@pytest.mark.parametrize("preset", ["vit-tiny", "retnet-tiny"])
def test_config_heads_must_be_positive(preset):
    with pytest.raises(ValueError, match=r"num_attention_heads=0 must be positive"):
        DefocusVisionModel(DefocusVisionConfig.from_preset(preset, num_attention_heads=0))  # checked by the mixer
