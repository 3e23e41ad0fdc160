"""Over-focus diagnostics: the implicit Mamba map is the scan's operator, maps and gradients agree with direct
computations, the numbers on hand-made maps, and `defocus-diagnose` end to end."""

import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from defocus_mllm import DefocusForImageClassification, DefocusVisionConfig, DefocusVisionModel
from defocus_mllm.encoder.diagnostics import (
    attention_entropy,
    attention_maps,
    gradient_map,
    gradient_top_share,
    implicit_mamba_attention,
    main,
    mamba_attention_kernel,
    overfocus_metrics,
    top_key_share,
)
from defocus_mllm.ops import selective_scan

torch.set_num_threads(1)

# the tiny presets on a 4x4 grid: 17 tokens with the CLS token
SMALL = dict(image_size=32)


def _model(preset, cls=DefocusVisionModel, seed=0, **overrides):
    torch.manual_seed(seed)
    return cls(DefocusVisionConfig.from_preset(preset, **SMALL, **overrides)).eval()


@pytest.mark.parametrize("use_rope", [True, False])
def test_implicit_mamba_map_is_the_scan_operator(use_rope):
    model = _model("mamba-tiny", use_rope=use_rope).double()
    mixer = model.blocks[1].mixer
    hidden = torch.randn(2, 17, 64, dtype=torch.float64)
    with torch.no_grad():
        # a larger time step than the init's so that the decay matters over these 17 tokens
        mixer.dt_proj.bias.add_(2.0)
        x, _, delta, A, B, C = mixer.ssm_inputs(hidden)
        alpha = mamba_attention_kernel(delta, A, B, C)  # [B, D, L, L]
        y = selective_scan(x, delta, A, B, C, backend="torch")
    assert alpha.shape == (2, 128, 17, 17)
    assert torch.count_nonzero(torch.triu(alpha, diagonal=1)) == 0
    torch.testing.assert_close(torch.einsum("bdij,bdj->bdi", alpha, x), y, rtol=1e-9, atol=1e-12)

    # channel chunks change the memory, not the map; fp32 agrees with fp64
    full = alpha.abs().mean(1).float()
    for chunk in (1, 7, 128):
        torch.testing.assert_close(implicit_mamba_attention(mixer, hidden, channel_chunk=chunk), full)
    single = mixer.float()
    torch.testing.assert_close(implicit_mamba_attention(single, hidden.float()), full, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("preset", ["mamba-tiny", "vit-tiny", "vit-tiny-noncausal", "retnet-tiny"])
def test_attention_maps_match_the_mixers(preset):
    model = _model(preset)
    pixels = torch.randn(2, 3, 32, 32)
    maps = attention_maps(model, pixels, layers=[0, -1])
    assert sorted(maps) == [0, 3]
    with torch.no_grad():
        hidden_states = model(pixels, output_hidden_states=True).hidden_states  # [i] is block i's input
    for layer, amap in maps.items():
        assert amap.shape == (2, 17, 17)
        torch.testing.assert_close(amap.sum(-1), torch.ones(2, 17))
        block = model.blocks[layer]
        mixer_input = block.norm(hidden_states[layer])
        if preset.startswith("mamba"):
            expected = implicit_mamba_attention(block.mixer, mixer_input)
        else:
            expected = block.mixer.attention_map(mixer_input).mean(1)
        torch.testing.assert_close(amap, expected / expected.sum(-1, keepdim=True), rtol=1e-4, atol=1e-6)
        causal_part = torch.triu(amap, diagonal=1).abs().max()
        assert (causal_part > 0) == (preset == "vit-tiny-noncausal")


def test_gradient_map_is_the_gradient_at_the_patch_embedding():
    model = _model("vit-tiny", cls=DefocusForImageClassification)
    pixels = torch.randn(2, 3, 32, 32)
    grad = gradient_map(model, pixels)
    assert grad.shape == (2, 4, 4)
    assert all(p.grad is None for p in model.parameters())

    # by hand: the encoder's forward with the patch embedding as a leaf
    encoder = model.defocus
    patches = encoder.patch_embed(pixels).detach().requires_grad_(True)
    x = torch.cat([patches, encoder.cls_token.expand(2, -1, -1)], dim=1)
    for block in encoder.blocks:
        x = block(x)
    logits = model.head(encoder.norm(x)[:, -1])
    loss = torch.nn.functional.cross_entropy(logits, logits.argmax(-1), reduction="sum")
    (expected,) = torch.autograd.grad(loss, patches)
    torch.testing.assert_close(grad, expected.norm(dim=-1).reshape(2, 4, 4))

    # a sample's map does not depend on the rest of the batch; a given label changes it
    torch.testing.assert_close(gradient_map(model, pixels[1:]), grad[1:])
    other = (logits.argmax(-1) + 1) % 10
    assert not torch.allclose(gradient_map(model, pixels, labels=other), grad)

    # a bare encoder: the norm of the pooled (CLS) token
    patches = encoder.patch_embed(pixels).detach().requires_grad_(True)
    x = torch.cat([patches, encoder.cls_token.expand(2, -1, -1)], dim=1)
    for block in encoder.blocks:
        x = block(x)
    (expected,) = torch.autograd.grad(encoder.norm(x)[:, -1].norm(dim=-1).sum(), patches)
    torch.testing.assert_close(gradient_map(encoder, pixels), expected.norm(dim=-1).reshape(2, 4, 4))


def test_overfocus_numbers_on_known_maps():
    length = 100
    causal_uniform = torch.ones(length, length).tril()
    causal_uniform = causal_uniform / causal_uniform.sum(-1, keepdim=True)
    identity = torch.eye(length)
    sink = torch.zeros(length, length)
    sink[:, 0] = 1.0
    uniform = torch.full((length, length), 1.0 / length)

    assert attention_entropy(causal_uniform) == pytest.approx(1.0)
    assert attention_entropy(uniform) == pytest.approx(1.0)
    assert attention_entropy(identity) == pytest.approx(0.0)
    assert attention_entropy(sink) == pytest.approx(0.0)
    # top 1% of 100 keys is one key
    assert top_key_share(sink) == pytest.approx(1.0)
    assert top_key_share(identity) == pytest.approx(0.01)
    assert top_key_share(uniform) == pytest.approx(0.01)
    assert top_key_share(causal_uniform) == pytest.approx(sum(1 / (i + 1) for i in range(length)) / length)
    # fewer than 100 keys: still at least one key
    assert top_key_share(torch.eye(17)) == pytest.approx(1 / 17)

    grad = torch.ones(1, 10, 10)
    assert gradient_top_share(grad) == pytest.approx(0.05)
    grad[0, 3, 4] = 1000.0
    assert gradient_top_share(grad) == pytest.approx((1000.0 + 4) / (1000.0 + 99))

    metrics = overfocus_metrics({2: sink[None], 5: uniform[None]}, grad)
    assert metrics["layers"][2] == {"entropy": pytest.approx(0.0), "top_key_share": pytest.approx(1.0)}
    assert metrics["mean_entropy"] == pytest.approx(0.5)
    assert metrics["mean_top_key_share"] == pytest.approx(0.505)
    assert metrics["gradient_top_share"] == pytest.approx(1004 / 1099)


@pytest.fixture
def image_path(tmp_path):
    rng = np.random.default_rng(0)
    pixels = np.full((64, 64, 3), 240, dtype=np.uint8)
    pixels[20:50, 10:40] = rng.integers(0, 255, size=3)
    path = tmp_path / "shape.png"
    Image.fromarray(pixels).save(path)
    return path


def test_defocus_diagnose_writes_figures_and_numbers(tmp_path, image_path):
    saved = tmp_path / "vit-saved"
    _model("vit-tiny-causal", cls=DefocusForImageClassification).save_pretrained(saved)
    out = tmp_path / "out"
    rc = main(["--model", "mamba-tiny", "--model", str(saved), "--image", str(image_path), "--layers", "0", "-1",
               "--image-size", "32", "--out", str(out)])
    assert rc == 0
    for name in ("attention_maps.png", "cls_attention.png", "gradient_maps.png"):
        with Image.open(out / name) as figure:
            assert figure.format == "PNG" and min(figure.size) > 200
    report = json.loads((out / "diagnostics.json").read_text())
    assert [m["name"] for m in report["models"]] == ["mamba-tiny", "vit-saved"]
    for record, mixer in zip(report["models"], ["mamba", "attention"]):
        assert record["mixer"] == mixer and record["num_tokens"] == 17 and record["grid"] == [4, 4]
        assert sorted(record["layers"]) == ["0", "3"]
        for numbers in record["layers"].values():
            assert 0.0 <= numbers["entropy"] <= 1.0 and 1 / 17 <= numbers["top_key_share"] <= 1.0
        assert 1 / 16 <= record["gradient_top_share"] <= 1.0
        assert record["loss"] == "cross_entropy(predicted class)"
    # an untrained causal ViT attends uniformly over its visible keys
    assert report["models"][1]["mean_entropy"] > 0.99


def test_defocus_diagnose_errors(tmp_path, image_path, monkeypatch, capsys):
    assert main(["--model", "no-such-preset", "--image", str(image_path), "--out", str(tmp_path / "a")]) == 2
    assert "neither a directory nor a preset" in capsys.readouterr().err
    assert main(["--model", "mamba-tiny", "--image", str(image_path), "--layers", "4", "--image-size", "32",
                 "--out", str(tmp_path / "b")]) == 2
    assert "out of range" in capsys.readouterr().err

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if the viz extra were not installed
    assert main(["--model", "mamba-tiny", "--image", str(image_path), "--out", str(tmp_path / "c")]) == 2
    assert "pip install 'defocus-mllm[viz]'" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
    # the numbers alone need no matplotlib
    assert main(["--model", "mamba-tiny", "--image", str(image_path), "--layers", "1", "--image-size", "32",
                 "--no-figures", "--out", str(tmp_path / "d")]) == 0
    assert json.loads((tmp_path / "d" / "diagnostics.json").read_text())["models"][0]["layers"].keys() == {"1"}


def test_models_whose_folders_share_a_name_are_told_apart(tmp_path, image_path):
    for run in ("run1", "run2"):
        _model("mamba-tiny", seed=len(run)).save_pretrained(tmp_path / run / "final")
    paths = [str(tmp_path / run / "final") for run in ("run1", "run2")]
    assert main(["--model", paths[0], "--model", paths[1], "--image", str(image_path), "--layers", "0",
                 "--image-size", "32", "--no-figures", "--out", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "diagnostics.json").read_text())
    assert [m["name"] for m in report["models"]] == paths


@pytest.mark.parametrize("option, value", [("--top-key-fraction", "0"), ("--top-gradient-fraction", "1.5"),
                                           ("--top-key-fraction", "nan")])
def test_fractions_outside_zero_to_one_are_refused_naming_the_option(option, value, tmp_path, image_path, capsys):
    assert main(["--model", "mamba-tiny", "--image", str(image_path), option, value, "--no-figures",
                 "--out", str(tmp_path / "out")]) == 2
    assert f"{option[2:].replace('-', '_')}={float(value)!r} must be in (0, 1]" in capsys.readouterr().err
