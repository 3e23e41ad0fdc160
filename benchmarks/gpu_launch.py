"""The recipe launches of the one-GPU run (docs/gpu.md): the `accelerate launch` command line of one LLaVA stage
under DeepSpeed ZeRO-2 / ZeRO-3 on one process, and the recipe values that launch ends up with.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path
from typing import Any, Optional

from gpu_plan import ROOT, STAGE_CONFIGS, ZERO_CONFIGS, Plan


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
