"""The LLaVA recipes end to end on small easy-VQA subsets: in process, resumed, and under `accelerate launch` with
DeepSpeed ZeRO-2 (stage 1 -> stage 2) and ZeRO-3 (stage 2) on two CPU processes; per-part learning rates, bad
samples skipped from dataloader workers, and the shipped accelerate / DeepSpeed configs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor, TrainerCallback

import defocus_mllm  # noqa: F401
from defocus_mllm import chat
from defocus_mllm.data.conversations import BadSampleError
from helpers import TINY_RECIPE_ARGS as TINY, accelerate_launch_command, build_tiny_llava, load_script
from helpers import GOOD_TURNS, image_folder_with as _images, llava_record as _record, write_json_lines as _jsonl
from helpers import colour_folder as _colour_folder
from defocus_mllm.training import LlavaTrainingArguments, ModelArguments, warm_up_vision_tower

ROOT = Path(__file__).resolve().parents[1]


def _recipe(name: str):
    return load_script(ROOT / "recipes" / f"{name}.py", f"recipe_{name}")


def _answer(model_dir: Path) -> str:
    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    from easy_vqa import get_test_image_paths

    return chat(model, processor, get_test_image_paths()[0], "what shape is in the image?", max_new_tokens=3)


def test_finetune_trains_saves_and_reports_what_eval_run_reports(tmp_path):
    out = tmp_path / "ft"
    # the default's curriculum on 8 images: text-only (described) samples, then open questions, then all
    metrics = _recipe("finetune").main([*TINY, "--output_dir", str(out), "--max_steps", "6", "--eval_easy_vqa", "true",
                                        "--eval_limit", "24", "--eval_batch_size", "8", "--vision_warmup_epochs", "0.02",
                                        "--easy_vqa_curriculum", "described, open, all", "--easy_vqa_max_images", "8",
                                        "--max_train_samples", "100"])
    assert metrics["easy_vqa_questions"] == 24 and 0.0 <= metrics["easy_vqa_accuracy"] <= 100.0
    assert metrics["vision_warmup_train_loss"] > 0  # the offline default warms its fresh encoder up first
    assert (out / "model.safetensors").exists() and (out / "projector.safetensors").exists()
    assert isinstance(_answer(out), str)
    # eval/run.py on the saved directory agrees with what the recipe printed
    result = subprocess.run([sys.executable, str(ROOT / "eval" / "run.py"), "--model", str(out), "--benchmark",
                             "easy-vqa", "--limit", "24", "--batch-size", "8", "--output", str(tmp_path / "eval")],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert report["metrics"]["accuracy"] == pytest.approx(metrics["easy_vqa_accuracy"])


class _StopAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_resume_from_checkpoint_ends_with_the_same_weights(tmp_path):
    finetune = _recipe("finetune")
    common = [*TINY, "--max_steps", "6", "--save_strategy", "steps", "--save_steps", "3", "--save_total_limit", "3",
              "--learning_rate", "3e-3",
              "--seed", "7"]
    finetune.main([*common, "--output_dir", str(tmp_path / "straight")])

    # interrupted right after checkpoint-3
    finetune.main([*common, "--output_dir", str(tmp_path / "resumed")], callbacks=[_StopAt(3)])
    assert (tmp_path / "resumed" / "checkpoint-3").is_dir()
    assert not (tmp_path / "resumed" / "checkpoint-6").exists()
    finetune.main([*common, "--output_dir", str(tmp_path / "resumed"), "--resume_from_checkpoint", "last"])

    straight = load_file(str(tmp_path / "straight" / "model.safetensors"))
    resumed = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert straight.keys() == resumed.keys()
    first = load_file(str(tmp_path / "resumed" / "checkpoint-3" / "model.safetensors"))
    assert any(not torch.equal(first[k], straight[k]) for k in straight)  # the last three steps did change weights
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=1e-6, msg=name)


def test_lora_finetune_with_its_own_projector_lr_saves_a_merged_model(tmp_path):
    out = tmp_path / "lora"
    _recipe("finetune").main([*TINY, "--output_dir", str(out), "--max_steps", "2", "--lora_enable", "true",
                              "--lora_r", "4", "--lora_alpha", "8", "--learning_rate", "2e-4", "--projector_lr",
                              "2e-5"])
    weights = load_file(str(out / "model.safetensors"))
    assert not any("lora" in k or "modules_to_save" in k for k in weights)
    assert isinstance(_answer(out), str)


def test_bad_data_stops_with_a_named_sample_or_is_skipped_and_reported(tmp_path):
    from easy_vqa import get_train_image_paths

    image = Path(get_train_image_paths()[0])
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "ok.png").write_bytes(image.read_bytes())
    good = {"id": "good", "image": "ok.png", "conversations": [{"from": "human", "value": "<image>\nwhat shape?"},
                                                               {"from": "gpt", "value": "circle"}]}
    bad = {**good, "id": "lost", "image": "missing.png"}
    data = tmp_path / "data.json"
    data.write_text(json.dumps([good, bad] + [{**good, "id": f"g{i}"} for i in range(6)]))
    args = [*TINY, "--data_path", str(data), "--image_folder", str(folder), "--max_steps", "1"]
    with pytest.raises(BadSampleError, match=r"data\.json\[1\] \(sample 'lost'\): image file not found"):
        _recipe("finetune").main([*args, "--output_dir", str(tmp_path / "strict")])
    metrics = _recipe("finetune").main([*args, "--output_dir", str(tmp_path / "skip"), "--skip_bad_samples", "true"])
    assert metrics["skipped_samples"] == 1
    assert "sample 'lost'" in (tmp_path / "skip" / "skipped_samples.txt").read_text()


def _launch(tmp_path: Path, recipe: str, ds_config: str, *args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    cmd = [*accelerate_launch_command("--num_processes", "2", "--use_deepspeed"),
           "--deepspeed_config_file", str(ROOT / "recipes" / "deepspeed" / ds_config),
           str(ROOT / "recipes" / f"{recipe}.py"), *TINY, *args]
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]


@pytest.mark.slow
def test_deepspeed_zero2_stage1_then_stage2_and_zero3_stage2(tmp_path):
    stage1, stage2, stage2_z3 = tmp_path / "stage1", tmp_path / "stage2", tmp_path / "stage2_zero3"
    _launch(tmp_path, "pretrain", "zero2.json", "--output_dir", str(stage1), "--max_steps", "3")
    assert (stage1 / "projector.safetensors").exists()
    _launch(tmp_path, "finetune", "zero2.json", "--output_dir", str(stage2), "--model_name_or_path", str(stage1),
            "--max_steps", "3")
    _launch(tmp_path, "finetune", "zero3.json", "--output_dir", str(stage2_z3), "--model_name_or_path", str(stage1),
            "--max_steps", "3")
    projector1 = load_file(str(stage1 / "projector.safetensors"))
    for out in (stage2, stage2_z3):
        assert isinstance(_answer(out), str)
        projector2 = load_file(str(out / "projector.safetensors"))
        assert projector1.keys() == projector2.keys()
        assert any(not torch.equal(projector1[k], projector2[k]) for k in projector1)  # stage 2 trained it further
        weights = load_file(str(out / "model.safetensors"))
        assert all(v.numel() > 0 for v in weights.values())  # ZeRO-3 gathered full tensors on save
    # stage 1 trained the projector alone: the language model is the one stage 2 started from
    s1 = load_file(str(stage1 / "model.safetensors"))
    s2 = load_file(str(stage2 / "model.safetensors"))
    changed = [k for k in s1 if "language_model" in k and not torch.equal(s1[k], s2[k])]
    assert changed  # and stage 2 trained the language model


def test_vision_warmup_trains_the_llava_tower_in_place(tmp_path, monkeypatch):
    model, processor = build_tiny_llava()
    tower = model.model.vision_tower
    before = {k: v.clone() for k, v in tower.state_dict().items()}
    model_args = ModelArguments(vision_warmup_epochs=2, vision_warmup_data=str(_colour_folder(tmp_path / "images")))
    args = LlavaTrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, use_cpu=True,
                                  report_to="none", disable_tqdm=True)
    metrics = warm_up_vision_tower(model, processor.image_processor, model_args, args)
    assert metrics["vision_warmup_epoch"] == pytest.approx(2.0) and metrics["vision_warmup_train_loss"] > 0
    assert model.model.vision_tower is tower
    changed = [k for k, v in tower.state_dict().items() if not torch.equal(v, before[k])]
    assert "patch_embed.proj.weight" in changed and len(changed) > len(before) // 2
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ValueError, match="without DeepSpeed"):
        warm_up_vision_tower(model, processor.image_processor, model_args, args)


def test_the_accelerate_command_of_the_readme_starts():
    # `accelerate launch` (the console script, as the README runs it) imports more than `python -m
    # accelerate.commands.launch`, which the other tests use: e.g. timm whenever it is installed, which breaks when
    # timm's torchvision does not import (the lmms-eval extra over the CPU torch, .ci/run)
    script = Path(sys.executable).with_name("accelerate")
    assert script.exists(), f"no accelerate command next to {sys.executable}: is the train extra installed?"
    proc = subprocess.run([str(script), "launch", "--help"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--num_processes" in proc.stdout


# ------------------------------------------------------------------ issue 24: resuming


@pytest.mark.parametrize("recipe, first_step", [("finetune", "load_conversations"), ("pretrain", "load_conversations"),
                                                ("pretrain_encoder", "build_classification_transforms"),
                                                ("segment", "build_segmentation_datasets")])
def test_a_missing_resume_directory_fails_before_any_data_is_prepared(recipe, first_step, tmp_path, monkeypatch):
    module = _recipe(recipe)

    def prepare(*args, **kwargs):
        raise AssertionError("data preparation started before the checkpoint was checked")

    monkeypatch.setattr(module, first_step, prepare)
    missing = tmp_path / "out" / "checkpoint-7"
    with pytest.raises(FileNotFoundError, match=rf"--resume_from_checkpoint {missing}: no such directory"):
        module.main(["--output_dir", str(tmp_path / "out"), "--resume_from_checkpoint", str(missing),
                     "--use_cpu", "true", "--report_to", "none"])


def test_check_resume_tokenizer_names_the_checkpoint_and_a_changed_id(tmp_path):
    from defocus_mllm.training.llava_setup import check_resume_tokenizer

    _, processor = build_tiny_llava(["what shape is it?", "circle", "USER: ASSISTANT:"])
    processor.save_pretrained(tmp_path / "checkpoint-3")
    check_resume_tokenizer(tmp_path / "checkpoint-3", processor.tokenizer)  # the same tokenizer passes
    _, other = build_tiny_llava(["zebra quartz jumps over the lazy fox", "USER: ASSISTANT:"])
    with pytest.raises(ValueError, match=r"checkpoint-3: its tokenizer differs from this run's \(\d+ token id\(s\) mean "
                                         r"another token"):
        check_resume_tokenizer(tmp_path / "checkpoint-3", other.tokenizer)


@pytest.mark.slow
def test_resuming_the_offline_run_on_other_data_keeps_the_checkpoint_tokenizer(tmp_path):
    from easy_vqa import get_train_image_paths
    from transformers import AutoTokenizer

    finetune, out = _recipe("finetune"), tmp_path / "out"
    common = [*TINY, "--save_strategy", "steps", "--save_steps", "2", "--output_dir", str(out)]
    finetune.main([*common, "--max_steps", "2"])
    trained_with = AutoTokenizer.from_pretrained(out / "checkpoint-2").get_vocab()  # the config keeps one checkpoint
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "a.png").write_bytes(Path(get_train_image_paths()[0]).read_bytes())
    other = [{"id": f"z{i}", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nzebra quartz vexing jumpy wizards?"}, {"from": "gpt", "value": "zzz qqq"}]}
        for i in range(16)]
    (tmp_path / "other.json").write_text(json.dumps(other))
    finetune.main([*common, "--max_steps", "4", "--data_path", str(tmp_path / "other.json"), "--image_folder",
                   str(folder), "--resume_from_checkpoint", "last"])
    # the embeddings of checkpoint-2 keep the meaning of their ids: the tokenizer is the checkpoint's, not retrained
    assert AutoTokenizer.from_pretrained(out).get_vocab() == trained_with
    assert AutoTokenizer.from_pretrained(out / "checkpoint-4").get_vocab() == trained_with


# ------------------------------------------------------------------ issue 23: one preamble, the stage, the lrs


@pytest.mark.parametrize("recipe, other", [("pretrain", "finetune"), ("finetune", "pretrain")])
def test_a_llava_recipe_refuses_another_stage_naming_the_field(recipe, other, tmp_path):
    with pytest.raises(ValueError, match=rf"stage='{other}': this recipe fixes stage='{recipe}'"):
        _recipe(recipe).main(["--output_dir", str(tmp_path), "--stage", other, "--use_cpu", "true",
                              "--report_to", "none"])


@pytest.mark.parametrize("recipe", ["pretrain", "finetune"])
def test_both_llava_stages_give_the_projector_and_the_vision_tower_their_learning_rates(recipe, tmp_path,
                                                                                        monkeypatch):
    from defocus_mllm.llava import model_parts

    module, built = _recipe(recipe), []

    def build_only(trainer, resume):  # the recipe's trainer, not trained: the recipe returns at once
        built.append(trainer)
        return {"interrupted_at_step": 0}

    monkeypatch.setattr(module, "run_training", build_only)
    module.main([*TINY, "--output_dir", str(tmp_path), "--stage", recipe, "--max_train_samples", "8",
                 "--train_vision_tower", "true", "--learning_rate", "1e-3", "--projector_lr", "2e-3",
                 "--vision_tower_lr", "3e-4"])
    trainer = built[0]
    lr_of = {id(p): group["lr"] for group in trainer.create_optimizer().param_groups for p in group["params"]}
    parts = {name: [p for module in modules for p in module.parameters()]
             for name, modules in model_parts(trainer.model).items()}
    assert {lr_of[id(p)] for p in parts["projector"]} == {2e-3}
    assert {lr_of[id(p)] for p in parts["vision_tower"]} == {3e-4}
    # stage 1 keeps the language model frozen (out of the optimizer); stage 2 trains it at learning_rate
    assert {lr_of.get(id(p)) for p in parts["language_model"]} == ({None} if recipe == "pretrain" else {1e-3})


def test_configure_trainable_needs_a_stage_and_refuses_lora_in_stage_1(tmp_path):
    from defocus_mllm.training import configure_trainable

    model, _ = build_tiny_llava()

    def args(**kw):
        return LlavaTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", **kw)

    with pytest.raises(ValueError, match=r"stage=None must be 'pretrain' or 'finetune'"):
        configure_trainable(model, args())
    with pytest.raises(ValueError, match=r"lora_enable=True: LoRA adapts the language model, which stage 1"):
        configure_trainable(model, args(stage="pretrain", lora_enable=True))
    with pytest.raises(ValueError, match=r"stage='align' must be one of None, 'pretrain', 'finetune'"):
        args(stage="align")


class _OptimizerGroups(TrainerCallback):
    """Records, when training begins, the learning rate the optimizer gives each named parameter."""

    def __init__(self):
        self.lr: dict[str, float] = {}

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        by_id = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
        self.lr = {name: by_id[id(p)] for name, p in model.named_parameters() if id(p) in by_id}


@pytest.mark.parametrize("lora", [False, True])
def test_the_finetune_recipe_gives_the_projector_and_the_tower_their_own_learning_rates(tmp_path, lora):
    groups = _OptimizerGroups()
    recipe = load_script(ROOT / "recipes" / "finetune.py", "recipe_finetune_lr")
    extra = ["--lora_enable", "true", "--lora_r", "4", "--lora_alpha", "8"] if lora else []
    recipe.main([*TINY, "--output_dir", str(tmp_path), "--max_steps", "1", "--learning_rate", "1e-3",
                 "--projector_lr", "2e-5", "--vision_tower_lr", "3e-4", "--train_vision_tower", "true",
                 "--lr_scheduler_type", "constant", *extra], callbacks=[groups])
    parts = {"projector": [], "tower": [], "lm": []}
    for name, lr in groups.lr.items():
        part = "projector" if "multi_modal_projector" in name else "tower" if "vision_tower" in name else "lm"
        parts[part].append(lr)
    assert parts["projector"] and set(parts["projector"]) == {2e-5}
    assert parts["tower"] and set(parts["tower"]) == {3e-4}
    assert parts["lm"] and set(parts["lm"]) == {1e-3}


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


def test_recipe_lists_skips_from_dataloader_workers_once_and_survives_an_all_bad_batch(tmp_path):
    """4 unreadable images first (sequential order, batch 4: the first batch is all bad), 4 good samples, a malformed
    line and an unknown speaker; 2 epochs on 2 dataloader workers."""
    folder = _images(tmp_path / "images", corrupt=[f"bad{i}.png" for i in range(4)])
    lines = [_record(i, image=f"bad{i}.png") for i in range(4)] + [_record(4 + i) for i in range(4)]
    lines += ["{not json", _record(9, turns=[{"from": "robot", "value": "<image>\nhi"}, GOOD_TURNS[1]])]
    data = _jsonl(tmp_path / "data.jsonl", lines)
    out = tmp_path / "out"
    recipe = load_script(ROOT / "recipes" / "finetune.py", "recipe_finetune_bad_samples")
    metrics = recipe.main([*TINY, "--data_path", str(data), "--image_folder", str(folder), "--output_dir", str(out),
                           "--skip_bad_samples", "true", "--dataloader_num_workers", "2", "--num_train_epochs", "2",
                           "--per_device_train_batch_size", "4", "--train_sampling_strategy", "sequential",
                           "--dataloader_persistent_workers", "false"])
    listed = (out / "skipped_samples.txt").read_text().splitlines()
    assert metrics["skipped_samples"] == 6 and len(listed) == 6 and len(set(listed)) == 6
    for i in range(4):
        assert sum(f"(sample 's{i}')" in line for line in listed) == 1
    assert any("data.jsonl:9: malformed JSON line" in line for line in listed)
    assert any("unknown speaker 'robot'" in line for line in listed)
