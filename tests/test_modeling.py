"""The De-focus Mamba encoder: shapes, causality, presets, heads and losses, drop path, save / load."""

import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForImageClassification

import defocus_mllm  # noqa: F401  (registers the Auto classes)
from defocus_mllm import DefocusForImageClassification, DefocusVisionConfig, DefocusVisionModel


def tiny_config(**overrides):
    return DefocusVisionConfig.from_preset("mamba-tiny", **overrides)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return DefocusForImageClassification(tiny_config()).eval()


@pytest.mark.parametrize("name,expected,head", [("mamba-small", 25.1e6, "linear"), ("mamba-base", 92.7e6, "linear"),
                                                ("mamba-large", 330.1e6, "mlp")])
def test_presets_match_released_parameter_counts(name, expected, head):
    config = DefocusVisionConfig.from_preset(name)
    assert config.head_type == head and config.num_labels == 1000
    with torch.device("meta"):
        n_params = sum(p.numel() for p in DefocusForImageClassification(config).parameters())
    assert abs(n_params - expected) / expected < 0.01


def test_unknown_preset_and_bad_fields_are_named():
    with pytest.raises(ValueError, match="mamba-huge"):
        DefocusVisionConfig.from_preset("mamba-huge")
    with pytest.raises(ValueError, match="aux_loss_mode"):
        tiny_config(aux_loss_mode="mean")
    with pytest.raises(ValueError, match="group_norm_size"):
        tiny_config(intermediate_size=100)


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


def test_causality_changing_token_j_never_changes_earlier_outputs(model):
    x = torch.randn(1, 3, 32, 32)  # 4x4 grid + CLS
    base = model.defocus(x).last_hidden_state
    for j, (row, col) in [(5, (1, 1)), (10, (2, 2)), (0, (0, 0))]:
        changed = x.clone()
        changed[:, :, row * 8:(row + 1) * 8, col * 8:(col + 1) * 8] += 1.0
        out = model.defocus(changed).last_hidden_state
        assert torch.equal(out[:, :j], base[:, :j]), f"token {j} leaked into earlier positions"
        assert not torch.allclose(out[:, j:], base[:, j:])


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


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    m = DefocusForImageClassification(tiny_config()).train()
    x, labels = torch.randn(2, 3, 16, 16), torch.tensor([1, 2])
    m(x, labels=labels).loss.backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    m.gradient_checkpointing_enable()
    assert all(b.gradient_checkpointing for b in m.defocus.blocks)
    m(x, labels=labels).loss.backward()
    for n, p in m.named_parameters():
        assert torch.allclose(p.grad, grads[n], atol=1e-6), n


def test_bf16_autocast_runs_and_keeps_the_residual_stream_in_fp32(model):
    x = torch.randn(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.defocus(x, output_hidden_states=True)
    assert out.hidden_states[1].dtype == torch.float32
    reference = model.defocus(x).last_hidden_state
    assert torch.allclose(out.last_hidden_state.float(), reference, atol=0.15)


def test_auto_classes_and_fresh_process_round_trip(model, tmp_path):
    assert isinstance(AutoConfig.for_model("defocus_vision"), DefocusVisionConfig)
    assert isinstance(AutoModel.from_config(model.config), DefocusVisionModel)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    x = torch.randn(2, 3, 32, 32)
    torch.save({"x": x, "logits": model(x).logits, "aux": model(x).aux_logits}, tmp_path / "expected.pt")
    script = textwrap.dedent(f"""
        import torch, defocus_mllm
        from transformers import AutoModelForImageClassification
        m = AutoModelForImageClassification.from_pretrained({str(tmp_path)!r}).eval()
        e = torch.load({str(tmp_path / 'expected.pt')!r})
        out = m(e["x"])
        assert type(m).__name__ == "DefocusForImageClassification"
        assert torch.equal(out.logits, e["logits"]) and torch.equal(out.aux_logits, e["aux"])
        print("identical")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "identical" in result.stdout, result.stderr[-2000:]
    encoder = AutoModel.from_pretrained(tmp_path)
    assert isinstance(encoder, DefocusVisionModel)
    assert torch.equal(encoder(x).last_hidden_state, model.defocus(x).last_hidden_state)
