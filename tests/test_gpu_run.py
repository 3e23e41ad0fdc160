"""benchmarks/gpu_run.py, the one-GPU run of docs/gpu.md: its pieces in process, and its CPU dry run end to end (every
code path of the GPU run at tiny sizes: throughput, LM directory, ZeRO-2 and ZeRO-3 launches, reload, reports)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import load_script

ROOT = Path(__file__).resolve().parents[1]
gpu_run = load_script(ROOT / "benchmarks" / "gpu_run.py", "gpu_run")


def test_the_real_plan_fits_its_budget_and_builds_a_half_billion_parameter_qwen2():
    plan = gpu_run.real_plan()
    assert sorted(plan.resolutions) == [224, 336, 448, 672, 1024] and set(plan.batch) == set(plan.resolutions)
    assert plan.budget_s <= 540  # ~9 minutes of a 15-minute device lease, start-up excluded
    assert all(plan.timeouts[p] < plan.budget_s / 2 for p in plan.timeouts)  # no single part can eat the budget
    config = gpu_run.qwen2_lm_config(1000, plan.lm_shape)
    assert config.model_type == "qwen2" and 0.45e9 < gpu_run.lm_parameter_count(config) < 0.55e9


def test_the_parameter_count_matches_a_built_model():
    from transformers import AutoModelForCausalLM

    for tie in (True, False):
        config = gpu_run.qwen2_lm_config(300, "qwen2-tiny", tie_word_embeddings=tie)
        model = AutoModelForCausalLM.from_config(config)
        assert gpu_run.lm_parameter_count(config) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_the_stage_configs_parse_with_the_recipe_arguments(stage, tmp_path):
    from defocus_mllm.training import DataArguments, LlavaTrainingArguments, ModelArguments, parse_recipe_args

    for plan in (gpu_run.real_plan(), gpu_run.dry_plan()):
        argv = ["--config", str(gpu_run.STAGE_CONFIGS[stage]), "--output_dir", str(tmp_path), "--use_cpu", "true",
                *plan.stage_overrides[stage]]
        model_args, data_args, args = parse_recipe_args((ModelArguments, DataArguments, LlavaTrainingArguments), argv)
        assert args.bf16 and args.gradient_checkpointing and args.logging_steps == 1 and args.disable_tqdm
        assert data_args.data_path == "easy-vqa"
        if not plan.dry_run:
            assert 24 <= args.max_steps <= 60  # "a few dozen steps"
            assert args.max_steps * args.per_device_train_batch_size <= data_args.max_train_samples
    if stage == "pretrain":
        assert data_args.easy_vqa_captions and model_args.vision_tower == "mamba-tiny"  # the dry plan's tower
    else:
        assert args.train_vision_tower  # stage 2 runs the scan's backward under activation checkpointing


def test_launch_commands_name_the_zero_stage_and_the_inputs(tmp_path):
    plan = gpu_run.real_plan()
    cmd = gpu_run.launch_command("pretrain", 3, True, tmp_path / "s1", lm_dir=tmp_path / "lm", stage1_dir=None,
                                 plan=plan)
    assert cmd[cmd.index("--deepspeed_config_file") + 1].endswith("zero3.json")
    assert cmd[cmd.index("--zero3_init_flag") + 1] == "true" and cmd[cmd.index("--num_processes") + 1] == "1"
    assert cmd[cmd.index("--language_model") + 1] == str(tmp_path / "lm")
    cmd = gpu_run.launch_command("finetune", 2, True, tmp_path / "s2", lm_dir=None, stage1_dir=tmp_path / "s1",
                                 plan=plan)
    assert cmd[cmd.index("--zero3_init_flag") + 1] == "false" and "--language_model" not in cmd
    assert cmd[cmd.index("--model_name_or_path") + 1] == str(tmp_path / "s1")
    assert cmd[cmd.index("--config") + 1].endswith("gpu_finetune_mamba_base.yaml")


def test_a_failed_part_reports_the_exception_lines_not_the_launcher_trailer():
    lines = ["Traceback (most recent call last):", "[rank0]: NotImplementedError: Cannot copy out of meta tensor",
             "    raise ChildFailedError(", "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: "]
    assert gpu_run.error_lines(lines) == ["[rank0]: NotImplementedError: Cannot copy out of meta tensor"]


def test_train_logs_give_losses_and_steady_samples_per_second():
    lines = [(0.0, "[transformers] loading things"), (10.0, "{'loss': '5.2', 'grad_norm': '1.0', 'epoch': '0.1'}")]
    lines += [(10.0 + step, f"{{'loss': {5.2 - 0.1 * step}, 'learning_rate': 0.001}}") for step in range(1, 8)]
    lines += [(20.0, "{'train_runtime': '9.0', 'train_loss': '4.9'}")]
    logs = gpu_run.parse_train_logs(lines)
    assert len(logs) == 8 and logs[0]["loss"] == 5.2 and logs[0]["t"] == 10.0
    summary = gpu_run.summarize_training(logs, global_batch=16)
    assert summary["loss_finite"] and summary["loss_falling"] and summary["steps_logged"] == 8
    assert summary["steady_samples_per_s"] == pytest.approx(16.0)  # one step a second after the first three
    nan = gpu_run.summarize_training(gpu_run.parse_train_logs([(0, "{'loss': nan}")] * 3 + lines), 16)
    assert nan["loss_finite"] is False and nan["steps_logged"] == 11


def _rows(mamba_1024=40.0, status="ok"):
    rows = []
    for res, tokens in ((224, 197), (1024, 4097)):
        for model, rate in (("defocus-mamba-base", mamba_1024 if res == 1024 else 900.0), ("vit-b16", 20.0),
                            ("clip-vit-l14", 5.0)):
            for mode in ("inference", "train"):
                rows.append({"model": model, "resolution": res, "mode": mode, "batch": 4, "tokens": tokens,
                             "status": status if model == "clip-vit-l14" and res == 1024 else "ok",
                             "images_per_s": rate, "tokens_per_s": rate * tokens, "peak_mem_gib": 1.0 + rate / 100})
    return rows


def test_the_report_of_a_partial_run_has_its_tables_and_the_goal_verdict():
    results = {"meta": {"dry_run": False, "started": "now", "budget_s": 525, "elapsed_s": 100,
                        "scan_backend": "triton"},
               "env": {"gpu": "NVIDIA H100 80GB HBM3", "gpu_memory_gib": 79.2, "capability": "9.0",
                       "scan_backends_available": ["torch", "triton"]},
               "versions": {"torch": "2.11.0"},
               "parts": {"throughput": {"status": "ok", "seconds": 90, "timeout_s": 180},
                         "zero2_stage1": {"status": "timeout", "seconds": 100, "timeout_s": 100,
                                          "errors": ["[rank0]: RuntimeError: boom"]}},
               "throughput": _rows(status="oom"), "lm": None, "recipes": {}, "reload": []}
    text = gpu_run.render_markdown(results)
    assert "still running or cut short" in text and "| zero2_stage1 | timeout |" in text
    assert "zero2_stage1 failed with:" in text and "RuntimeError: boom" in text
    assert "### Inference" in text and "### Forward + backward" in text and "| 1024 |" in text and "oom" in text
    assert "2.00x" in text  # Mamba ÷ ViT-B at 1024 px
    assert "At 1024 px De-focus Mamba-B runs at 2.00x" in text and "meets the 1.5x goal" in text
    assert "(not less)" in gpu_run.goal_line(_rows(mamba_1024=40.0))  # 1.40 vs 1.20 GiB
    assert "misses" in gpu_run.goal_line(_rows(mamba_1024=25.0))


def test_one_throughput_cell_per_mode_on_the_cpu(monkeypatch):
    monkeypatch.setenv("DEFOCUS_SCAN_BACKEND", "torch")  # as the dry run sets it (no native kernel to build)
    plan = gpu_run.dry_plan()
    specs = gpu_run.encoder_specs(dry_run=True)
    for name, (config, kwargs) in specs.items():
        model = gpu_run.build_encoder(name, config, "cpu")
        for mode in ("inference", "train"):
            row = gpu_run.measure_encoder(model, kwargs, config, name, 32, 2, mode, plan, "cpu")
            assert row["status"] == "ok", row
            assert row["images_per_s"] > 0 and row["tokens"] == (32 // config.patch_size) ** 2 + 1


KNOWN_ZERO3_BUILD_BUG = "Cannot copy out of meta tensor"


@pytest.mark.slow
def test_the_dry_run_exercises_every_part_on_the_cpu(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_run.py"), "--dry-run", "--out", str(out),
                             "--work", str(work)], capture_output=True, text=True, timeout=1800, env=env, cwd=ROOT)
    results = json.loads((out / "results.json").read_text())
    parts = results["parts"]
    assert results["meta"]["finished"] and results["meta"]["dry_run"]
    assert sorted(os.listdir(out)) == ["gpu_run.log", "results.json", "results.md"]  # what comes back from $OUT
    # throughput: every encoder, resolution and mode measured
    assert parts["throughput"]["status"] == "ok"
    cells = {(r["model"], r["resolution"], r["mode"]) for r in results["throughput"] if r["status"] == "ok"}
    assert len(cells) == 3 * 2 * 2
    assert results["lm"]["model_type"] == "qwen2" and results["lm"]["dtype"] == "bfloat16"
    # ZeRO-2: stage 1 then stage 2, losses finite, saved
    for name in ("zero2_stage1", "zero2_stage2"):
        assert parts[name]["status"] == "ok", parts[name].get("tail")
        recipe = results["recipes"][name]
        assert recipe["saved"] and recipe["steps_logged"] == 3 and recipe["loss_finite"]
        assert recipe["trainer"]["train_samples_per_second"] > 0
    assert results["recipes"]["zero2_stage2"]["from"] == "zero2_stage1"
    # ZeRO-3: stage 2 always runs (from the ZeRO-2 stage-1 output if its own stage 1 failed)
    assert parts["zero3_stage2"]["status"] == "ok", parts["zero3_stage2"].get("tail")
    reloaded = {entry["model_dir"]: entry for entry in results["reload"]}
    assert set(reloaded) == {"zero2_stage2", "zero3_stage2"}
    for entry in reloaded.values():
        assert entry["status"] == "ok" and "bfloat16" in entry["dtypes"]  # (the filters' parameters stay fp32)
        assert all(isinstance(qa["answer"], str) for qa in entry["answers"]) and len(entry["answers"]) == 2
    text = (out / "results.md").read_text()
    assert "DRY RUN" in text and "## Recipes" in text and "## Reload" in text
    assert all(math.isfinite(x) for r in results["recipes"].values() for x in r.get("losses", []))
    if parts["zero3_stage1"]["status"] != "ok":
        tail = "\n".join(parts["zero3_stage1"].get("tail", [])) + (out / "gpu_run.log").read_text()
        if KNOWN_ZERO3_BUILD_BUG in tail:
            pytest.xfail("build_llava under ZeRO-3 (a fresh stage 1) fails: the Llava shell is built on the meta "
                         "device while transformers initialises its tower under ZeRO-3 (reported; see docs/gpu.md)")
        pytest.fail(f"zero3_stage1 failed: {parts['zero3_stage1']}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_the_report_shows_the_cuda_graph_rows_and_the_kernel_check_output():
    rows = _rows()
    for res, tokens in ((224, 197), (1024, 4097)):
        rows.append({"model": gpu_run.GRAPHED, "resolution": res, "mode": "inference", "batch": 4, "tokens": tokens,
                     "status": "ok", "images_per_s": 60.0, "tokens_per_s": 60.0 * tokens, "peak_mem_gib": 1.5})
    results = {"meta": {"dry_run": False, "started": "now", "budget_s": 525, "elapsed_s": 100, "finished": True,
                        "scan_backend": "triton"}, "env": {}, "versions": {},
               "parts": {"kernels": {"status": "ok", "seconds": 200, "timeout_s": 250}},
               "kernels": ["triton fused mixer B=64 L=197 fwd+bwd: 1.000 ms"], "throughput": rows}
    text = gpu_run.render_markdown(results)
    inference = text.split("### Inference")[1].split("### Forward")[0]
    assert "Mamba-B/16 CUDA graph img/s" in inference and "Mamba graph ÷ ViT-B" in inference
    assert "3.00x" in inference  # 60 / 20 images per second
    train_header = next(line for line in text.split("### Forward")[1].splitlines() if line.startswith("| px"))
    assert "CUDA graph" not in train_header  # graphs are an inference-only option
    assert "## Kernels" in text and "triton fused mixer B=64 L=197 fwd+bwd: 1.000 ms" in text
    # Mamba 900 img/s vs ViT 20 at 224 px; fwd+bwd at 1024 px 40 vs 20
    assert ("At 224 px Mamba-B's inference runs at 45.00x ViT-B/16's (3.00x replayed as a CUDA graph): meets the "
            "0.5x goal.") in text
    assert "At 1024 px Mamba-B's forward + backward runs at 2.00x ViT-B/16's: meets the 1x goal." in text
    assert "misses the 1x goal" in "\n".join(gpu_run.fused_path_goals(_rows(mamba_1024=10.0)))


def test_the_kernels_part_is_known_but_not_in_the_default_run():
    args = gpu_run.parse_args(["--parts", "kernels,throughput", "--cuda-graphs", "off"])
    assert args.parts == "kernels,throughput" and args.cuda_graphs == "off"
    assert "kernels" not in gpu_run.parse_args([]).parts.split(",")
    with pytest.raises(SystemExit):
        gpu_run.parse_args(["--parts", "kernel"])
    # a CUDA graph row on the CPU is one failed cell that says why, not a crash of the whole part
    config, kwargs = gpu_run.encoder_specs(dry_run=True)["defocus-mamba-base"]
    model = gpu_run.build_encoder("defocus-mamba-base", config, "cpu")
    row = gpu_run.measure_encoder(model, kwargs, config, "defocus-mamba-base", 32, 2, "inference", gpu_run.dry_plan(),
                                  "cpu", cuda_graph=True)
    assert row["model"] == gpu_run.GRAPHED and "cuda_graph is for inference on CUDA" in row["status"]
