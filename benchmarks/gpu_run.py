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
to `--work` (default: a temporary directory), never to `--out`. This script runs the parts; `gpu_report.py` reads
their output back and writes results.md; `timing.py` times the throughput cells.
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
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

# the report's names stay importable from here (tests and older callers read them as gpu_run.<name>)
from gpu_report import (ENCODER_LABELS, ENCODERS, GRAPHED, error_lines, fused_path_goals, goal_line,  # noqa: F401
                        parse_train_logs, render_markdown, summarize_training, trainer_memory)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "recipes" / "configs"
STAGE_CONFIGS = {"pretrain": CONFIGS / "gpu_pretrain_mamba_base.yaml",
                 "finetune": CONFIGS / "gpu_finetune_mamba_base.yaml"}
ZERO_CONFIGS = {2: ROOT / "recipes" / "deepspeed" / "zero2.json", 3: ROOT / "recipes" / "deepspeed" / "zero3.json"}
PACKAGES = ["torch", "transformers", "accelerate", "deepspeed", "peft", "triton", "tokenizers", "safetensors",
            "huggingface-hub", "mamba-ssm", "causal-conv1d", "pydantic", "easy-vqa"]

# A Qwen2-shaped LM (GQA, q/k/v biases, SwiGLU, RMSNorm, tied embeddings). With the small easy-VQA vocabulary the
# embeddings are tiny, so the width is Qwen2.5-0.5B's 896 -> 1024 and the MLP 4864 -> 5632 to land near 0.5B.
LM_SHAPES: dict[str, dict[str, Any]] = {
    "qwen2-0.5b": dict(hidden_size=1024, intermediate_size=5632, num_hidden_layers=24, num_attention_heads=16,
                       num_key_value_heads=4, max_position_embeddings=2048),
    "qwen2-tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=1024),
}


# ------------------------------------------------------------------------------------------------------------ plan

@dataclass
class Plan:
    """Sizes, steps and time budget of one run; `real_plan()` for a GPU, `dry_plan()` for the CPU dry run."""

    dry_run: bool
    resolutions: tuple[int, ...]  # in the order they are measured (the report sorts them)
    batch: dict[int, int]  # images per batch at each resolution, the same for every encoder
    warmup: int
    min_iters: int
    max_iters: int
    target_s: float  # timed iterations last about this long
    lm_shape: str
    vocab_size: int
    tokenizer_images: Optional[int]  # easy-VQA images whose text trains the tokenizer (None: all)
    stage_overrides: dict[str, list[str]]  # extra recipe arguments per stage
    budget_s: float
    timeouts: dict[str, float]  # per part
    min_part_s: float  # a part is skipped when less than this is left
    reload_reserve_s: float  # kept back for the reload part while stages run
    questions: int  # easy-VQA test questions asked after reloading


def real_plan() -> Plan:
    return Plan(
        dry_run=False,
        resolutions=(224, 1024, 448, 672, 336),  # the ends first: a run cut short still shows the trend
        batch={224: 64, 336: 32, 448: 16, 672: 8, 1024: 4},
        warmup=2, min_iters=3, max_iters=50, target_s=1.0,
        lm_shape="qwen2-0.5b", vocab_size=1000, tokenizer_images=None,
        stage_overrides={"pretrain": [], "finetune": []},
        budget_s=525.0,
        timeouts={"kernels": 250, "throughput": 200, "lm": 90, "zero2_stage1": 100, "zero2_stage2": 110, "zero3_stage1": 110,
                  "zero3_stage2": 130, "reload": 80},
        min_part_s=25.0, reload_reserve_s=45.0, questions=3,
    )


DRY_VISION = "hidden_size=32,num_hidden_layers=2,intermediate_size=64,image_size=32,patch_size=8,drop_path_rate=0.0"


def dry_plan() -> Plan:
    common = ["--use_cpu", "true", "--max_steps", "3", "--per_device_train_batch_size", "2", "--max_train_samples", "8",
              "--dataloader_num_workers", "0", "--warmup_steps", "0"]
    return Plan(
        dry_run=True,
        resolutions=(32, 64),
        batch={32: 2, 64: 2},
        warmup=1, min_iters=2, max_iters=2, target_s=0.0,
        lm_shape="qwen2-tiny", vocab_size=400, tokenizer_images=64,
        stage_overrides={"pretrain": [*common, "--vision_tower", "mamba-tiny", "--vision_overrides", DRY_VISION],
                         "finetune": common},
        budget_s=1500.0,
        timeouts={"kernels": 300, "throughput": 300, "lm": 300, "zero2_stage1": 300, "zero2_stage2": 300, "zero3_stage1": 300,
                  "zero3_stage2": 300, "reload": 300},
        min_part_s=10.0, reload_reserve_s=60.0, questions=2,
    )


# ------------------------------------------------------------------------------------------------ the LM builder

def qwen2_lm_config(vocab_size: int, shape: str = "qwen2-0.5b", **overrides: Any):
    """A randomly initialisable `Qwen2Config` of the named shape (`LM_SHAPES`) for a tokenizer of `vocab_size`.

    Special token ids follow `defocus_mllm.training.tiny_lm.SPECIAL_TOKENS` (`<unk> <pad> <s> </s>` = 0..3).
    """
    from transformers import Qwen2Config

    kwargs = dict(LM_SHAPES[shape], vocab_size=vocab_size, tie_word_embeddings=True, rope_theta=1_000_000.0,
                  rms_norm_eps=1e-6, hidden_act="silu", pad_token_id=1, bos_token_id=2, eos_token_id=3,
                  use_sliding_window=False)
    kwargs.update(overrides)
    return Qwen2Config(**kwargs)


def lm_parameter_count(config) -> int:
    """Parameters of a Qwen2 causal LM with `config`, counted from the shapes (no model is built)."""
    h, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q = config.num_attention_heads * head_dim
    kv = config.num_key_value_heads * head_dim
    attention = (h * q + q) + 2 * (h * kv + kv) + q * h  # q, k, v with biases; o without
    per_layer = attention + 3 * h * inter + 2 * h  # SwiGLU MLP, two RMSNorms
    embeddings = config.vocab_size * h * (1 if config.tie_word_embeddings else 2)
    return embeddings + layers * per_layer + h  # final norm


def build_lm_dir(plan: Plan, out_dir: Path) -> dict[str, Any]:
    """Train a BPE tokenizer on easy-VQA's text (both stages' data, the chat template's words), build the LM at
    random in bf16 (as real checkpoints are stored), and save both to `out_dir`."""
    import torch
    from transformers import AutoModelForCausalLM

    from defocus_mllm.data.easy_vqa import load_easy_vqa
    from defocus_mllm.training.llava_setup import corpus_for_tokenizer
    from defocus_mllm.training.tiny_lm import train_tokenizer

    started = time.time()
    limit = plan.tokenizer_images
    corpus = (corpus_for_tokenizer(load_easy_vqa("train", limit=limit))
              + corpus_for_tokenizer(load_easy_vqa("train", captions=True, limit=limit)))
    tokenizer = train_tokenizer(corpus, vocab_size=plan.vocab_size)
    config = qwen2_lm_config(len(tokenizer), plan.lm_shape)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return {"shape": plan.lm_shape, "model_type": config.model_type, "parameters": params,
            "vocab_size": len(tokenizer), "hidden_size": config.hidden_size, "layers": config.num_hidden_layers,
            "dtype": "bfloat16", "seconds": round(time.time() - started, 1)}


# --------------------------------------------------------------------------------------------------- throughput

def encoder_specs(dry_run: bool) -> dict[str, tuple[Any, dict[str, Any]]]:
    """`name -> (config, forward kwargs)` of the three encoders, random weights."""
    from transformers import CLIPVisionConfig, ViTConfig

    from defocus_mllm import DefocusVisionConfig
    from defocus_mllm.training.arguments import parse_overrides

    if dry_run:
        mamba = DefocusVisionConfig.from_preset("mamba-tiny", **parse_overrides(DRY_VISION))
        vit = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        patch_size=8, image_size=32)
        clip = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                patch_size=8, image_size=32)
    else:
        # stochastic depth off: the timed forward+backward runs in train mode and must run every block
        mamba = DefocusVisionConfig.from_preset("mamba-base", drop_path_rate=0.0, use_scheduled_drop_path=False)
        vit = ViTConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                        patch_size=16, image_size=224)
        clip = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                num_attention_heads=16, patch_size=14, image_size=336, projection_dim=768)
    return {"defocus-mamba-base": (mamba, {}), "vit-b16": (vit, {"interpolate_pos_encoding": True}),
            "clip-vit-l14": (clip, {"interpolate_pos_encoding": True})}


def build_encoder(name: str, config: Any, device: str):
    import torch
    from transformers import CLIPVisionModel, ViTModel

    from defocus_mllm import DefocusVisionModel

    torch.manual_seed(0)
    if name == "defocus-mamba-base":
        model = DefocusVisionModel(config)
    elif name == "vit-b16":
        model = ViTModel._from_config(config, attn_implementation="sdpa", add_pooling_layer=False)
    else:
        model = CLIPVisionModel._from_config(config, attn_implementation="sdpa")
    return model.to(device=device, dtype=torch.bfloat16)


def tokens_per_image(config: Any, resolution: int) -> int:
    """Tokens the encoder mixes at `resolution`: the patches (the conv drops a remainder) plus one CLS token."""
    return (resolution // config.patch_size) ** 2 + 1


def measure_encoder(model, forward_kwargs: dict[str, Any], config: Any, name: str, resolution: int, batch: int,
                    mode: str, plan: Plan, device: str, cuda_graph: bool = False) -> dict[str, Any]:
    """One row: images/s, tokens/s and peak memory of `model` at `resolution` in `mode` ("inference" | "train").

    `cuda_graph`: the inference forward captured once as a CUDA graph and replayed (`ops.cuda_graphs`); the row is
    named `name + "+graph"`.
    """
    import torch
    from timing import PeakMemory, adaptive_mean_time, encoder_step

    cuda = device == "cuda"
    row: dict[str, Any] = {"model": name + ("+graph" if cuda_graph else ""), "resolution": resolution,
                           "mode": mode, "batch": batch, "tokens": tokens_per_image(config, resolution)}
    pixels = torch.randn(batch, 3, resolution, resolution, device=device, dtype=torch.bfloat16)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())

    measured: dict[str, Any] = {}

    def timed_loop() -> None:
        fn = encoder_step(model, pixels, mode, **forward_kwargs)
        if cuda_graph:
            if mode != "inference" or not cuda:
                raise ValueError("measure_encoder: cuda_graph is for inference on CUDA")
            from defocus_mllm.ops.cuda_graphs import CUDAGraphInference

            graph = CUDAGraphInference(lambda p: model(pixel_values=p, **forward_kwargs).last_hidden_state, pixels)
            fn = lambda: graph(pixels)  # noqa: E731 - the graph's memory pool goes when this call returns
        measured["seconds"], measured["iters"] = adaptive_mean_time(fn, device, plan.warmup, plan.min_iters,
                                                                    plan.max_iters, plan.target_s)

    try:
        if cuda:
            torch.cuda.empty_cache()
            # this model's weights plus everything its measurement allocated on top of what was resident
            row["peak_mem_gib"] = round((PeakMemory(device).measure(timed_loop) * 2**20 + weight_bytes) / 2**30, 3)
        else:
            timed_loop()
        seconds = measured["seconds"]
        row.update(status="ok", ms_per_batch=round(seconds * 1e3, 3), iters=measured["iters"],
                   images_per_s=round(batch / seconds, 2), tokens_per_s=round(batch * row["tokens"] / seconds, 1))
    except torch.cuda.OutOfMemoryError:
        row["status"] = "oom"
    except Exception as exc:  # noqa: BLE001 - one failing cell must not lose the others
        row["status"] = f"error: {type(exc).__name__}: {str(exc)[:200]}"
    finally:
        model.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.empty_cache()
    return row


def run_throughput(plan: Plan, out_file: Path, env_file: Path, cuda_graphs: bool = True) -> None:
    """Child of the `throughput` part: one JSON line per measurement, written as it completes."""
    import torch

    from defocus_mllm.ops import available_backends

    device = "cpu" if plan.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_run: no CUDA device (use --dry-run on a CPU machine)")
    wanted = os.environ.get("DEFOCUS_SCAN_BACKEND", "default")
    # The recipes' processes only `import defocus_mllm`: whether that alone registers the wanted backend matters.
    env = {"device": device, "scan_backend": wanted, "scan_backends_available": available_backends(),
           "scan_backend_registered_by_import": wanted == "default" or wanted in available_backends(),
           "torch_cuda": torch.version.cuda}
    if not env["scan_backend_registered_by_import"] and importlib.util.find_spec("defocus_mllm.ops.triton_scan"):
        importlib.import_module("defocus_mllm.ops.triton_scan")  # registers "triton" for the measurements here
        env["scan_backends_available"] = available_backends()
        print(f"gpu_run: WARNING: `import defocus_mllm` does not register scan backend {wanted!r}; the recipe "
              "launches will fail to find it", flush=True)
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   capability=f"{props.major}.{props.minor}", multiprocessors=props.multi_processor_count)
    env_file.write_text(json.dumps(env, indent=1))
    specs = encoder_specs(plan.dry_run)
    models = {name: build_encoder(name, config, device) for name, (config, _) in specs.items()}
    env["attn_implementation"] = {n: getattr(m.config, "_attn_implementation", None) for n, m in models.items()}
    env["encoder_parameters"] = {n: sum(p.numel() for p in m.parameters()) for n, m in models.items()}
    env_file.write_text(json.dumps(env, indent=1))
    with out_file.open("a") as f:
        for resolution in plan.resolutions:
            for name, model in models.items():
                config, kwargs = specs[name]
                runs = [("inference", False), ("train", False)]
                if cuda_graphs and device == "cuda" and name == "defocus-mamba-base":
                    runs.insert(1, ("inference", True))
                for mode, graph in runs:
                    row = measure_encoder(model, kwargs, config, name, resolution, plan.batch[resolution], mode,
                                          plan, device, cuda_graph=graph)
                    print(json.dumps(row), flush=True)
                    f.write(json.dumps(row) + "\n")
                    f.flush()


# ------------------------------------------------------------------------------------------------------- reload

def run_reload(plan: Plan, model_dirs: list[Path], out_file: Path) -> None:
    """Child of the `reload` part: load each saved model with `AutoModelForImageTextToText` and answer questions."""
    import torch
    from easy_vqa import get_test_image_paths, get_test_questions
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import defocus_mllm  # noqa: F401 - registers the De-focus encoder with the Auto classes
    from defocus_mllm import chat

    device = "cpu" if plan.dry_run else "cuda"
    questions, answers, image_ids = get_test_questions()
    paths = get_test_image_paths()
    results = []
    for model_dir in model_dirs:
        started = time.time()
        entry: dict[str, Any] = {"model_dir": model_dir.name}
        try:
            model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.bfloat16).to(device).eval()
            processor = AutoProcessor.from_pretrained(model_dir)
            entry["load_s"] = round(time.time() - started, 1)
            entry["dtypes"] = sorted({str(p.dtype).replace("torch.", "") for p in model.parameters()})
            qa = []
            t0 = time.time()
            for i in range(plan.questions):
                answer = chat(model, processor, paths[image_ids[i]], questions[i], max_new_tokens=5)
                qa.append({"question": questions[i], "answer": answer, "gold": answers[i]})
            entry.update(status="ok", answers=qa, generate_s=round(time.time() - t0, 2))
            del model
            if device == "cuda":
                torch.cuda.empty_cache()
        except Exception as exc:  # noqa: BLE001 - the other directories still get their turn
            entry["status"] = f"error: {type(exc).__name__}: {str(exc)[:300]}"
        print(json.dumps(entry), flush=True)
        results.append(entry)
        out_file.write_text(json.dumps(results, indent=1))


# ------------------------------------------------------------------------------------------- the recipe launches

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_command(stage: str, zero: int, zero3_init: bool, output_dir: Path, *, lm_dir: Optional[Path],
                   stage1_dir: Optional[Path], plan: Plan) -> list[str]:
    """`accelerate launch` of `recipes/{pretrain,finetune}.py` with DeepSpeed ZeRO-`zero` on one process."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
           "--main_process_port", str(free_port()), "--use_deepspeed", "--deepspeed_config_file",
           str(ZERO_CONFIGS[zero]), "--zero3_init_flag", "true" if zero == 3 and zero3_init else "false",
           str(ROOT / "recipes" / f"{stage}.py"), "--config", str(STAGE_CONFIGS[stage]),
           "--output_dir", str(output_dir)]
    if stage == "pretrain":
        cmd += ["--language_model", str(lm_dir)]
    else:
        cmd += ["--model_name_or_path", str(stage1_dir)]
    return cmd + plan.stage_overrides[stage]


def recipe_value(stage: str, key: str, plan: Plan, default: Any = None) -> Any:
    """`key` as the launch sets it: the command-line override, else the stage's YAML file."""
    import yaml

    overrides = plan.stage_overrides[stage]
    flag = f"--{key}"
    if flag in overrides:
        return overrides[overrides.index(flag) + 1]
    return (yaml.safe_load(STAGE_CONFIGS[stage].read_text()) or {}).get(key, default)


# ------------------------------------------------------------------------------------------------ orchestration

class GpuMemoryPoller:
    """Samples `nvidia-smi`'s used memory of GPU 0 every half second (the whole card, context and cache included)."""

    def __init__(self) -> None:
        self.peak_mib: Optional[float] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def __enter__(self) -> "GpuMemoryPoller":
        if shutil.which("nvidia-smi"):
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                                      "-i", "0"], capture_output=True, text=True, timeout=5).stdout.strip()
                used = float(out.splitlines()[0])
                self.peak_mib = used if self.peak_mib is None else max(self.peak_mib, used)
            except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
                pass
            self._stop.wait(0.5)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=6)


def run_streamed(cmd: list[str], timeout: float, env: dict[str, str], log) -> tuple[Any, list[tuple[float, str]]]:
    """Run `cmd` in its own process group, stream its output (time-stamped) into `log`, kill the whole group at
    `timeout`. Returns `(returncode or "timeout", [(time, line), ...])`."""
    lines: list[tuple[float, str]] = []
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT,
                            start_new_session=True, bufsize=1, errors="replace")
    RUNNING[:] = [proc]

    started = time.time()

    def reader() -> None:
        for line in proc.stdout:
            now = time.time()
            lines.append((now, line.rstrip("\n")))
            log.write(f"[{now - started:7.1f}s] {line}")
            log.flush()

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    try:
        rc: Any = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        rc = "timeout"
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=10)
                break
            except subprocess.TimeoutExpired:
                continue
    thread.join(timeout=10)
    RUNNING.clear()
    return rc, lines


RUNNING: list[subprocess.Popen] = []  # the part in flight, whose process group a SIGTERM to this script ends too


def _terminate(signum, frame) -> None:
    for proc in RUNNING:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    raise SystemExit(128 + signum)


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
    signal.signal(signal.SIGTERM, _terminate)
    return Run(plan, args).run(args.parts.split(","))


if __name__ == "__main__":
    sys.exit(main())
