"""The converter, the encoder config and the file readers refuse nonsense with an error that names what is wrong:
the key and both shapes, non-finite weights, non-positive sizes and factors, truncated weight and data files."""

import math
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import defocus_mllm  # noqa: F401
from defocus_mllm import DefocusVisionConfig, DefocusVisionModel
from defocus_mllm.encoder.convert import CheckpointError, convert_checkpoint
from defocus_mllm.encoder.convert import main as convert_main
from release_checkpoint import GROUP, release_state_dict


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


POSITIVE_FIELDS = ["hidden_size", "num_hidden_layers", "intermediate_size", "state_size", "time_step_rank",
                   "conv_kernel", "patch_size", "image_size", "num_channels", "rope_scale_factor",
                   "delta_scale_factor"]


@pytest.mark.parametrize("field", POSITIVE_FIELDS)
@pytest.mark.parametrize("value", [0, -1])
def test_config_sizes_must_be_positive_and_the_field_is_named(field, value):
    with pytest.raises(ValueError, match=rf"{field}={value} must be positive"):
        DefocusVisionConfig.from_preset("mamba-tiny", **{field: value})


@pytest.mark.parametrize("preset", ["vit-tiny", "retnet-tiny"])
def test_config_heads_must_be_positive(preset):
    with pytest.raises(ValueError, match=r"num_attention_heads=0 must be positive"):
        DefocusVisionModel(DefocusVisionConfig.from_preset(preset, num_attention_heads=0))  # checked by the mixer


def test_a_saved_config_with_zero_layers_does_not_load(tmp_path):
    DefocusVisionModel(DefocusVisionConfig.from_preset("mamba-tiny", num_hidden_layers=1)).save_pretrained(tmp_path)
    config = (tmp_path / "config.json").read_text().replace('"num_hidden_layers": 1', '"num_hidden_layers": 0')
    (tmp_path / "config.json").write_text(config)
    with pytest.raises(ValueError, match="num_hidden_layers=0 must be positive"):
        DefocusVisionModel.from_pretrained(tmp_path)


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_a_truncated_safetensors_checkpoint_is_named_by_the_converter(tmp_path, capsys):
    save_file(release_state_dict(), str(tmp_path / "release.safetensors"))
    _truncate(tmp_path / "release.safetensors")
    with pytest.raises(CheckpointError, match="release.safetensors"):
        convert_checkpoint(tmp_path / "release.safetensors", group_norm_size=GROUP)
    result = _convert_cli(tmp_path / "release.safetensors", tmp_path / "out", "--group-norm-size", GROUP,
                          capsys=capsys)
    assert result.returncode == 2 and "release.safetensors" in result.stderr and "Traceback" not in result.stderr


def test_a_truncated_model_directory_is_named_when_loaded(tmp_path):
    from defocus_mllm.llava import load_vision_tower
    from defocus_mllm.training.llava_setup import load_projector
    from helpers import build_tiny_llava

    DefocusVisionModel(DefocusVisionConfig.from_preset("mamba-tiny", num_hidden_layers=1)).save_pretrained(
        tmp_path / "tower")
    _truncate(tmp_path / "tower" / "model.safetensors")
    with pytest.raises(ValueError, match=r"tower/model\.safetensors.*truncated"):
        load_vision_tower(tmp_path / "tower")
    model, _ = build_tiny_llava()
    projector = model.model.multi_modal_projector.state_dict()
    save_file({k: v.contiguous() for k, v in projector.items()}, str(tmp_path / "projector.safetensors"))
    _truncate(tmp_path / "projector.safetensors")
    with pytest.raises(ValueError, match=r"projector\.safetensors.*truncated"):
        load_projector(model, tmp_path / "projector.safetensors")


def test_a_truncated_parquet_file_is_named_by_the_training_loaders(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from defocus_mllm.data.conversations import load_hf_dataset
    from defocus_mllm.training import EncoderDataArguments
    from defocus_mllm.training.encoder_setup import build_classification_datasets

    (tmp_path / "chat").mkdir()
    rows = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]] * 50
    pq.write_table(pa.table({"messages": rows}), tmp_path / "chat" / "train.parquet")
    _truncate(tmp_path / "chat" / "train.parquet")
    with pytest.raises(ValueError, match=r"chat/train\.parquet"):
        load_hf_dataset(tmp_path / "chat")
    (tmp_path / "images").mkdir()
    pq.write_table(pa.table({"image": [{"bytes": b"x" * 100, "path": None}] * 50, "label": [0] * 50}),
                   tmp_path / "images" / "train.parquet")
    _truncate(tmp_path / "images" / "train.parquet")
    with pytest.raises(ValueError, match=r"images/train\.parquet"):
        build_classification_datasets(EncoderDataArguments(dataset_name=str(tmp_path / "images")), None, None)


# ------------------------------------------------------------------ issue 24: recipe arguments from YAML and the CLI


def _llava_args(tmp_path, yaml_text: str, argv: tuple = ()):
    from defocus_mllm.training import DataArguments, LlavaTrainingArguments, ModelArguments, parse_recipe_args

    config = tmp_path / "config.yaml"
    config.write_text(yaml_text + f"\noutput_dir: {tmp_path / 'out'}\nuse_cpu: true\nreport_to: none\n")
    return parse_recipe_args((ModelArguments, DataArguments, LlavaTrainingArguments), list(argv),
                             default_config=str(config))


@pytest.mark.parametrize("yaml_text, message", [
    ("max_steps: 2.7", "max_steps: 2.7 is not a valid int"),
    ("num_train_epochs: [1, 2]", r"num_train_epochs takes one value, not the list \[1, 2\]"),
    ("eval_easy_vqa: 3", "eval_easy_vqa: 3 is not a valid boolean"),
    ("lr_scheduler_type: cosinus", "lr_scheduler_type: 'cosinus' is not one of linear, cosine"),
    ("tiny_vocab_size: {a: 1}", "tiny_vocab_size: '{\"a\": 1}' is not a valid int"),
])
def test_yaml_values_are_converted_and_checked_naming_the_file_and_field(yaml_text, message, tmp_path):
    with pytest.raises(ValueError, match=rf"config\.yaml: {message}"):
        _llava_args(tmp_path, yaml_text)


def test_yaml_values_of_every_type_arrive_converted(tmp_path):
    model_args, data_args, args = _llava_args(tmp_path, "max_steps: 3\nnum_train_epochs: 2\nlearning_rate: 1e-3\n"
                                                        "eval_easy_vqa: true\neval_limit: 5\nimage_size: 64")
    assert (args.max_steps, args.num_train_epochs, args.learning_rate, args.eval_easy_vqa) == (3, 2.0, 1e-3, True)
    assert isinstance(args.num_train_epochs, float) and args.eval_limit == 5 and model_args.image_size == 64


def test_a_yaml_list_of_the_wrong_type_is_named(tmp_path):
    from transformers import TrainingArguments

    from defocus_mllm.training import SegmentationDataArguments, SegmentationModelArguments, parse_recipe_args

    config = tmp_path / "segment.yaml"
    config.write_text(f"out_indices: [1, 2.5]\noutput_dir: {tmp_path}\n")
    types = (SegmentationModelArguments, SegmentationDataArguments, TrainingArguments)
    with pytest.raises(ValueError, match=r"segment\.yaml: out_indices: 2\.5 is not a valid int"):
        parse_recipe_args(types, [], default_config=str(config))
    config.write_text(f"out_indices: [1, 3]\noutput_dir: {tmp_path}\n")
    assert parse_recipe_args(types, [], default_config=str(config))[0].out_indices == [1, 3]


@pytest.mark.parametrize("option, value, message", [
    ("--image_aspect_ratio", "square", "image_aspect_ratio='square' must be one of 'pad', 'crop'"),
    ("--easy_vqa_turns", "0", "easy_vqa_turns=0 must be at least 1"),
    ("--tiny_vocab_size", "0", "tiny_vocab_size=0 must be at least 1"),
    ("--model_max_length", "-5", "model_max_length=-5 must be at least 1"),
    ("--eval_limit", "-1", "eval_limit=-1 must be at least 1"),
    ("--eval_batch_size", "0", "eval_batch_size=0 must be at least 1"),
    ("--vision_warmup_epochs", "-1", "vision_warmup_epochs=-1.0 must be at least 0"),
])
def test_recipe_fields_out_of_range_are_refused_naming_the_field(option, value, message, tmp_path):
    with pytest.raises(ValueError, match=re.escape(message)):
        _llava_args(tmp_path, "", (option, value))


@pytest.mark.parametrize("recipe, option, value, message", [
    ("encoder", "--hflip", "1.5", "hflip=1.5 must be in [0, 1]"),
    ("encoder", "--mixup_prob", "-0.1", "mixup_prob=-0.1 must be in [0, 1]"),
    ("encoder", "--crop_scale_min", "0", "crop_scale_min=0.0 must be in (0, 1]"),
    ("encoder", "--repeated_aug", "0", "repeated_aug=0 must be at least 1"),
    ("encoder", "--layer_decay", "0", "layer_decay=0.0 must be in (0, 1]"),
    ("encoder", "--label_smoothing", "2", "label_smoothing=2.0 must be in [0, 1]"),
    ("segment", "--figure_images", "-1", "figure_images=-1 must be at least 0"),
    ("segment", "--decode_hidden_size", "0", "decode_hidden_size=0 must be at least 1"),
])
def test_encoder_and_segmentation_fields_out_of_range_are_refused(recipe, option, value, message, tmp_path):
    from transformers import TrainingArguments

    from defocus_mllm.training import (
        EncoderDataArguments,
        EncoderModelArguments,
        SegmentationDataArguments,
        SegmentationModelArguments,
        parse_recipe_args,
    )

    types = {"encoder": (EncoderModelArguments, EncoderDataArguments, TrainingArguments),
             "segment": (SegmentationModelArguments, SegmentationDataArguments, TrainingArguments)}[recipe]
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_recipe_args(types, [option, value, "--output_dir", str(tmp_path), "--use_cpu", "true"])
