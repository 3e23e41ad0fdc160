"""Regressions found by a CPU dry run of the GPU recipe path (DeepSpeed launch configs, ZeRO-3 init, bf16 models)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from defocus_mllm import DefocusVisionConfig, build_llava
from defocus_mllm.training.tiny_lm import tiny_llama_config, train_tokenizer

from helpers import build_tiny_llava, free_port

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["what shape is in the image?", "circle", "red", "yes", "no", "USER: ASSISTANT:"]


def _batch(model, processor, dtype=torch.float32):
    """One image-question pair as the processor makes it, pixel values in `dtype`."""
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what shape?"}]}],
        add_generation_prompt=True, tokenize=False)
    size = model.config.vision_config.image_size
    image = torch.rand(3, size, size)
    batch = processor(images=[image], text=[prompt], return_tensors="pt", do_rescale=False)
    batch["pixel_values"] = batch["pixel_values"].to(dtype)
    return batch


@pytest.mark.parametrize("name", ["zero2", "zero3", "zero3_offload"])
def test_deepspeed_accelerate_configs_pass_accelerates_own_check(name, monkeypatch):
    """accelerate refuses `mixed_precision` (and the other fields it lists) next to `deepspeed_config_file`; run the
    launcher's own argument handling and the DeepSpeed plugin's check on each shipped config."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import DeepSpeedPlugin

    path = ROOT / "recipes" / "accelerate" / f"{name}.yaml"
    args = launch_command_parser().parse_args(["--config_file", str(path), "train.py"])
    args, defaults, mixed_precision_from_config = _validate_launch_command(args)
    assert "deepspeed_config_file" in defaults.deepspeed_config
    # what `accelerate launch` hands the training processes (accelerate/commands/launch.py, `launch_command`)
    fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mixed_precision_from_config else [])
    monkeypatch.setenv("ACCELERATE_CONFIG_DS_FIELDS", ",".join(fields).lower())
    DeepSpeedPlugin._deepspeed_config_checks(None)  # raises ValueError("... will be ignored ...")


@pytest.mark.parametrize("name", ["pretrain_vicuna7b", "finetune_vicuna7b", "finetune_vicuna7b_lora",
                                  "pretrain_qwen2.5_7b", "finetune_qwen2.5_7b", "finetune_qwen2.5_7b_lora"])
def test_deepspeed_recipes_ask_for_bf16_themselves(name):
    """With no `mixed_precision` in the launch config, bf16 reaches DeepSpeed's "auto" only from the Trainer's bf16."""
    import yaml

    config = yaml.safe_load((ROOT / "recipes" / "configs" / f"{name}.yaml").read_text())
    assert config.get("bf16") is True


ZERO3_BUILD = textwrap.dedent("""
    import os, sys
    import deepspeed, torch
    from transformers.integrations import HfDeepSpeedConfig, is_deepspeed_zero3_enabled
    sys.path.insert(0, {tests!r})
    from helpers import build_tiny_llava

    torch.set_num_threads(1)
    deepspeed.init_distributed("gloo")
    ds = HfDeepSpeedConfig({{"zero_optimization": {{"stage": 3}}, "bf16": {{"enabled": True}},
                             "train_micro_batch_size_per_gpu": 1}})
    model, processor = build_tiny_llava()
    assert is_deepspeed_zero3_enabled()  # the ZeRO-3 config is active again after build_llava
    tower = model.model.vision_tower
    assert not any(hasattr(p, "ds_id") for p in tower.parameters()), "the tower is the real one, not re-built"
    assert all(p.device.type != "meta" and p.numel() > 0 for p in tower.parameters())
    assert any(hasattr(p, "ds_id") for p in model.model.language_model.parameters()), "the LM is the ZeRO-3 one"
    dtypes = {{p.dtype for p in model.parameters()}}
    assert dtypes == {{torch.bfloat16}}, dtypes
    print("ZERO3-OK")
""")


@pytest.mark.slow
def test_build_llava_under_zero3_init(tmp_path):
    """A ZeRO-3 config is alive while the recipe builds the model: the meta-device shell must not go through
    `deepspeed.zero.Init` (it crashed in the Mamba mixer's weight init), and the tower / LM must be the real ones."""
    pytest.importorskip("deepspeed")
    script = tmp_path / "zero3_build.py"
    script.write_text(ZERO3_BUILD.format(tests=str(ROOT / "tests")))
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, str(script)], env=env, cwd=ROOT, capture_output=True, text=True,
                            timeout=240)
    assert result.returncode == 0 and "ZERO3-OK" in result.stdout, result.stderr[-3000:]


def test_build_llava_from_bf16_checkpoint_has_one_dtype(tmp_path):
    """A real LM checkpoint loads in bf16: the tower and projector must follow it, so no autocast is needed."""
    tokenizer = train_tokenizer(TEXTS, vocab_size=128)
    lm = __import__("transformers").AutoModelForCausalLM.from_config(tiny_llama_config(len(tokenizer)))
    lm.to(torch.bfloat16).save_pretrained(tmp_path / "lm")
    tokenizer.save_pretrained(tmp_path / "lm")
    vision = DefocusVisionConfig.from_preset("mamba-tiny", hidden_size=32, num_hidden_layers=2,
                                             intermediate_size=64, image_size=32)
    model, processor = build_llava(vision, tmp_path / "lm")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        out = model(**_batch(model, processor, torch.bfloat16))
    assert torch.isfinite(out.logits.float()).all()


def test_bf16_model_with_intermediate_vision_feature_layer():
    """`hidden_states` of intermediate layers come back in the parameters' dtype, not the fp32 residual stream."""
    model, processor = build_tiny_llava(TEXTS, vocab_size=128)
    model.to(torch.bfloat16)
    with torch.no_grad():
        out = model(**_batch(model, processor, torch.bfloat16), vision_feature_layer=-2)
        hidden = model.model.vision_tower(_batch(model, processor, torch.bfloat16)["pixel_values"],
                                          output_hidden_states=True).hidden_states
    assert torch.isfinite(out.logits.float()).all()
    assert {h.dtype for h in hidden} == {torch.bfloat16}


def test_preset_tower_has_no_drop_path_in_llava(monkeypatch):
    """A preset's pre-training drop path (mamba-base: up to 0.75, scheduled) is off in a LLaVA tower."""
    from defocus_mllm.encoder.configuration_defocus import DEFOCUS_PRESETS
    from defocus_mllm.llava import load_vision_tower

    # mamba-base's drop-path settings on a tiny encoder (the real one takes seconds to build)
    base = DEFOCUS_PRESETS["mamba-base"]
    assert base["drop_path_rate"] > 0 and base["use_scheduled_drop_path"]
    small = dict(DEFOCUS_PRESETS["mamba-tiny"], hidden_size=32, num_hidden_layers=3, intermediate_size=64,
                 image_size=32, **{key: base[key] for key in ("drop_path_rate", "min_drop_path_rate",
                                                              "use_scheduled_drop_path")})
    monkeypatch.setitem(DEFOCUS_PRESETS, "mamba-base", small)
    tower = load_vision_tower("mamba-base")
    assert tower.config.drop_path_rate == 0.0 and not tower.config.use_scheduled_drop_path
    assert all(block.drop_path_rate == 0.0 for block in tower.blocks)
    # asked for on purpose (a config): kept
    config = DefocusVisionConfig.from_preset("mamba-tiny", hidden_size=32, num_hidden_layers=3,
                                             intermediate_size=64, image_size=32, drop_path_rate=0.2)
    assert load_vision_tower(config).blocks[-1].drop_path_rate == pytest.approx(0.2)
