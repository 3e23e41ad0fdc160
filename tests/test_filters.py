"""The bandpass filter (encoder/filters.py): both halves and their two rotary layouts, the learnable / fixed / none
setup every mixer shares, and the state-dict names that released checkpoints and saved models rely on."""

import pytest
import torch
from torch import nn

from defocus_mllm import DefocusForImageClassification, DefocusVisionModel
from defocus_mllm.encoder.filters import BandpassFilter, register_filter_tensor
from defocus_mllm.encoder.mixers import DefocusAttentionMixer, DefocusMambaMixer, DefocusRetentionMixer
from helpers import tiny_config as tiny


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


def test_mamba_rotation_turns_each_element_by_its_own_frequency():
    """The released indexing (docs/method.md §2.3 step 4): elements 2i and 2i+1 use freq[2i] and freq[2i+1]."""
    mixer = DefocusMambaMixer(tiny("mamba-tiny", rope_scale_factor=4.0))
    assert isinstance(mixer, BandpassFilter) and mixer.freq.shape == (16,)
    with torch.no_grad():
        mixer.freq.copy_(torch.rand(16, generator=torch.Generator().manual_seed(0)))
    y = torch.randn(2, 11, 16, dtype=torch.float64)
    n = torch.arange(11, dtype=torch.float64)[:, None] / 4.0
    theta = n * mixer.freq.double()  # [L, N]: one angle per element
    even, odd = y[..., 0::2], y[..., 1::2]
    expected = torch.empty_like(y)
    expected[..., 0::2] = even * theta[:, 0::2].cos() - odd * theta[:, 0::2].sin()
    expected[..., 1::2] = odd * theta[:, 1::2].cos() + even * theta[:, 1::2].sin()
    torch.testing.assert_close(mixer.rotate(y), expected, rtol=0, atol=1e-6)
    # several tensors at once: one set of angles, a tuple back
    first, second = mixer.rotate(y, 2 * y)
    torch.testing.assert_close(second, 2 * first)


def test_head_rotation_is_a_rotation_of_each_pair_and_relative():
    filt = DefocusAttentionMixer(tiny("vit-tiny")).filter
    with torch.no_grad():
        filt.freq.copy_(torch.rand(filt.freq.shape, generator=torch.Generator().manual_seed(1)))
    x = torch.randn(1, 4, 9, 16)
    rotated = filt.rotate(x)
    # pairs keep their length
    torch.testing.assert_close(rotated.view(1, 4, 9, 8, 2).norm(dim=-1), x.view(1, 4, 9, 8, 2).norm(dim=-1))
    # q_i . k_j depends on positions only through i - j: the same q and k at every position
    same = torch.randn(1, 4, 1, 16).expand(1, 4, 9, 16)
    r = filt.rotate(same)
    scores = r @ r.transpose(-1, -2)  # [1, 4, 9, 9]
    torch.testing.assert_close(scores[..., 3, 1], scores[..., 8, 6], rtol=0, atol=1e-5)
    torch.testing.assert_close(scores[..., 2, 2], scores[..., 7, 7], rtol=0, atol=1e-5)


@pytest.mark.parametrize("overrides,params,buffers", [
    ({}, {"A_log", "freq"}, set()),
    ({"rope_mode": "fixed"}, {"A_log"}, {"freq"}),
    ({"use_rope": False}, {"A_log"}, set()),
])
def test_mamba_filter_modes_keep_the_released_names(overrides, params, buffers):
    """Mamba's filter tensors sit on the mixer itself: `blocks.{i}.mixer.A_log` / `.freq`, as in the release."""
    model = DefocusVisionModel(tiny("mamba-tiny", **overrides))
    mixer = model.blocks[1].mixer
    own = {n for n, _ in mixer.named_parameters(recurse=False)} - {"D"}
    assert own == params and {n for n, _ in mixer.named_buffers(recurse=False)} == buffers
    keys = set(model.state_dict())
    assert "blocks.1.mixer.A_log" in keys and ("blocks.1.mixer.freq" in keys) == ("freq" in params | buffers)
    assert not any(".filter." in k for k in keys)
    assert mixer.log_decay().shape == (128, 16) and torch.all(mixer.log_decay() < 0)


def test_head_filters_keep_their_names():
    for name in ("vit-tiny", "retnet-tiny"):
        keys = set(DefocusVisionModel(tiny(name)).state_dict())
        assert {"blocks.0.mixer.filter.A_log", "blocks.0.mixer.filter.freq"} <= keys
    assert isinstance(DefocusRetentionMixer(tiny("retnet-tiny")).filter, BandpassFilter)


def test_register_filter_tensor_modes():
    owner = nn.Module()
    register_filter_tensor(owner, "a", "learnable", torch.ones(2))
    register_filter_tensor(owner, "b", "fixed", torch.ones(2))
    register_filter_tensor(owner, "c", "none", torch.ones(2))
    assert isinstance(owner.a, nn.Parameter) and "b" in dict(owner.named_buffers()) and owner.c is None
    assert set(owner.state_dict()) == {"a", "b"}
    with pytest.raises(ValueError, match="must be one of"):
        register_filter_tensor(owner, "d", "frozen", torch.ones(2))

