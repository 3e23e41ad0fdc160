"""What the one-GPU run of docs/gpu.md runs: its `Plan` (sizes, steps, budget; `real_plan()` for a GPU, `dry_plan()`
for the CPU dry run), the recipe files it launches, and the Qwen2-shaped language model its `lm` part builds.

Used by `gpu_run.py` (the orchestrator) and its children; no GPU needed to import it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "recipes" / "configs"
STAGE_CONFIGS = {"pretrain": CONFIGS / "gpu_pretrain_mamba_base.yaml",
                 "finetune": CONFIGS / "gpu_finetune_mamba_base.yaml"}
ZERO_CONFIGS = {2: ROOT / "recipes" / "deepspeed" / "zero2.json", 3: ROOT / "recipes" / "deepspeed" / "zero3.json"}

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
    """The run on one CUDA GPU: the real encoders and a ~0.5B LM within a 525 s budget."""
    return Plan(
        dry_run=False,
        resolutions=(224, 1024, 448, 672, 336),  # the ends first: a run cut short still shows the trend
        batch={224: 64, 336: 32, 448: 16, 672: 8, 1024: 4},
        warmup=2, min_iters=3, max_iters=50, target_s=1.0,
        lm_shape="qwen2-0.5b", vocab_size=1000, tokenizer_images=None,
        stage_overrides={"pretrain": [], "finetune": []},
        budget_s=525.0,
        timeouts={"kernels": 250, "throughput": 200, "lm": 90, "zero2_stage1": 100, "zero2_stage2": 110,
                  "zero3_stage1": 110, "zero3_stage2": 130, "reload": 80},
        min_part_s=25.0, reload_reserve_s=45.0, questions=3,
    )


DRY_VISION = "hidden_size=32,num_hidden_layers=2,intermediate_size=64,image_size=32,patch_size=8,drop_path_rate=0.0"


def dry_plan() -> Plan:
    """The CPU dry run: tiny sizes, a few steps, every code path of the real run."""
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
        timeouts={"kernels": 300, "throughput": 300, "lm": 300, "zero2_stage1": 300, "zero2_stage2": 300,
                  "zero3_stage1": 300, "zero3_stage2": 300, "reload": 300},
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

