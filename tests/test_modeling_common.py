"""The common model suite: every token mixer in `MIXER_CLASSES` x every encoder model class, checked against the
same contract (output types and shapes, hidden states, save / load, dtype and device loading, gradient
checkpointing, training, image sizes, determinism, batching, tracing, the Auto classes).

A mixer added to `MIXER_CLASSES` is covered with no edit here: configurations are built from the mixer's name and
small sizes, not from a preset. What one mixer or model class does that others do not (the release numerics, the
feature pyramid, the attention backends) is tested in its own module.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoBackbone, AutoConfig, AutoModel, AutoModelForImageClassification
from transformers.modeling_outputs import BackboneOutput, BaseModelOutputWithPooling

import defocus_mllm  # noqa: F401  (registers the Auto classes)
from defocus_mllm import DefocusBackbone, DefocusForImageClassification, DefocusVisionConfig, DefocusVisionModel
from defocus_mllm.encoder.mixers import MIXER_CLASSES
from defocus_mllm.encoder.modeling_defocus import DefocusImageClassifierOutput

MODEL_CLASSES = (DefocusVisionModel, DefocusForImageClassification, DefocusBackbone)
AUTO_CLASSES = {DefocusVisionModel: AutoModel, DefocusForImageClassification: AutoModelForImageClassification,
                DefocusBackbone: AutoBackbone}


def auto_from_pretrained(model_class: type, folder: Path) -> torch.nn.Module:
    """Load `folder` through the Auto class of `model_class`. This transformers' `AutoBackbone.from_pretrained` asks
    the Hub whether a local directory is a repository and fails (tests/test_backbone.py pins that), so a backbone is
    loaded by the class `AutoBackbone` maps the configuration to."""
    auto = AUTO_CLASSES[model_class]
    if auto is AutoBackbone:
        return auto._model_mapping[type(AutoConfig.from_pretrained(folder))].from_pretrained(folder)
    return auto.from_pretrained(folder)

# Mixers whose default CPU forward cannot be traced by `torch.compile(fullgraph=True)` / `torch.export`, with the
# environment that makes them traceable and the error the default path raises. The Mamba mixer's CPU kernels (the
# fused mixer op, the causal conv, the scan; `ops/cpu_scan.cpp`) are called through ctypes on raw data pointers:
# Dynamo cannot trace the ctypes call and export's fake tensors have no data pointer. The PyTorch path
# (`DEFOCUS_SCAN_BACKEND=torch` routes the mixer op to its PyTorch composition, `DEFOCUS_CONV_BACKEND=torch` the
# conv) is plain tensor code and traces.
UNTRACEABLE_BY_DEFAULT: dict[str, dict[str, Any]] = {
    "mamba": dict(traceable_env={"DEFOCUS_SCAN_BACKEND": "torch", "DEFOCUS_CONV_BACKEND": "torch"},
                  default_env={"DEFOCUS_SCAN_BACKEND": "cpu"},
                  compile_error=torch._dynamo.exc.Unsupported, export_error=RuntimeError,
                  export_match="data pointer"),
}


class DefocusModelTester:
    """Builds the tiny configuration, inputs and models of one `(mixer, model class)` pair, and knows what its
    outputs must look like. Sizes are chosen for speed: 2 blocks, width 32, 16x16 images of 8x8 patches."""

    def __init__(self, mixer: str, model_class: type, batch_size: int = 3, image_size: int = 16,
                 patch_size: int = 8, hidden_size: int = 32, num_hidden_layers: int = 2, num_labels: int = 5) -> None:
        self.mixer = mixer
        self.model_class = model_class
        self.batch_size = batch_size
        self.image_size = image_size
        self.patch_size = patch_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_labels = num_labels

    def get_config(self, **overrides: Any) -> DefocusVisionConfig:
        kwargs = dict(mixer=self.mixer, hidden_size=self.hidden_size, num_hidden_layers=self.num_hidden_layers,
                      intermediate_size=2 * self.hidden_size, state_size=8, time_step_rank=4, group_norm_size=16,
                      num_attention_heads=4, mlp_ratio=2.0, patch_size=self.patch_size, image_size=self.image_size,
                      num_labels=self.num_labels,
                      out_features=list(dict.fromkeys(["stem", "stage1", f"stage{self.num_hidden_layers}"])))
        kwargs.update(overrides)
        return DefocusVisionConfig(**kwargs)

    def create_model(self, seed: int = 0, **overrides: Any) -> torch.nn.Module:
        """A freshly initialised model in eval mode; its filters are moved off their initial values so that no
        check passes by a symmetry of the initialisation."""
        torch.manual_seed(seed)
        model = self.model_class(self.get_config(**overrides))
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, tensor in model.named_parameters():
                if name.endswith(("A_log", "freq")):
                    tensor.add_(0.1 * torch.randn(tensor.shape, generator=generator))
        return model.eval()

    def pixel_values(self, batch_size: Optional[int] = None, height: Optional[int] = None,
                     width: Optional[int] = None, seed: int = 1) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return torch.randn(batch_size or self.batch_size, 3, height or self.image_size, width or self.image_size,
                           generator=generator)

    def labels(self, batch_size: Optional[int] = None) -> torch.Tensor:
        return torch.arange(batch_size or self.batch_size) % self.num_labels

    def main_outputs(self, outputs: Any) -> tuple[torch.Tensor, ...]:
        """The tensors a model class is for: the last hidden state, the logits, the feature maps."""
        if self.model_class is DefocusVisionModel:
            return (outputs.last_hidden_state, outputs.pooler_output)
        if self.model_class is DefocusForImageClassification:
            return (outputs.logits, outputs.aux_logits)
        return tuple(outputs.feature_maps)

    def check_outputs(self, model: torch.nn.Module, outputs: Any, batch: int, height: int, width: int) -> None:
        grid_h, grid_w = height // self.patch_size, width // self.patch_size
        tokens = grid_h * grid_w + 1  # the CLS token is appended last
        if self.model_class is DefocusVisionModel:
            assert isinstance(outputs, BaseModelOutputWithPooling)
            assert outputs.last_hidden_state.shape == (batch, tokens, self.hidden_size)
            torch.testing.assert_close(outputs.pooler_output, outputs.last_hidden_state[:, -1])
        elif self.model_class is DefocusForImageClassification:
            assert isinstance(outputs, DefocusImageClassifierOutput)
            assert outputs.logits.shape == (batch, self.num_labels)
            assert outputs.aux_logits.shape == (batch, tokens - 1, self.num_labels)  # aux_loss_mode="per_token"
        else:
            assert isinstance(outputs, BackboneOutput)
            assert len(outputs.feature_maps) == len(model.out_features) == len(self.get_config().out_features)
            assert model.channels == [self.hidden_size] * len(model.out_features)
            for feature_map in outputs.feature_maps:
                assert feature_map.shape == (batch, self.hidden_size, grid_h, grid_w)
        for tensor in self.main_outputs(outputs):
            assert torch.isfinite(tensor).all()

    def untrained_by_design(self) -> list[str]:
        if self.model_class is DefocusBackbone and self.get_config().causal:
            return ["defocus.cls_token"]
        return []

    def loss(self, model: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        """A scalar to train on: the model's own loss where it has one, else a regression of its main outputs onto
        a fixed random target."""
        if self.model_class is DefocusForImageClassification:
            return model(pixel_values, labels=self.labels(pixel_values.shape[0])).loss
        outputs = self.main_outputs(model(pixel_values))
        generator = torch.Generator().manual_seed(7)
        return sum(torch.nn.functional.mse_loss(t, torch.randn(t.shape, generator=generator)) for t in outputs)


@pytest.fixture(params=[(mixer, cls) for mixer in MIXER_CLASSES for cls in MODEL_CLASSES],
                ids=lambda p: f"{p[0]}-{p[1].__name__}")
def tester(request) -> DefocusModelTester:
    return DefocusModelTester(*request.param)


@pytest.fixture(params=list(MIXER_CLASSES))
def mixer(request) -> str:
    return request.param


def _assert_same_outputs(a: Any, b: Any, tester: DefocusModelTester, **tolerance: float) -> None:
    for x, y in zip(tester.main_outputs(a), tester.main_outputs(b), strict=True):
        torch.testing.assert_close(x, y, **tolerance)


# ---------------------------------------------------------------------------------------------- outputs


def test_outputs_have_the_model_class_type_and_shapes(tester):
    model = tester.create_model()
    with torch.no_grad():
        outputs = model(tester.pixel_values())
    tester.check_outputs(model, outputs, tester.batch_size, tester.image_size, tester.image_size)


def test_tuple_outputs_hold_the_same_tensors_as_the_output_object(tester):
    model = tester.create_model()
    pixels = tester.pixel_values()
    with torch.no_grad():
        as_object = model(pixels, output_hidden_states=True)
        as_tuple = model(pixels, output_hidden_states=True, return_dict=False)
    expected = list(as_object.to_tuple())
    assert len(as_tuple) == len(expected)
    for got, want in zip(as_tuple, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_hidden_states_are_the_embedding_and_one_per_block(tester):
    model = tester.create_model()
    with torch.no_grad():
        outputs = model(tester.pixel_values(), output_hidden_states=True)
        plain = model(tester.pixel_values())
    tokens = (tester.image_size // tester.patch_size) ** 2 + 1
    assert len(outputs.hidden_states) == tester.num_hidden_layers + 1
    for hidden in outputs.hidden_states:
        assert hidden.shape == (tester.batch_size, tokens, tester.hidden_size)
    # the hidden states are extra outputs: asking for them changes nothing else
    _assert_same_outputs(outputs, plain, tester, rtol=0, atol=0)
    assert plain.hidden_states is None


def test_no_split_modules_name_module_classes_of_the_model(tester):
    model = tester.create_model()
    present = {type(m).__name__ for m in model.modules()}
    assert model._no_split_modules
    for name in model._no_split_modules:
        assert name in present, f"_no_split_modules names {name!r}, which is not a module class of the model"
        # one such module per block: the unit that may not be split across devices
        assert sum(type(m).__name__ == name for m in model.modules()) == tester.num_hidden_layers


# --------------------------------------------------------------------------------------------- save / load


def test_save_and_load_round_trip_through_safetensors(tester, tmp_path):
    model = tester.create_model()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert not list(tmp_path.glob("*.bin"))
    saved = load_file(str(tmp_path / "model.safetensors"))
    assert set(saved) == set(model.state_dict())
    loaded = type(model).from_pretrained(tmp_path).eval()
    for (name, a), (name_b, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert name == name_b
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"{name} changed in the round trip")
    pixels = tester.pixel_values()
    with torch.no_grad():
        _assert_same_outputs(model(pixels), loaded(pixels), tester, rtol=0, atol=0)


def test_loading_rebuilds_every_buffer_including_the_unsaved_ones(tester, tmp_path):
    """transformers builds the model on the meta device and fills in the saved weights (`low_cpu_mem_usage=True`
    asks for that explicitly; recent releases always do it): buffers that are not saved must be recomputed, not left
    empty or on the meta device."""
    model = tester.create_model()
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path, low_cpu_mem_usage=True).eval()
    tensors = dict(loaded.named_parameters()) | dict(loaded.named_buffers())
    assert not [name for name, t in tensors.items() if t.is_meta]
    for name, reference in (dict(model.named_parameters()) | dict(model.named_buffers())).items():
        torch.testing.assert_close(tensors[name], reference, rtol=0, atol=0, msg=f"{name} differs after loading")


def test_from_pretrained_with_torch_dtype_bfloat16_and_device_map_cpu(tester, tmp_path):
    model = tester.create_model()
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path, torch_dtype=torch.bfloat16, device_map="cpu").eval()
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in loaded.parameters()} == {"cpu"}
    pixels = tester.pixel_values()
    with torch.no_grad():
        reference, low = tester.main_outputs(model(pixels)), tester.main_outputs(loaded(pixels))
    for ref, got in zip(reference, low, strict=True):
        assert got.dtype == torch.bfloat16
        # bf16 keeps 8 bits of mantissa: the outputs agree to a few percent of their scale
        scale = ref.abs().max()
        assert (got.float() - ref).abs().max() < 0.1 * scale


def test_auto_classes_round_trip(tester, tmp_path):
    model = tester.create_model()
    model.save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    assert type(config) is DefocusVisionConfig
    assert config.to_diff_dict() | {"_name_or_path": ""} == model.config.to_diff_dict() | {"_name_or_path": ""}
    loaded = auto_from_pretrained(type(model), tmp_path).eval()
    assert type(loaded) is type(model)
    built = AUTO_CLASSES[type(model)].from_config(config)
    assert type(built) is type(model)
    pixels = tester.pixel_values()
    with torch.no_grad():
        _assert_same_outputs(model(pixels), loaded(pixels), tester, rtol=0, atol=0)


def test_a_fresh_process_loads_every_saved_pair_to_the_same_outputs(tmp_path):
    """Once for every (mixer, model class): nothing the saving process registered or cached is needed to load."""
    pairs = []
    pixels = DefocusModelTester(next(iter(MIXER_CLASSES)), DefocusVisionModel).pixel_values()
    torch.save(pixels, tmp_path / "pixels.pt")
    for mixer_name in MIXER_CLASSES:
        for cls in MODEL_CLASSES:
            tester = DefocusModelTester(mixer_name, cls)
            model = tester.create_model()
            folder = tmp_path / f"{mixer_name}-{cls.__name__}"
            model.save_pretrained(folder)
            with torch.no_grad():
                outputs = tester.main_outputs(model(pixels))
            torch.save(list(outputs), folder / "expected.pt")
            loader = "defocus_mllm" if cls is DefocusBackbone else "transformers"  # see `auto_from_pretrained`
            pairs.append((str(folder), loader, (AUTO_CLASSES[cls] if loader == "transformers" else cls).__name__))
    script = textwrap.dedent("""
        import json, sys
        import torch
        import transformers
        import defocus_mllm
        pixels = torch.load(sys.argv[2])
        for folder, module, name in json.loads(sys.argv[1]):
            model = getattr(sys.modules[module], name).from_pretrained(folder).eval()
            with torch.no_grad():
                out = model(pixels)
            got = list(out.feature_maps) if hasattr(out, "feature_maps") else (
                [out.logits, out.aux_logits] if hasattr(out, "logits") else [out.last_hidden_state, out.pooler_output])
            for a, b in zip(got, torch.load(folder + "/expected.pt"), strict=True):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
            print("ok", folder)
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                       os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(pairs), str(tmp_path / "pixels.pt")],
                          capture_output=True, text=True, timeout=300, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("ok ") == len(pairs)


# ---------------------------------------------------------------------------------------------- training


def _gradients(model: torch.nn.Module, tester: DefocusModelTester, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    tester.loss(model, pixels).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_gives_the_same_gradients(tester):
    model = tester.create_model().train()
    pixels = tester.pixel_values()
    plain = _gradients(model, tester, pixels)
    assert plain

    calls = []
    # on the block's first submodule: hooks of the checkpointed layer itself stay outside the checkpoint, and the
    # recomputation stops as soon as it has rebuilt what the backward needs, so a later submodule may not rerun
    norm = model.get_submodule(_first_block_path(model) + ".norm")
    handle = norm.register_forward_pre_hook(lambda *_: calls.append(1))
    # `activation_checkpointing_enable` is the newer name of the same switch
    getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    assert model.is_gradient_checkpointing
    checkpointed = _gradients(model, tester, pixels)
    handle.remove()
    assert len(calls) == 2  # the block ran again in the backward pass: checkpointing took effect
    assert checkpointed.keys() == plain.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


def _first_block_path(model: torch.nn.Module) -> str:
    return next(name for name, m in model.named_modules() if type(m).__name__ == "DefocusBlock")


def test_a_training_step_changes_the_weights_and_lowers_the_loss(tester):
    model = tester.create_model().train()
    pixels = tester.pixel_values()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(4):
        optimizer.zero_grad()
        loss = tester.loss(model, pixels)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    with torch.no_grad():
        final = tester.loss(model, pixels).item()
    assert final < losses[0], (losses, final)
    unchanged = [n for n, p in model.named_parameters() if p.requires_grad and torch.equal(p, before[n])]
    # every trainable tensor takes part in the loss but the CLS token of a causal backbone: appended last, it is
    # seen by no image token and dropped from the feature maps
    assert unchanged == tester.untrained_by_design(), f"not trained: {unchanged}"


# ------------------------------------------------------------------------------------------------ inputs


def test_other_image_sizes_give_outputs_on_their_own_grid(tester):
    """No part of the model depends on absolute positions by default (the filter works on distances, there is no
    absolute position table), so any image whose sides are multiples of the patch size goes through, square or
    not, and the outputs follow its grid."""
    model = tester.create_model()
    for height, width in ((8, 8), (24, 16), (32, 40)):
        with torch.no_grad():
            outputs = model(tester.pixel_values(batch_size=2, height=height, width=width))
        tester.check_outputs(model, outputs, 2, height, width)


def test_an_absolute_position_table_refuses_other_image_sizes(tester):
    """With `use_abs_pos_embed=True` the grid is fixed by `image_size`: the table is not interpolated, and another
    size is refused with an error naming the option rather than broadcast or cropped."""
    model = tester.create_model(use_abs_pos_embed=True)
    with torch.no_grad():
        tester.check_outputs(model, model(tester.pixel_values()), tester.batch_size, tester.image_size,
                             tester.image_size)
        with pytest.raises(ValueError, match="use_abs_pos_embed"):
            model(tester.pixel_values(height=24))


def test_image_sizes_off_the_patch_grid_are_refused(tester):
    model = tester.create_model()
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model(tester.pixel_values(height=tester.image_size + 4))


def test_forward_is_deterministic(tester):
    pixels = tester.pixel_values()
    model = tester.create_model(seed=3)
    again = tester.create_model(seed=3)
    with torch.no_grad():
        first, second, rebuilt = model(pixels), model(pixels), again(pixels)
    _assert_same_outputs(first, second, tester, rtol=0, atol=0)
    _assert_same_outputs(first, rebuilt, tester, rtol=0, atol=0)


def test_an_image_in_a_batch_gives_what_it_gives_alone(tester):
    model = tester.create_model()
    pixels = tester.pixel_values(batch_size=4)
    with torch.no_grad():
        batched = tester.main_outputs(model(pixels))
        for i in range(pixels.shape[0]):
            alone = tester.main_outputs(model(pixels[i:i + 1]))
            for b, a in zip(batched, alone, strict=True):
                torch.testing.assert_close(b[i:i + 1], a, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------ tracing


def _tracing_env(mixer_name: str, default: bool) -> dict[str, str]:
    entry = UNTRACEABLE_BY_DEFAULT.get(mixer_name)
    if entry is None:
        return {}
    return entry["default_env" if default else "traceable_env"]


def _traced_forward(how: str, model: torch.nn.Module) -> Callable[[torch.Tensor], Any]:
    if how == "compile":
        torch._dynamo.reset()
        # the "eager" backend: Dynamo captures the whole forward as one graph (fullgraph refuses any break) and
        # runs it without code generation, which would cost most of this module's time budget
        return torch.compile(model, backend="eager", fullgraph=True)
    example = torch.zeros(1, 3, 16, 16)
    return torch.export.export(model, (example,)).module()


def _model_to_trace(mixer: str, monkeypatch, default: bool) -> tuple[DefocusModelTester, torch.nn.Module, torch.Tensor]:
    """A one-block encoder of `mixer` and one image, under the backends `_tracing_env` picks."""
    for key, value in _tracing_env(mixer, default=default).items():
        monkeypatch.setenv(key, value)
    tester = DefocusModelTester(mixer, DefocusVisionModel, num_hidden_layers=1)
    return tester, tester.create_model(), tester.pixel_values(batch_size=1)


@pytest.mark.parametrize("how", ["compile", "export"])
def test_the_forward_traces_and_matches_eager(mixer, how, monkeypatch):
    tester, model, pixels = _model_to_trace(mixer, monkeypatch, default=False)
    with torch.no_grad():
        eager = model(pixels)
        traced = _traced_forward(how, model)(pixels)
    _assert_same_outputs(traced, eager, tester, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("how", ["compile", "export"])
@pytest.mark.parametrize("mixer_name", sorted(UNTRACEABLE_BY_DEFAULT))
def test_an_untraceable_default_forward_fails_as_documented(mixer_name, how, monkeypatch):
    entry = UNTRACEABLE_BY_DEFAULT[mixer_name]
    _, model, pixels = _model_to_trace(mixer_name, monkeypatch, default=True)
    with torch.no_grad():
        model(pixels)  # the default path itself runs
        with pytest.raises(entry[f"{how}_error"], match=entry.get(f"{how}_match")):
            _traced_forward(how, model)(pixels)
