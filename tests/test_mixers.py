"""The attention (De-focus ViT) and retention (De-focus RetNet) mixers, the ablation switches and every preset."""

import math

import pytest
import torch
from transformers import AutoModelForImageClassification

import defocus_mllm  # noqa: F401  (registers the Auto classes)
from defocus_mllm import DEFOCUS_PRESETS, DefocusForImageClassification, DefocusVisionConfig, DefocusVisionModel
from defocus_mllm.encoder.mixers import DefocusAttentionMixer, DefocusRetentionMixer

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: a second intra-op thread only adds contention on a shared 2-core machine (where it
    made this file 10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


CAUSAL_TINY = ["vit-tiny", "vit-tiny-causal", "retnet-tiny", "retnet-tiny-causal", "mamba-tiny", "mamba-tiny-causal"]


def tiny(name="vit-tiny", **overrides):
    return DefocusVisionConfig.from_preset(name, **overrides)


def scramble_filter(mixer, generator):
    """Move the filter off its initial values so that tests do not pass by symmetry of the init."""
    with torch.no_grad():
        if mixer.filter.A_log is not None:
            mixer.filter.A_log.copy_(torch.randn(mixer.filter.A_log.shape, generator=generator) - 2.0)
        if mixer.filter.freq is not None:
            mixer.filter.freq.copy_(torch.rand(mixer.filter.freq.shape, generator=generator))


def perturb_patch(pixels, row, col, patch=8):
    changed = pixels.clone()
    changed[:, :, row * patch:(row + 1) * patch, col * patch:(col + 1) * patch] += 1.0
    return changed


@pytest.mark.parametrize("name", CAUSAL_TINY)
def test_causal_variants_never_let_token_j_change_earlier_outputs(name):
    torch.manual_seed(0)
    model = DefocusVisionModel(tiny(name)).eval()
    for block in model.blocks:
        if hasattr(block.mixer, "filter"):
            scramble_filter(block.mixer, torch.Generator().manual_seed(block.layer_idx))
    x = torch.randn(1, 3, 32, 32)  # 4x4 grid + CLS
    base = model(x).last_hidden_state
    for j, (row, col) in [(5, (1, 1)), (10, (2, 2)), (0, (0, 0))]:
        out = model(perturb_patch(x, row, col)).last_hidden_state
        torch.testing.assert_close(out[:, :j], base[:, :j], rtol=0, atol=1e-6, msg=f"{name}: token {j} leaked back")
        assert (out[:, j:] - base[:, j:]).abs().amax(-1).min() > 1e-4, f"{name}: token {j} did not reach later ones"


def test_non_causal_vit_is_not_causal():
    torch.manual_seed(0)
    model = DefocusVisionModel(tiny("vit-tiny-noncausal")).eval()
    x = torch.randn(1, 3, 32, 32)
    out = model(perturb_patch(x, 2, 2)).last_hidden_state  # token 10
    assert (out[:, :10] - model(x).last_hidden_state[:, :10]).abs().amax(-1).min() > 1e-4


def explicit_attention_reference(mixer, hidden, causal):
    """SPEC §2.3 written out: logits `q_i . R(theta (i-j)) k_j / sqrt(d) + decay`, with the relative rotation applied
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


def test_filter_initialisation_spans_short_to_long_ranges_and_starts_from_rope():
    model = DefocusForImageClassification(tiny("retnet-tiny"))
    filt = model.defocus.blocks[0].mixer.filter
    lam = torch.exp(-torch.exp(filt.A_log.detach()))
    torch.testing.assert_close(lam[0], torch.tensor(1 - 2.0**-5))
    torch.testing.assert_close(lam[-1], torch.tensor(1 - 2.0**-12))
    assert torch.all(lam[1:] > lam[:-1])
    head_dim = 16
    torch.testing.assert_close(filt.freq[2, 3], torch.tensor(10000.0 ** (-2 * 3 / head_dim)))


@pytest.mark.parametrize("mixer_cls,name", [(DefocusAttentionMixer, "vit-tiny"),
                                            (DefocusRetentionMixer, "retnet-tiny")])
def test_decay_and_rope_modes(mixer_cls, name):
    hidden = torch.randn(1, 9, 64)
    learnable = mixer_cls(tiny(name))
    learnable(hidden).sum().backward()
    assert learnable.filter.A_log.grad.abs().sum() > 0 and learnable.filter.freq.grad.abs().sum() > 0

    fixed = mixer_cls(tiny(name, decay_mode="fixed", rope_mode="fixed"))
    assert not any("filter" in n for n, _ in fixed.named_parameters())
    assert {"filter.A_log", "filter.freq"} <= set(fixed.state_dict())
    assert not fixed.filter.A_log.requires_grad and not fixed.filter.freq.requires_grad

    off = mixer_cls(tiny(name, decay_mode="none", use_rope=False))
    assert off.filter.A_log is None and off.filter.freq is None and off.filter.log_decay() is None
    assert not any("filter" in n for n in off.state_dict())
    assert torch.equal(off.filter.rotate(hidden.view(1, 1, 9, 64)), hidden.view(1, 1, 9, 64))


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


def test_blocks_get_an_mlp_only_for_attention_and_retention():
    vit = DefocusVisionModel(tiny("vit-tiny"))
    keys = set(vit.state_dict())
    assert {"blocks.0.norm2.weight", "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.bias"} <= keys
    assert vit.blocks[0].mlp.fc1.out_features == 256
    assert DefocusVisionModel(tiny("vit-tiny", mlp_ratio=0)).blocks[0].mlp is None
    mamba = DefocusVisionModel(tiny("mamba-tiny", mlp_ratio=4.0))
    assert mamba.blocks[0].mlp is None and not any("mlp" in k or "norm2" in k for k in mamba.state_dict())


def test_bad_head_fields_are_named():
    with pytest.raises(ValueError, match="num_attention_heads"):
        tiny(num_attention_heads=5)
    with pytest.raises(ValueError, match="use_rope"):
        tiny(hidden_size=60, num_attention_heads=4)  # head width 15
    with pytest.raises(ValueError, match="intermediate_size"):
        tiny("retnet-tiny", intermediate_size=130)
    with pytest.raises(ValueError, match="causal"):
        tiny("retnet-tiny", causal=False)


def count_parameters(config):
    with torch.device("meta"):
        return sum(p.numel() for p in DefocusForImageClassification(config).parameters())


@pytest.mark.parametrize("name,expected", [("vit-base", 87.4e6), ("retnet-base", 92.7e6)])
def test_base_presets_match_the_paper_parameter_counts(name, expected):
    config = DefocusVisionConfig.from_preset(name)
    assert config.num_labels == 1000 and config.num_hidden_layers == 12 and config.hidden_size == 768
    assert abs(count_parameters(config) - expected) / expected < 0.01


@pytest.mark.parametrize("defocus,baseline", [("vit-base", "vit-base-causal"), ("vit-base", "vit-base-noncausal"),
                                              ("retnet-base", "retnet-base-causal")])
def test_baselines_differ_only_by_the_learnable_filter_and_the_aux_head(defocus, baseline):
    # 12 layers x (a decay per head + a rotary frequency per head and pair); the fixed decay of the RetNet
    # baseline is a buffer, not a parameter
    filter_params, aux_head = 12 * (12 + 12 * 32), 768 * 1000 + 1000
    difference = count_parameters(DefocusVisionConfig.from_preset(defocus)) - count_parameters(
        DefocusVisionConfig.from_preset(baseline))
    assert difference == filter_params + aux_head


@pytest.mark.parametrize("name", sorted(DEFOCUS_PRESETS))
def test_every_preset_saves_loads_and_trains_on_cpu(name, tmp_path):
    # the big presets at one layer and a 2x2 patch grid, the tiny ones at full depth on a 4x4 grid
    overrides = dict(image_size=32) if "tiny" in name else dict(num_hidden_layers=1, image_size=32, patch_size=16,
                                                                num_labels=10)
    config = DefocusVisionConfig.from_preset(name, **overrides)
    torch.manual_seed(0)
    model = DefocusForImageClassification(config).train()
    pixels, labels = torch.randn(2, 3, config.image_size, config.image_size), torch.tensor([1, 3])
    model(pixels, labels=labels).loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"{name}: no or non-finite gradient for {missing}"
    model.eval().save_pretrained(tmp_path)
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    assert type(loaded) is DefocusForImageClassification and loaded.config.mixer == config.mixer
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixels).logits, model(pixels).logits, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["vit-tiny", "retnet-tiny"])
def test_bf16_autocast_runs_with_the_filter(name):
    torch.manual_seed(0)
    model = DefocusVisionModel(tiny(name)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x).last_hidden_state
    torch.testing.assert_close(out.float(), model(x).last_hidden_state, rtol=0, atol=0.15)
