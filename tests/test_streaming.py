"""Streaming causal encoding (docs/streaming.md): an image fed a few patch rows at a time, or a video frame after
frame, with the carried `past_state`, equals the whole forward; Mamba's and RetNet's state does not grow with the
stream."""

import pytest
import torch

from defocus_mllm import DefocusVisionConfig
from defocus_mllm.encoder import DEFOCUS_PRESETS, DefocusVisionModel
from defocus_mllm.encoder.modeling_defocus import DefocusStreamState
from defocus_mllm.ops import available_backends, available_mamba_mixer_backends, selective_scan

CAUSAL_PRESETS = sorted(name for name, preset in DEFOCUS_PRESETS.items() if preset.get("causal", True))
# Small widths with every preset's own options (filter modes, rope / delta scale factors, group norm, MLP ratio)
SHRINK = dict(hidden_size=32, num_hidden_layers=2, intermediate_size=64, num_attention_heads=4, time_step_rank=4,
              group_norm_size=16, patch_size=8, image_size=32)
TOL = dict(rtol=0, atol=1e-5)


def tiny_model(name: str, seed: int = 0, **overrides) -> DefocusVisionModel:
    torch.manual_seed(seed)
    model = DefocusVisionModel(DefocusVisionConfig.from_preset(name, **{**SHRINK, **overrides})).eval()
    # trained-looking filters: a random decay and random frequencies, not the initial values alone
    with torch.no_grad():
        for name_, param in model.named_parameters():
            if name_.endswith(("A_log", "freq")):
                param.add_(0.3 * torch.randn_like(param))
    return model


@pytest.fixture
def scan_backend(request, monkeypatch):
    """Force the whole forward's scan backend; a stream's scan goes to one that carries a state."""
    monkeypatch.delenv("DEFOCUS_MIXER_BACKEND", raising=False)
    monkeypatch.setenv("DEFOCUS_SCAN_BACKEND", request.param)
    return request.param


@pytest.fixture
def mixer_backend(request, monkeypatch):
    monkeypatch.delenv("DEFOCUS_SCAN_BACKEND", raising=False)
    monkeypatch.setenv("DEFOCUS_MIXER_BACKEND", request.param)
    return request.param


@pytest.mark.parametrize("name", CAUSAL_PRESETS)
@pytest.mark.parametrize("rows", [1, 2, 3, 4])  # 3 does not divide the 4-row grid; 4 is the whole image
@torch.no_grad()
def test_an_image_encoded_in_row_chunks_equals_the_whole_forward(name, rows):
    model = tiny_model(name)
    image = torch.randn(2, 3, 32, 40)  # a 4 x 5 patch grid: rows are not square
    whole = model(image)
    streamed = model.encode_rows(image, rows_per_chunk=rows)
    assert streamed.last_hidden_state.shape == whole.last_hidden_state.shape == (2, 21, 32)
    torch.testing.assert_close(streamed.last_hidden_state, whole.last_hidden_state, **TOL)
    torch.testing.assert_close(streamed.pooler_output, whole.pooler_output, **TOL)
    assert streamed.past_state.position_offset == 21 and streamed.past_state.finalized


@pytest.mark.parametrize("attention_backend", ["chunked", "sdpa"])
@torch.no_grad()
def test_a_vit_stream_equals_the_whole_forward_on_each_attention_path(attention_backend):
    # "chunked" (the CPU default): each chunk's queries at their offset in ops.decay_attention's tiles; "sdpa": one
    # call with the chunk's [H, l, n + l] bias
    model = tiny_model("vit-tiny")
    for block in model.blocks:
        block.mixer.attention_backend = attention_backend
    image = torch.randn(2, 3, 32, 40)
    whole = model(image)
    for rows in (1, 3):
        streamed = model.encode_rows(image, rows_per_chunk=rows)
        torch.testing.assert_close(streamed.last_hidden_state, whole.last_hidden_state, **TOL)


@pytest.mark.parametrize("name", ["mamba-tiny", "retnet-tiny", "vit-tiny", "vit-small", "mamba-large-384"])
@pytest.mark.parametrize("frames_per_chunk", [1, 2])
@torch.no_grad()
def test_a_video_fed_frame_after_frame_equals_its_frames_encoded_as_one_sequence(name, frames_per_chunk):
    model = tiny_model(name)
    video = torch.randn(2, 3, 3, 16, 24)  # 3 frames of 2 x 3 patches
    whole = model(video)
    # the concatenated sequence: frame after frame, row-major inside a frame, then the CLS token
    tokens = torch.cat([model.patch_embed(video[:, t]) for t in range(3)] + [model.cls_token.expand(2, -1, -1)], 1)
    torch.testing.assert_close(model.embed(video), tokens, rtol=0, atol=0)
    streamed = model.encode_video(video, frames_per_chunk=frames_per_chunk)
    assert streamed.last_hidden_state.shape == (2, 3 * 6 + 1, 32)
    torch.testing.assert_close(streamed.last_hidden_state, whole.last_hidden_state, **TOL)


@torch.no_grad()
def test_hand_fed_chunks_a_separate_finalize_and_the_hidden_states_equal_the_whole_forward():
    model = tiny_model("retnet-tiny")
    image = torch.randn(1, 3, 32, 32)
    whole = model(image, output_hidden_states=True)
    state, outputs, hidden = None, [], []
    for top in (0, 8, 24):  # chunks of 1, 2 and 1 patch rows
        out = model(image[:, :, top:top + (16 if top == 8 else 8)], past_state=state, use_cache=True,
                    finalize=False, output_hidden_states=True)
        assert out.pooler_output is None  # no CLS token before the stream is finalized
        state = out.past_state
        outputs.append(out.last_hidden_state)
        hidden.append(out.hidden_states)
    assert state.position_offset == 16 and not state.finalized
    final = model.finalize(state)
    assert final.last_hidden_state.shape == (1, 1, 32)
    torch.testing.assert_close(torch.cat(outputs + [final.last_hidden_state], 1), whole.last_hidden_state, **TOL)
    torch.testing.assert_close(final.pooler_output, whole.pooler_output, **TOL)
    for layer, whole_layer in enumerate(whole.hidden_states):
        torch.testing.assert_close(torch.cat([h[layer] for h in hidden], 1), whole_layer[:, :-1], **TOL)
    with pytest.raises(ValueError, match="finalized"):
        model(image, past_state=state)


@pytest.mark.parametrize("name", ["mamba-tiny", "retnet-tiny", "vit-tiny"])
@torch.no_grad()
def test_an_absolute_position_embedding_is_spatial_in_chunks_and_frames(name):
    model = tiny_model(name, use_abs_pos_embed=True)
    with torch.no_grad():
        model.pos_embed.normal_()
    image = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(model.encode_rows(image, 3).last_hidden_state, model(image).last_hidden_state, **TOL)
    video = torch.randn(1, 2, 3, 32, 32)
    torch.testing.assert_close(model.encode_video(video).last_hidden_state, model(video).last_hidden_state, **TOL)
    tokens = model.embed(video)
    torch.testing.assert_close(tokens[:, 16:32] - model.patch_embed(video[:, 1]), model.pos_embed[0].expand(1, -1, -1))


@pytest.mark.parametrize("scan_backend", [b for b in ("torch", "cpu") if b in available_backends()], indirect=True)
@pytest.mark.parametrize("name", ["mamba-tiny", "mamba-large-384"])
@torch.no_grad()
def test_the_stream_equals_the_whole_forward_with_each_cuda_free_scan_backend(scan_backend, name):
    model = tiny_model(name)
    image = torch.randn(2, 3, 32, 48)
    whole = model(image).last_hidden_state  # the forced backend ("cpu": the native kernel)
    torch.testing.assert_close(model.encode_rows(image, 3).last_hidden_state, whole, **TOL)


@pytest.mark.parametrize("mixer_backend", available_mamba_mixer_backends(), indirect=True)
@torch.no_grad()
def test_the_stream_equals_the_whole_forward_with_each_mamba_mixer_backend(mixer_backend):
    model = tiny_model("mamba-small")
    image = torch.randn(2, 3, 40, 32)
    video = torch.randn(1, 3, 3, 16, 16)
    torch.testing.assert_close(model.encode_rows(image, 2).last_hidden_state, model(image).last_hidden_state, **TOL)
    torch.testing.assert_close(model.encode_video(video).last_hidden_state, model(video).last_hidden_state, **TOL)


@pytest.mark.parametrize("backend", available_backends())
def test_every_scan_backend_continues_a_split_scan(backend):
    # backends with `carries_state` take the state; the others are continued by linearity around them
    torch.manual_seed(0)
    u, delta, B, C = torch.randn(2, 6, 11), torch.rand(2, 6, 11), torch.randn(2, 4, 11), torch.randn(2, 4, 11)
    A = -torch.rand(6, 4) - 0.1
    y, s = selective_scan(u, delta, A, B, C, backend=backend, return_final_state=True)
    y1, s1 = selective_scan(u[..., :4], delta[..., :4], A, B[..., :4], C[..., :4], backend=backend,
                            return_final_state=True)
    y2, s2 = selective_scan(u[..., 4:], delta[..., 4:], A, B[..., 4:], C[..., 4:], backend=backend,
                            initial_state=s1, return_final_state=True)
    torch.testing.assert_close(torch.cat([y1, y2], -1), y, **TOL)
    torch.testing.assert_close(s2, s, **TOL)


def state_shapes(state: DefocusStreamState) -> list[tuple[int, ...]]:
    return [tuple(t.shape) for t in state.tensors()]


@pytest.mark.parametrize("name", ["mamba-tiny", "mamba-large-384", "retnet-tiny", "retnet-tiny-causal"])
@torch.no_grad()
def test_the_mamba_and_retnet_state_does_not_depend_on_the_number_of_tokens(name):
    model = tiny_model(name)
    cfg = model.config
    sizes = []
    for height in (8, 32, 96):  # 4, 16 and 48 tokens
        out = model.encode_rows(torch.randn(2, 3, height, 32), rows_per_chunk=1, finalize=False)
        sizes.append((state_shapes(out.past_state), out.past_state.num_bytes()))
    assert sizes[0] == sizes[1] == sizes[2]
    shapes = sizes[0][0]
    if cfg.mixer == "mamba":  # per layer: the conv window and the scan state
        expected = [(2, cfg.conv_kernel - 1, cfg.intermediate_size), (2, cfg.intermediate_size, cfg.state_size)]
    else:  # per layer: the recurrent state [B, H, d_k, d_v]
        heads = cfg.num_attention_heads
        expected = [(2, heads, cfg.hidden_size // heads, cfg.intermediate_size // heads)]
    assert shapes == expected * cfg.num_hidden_layers


@torch.no_grad()
def test_the_vit_key_value_cache_grows_with_the_stream():
    model = tiny_model("vit-tiny")
    bytes_per_token = 2 * model.config.num_hidden_layers * model.config.hidden_size * 4  # keys and values, fp32
    for height, tokens in ((8, 4), (32, 16)):
        state = model.encode_rows(torch.randn(1, 3, height, 32), rows_per_chunk=1, finalize=False).past_state
        assert state.num_bytes() == tokens * bytes_per_token


def test_use_cache_alone_as_llava_passes_it_is_the_whole_forward():
    model = tiny_model("mamba-tiny")
    image = torch.randn(2, 3, 32, 32)
    whole = model(image, output_hidden_states=-2, return_dict=True)
    as_llava = model(image, use_cache=True, output_hidden_states=-2, return_dict=True)
    assert as_llava.pooler_output is not None and len(as_llava.hidden_states) == len(whole.hidden_states)
    torch.testing.assert_close(as_llava.last_hidden_state, whole.last_hidden_state, rtol=0, atol=0)


def test_streams_are_refused_where_they_make_no_sense():
    noncausal = tiny_model("vit-tiny-noncausal")
    with pytest.raises(ValueError, match="non-causal"):
        noncausal.encode_rows(torch.randn(1, 3, 16, 16), 1)
    model = tiny_model("mamba-tiny")
    with pytest.raises(ValueError, match="rows_per_chunk=0"):
        model.encode_rows(torch.randn(1, 3, 16, 16), 0)
    with pytest.raises(ValueError, match="empty stream"):
        model(None, past_state=DefocusStreamState(len(model.blocks)), finalize=True)
    with pytest.raises(ValueError, match="needs use_cache=True"):
        model(torch.randn(1, 3, 16, 16), finalize=False)
    with pytest.raises(ValueError, match="layers"):
        model(torch.randn(1, 3, 16, 16), past_state=DefocusStreamState(7))
    pos = tiny_model("mamba-tiny", use_abs_pos_embed=True)
    with pytest.raises(ValueError, match="fixes the grid to 4x4"):
        pos.encode_rows(torch.randn(1, 3, 32, 40), 1)


def test_the_stream_is_differentiable_through_the_carried_state():
    model = tiny_model("mamba-tiny")
    image = torch.randn(1, 3, 24, 16)
    weights = torch.randn(1, 7, 32)
    whole = torch.autograd.grad((model(image).last_hidden_state * weights).sum(), model.parameters())
    streamed = torch.autograd.grad((model.encode_rows(image, 2).last_hidden_state * weights).sum(),
                                   model.parameters())
    for g_stream, g_whole in zip(streamed, whole):
        torch.testing.assert_close(g_stream, g_whole, rtol=1e-4, atol=1e-5)


def test_the_streaming_benchmark_runs_quick():
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(repo / "benchmarks" / "bench_streaming.py"), "--quick",
                           "--models", "Mamba-S", "RetNet-S", "--tokens-per-chunk", "8"], cwd=repo,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    for model in ("Mamba-S", "RetNet-S"):
        modes = [line.split()[4] for line in lines if line.startswith(model)]
        assert modes == ["whole", "rows", "whole", "rows", "whole", "frame"], proc.stdout
    # --tokens-per-chunk: 2 rows of the 4-patch-wide image, 1 row of the 8-wide one, 8 tokens per chunk at both
    rows = [line.split() for line in lines if line.startswith("Mamba-S") and " rows " in line]
    assert [r[5] for r in rows] == ["x2", "x1"] and [r[6] for r in rows] == ["8", "8"], proc.stdout
    # the state column (MiB, last) of the streamed rows is the same at both image sizes (32^2 and 64^2)
    states = [float(r[-1]) for r in rows]
    assert len(states) == 2 and states[0] == states[1] > 0, proc.stdout
    # the peak after the first quarter of a stream (next to last) is a high-water mark: never above the whole peak
    assert all(0 <= float(r[-2]) <= float(r[-3]) for r in rows), proc.stdout
