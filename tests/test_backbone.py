"""`DefocusBackbone`: the encoder as a Hugging Face backbone (stages, feature maps, pyramid, loading)."""

import pytest
import torch
from transformers import AutoBackbone, AutoConfig

import defocus_mllm  # noqa: F401  (registers the Auto classes)
from defocus_mllm import DefocusBackbone, DefocusVisionConfig, DefocusVisionModel
from defocus_mllm.encoder.convert import convert_checkpoint
from helpers import TINY_PRESETS as PRESETS, tiny_encoder_config as tiny
from release_checkpoint import GROUP, release_state_dict

def to_map(tokens, height, width, patch=8):
    """`[B, L, C]` encoder tokens (CLS last) -> `[B, C, H/p, W/p]`."""
    return tokens[:, :-1].reshape(tokens.shape[0], height // patch, width // patch, -1).permute(0, 3, 1, 2)


def test_config_stages_follow_the_backbone_conventions():
    config = DefocusVisionConfig.from_preset("vit-tiny", out_indices=[1, 3])
    assert config.stage_names == ["stem", "stage1", "stage2", "stage3", "stage4"]
    assert (config.out_features, config.out_indices) == (["stage1", "stage3"], [1, 3])
    assert DefocusVisionConfig.from_preset("vit-tiny").out_features == ["stage4"]  # default: the last stage
    config.out_features = ["stem", "stage4"]
    assert config.out_indices == [0, 4]
    again = DefocusVisionConfig.from_dict(config.to_dict())
    assert (again.out_features, again.out_indices) == (["stem", "stage4"], [0, 4])
    with pytest.raises(ValueError, match="stage_names"):
        DefocusVisionConfig.from_preset("vit-tiny", out_features=["stage9"])


@pytest.mark.parametrize("mixer", sorted(PRESETS))
def test_feature_map_shapes_for_every_mixer_and_size(mixer):
    backbone = AutoBackbone.from_config(tiny(mixer, out_indices=[0, 2, 3])).eval()
    assert isinstance(backbone, DefocusBackbone)
    assert backbone.channels == [32, 32, 32]
    for height, width in [(32, 32), (24, 40), (8, 8)]:
        out = backbone(torch.randn(2, 3, height, width), output_hidden_states=True)
        assert [tuple(f.shape) for f in out.feature_maps] == [(2, 32, height // 8, width // 8)] * 3
        assert len(out.hidden_states) == 4 and out.hidden_states[0].shape == (2, height * width // 64 + 1, 32)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        backbone(torch.randn(1, 3, 20, 16))


@pytest.mark.parametrize("mixer", sorted(PRESETS))
def test_feature_maps_are_the_normalised_hidden_states(mixer):
    config = tiny(mixer, out_features=["stem", "stage1", "stage3"])
    encoder = DefocusVisionModel(config).eval()
    backbone = DefocusBackbone(config).eval()
    backbone.defocus.load_state_dict(encoder.state_dict())
    pixels = torch.randn(2, 3, 16, 24)
    hidden = encoder(pixels, output_hidden_states=True).hidden_states
    out = backbone(pixels, output_hidden_states=True)
    assert all(torch.equal(a, b) for a, b in zip(out.hidden_states, hidden))
    # intermediate stages: the final LayerNorm applied to the residual stream; the last stage: last_hidden_state
    expected = [encoder.norm(hidden[0]), encoder.norm(hidden[1]), hidden[3]]
    for feature, tokens in zip(out.feature_maps, expected):
        torch.testing.assert_close(feature, to_map(tokens, 16, 24), rtol=0, atol=0)

    raw = DefocusBackbone(tiny(mixer, out_indices=[1], apply_layernorm=False, reshape_hidden_states=False)).eval()
    raw.load_state_dict(backbone.state_dict())
    assert torch.equal(raw(pixels).feature_maps[0], hidden[1][:, :-1])  # [B, L-1, C], residual stream as is


def test_simple_feature_pyramid_scales():
    pixels = torch.randn(1, 3, 32, 48)  # a 4x6 grid of patches
    for out_indices in ([3], [0, 1, 2, 3]):
        backbone = DefocusBackbone(tiny(out_indices=out_indices, backbone_feature_pyramid=True)).eval()
        assert backbone.channels == [32] * 4
        shapes = [tuple(f.shape[-2:]) for f in backbone(pixels).feature_maps]
        assert shapes == [(16, 24), (8, 12), (4, 6), (2, 3)]  # strides p/4, p/2, p, 2p
    one_patch = backbone(torch.randn(1, 3, 8, 8)).feature_maps
    assert [tuple(f.shape[-2:]) for f in one_patch] == [(4, 4), (2, 2), (1, 1), (1, 1)]
    with pytest.raises(ValueError, match="1 or 4 out_features"):
        DefocusBackbone(tiny(out_indices=[1, 2], backbone_feature_pyramid=True))


def test_converted_detection_checkpoint_loads_with_no_missing_keys(tmp_path):
    sd = release_state_dict()
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in sd.items() if not k.startswith("head")},
                "meta": {"epoch": 12}}, tmp_path / "det.pth")
    encoder = convert_checkpoint(tmp_path / "det.pth", tmp_path / "det_hf", group_norm_size=GROUP)
    backbone, info = DefocusBackbone.from_pretrained(tmp_path / "det_hf", out_indices=[0, 1, 2],
                                                     output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert isinstance(AutoBackbone.from_config(AutoConfig.from_pretrained(tmp_path / "det_hf")), DefocusBackbone)
    pixels = torch.randn(2, 3, 16, 24)
    hidden = encoder(pixels, output_hidden_states=True).hidden_states
    features = backbone.eval()(pixels).feature_maps
    for feature, tokens in zip(features, [encoder.norm(hidden[0]), encoder.norm(hidden[1]), hidden[2]]):
        assert torch.equal(feature, to_map(tokens, 16, 24))
    # a classification checkpoint loads too: its heads are the only keys left over
    sd_dir = tmp_path / "cls_hf"
    torch.save(sd, tmp_path / "cls.pth")
    convert_checkpoint(tmp_path / "cls.pth", sd_dir, group_norm_size=GROUP)
    _, info = DefocusBackbone.from_pretrained(sd_dir, output_loading_info=True)
    assert not info["missing_keys"] and all(k.startswith("head") for k in info["unexpected_keys"])


def test_auto_backbone_from_pretrained_on_a_local_directory(tmp_path):
    DefocusBackbone(tiny("attention", out_indices=[2])).save_pretrained(tmp_path)
    try:
        backbone = AutoBackbone.from_pretrained(str(tmp_path))
    except Exception as err:  # transformers 5.x asks the Hub whether the name is a repository before looking on disk
        if type(err).__name__ in ("HFValidationError", "ConnectError", "OfflineModeIsEnabled"):
            pytest.xfail(f"this transformers' AutoBackbone.from_pretrained rejects local directories: {err}")
        raise
    assert isinstance(backbone, DefocusBackbone) and backbone.out_features == ["stage2"]
