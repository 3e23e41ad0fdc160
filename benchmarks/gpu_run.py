#!/usr/bin/env python
"""The one-GPU run of docs/gpu.md: encoder throughput by resolution, then the LLaVA recipes under DeepSpeed.

    python benchmarks/gpu_run.py --out DIR            # on one CUDA GPU, within the plan's 525 s budget
    python benchmarks/gpu_run.py --dry-run --out DIR  # anywhere: tiny sizes on the CPU, every code path

    python benchmarks/gpu_run.py --parts kernels,throughput --out DIR   # issue 26's kernel run: < 9 minutes

`benchmarks/gpu_run.sh` wraps it for a machine without network (installs the wheels carried in `.devcarry/wheels`,
e.g. DeepSpeed, first). Parts, each in its own subprocess with its own timeout inside one overall budget; the results
(`results.json`, `results.md`) are rewritten after every part, so a run cut short still leaves its tables:

  kernels     (only when named in --parts) `benchmarks/check_cuda_kernels.py --quick --sweep`: the sequential Triton
              scan, the fused Triton mixer and the Triton conv against PyTorch, a whole Mamba-Base with each fast
              path, a small launch-configuration sweep, the scan's / mixer's GB/s next to the card's copy bandwidth,
              CUDA graphs on / off, FlexAttention vs SDPA (with the A_log gradient at L = 785 against float64) and
              the profile of a Mamba-B inference forward; its output goes into results.md verbatim.
  throughput  bf16 encoder throughput at 224/336/448/672/1024 px, inference and forward+backward, in one process on
              one card: De-focus Mamba-Base (fast scan backend) vs `transformers`' ViT-B/16 (SDPA) and the CLIP
              ViT-L/14 tower shape LLaVA-1.5 uses (SDPA), random weights: images/s, tokens/s, peak memory, ratios;
              with `--cuda-graphs on` (the default) also Mamba-B's inference replayed as one CUDA graph.
  lm          a randomly initialised Qwen2-shaped language model (~0.5B parameters; a tiny one for --dry-run) and a
              BPE tokenizer trained on easy-VQA's text, saved as a local directory (`--language_model DIR`).
  zero2_*     stage 1 (projector only) then stage 2 (projector + LM + tower) with `accelerate launch`, DeepSpeed
  zero3_*     ZeRO-2 / ZeRO-3, one process, bf16, activation checkpointing, on easy-VQA at the tower's 224 px
              (recipes/configs/gpu_{pretrain,finetune}_mamba_base.yaml): losses, samples/s, peak memory.
  reload      every stage-2 output reloaded with `AutoModelForImageTextToText` (bf16) and asked easy-VQA questions.

Files in `--out`: results.json, results.md, gpu_run.log (every part's output). Large files (the LM, checkpoints) go
to `--work` (default: a temporary directory), never to `--out`. This script runs the parts (`Run`) and is its own
children (`--child throughput|lm|reload`); its siblings hold the rest: `gpu_plan.py` the plans and the LM builder,
`gpu_throughput.py` / `gpu_reload.py` the children's work, `gpu_launch.py` the recipe launches, `gpu_process.py` the
subprocess runner and memory poller, `gpu_report.py` the log parsing and results.md, `timing.py` the timed cells.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

# Every name below stays importable from here (tests and older callers read them as gpu_run.<name>).
from gpu_launch import free_port, launch_command, recipe_value  # noqa: F401
from gpu_plan import (CONFIGS, DRY_VISION, LM_SHAPES, ROOT, STAGE_CONFIGS, ZERO_CONFIGS, Plan,  # noqa: F401
                      build_lm_dir, dry_plan, lm_parameter_count, qwen2_lm_config, real_plan)
from gpu_process import RUNNING, GpuMemoryPoller, run_streamed, terminate_running  # noqa: F401
from gpu_reload import run_reload
from gpu_report import (ENCODER_LABELS, ENCODERS, GRAPHED, error_lines, fused_path_goals, goal_line,  # noqa: F401
                        parse_train_logs, render_markdown, summarize_training, trainer_memory)
from gpu_throughput import build_encoder, encoder_specs, measure_encoder, run_throughput, tokens_per_image  # noqa: F401

_terminate = terminate_running  # its name when it lived here

PACKAGES = ["torch", "transformers", "accelerate", "deepspeed", "peft", "triton", "tokenizers", "safetensors",
            "huggingface-hub", "mamba-ssm", "causal-conv1d", "pydantic", "easy-vqa"]


class Run:
    """Runs the parts in order inside the budget and rewrites results.json / results.md after each."""

    def __init__(self, plan: Plan, args: argparse.Namespace) -> None:
        self.plan, self.args = plan, args
        self.out = Path(args.out)
        self.work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gpu_run_"))
        self.out.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        self.started = time.time()
        self.deadline = self.started + (args.budget_s or plan.budget_s)
        self.log = (self.out / "gpu_run.log").open("a")
        self.results: dict[str, Any] = {
            "meta": {"dry_run": plan.dry_run, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                     "budget_s": args.budget_s or plan.budget_s, "command": " ".join(sys.argv),
                     "zero3_init": args.zero3_init, "plan": {k: v for k, v in asdict(plan).items()
                                                             if k != "stage_overrides"}},
            "versions": package_versions(), "env": {}, "parts": {}, "throughput": [], "lm": None, "recipes": {},
            "reload": [],
        }
        self.results["meta"]["host"] = host_info()
        self.env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
                        DEFOCUS_SCAN_BACKEND=args.scan_backend,
                        PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "")
                                                                  .split(os.pathsep) if p]))
        if plan.dry_run:
            self.env.setdefault("OMP_NUM_THREADS", "1")
        self.results["meta"]["scan_backend"] = args.scan_backend

    # -- bookkeeping
    def remaining(self) -> float:
        return self.deadline - time.time()

    def write(self) -> None:
        self.results["meta"]["elapsed_s"] = round(time.time() - self.started, 1)
        (self.out / "results.json").write_text(json.dumps(self.results, indent=1, default=str))
        (self.out / "results.md").write_text(render_markdown(self.results))

    def part(self, name: str, cmd: list[str], reserve: float = 0.0) -> Optional[tuple[Any, list, float]]:
        """Run one part's command with its timeout (capped by what the budget leaves after `reserve`)."""
        timeout = min(self.plan.timeouts[name], self.remaining() - reserve)
        record: dict[str, Any] = {"timeout_s": round(timeout, 1)}
        self.results["parts"][name] = record
        if timeout < self.plan.min_part_s:
            record["status"] = "skipped: out of budget"
            print(f"[gpu_run] {name}: skipped ({self.remaining():.0f} s left)", flush=True)
            self.write()
            return None
        print(f"[gpu_run] {name}: starting (timeout {timeout:.0f} s, {self.remaining():.0f} s left)", flush=True)
        self.log.write(f"\n===== {name}: {' '.join(cmd)}\n")
        self.log.flush()
        started = time.time()
        rc, lines = run_streamed(cmd, timeout, self.env, self.log)
        seconds = time.time() - started
        record.update(status="ok" if rc == 0 else ("timeout" if rc == "timeout" else f"failed (exit {rc})"),
                      seconds=round(seconds, 1))
        if rc != 0:
            record["tail"] = [line for _, line in lines[-25:]]
            record["errors"] = error_lines([line for _, line in lines])
        print(f"[gpu_run] {name}: {record['status']} in {seconds:.0f} s", flush=True)
        return rc, lines, seconds

    def skip(self, name: str, why: str) -> None:
        self.results["parts"][name] = {"status": f"skipped: {why}"}
        print(f"[gpu_run] {name}: skipped ({why})", flush=True)
        self.write()

    def child(self, name: str, *extra: str) -> list[str]:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--work", str(self.work),
               "--out", str(self.out), "--zero3-init", self.args.zero3_init, *extra]
        return cmd + (["--dry-run"] if self.plan.dry_run else [])

    # -- the parts
    def kernels(self) -> None:
        script = ROOT / "benchmarks" / "check_cuda_kernels.py"
        cmd = [sys.executable, str(script)] + (["--dry-run"] if self.plan.dry_run else ["--quick", "--sweep"])
        outcome = self.part("kernels", cmd)
        if outcome is not None:
            self.results["kernels"] = [line for _, line in outcome[1]]
        self.write()

    def throughput(self) -> None:
        rows_file, env_file = self.work / "throughput.jsonl", self.work / "env.json"
        rows_file.unlink(missing_ok=True)
        self.part("throughput", self.child("throughput", "--cuda-graphs", self.args.cuda_graphs))
        if env_file.exists():
            self.results["env"].update(json.loads(env_file.read_text()))
        if rows_file.exists():
            self.results["throughput"] = [json.loads(line) for line in rows_file.read_text().splitlines() if line]
        self.write()

    def lm(self) -> bool:
        info = self.work / "lm_info.json"
        info.unlink(missing_ok=True)
        self.part("lm", self.child("lm"), reserve=self.plan.reload_reserve_s)
        if info.exists():
            self.results["lm"] = json.loads(info.read_text())
        self.write()
        return info.exists()

    def stage(self, zero: int, stage_no: int, stage1_dir: Optional[Path]) -> Optional[Path]:
        name = f"zero{zero}_stage{stage_no}"
        stage = "pretrain" if stage_no == 1 else "finetune"
        output_dir = self.work / name
        shutil.rmtree(output_dir, ignore_errors=True)
        cmd = launch_command(stage, zero, self.args.zero3_init == "true", output_dir, lm_dir=self.work / "lm",
                             stage1_dir=stage1_dir, plan=self.plan)
        with GpuMemoryPoller() as poller:
            outcome = self.part(name, cmd, reserve=self.plan.reload_reserve_s)
        if outcome is None:
            return None
        rc, lines, seconds = outcome
        batch = int(recipe_value(stage, "per_device_train_batch_size", self.plan, 8))
        summary: dict[str, Any] = {"stage": stage_no, "zero": zero, "seconds": round(seconds, 1),
                                   "from": stage1_dir.name if stage1_dir else "--language_model",
                                   "global_batch": batch, "status": self.results["parts"][name]["status"],
                                   "max_steps": int(recipe_value(stage, "max_steps", self.plan, 0))}
        summary.update(summarize_training(parse_train_logs(lines), batch))
        metrics_file = output_dir / "final_results.json"
        if metrics_file.exists():
            metrics = json.loads(metrics_file.read_text())
            summary["trainer"] = {k: metrics[k] for k in ("train_runtime", "train_samples_per_second",
                                                          "train_steps_per_second", "train_loss") if k in metrics}
            summary["peak_allocated_gib"] = trainer_memory(metrics)
        summary["peak_gpu_used_gib"] = None if poller.peak_mib is None else round(poller.peak_mib / 1024, 2)
        saved = (output_dir / "config.json").exists()
        summary["saved"] = saved
        self.results["recipes"][name] = summary
        self.write()
        return output_dir if rc == 0 and saved else None

    def reload(self, model_dirs: list[Path]) -> None:
        out_file = self.work / "reload.json"
        out_file.unlink(missing_ok=True)
        self.part("reload", self.child("reload", *map(str, model_dirs)))
        if out_file.exists():
            self.results["reload"] = json.loads(out_file.read_text())
        self.write()

    def run(self, parts: list[str]) -> int:
        self.write()
        if "kernels" in parts:
            self.kernels()
        if "throughput" in parts:
            self.throughput()
        finals: list[Path] = []
        chains = [z for z in (2, 3) if f"zero{z}" in parts]
        if chains:
            if self.lm():
                stage1_dirs: dict[int, Path] = {}
                for zero in chains:
                    stage1 = self.stage(zero, 1, None)
                    if stage1 is not None:
                        stage1_dirs[zero] = stage1
                    # stage 2 continues from its own chain's stage 1, else from the other chain's (so a stage-1
                    # failure under one ZeRO stage still lets stage 2 run under it)
                    start = stage1 or next(iter(stage1_dirs.values()), None)
                    if start is None:
                        self.skip(f"zero{zero}_stage2", "no stage-1 model was saved")
                        continue
                    final = self.stage(zero, 2, start)
                    if final is not None:
                        finals.append(final)
            else:
                for zero in chains:
                    self.skip(f"zero{zero}_stage1", "no language model directory")
        if "reload" in parts:
            if finals:
                self.reload(finals)
            else:
                self.skip("reload", "no stage-2 model was saved")
        self.results["meta"]["finished"] = True
        self.write()
        self.log.close()
        print((self.out / "results.md").read_text(), flush=True)
        failed = [n for n, r in self.results["parts"].items() if r.get("status") != "ok"]
        return 1 if failed else 0


def package_versions() -> dict[str, Optional[str]]:
    versions: dict[str, Optional[str]] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def host_info() -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "cpus": os.cpu_count()}
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout
            info["nvidia_smi"] = out.strip()
        except (OSError, subprocess.TimeoutExpired):
            pass
    return info


def default_scan_backend(dry_run: bool) -> str:
    """The fast scan on a GPU: mamba-ssm's kernel where it is installed, else the Triton kernels; "torch" on CPU."""
    if dry_run:
        return "torch"
    return "cuda" if importlib.util.find_spec("mamba_ssm") else "triton"


# --------------------------------------------------------------------------------------------------------- main

ALL_PARTS = ["throughput", "zero2", "zero3", "reload"]  # the default run
KNOWN_PARTS = ["kernels"] + ALL_PARTS


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU; exercises every code path")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "outputs" / "gpu_run"),
                        help="results.json, results.md, gpu_run.log (default: $OUT, else outputs/gpu_run)")
    parser.add_argument("--work", default=None, help="models and checkpoints (default: a new temporary directory)")
    parser.add_argument("--budget-s", type=float, default=None, help="overall time budget (default: the plan's)")
    parser.add_argument("--parts", default=",".join(ALL_PARTS),
                        help=f"comma-separated subset of {KNOWN_PARTS} (default: {','.join(ALL_PARTS)})")
    parser.add_argument("--cuda-graphs", choices=["on", "off"], default="on",
                        help="throughput: also measure Mamba-B inference replayed as one CUDA graph (CUDA only)")
    parser.add_argument("--scan-backend", default=None, help="DEFOCUS_SCAN_BACKEND for every part (default: cuda "
                                                             "with mamba-ssm, else triton; torch for --dry-run)")
    parser.add_argument("--zero3-init", choices=["true", "false"], default="true",
                        help="accelerate's zero3_init_flag for the ZeRO-3 launches (recipes/accelerate/zero3.yaml "
                             "sets true)")
    parser.add_argument("--child", choices=["throughput", "lm", "reload"], help=argparse.SUPPRESS)
    parser.add_argument("model_dirs", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.scan_backend = args.scan_backend or default_scan_backend(args.dry_run)
    unknown = set(args.parts.split(",")) - set(KNOWN_PARTS)
    if unknown:
        parser.error(f"--parts: unknown {sorted(unknown)}; choose from {KNOWN_PARTS}")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    plan = dry_plan() if args.dry_run else real_plan()
    if args.child:
        work = Path(args.work)
        if args.child == "throughput":
            run_throughput(plan, work / "throughput.jsonl", work / "env.json", args.cuda_graphs == "on")
        elif args.child == "lm":
            info = build_lm_dir(plan, work / "lm")
            print(json.dumps(info), flush=True)
            (work / "lm_info.json").write_text(json.dumps(info, indent=1))
        else:
            run_reload(plan, [Path(p) for p in args.model_dirs], work / "reload.json")
        return 0
    signal.signal(signal.SIGTERM, terminate_running)
    return Run(plan, args).run(args.parts.split(","))


if __name__ == "__main__":
    sys.exit(main())
