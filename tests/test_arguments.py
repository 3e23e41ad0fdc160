"""training/arguments.py: recipe arguments from YAML and the command line, converted to each field's type and
checked, with an error that names the file and the field (issue 24)."""

import re

import pytest


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
    ("--image_cache_gb", "-1", "image_cache_gb=-1.0 must be at least 0"),
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
