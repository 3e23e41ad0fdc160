"""The De-focus encoder with every mixer: shapes, causality, presets and their parameter counts, heads and losses,
drop path, bf16, save / load, config sizes that must be positive. The mixers alone: tests/test_mixers.py; the
filter: tests/test_filters.py."""

from functools import partial

import pytest
import torch
from transformers import AutoModelForImageClassification

import defocus_mllm  # noqa: F401  (registers the Auto classes)
from defocus_mllm import DEFOCUS_PRESETS, DefocusForImageClassification, DefocusVisionConfig, DefocusVisionModel
from defocus_mllm.encoder.modeling_defocus import drop_path
from helpers import scramble_filter, tiny_config as _tiny_config

CAUSAL_TINY = ["vit-tiny", "vit-tiny-causal", "retnet-tiny", "retnet-tiny-causal", "mamba-tiny", "mamba-tiny-causal"]


tiny_config = partial(_tiny_config, "mamba-tiny")  # this module's models are Mamba ones


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return DefocusForImageClassification(tiny_config()).eval()


def count_parameters(config):
    with torch.device("meta"):
        return sum(p.numel() for p in DefocusForImageClassification(config).parameters())


@pytest.mark.parametrize("name,expected,head", [("mamba-small", 25.1e6, "linear"), ("mamba-base", 92.7e6, "linear"),
                                                ("mamba-large", 330.1e6, "mlp"), ("vit-base", 87.4e6, "linear"),
                                                ("retnet-base", 92.7e6, "linear")])
def test_presets_match_the_released_and_paper_parameter_counts(name, expected, head):
    config = DefocusVisionConfig.from_preset(name)
    assert config.head_type == head and config.num_labels == 1000
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


def test_unknown_preset_and_bad_fields_are_named():
    with pytest.raises(ValueError, match="mamba-huge"):
        DefocusVisionConfig.from_preset("mamba-huge")
    with pytest.raises(ValueError, match="aux_loss_mode"):
        tiny_config(aux_loss_mode="mean")
    # the mixer's own fields are checked by the mixer, when the model is built
    with pytest.raises(ValueError, match="group_norm_size"):
        DefocusVisionModel(tiny_config(intermediate_size=100))
    with pytest.raises(ValueError, match="num_attention_heads"):
        DefocusVisionModel(DefocusVisionConfig.from_preset("vit-tiny", num_attention_heads=5))
    with pytest.raises(ValueError, match="use_rope"):  # head width 15
        DefocusVisionModel(DefocusVisionConfig.from_preset("vit-tiny", hidden_size=60, num_attention_heads=4))
    with pytest.raises(ValueError, match="intermediate_size"):
        DefocusVisionModel(DefocusVisionConfig.from_preset("retnet-tiny", intermediate_size=130))
    with pytest.raises(ValueError, match="causal"):
        DefocusVisionModel(DefocusVisionConfig.from_preset("retnet-tiny", causal=False))


@pytest.mark.parametrize("height,width", [(64, 64), (32, 48), (8, 8), (96, 64)])
def test_any_multiple_of_the_patch_size_works(model, height, width):
    out = model.defocus(torch.randn(2, 3, height, width), output_hidden_states=True)
    tokens = (height // 8) * (width // 8) + 1
    assert out.last_hidden_state.shape == (2, tokens, 64)
    assert torch.equal(out.pooler_output, out.last_hidden_state[:, -1])
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    assert torch.equal(out.hidden_states[-1], out.last_hidden_state)


def test_image_size_not_a_multiple_of_the_patch_is_a_clear_error(model):
    with pytest.raises(ValueError, match="multiple of the patch size 8"):
        model(torch.randn(1, 3, 60, 64))
    with pytest.raises(ValueError, match="channels"):
        model(torch.randn(1, 1, 64, 64))


def test_cls_token_is_last_and_patches_are_row_major(model):
    x = torch.randn(1, 3, 16, 24)
    embedded = model.defocus.embed(x)
    assert torch.equal(embedded[0, -1], model.defocus.cls_token[0, 0])
    # patch (row 1, col 2) of a 2x3 grid is token 1 * 3 + 2
    patch = x[:, :, 8:16, 16:24]
    direct = torch.nn.functional.conv2d(patch, model.defocus.patch_embed.proj.weight,
                                        model.defocus.patch_embed.proj.bias).flatten()
    assert torch.allclose(embedded[0, 5], direct, atol=1e-5)


def perturb_patch(pixels, row, col, patch=8):
    changed = pixels.clone()
    changed[:, :, row * patch:(row + 1) * patch, col * patch:(col + 1) * patch] += 1.0
    return changed


@pytest.mark.parametrize("name", CAUSAL_TINY)
def test_causality_changing_token_j_never_changes_earlier_outputs(name):
    torch.manual_seed(0)
    model = DefocusVisionModel(DefocusVisionConfig.from_preset(name)).eval()
    for block in model.blocks:
        if hasattr(block.mixer, "filter"):  # attention / retention: move the filter off its initial values
            scramble_filter(block.mixer, torch.Generator().manual_seed(block.layer_idx))
    x = torch.randn(1, 3, 32, 32)  # 4x4 grid + CLS
    base = model(x).last_hidden_state
    exact = 0.0 if name.startswith("mamba") else 1e-6  # the scan is exact; softmax kernels round the masked sums
    for j, (row, col) in [(5, (1, 1)), (10, (2, 2)), (0, (0, 0))]:
        out = model(perturb_patch(x, row, col)).last_hidden_state
        torch.testing.assert_close(out[:, :j], base[:, :j], rtol=0, atol=exact, msg=f"{name}: token {j} leaked back")
        assert (out[:, j:] - base[:, j:]).abs().amax(-1).min() > 1e-4, f"{name}: token {j} did not reach later ones"


def test_non_causal_vit_is_not_causal():
    torch.manual_seed(0)
    model = DefocusVisionModel(DefocusVisionConfig.from_preset("vit-tiny-noncausal")).eval()
    x = torch.randn(1, 3, 32, 32)
    out = model(perturb_patch(x, 2, 2)).last_hidden_state  # token 10
    assert (out[:, :10] - model(x).last_hidden_state[:, :10]).abs().amax(-1).min() > 1e-4


def test_blocks_get_an_mlp_only_for_attention_and_retention():
    vit = DefocusVisionModel(DefocusVisionConfig.from_preset("vit-tiny"))
    keys = set(vit.state_dict())
    assert {"blocks.0.norm2.weight", "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.bias"} <= keys
    assert vit.blocks[0].mlp.fc1.out_features == 256
    assert DefocusVisionModel(DefocusVisionConfig.from_preset("vit-tiny", mlp_ratio=0)).blocks[0].mlp is None
    mamba = DefocusVisionModel(DefocusVisionConfig.from_preset("mamba-tiny", mlp_ratio=4.0))
    assert mamba.blocks[0].mlp is None and not any("mlp" in k or "norm2" in k for k in mamba.state_dict())


def test_classification_heads_and_losses(model):
    x, labels = torch.randn(3, 3, 32, 32), torch.tensor([1, 4, 9])
    out = model(x, labels=labels)
    assert out.logits.shape == (3, 10) and out.aux_logits.shape == (3, 16, 10)
    main = torch.nn.functional.cross_entropy(out.logits, labels)
    aux = torch.nn.functional.cross_entropy(out.aux_logits.reshape(-1, 10), labels.repeat_interleave(16))
    assert torch.allclose(out.loss, (main + aux) / 2, atol=1e-6)
    # soft (mixup) targets: one-hot soft targets give the hard-label loss
    soft = torch.nn.functional.one_hot(labels, 10).float()
    assert torch.allclose(model(x, labels=soft).loss, out.loss, atol=1e-5)
    mixed = 0.7 * soft + 0.3 * soft.flip(0)
    assert torch.isfinite(model(x, labels=mixed).loss)


def test_pooled_aux_loss_and_no_aux_head():
    torch.manual_seed(0)
    pooled = DefocusForImageClassification(tiny_config(aux_loss_mode="pooled")).eval()
    x, labels = torch.randn(2, 3, 32, 32), torch.tensor([0, 3])
    out = pooled(x, labels=labels)
    tokens = pooled.defocus(x).last_hidden_state
    assert torch.allclose(out.aux_logits, pooled.head2(tokens[:, :-1].mean(1)), atol=1e-6)
    none = DefocusForImageClassification(tiny_config(aux_loss_mode="none")).eval()
    out = none(x, labels=labels)
    assert none.head2 is None and out.aux_logits is None
    assert torch.allclose(out.loss, torch.nn.functional.cross_entropy(out.logits, labels), atol=1e-6)


def test_mlp_heads():
    m = DefocusForImageClassification(tiny_config(head_type="mlp"))
    assert [type(layer).__name__ for layer in m.head] == ["Linear", "Tanh", "Linear"]
    assert m.head[0].out_features == 3 * 64
    assert m(torch.randn(1, 3, 16, 16)).logits.shape == (1, 10)


def test_drop_path_is_set_at_run_time():
    torch.manual_seed(0)
    m = DefocusForImageClassification(tiny_config(drop_path_rate=0.0))
    rates = m.set_drop_path_rate(0.6)
    assert rates == pytest.approx([0.0, 0.2, 0.4, 0.6])
    assert [b.drop_path_rate for b in m.defocus.blocks] == pytest.approx(rates)
    x = torch.randn(8, 3, 16, 16)
    m.train()
    torch.manual_seed(1)
    a = m(x).logits
    torch.manual_seed(2)
    b = m(x).logits
    assert not torch.allclose(a, b)
    m.eval()
    assert torch.equal(m(x).logits, m(x).logits)
    m.set_drop_path_rate(0.0)
    m.train()
    assert torch.allclose(m(x).logits, m.eval()(x).logits, atol=1e-6)




@pytest.mark.parametrize("name", ["mamba-tiny", "vit-tiny", "retnet-tiny"])
def test_bf16_autocast_runs_and_keeps_the_residual_stream_in_fp32(name):
    torch.manual_seed(0)
    model = DefocusVisionModel(DefocusVisionConfig.from_preset(name)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, output_hidden_states=True)
    assert out.hidden_states[1].dtype == torch.float32
    reference = model(x).last_hidden_state
    torch.testing.assert_close(out.last_hidden_state.float(), reference, rtol=0, atol=0.15)


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


def test_drop_path_keeps_a_branch_with_probability_1_minus_rate_and_rescales_it_by_1_over_keep():
    # Stochastic depth (Huang et al. 2016; timm's `drop_path`): a kept branch is divided by keep = 1 - rate so that
    # its expectation is unchanged. rate 0.25: every value is 0 or 1 / 0.75 = 4/3.
    torch.manual_seed(0)
    out = drop_path(torch.ones(20000, 3, 2), rate=0.25, training=True)
    assert out.unique().tolist() == [0.0, pytest.approx(4 / 3)]
    per_sample = out[:, 0, 0]
    assert (out == per_sample[:, None, None]).all()  # the whole branch of a sample is kept or dropped together
    kept = (per_sample > 0).float().mean().item()
    assert kept == pytest.approx(0.75, abs=4 * (0.75 * 0.25 / 20000) ** 0.5)
    assert torch.equal(drop_path(torch.ones(4, 3), rate=0.25, training=False), torch.ones(4, 3))


POSITIVE_FIELDS = ["hidden_size", "num_hidden_layers", "intermediate_size", "state_size", "time_step_rank",
                   "conv_kernel", "patch_size", "image_size", "num_channels", "rope_scale_factor",
                   "delta_scale_factor"]


@pytest.mark.parametrize("field", POSITIVE_FIELDS)
@pytest.mark.parametrize("value", [0, -1])
def test_config_sizes_must_be_positive_and_the_field_is_named(field, value):
    with pytest.raises(ValueError, match=rf"{field}={value} must be positive"):
        DefocusVisionConfig.from_preset("mamba-tiny", **{field: value})


def test_a_saved_config_with_zero_layers_does_not_load(tmp_path):
    DefocusVisionModel(DefocusVisionConfig.from_preset("mamba-tiny", num_hidden_layers=1)).save_pretrained(tmp_path)
    config = (tmp_path / "config.json").read_text().replace('"num_hidden_layers": 1', '"num_hidden_layers": 0')
    (tmp_path / "config.json").write_text(config)
    with pytest.raises(ValueError, match="num_hidden_layers=0 must be positive"):
        DefocusVisionModel.from_pretrained(tmp_path)
