"""Release checkpoints -> Hugging Face directories: layouts, safe loading, the numerics of docs/method.md §2.3, and
what the converter refuses by name (a wrong shape, non-finite weights, non-positive factors, a truncated file).

`release_forward` below is an independent functional implementation of the released network, written from the
specification and run directly on a release-layout state dict; the converted model must reproduce it.
"""

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import AutoModel, AutoModelForImageClassification

import defocus_mllm  # noqa: F401
from defocus_mllm import DefocusVisionConfig, DefocusVisionModel
from defocus_mllm.encoder.convert import CheckpointError, convert_checkpoint, load_checkpoint
from defocus_mllm.encoder.convert import main as convert_main
from helpers import truncate_file as _truncate
from release_checkpoint import CLASSES, DEPTH, GROUP, HIDDEN, INNER, PATCH, RANK, STATE, release_state_dict


def release_forward(sd, pixels, delta_scale=1.0, rope_scale=1.0, head="linear"):
    """docs/method.md §2.1-2.3, step by step, in float64. Returns (tokens after the final norm, main logits, aux logits)."""
    sd = {k: v.double() for k, v in sd.items()}
    x = F.conv2d(pixels.double(), sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=PATCH)
    x = torch.cat([x.flatten(2).transpose(1, 2), sd["cls_token"].expand(x.shape[0], 1, -1)], 1)
    length = x.shape[1]
    for i in range(DEPTH):
        p = f"blocks.{i}.mixer."
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * sd[f"blocks.{i}.norm.weight"]
        xz = h @ sd[p + "in_proj.weight"].T  # [B, L, 2D]
        u, z = xz[..., :INNER], xz[..., INNER:]
        w = sd[p + "conv1d.weight"][:, 0]  # [D, 4]
        conv = sum(F.pad(u, (0, 0, 3 - k, 0))[:, :length] * w[:, k] for k in range(4)) + sd[p + "conv1d.bias"]
        u = F.silu(conv)
        proj = u @ sd[p + "x_proj.weight"].T
        dt, B, C = proj[..., :RANK], proj[..., RANK:RANK + STATE], proj[..., RANK + STATE:]
        theta = (torch.arange(length, dtype=torch.float64) / rope_scale)[:, None] * sd[p + "freq"][None]
        def rotate(y):
            out = torch.empty_like(y)
            out[..., 0::2], out[..., 1::2] = -y[..., 1::2], y[..., 0::2]
            return y * theta.cos() + out * theta.sin()
        B, C = rotate(B), rotate(C)
        delta = F.softplus(dt @ sd[p + "dt_proj.weight"].T + sd[p + "dt_proj.bias"]) / delta_scale  # [B, L, D]
        A = -torch.exp(sd[p + "A_log"])
        s = torch.zeros(x.shape[0], INNER, STATE, dtype=torch.float64)
        ys = []
        for t in range(length):
            s = torch.exp(delta[:, t, :, None] * A) * s + (delta[:, t] * u[:, t])[..., None] * B[:, t, None, :]
            ys.append((s * C[:, t, None, :]).sum(-1))
        y = torch.stack(ys, 1)  # [B, L, D]
        groups = y.reshape(*y.shape[:2], INNER // GROUP, GROUP)
        y = (groups * torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + 1e-6)).reshape_as(y)
        y = (y + u * sd[p + "D"]) * F.silu(z)
        x = x + y @ sd[p + "out_proj.weight"].T
    x = F.layer_norm(x, (HIDDEN,), sd["norm.weight"], sd["norm.bias"], eps=1e-6)
    if head == "linear":
        apply = lambda name, t: t @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]  # noqa: E731
    else:
        apply = lambda name, t: torch.tanh(t @ sd[f"{name}.0.weight"].T + sd[f"{name}.0.bias"]) @ sd[  # noqa: E731
            f"{name}.2.weight"].T + sd[f"{name}.2.bias"]
    return x, apply("head", x[:, -1]), apply("head2", x[:, :-1])


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


class NotATensor:
    """Stands for the pickled training-config object of the release files."""

    def __init__(self):
        self.lr = 5e-4


class RunsCodeWhenUnpickled:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("head,delta_scale,rope_scale", [("linear", 1.0, 1.0), ("mlp", 2.0, 4.0)])
def test_converted_model_reproduces_the_release_numerics(tmp_path, head, delta_scale, rope_scale):
    sd = release_state_dict(head=head)
    torch.save({"model": sd, "config": NotATensor(), "epoch": 7}, tmp_path / "ckpt.pth")
    model = convert_checkpoint(tmp_path / "ckpt.pth", tmp_path / "hf", delta_scale_factor=delta_scale,
                               rope_scale_factor=rope_scale, group_norm_size=GROUP)
    assert model.config.head_type == head and model.config.num_labels == CLASSES
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path / "hf").eval()
    pixels = torch.randn(2, 3, 32, 24)
    tokens, main, aux = release_forward(sd, pixels, delta_scale, rope_scale, head)
    out = loaded(pixels)
    assert rel_err(out.logits, main) < 1e-4
    assert rel_err(out.aux_logits, aux) < 1e-4
    assert rel_err(loaded.defocus(pixels).last_hidden_state, tokens) < 1e-4


def test_pickled_objects_are_never_executed(tmp_path):
    marker = tmp_path / "code-ran"
    sd = release_state_dict()
    torch.save({"model": sd, "model_ema": release_state_dict(seed=1), "optimizer": {"state": {}},
                "config": RunsCodeWhenUnpickled(marker)}, tmp_path / "train.pth")
    loaded = load_checkpoint(tmp_path / "train.pth")
    assert not marker.exists()
    assert torch.equal(loaded["model"]["cls_token"], sd["cls_token"])
    ema = convert_checkpoint(tmp_path / "train.pth", use_ema=True, group_norm_size=GROUP)
    assert not marker.exists()
    assert torch.equal(ema.defocus.cls_token, release_state_dict(seed=1)["cls_token"])


def test_plain_and_detection_layouts(tmp_path):
    sd = release_state_dict()
    torch.save(sd, tmp_path / "plain.pth")
    plain = convert_checkpoint(tmp_path / "plain.pth", group_norm_size=GROUP)
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in sd.items() if not k.startswith("head")},
                "meta": {"epoch": 12}}, tmp_path / "det.pth")
    backbone = convert_checkpoint(tmp_path / "det.pth", tmp_path / "det_hf", group_norm_size=GROUP)
    assert isinstance(backbone, DefocusVisionModel)
    pixels = torch.randn(1, 3, 16, 16)
    assert torch.equal(backbone(pixels).last_hidden_state, plain.defocus(pixels).last_hidden_state)
    assert isinstance(AutoModel.from_pretrained(tmp_path / "det_hf"), DefocusVisionModel)


def test_cli_converts_and_reports_bad_files(tmp_path):
    sd = release_state_dict()
    torch.save({"model": sd}, tmp_path / "ckpt.pth")
    cmd = [sys.executable, "-m", "defocus_mllm.encoder.convert", str(tmp_path / "ckpt.pth"), str(tmp_path / "out"),
           "--group-norm-size", str(GROUP), "--image-size", "32"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "DefocusForImageClassification" in result.stdout
    assert AutoModelForImageClassification.from_pretrained(tmp_path / "out").config.image_size == 32
    (tmp_path / "broken.pth").write_bytes(b"not a checkpoint")
    result = subprocess.run(cmd[:3] + [str(tmp_path / "broken.pth"), str(tmp_path / "out2")], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2 and "broken.pth" in result.stderr
    assert not (tmp_path / "out2").exists()


def test_wrong_checkpoints_give_clear_errors(tmp_path):
    torch.save({"model": {"encoder.weight": torch.zeros(2)}}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="not a De-focus encoder"):
        convert_checkpoint(tmp_path / "other.pth")
    torch.save({"model": release_state_dict()}, tmp_path / "no_ema.pth")
    with pytest.raises(CheckpointError, match="model_ema"):
        convert_checkpoint(tmp_path / "no_ema.pth", use_ema=True)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match="group_norm_size=24"):
        convert_checkpoint(tmp_path / "no_ema.pth", group_norm_size=24)  # inner 64 is not a multiple of 24
    truncated = release_state_dict()
    del truncated["blocks.1.mixer.D"]
    torch.save(truncated, tmp_path / "truncated.pth")
    with pytest.raises(CheckpointError, match="blocks.1.mixer.D"):
        convert_checkpoint(tmp_path / "truncated.pth", group_norm_size=GROUP)


def test_release_initialisation_values():
    config = DefocusVisionConfig.from_preset("mamba-tiny")
    mixer = DefocusVisionModel(config).blocks[0].mixer
    n = config.state_size
    k = torch.arange(1, n + 1, dtype=torch.float32)
    assert torch.allclose(mixer.freq, (100 ** (-k / n) - 0.01) / 0.99)
    assert torch.allclose(mixer.A_log, torch.log(k).expand(config.intermediate_size, -1))
    assert torch.equal(mixer.D, torch.ones(config.intermediate_size))
    dt = F.softplus(mixer.dt_proj.bias)
    assert dt[0].item() == pytest.approx(1e-3, rel=1e-3) and dt[-1].item() == pytest.approx(0.1, rel=1e-3)
    bound = config.time_step_rank ** -0.5
    assert mixer.dt_proj.weight.abs().max() <= bound and mixer.dt_proj.weight.std() > bound / 3
    assert mixer.in_proj.weight.std().item() == pytest.approx(0.02, rel=0.15)


def _convert_cli(*args, capsys=None):
    """`defocus-convert ARGS`: in a fresh process, or in this one (faster) when `capsys` is given; a traceback
    escaping `main` fails the in-process call."""
    if capsys is None:
        cmd = [sys.executable, "-m", "defocus_mllm.encoder.convert", *map(str, args)]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    capsys.readouterr()
    returncode = convert_main([str(a) for a in args])
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, returncode, captured.out, captured.err)


def test_a_tensor_of_the_wrong_shape_is_named_with_both_shapes(tmp_path):
    sd = release_state_dict()
    sd["blocks.1.mixer.D"] = torch.ones(7)  # the inner width is 64
    torch.save({"model": sd}, tmp_path / "wrong.pth")
    with pytest.raises(CheckpointError, match=r"blocks\.1\.mixer\.D.*\(7,\).*\(64,\)"):
        convert_checkpoint(tmp_path / "wrong.pth", group_norm_size=GROUP)
    result = _convert_cli(tmp_path / "wrong.pth", tmp_path / "out", "--group-norm-size", GROUP)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "blocks.1.mixer.D" in result.stderr and "(7,)" in result.stderr and "(64,)" in result.stderr


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_weights_are_refused_unless_asked_for(tmp_path, bad, capsys):
    sd = release_state_dict()
    sd["blocks.0.mixer.out_proj.weight"][3, 5] = bad
    torch.save(sd, tmp_path / "nan.pth")
    with pytest.raises(CheckpointError, match=r"blocks\.0\.mixer\.out_proj\.weight.*(NaN|infinite)"):
        convert_checkpoint(tmp_path / "nan.pth", group_norm_size=GROUP)
    result = _convert_cli(tmp_path / "nan.pth", tmp_path / "out", "--group-norm-size", GROUP, capsys=capsys)
    assert result.returncode == 2 and "blocks.0.mixer.out_proj.weight" in result.stderr
    assert "--allow-non-finite" in result.stderr
    kept = convert_checkpoint(tmp_path / "nan.pth", group_norm_size=GROUP, allow_non_finite=True)
    assert not torch.isfinite(kept.defocus.blocks[0].mixer.out_proj.weight).all()
    result = _convert_cli(tmp_path / "nan.pth", tmp_path / "out", "--group-norm-size", GROUP, "--allow-non-finite",
                          capsys=capsys)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize("flag", ["--delta-scale-factor", "--rope-scale-factor"])
@pytest.mark.parametrize("value", ["0", "-2", "nan"])
def test_non_positive_scale_factors_are_refused(tmp_path, flag, value, capsys):
    torch.save(release_state_dict(), tmp_path / "ckpt.pth")
    result = _convert_cli(tmp_path / "ckpt.pth", tmp_path / "out", "--group-norm-size", GROUP, flag, value,
                          capsys=capsys)
    field = flag[2:].replace("-", "_")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert f"{field}=" in result.stderr and "positive" in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_truncated_safetensors_checkpoint_is_named_by_the_converter(tmp_path, capsys):
    save_file(release_state_dict(), str(tmp_path / "release.safetensors"))
    _truncate(tmp_path / "release.safetensors")
    with pytest.raises(CheckpointError, match="release.safetensors"):
        convert_checkpoint(tmp_path / "release.safetensors", group_norm_size=GROUP)
    result = _convert_cli(tmp_path / "release.safetensors", tmp_path / "out", "--group-norm-size", GROUP,
                          capsys=capsys)
    assert result.returncode == 2 and "release.safetensors" in result.stderr and "Traceback" not in result.stderr


def test_the_converter_strips_the_module_prefix_of_ddp_checkpoints(tmp_path):
    from defocus_mllm.encoder.convert import convert_checkpoint
    from release_checkpoint import GROUP, release_state_dict

    sd = release_state_dict()
    torch.save({"model": sd}, tmp_path / "plain.pth")
    torch.save({"model": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "ddp.pth")  # saved from a DDP wrap
    plain = convert_checkpoint(tmp_path / "plain.pth", group_norm_size=GROUP).state_dict()
    ddp = convert_checkpoint(tmp_path / "ddp.pth", group_norm_size=GROUP).state_dict()
    assert plain.keys() == ddp.keys()
    assert all(torch.equal(plain[k], ddp[k]) for k in plain)
    assert torch.equal(ddp["defocus.cls_token"], sd["cls_token"])
