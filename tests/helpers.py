"""Helpers shared by the tests: tiny configurations and models, script imports, `accelerate launch` command lines,
the tiny recipe arguments and LLaVA-json samples, and small file helpers.

Plain functions and constants only; fixtures (the module-wide `one_thread` among them) live in `conftest.py`. The other
helper modules hold one concern each: `scan_reference.py` (float64 selective-scan references and inputs),
`op_checks.py` (error and memory measures of an op), `release_checkpoint.py` (a release-layout state dict),
`evaluation_helpers.py` (`eval/run.py`, the saved tiny LLaVA, result files), `evaluation_fixtures.py` (every
benchmark's files) and `triton_helpers.py` (Triton's interpreter in a fresh process). A test module that needs
something another test module defines takes it from one of these, so that no test file imports another.
Not part of the package: nothing in `defocus_mllm` imports these modules.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Iterable, Optional

import torch

from defocus_mllm import DefocusVisionConfig, build_llava
from defocus_mllm.training.tiny_lm import tiny_llama_config, train_tokenizer


def build_tiny_llava(texts: Optional[Iterable[str]] = None, vision: Optional[DefocusVisionConfig] = None,
                     vocab_size: int = 256, **lm_overrides: Any):
    """`(model, processor)`: a tiny De-focus Mamba encoder and a tiny Llama joined by `build_llava`.

    The tokenizer is trained on `texts` (a small default corpus when none is given).
    """
    if texts is None:
        texts = ["what shape is in the image?", "what color is the shape?", "is there a red circle?",
                 "yes", "no", "circle", "rectangle", "triangle", "red", "green", "blue", "USER: ASSISTANT:"]
    tokenizer = train_tokenizer(texts, vocab_size=vocab_size)
    vision = vision or DefocusVisionConfig.from_preset("mamba-tiny", hidden_size=32, num_hidden_layers=2,
                                                       intermediate_size=64, image_size=32)
    lm_config = tiny_llama_config(len(tokenizer), **lm_overrides)
    return build_llava(vision, lm_config, tokenizer=tokenizer)


# The tiny preset of each mixer (docs/method.md §2.5-2.6 sizes scaled down); `tiny_encoder_config` shrinks it further.
TINY_PRESETS = {"mamba": "mamba-tiny", "attention": "vit-tiny", "retention": "retnet-tiny"}


def tiny_config(preset: str = "vit-tiny", **overrides: Any) -> DefocusVisionConfig:
    """The named preset (a `*-tiny` one: a few-million-parameter encoder) with keyword overrides."""
    return DefocusVisionConfig.from_preset(preset, **overrides)


def tiny_encoder_config(mixer: str = "mamba", **overrides: Any) -> DefocusVisionConfig:
    """A 3-block, 32-wide encoder of any mixer with a tiny preset, patch 8, 32x32 images."""
    kwargs = dict(hidden_size=32, num_hidden_layers=3, intermediate_size=64, group_norm_size=16, time_step_rank=4,
                  state_size=8, num_attention_heads=4, mlp_ratio=2.0, image_size=32)
    kwargs.update(overrides)
    return DefocusVisionConfig.from_preset(TINY_PRESETS[mixer], **kwargs)


def input_dependent_tiny_llava(**lm_overrides: Any):
    """`build_tiny_llava` seeded, in eval mode, with its matrices redrawn large (std 0.3): a freshly initialised tiny
    model answers everything alike, large weights make answers depend on the input, so that padding or batching
    mistakes show."""
    torch.manual_seed(0)
    model, processor = build_tiny_llava(**lm_overrides)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    return model.eval(), processor


def free_port() -> int:
    """A TCP port nothing listens on now, for a test's `accelerate launch --main_process_port` (two launches on the
    default port at once, from parallel test runs, abort each other's process groups).

    Taken at random below the kernel's ephemeral range: a port from inside it (what binding port 0 gives) can be
    handed to another process's outgoing connection, gloo's own included, between this check and the launch.
    """
    import random
    import socket

    try:
        low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    # the OS's randomness: tests seed `random` (set_seed), so two test runs side by side would draw the same ports
    draw = random.SystemRandom()
    for _ in range(100):
        port = draw.randrange(10000, max(low, 10001))
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("free_port: no free port found below the ephemeral range")


def accelerate_launch_command(*launch_args: str) -> list[str]:
    """`python -m accelerate.commands.launch --main_process_port <free> *launch_args` as an argument list."""
    import sys

    return [sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", str(free_port()), *launch_args]


def load_script(path: str | os.PathLike, name: str) -> ModuleType:
    """Import a script that is not part of the package (a recipe, an `eval/` command) as module `name`.

    As when the script runs, its folder is on `sys.path`, so that it finds its sibling modules (`benchmarks/`'s
    scripts import `timing`)."""
    folder = str(Path(path).resolve().parent)
    if folder not in sys.path:
        sys.path.append(folder)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def scramble_filter(mixer, generator: torch.Generator) -> None:
    """Move an attention / retention mixer's filter off its initial values, so that tests do not pass by a symmetry
    of the initialisation."""
    with torch.no_grad():
        if mixer.filter.A_log is not None:
            mixer.filter.A_log.copy_(torch.randn(mixer.filter.A_log.shape, generator=generator) - 2.0)
        if mixer.filter.freq is not None:
            mixer.filter.freq.copy_(torch.rand(mixer.filter.freq.shape, generator=generator))


# ----------------------------------------------------------------------------------------------- recipes
# The command line of a tiny recipe run, and a two-class image folder.
TINY_RECIPE_ARGS = [
    "--vision_overrides", "hidden_size=32,num_hidden_layers=2,intermediate_size=64,patch_size=16,image_size=32",
    "--tiny_lm_hidden_size", "32", "--tiny_vocab_size", "300", "--max_train_samples", "48",
    "--per_device_train_batch_size", "8", "--report_to", "none", "--disable_tqdm", "true", "--use_cpu", "true",
    "--dataloader_num_workers", "0", "--eval_easy_vqa", "false", "--save_strategy", "no", "--logging_steps", "1",
    "--vision_warmup_epochs", "0", "--easy_vqa_curriculum", ""]


def colour_folder(root: Path) -> Path:
    from PIL import Image

    for name, colour in (("blue", (0, 0, 255)), ("red", (255, 0, 0))):
        (root / name).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (32, 32), tuple(max(0, c - 20 * i) for c in colour)).save(root / name / f"{i}.png")
    return root


def truncate_file(path: Path) -> None:
    """Cut a file to half its length, as a copy or a download that stopped early leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# A LLaVA-json sample, an image folder with readable and cut-short PNGs, and a JSON-lines file whose lines may be
# malformed on purpose (the bad-sample tests of test_training_data and test_recipes).
GOOD_TURNS = [{"from": "human", "value": "<image>\nwhat color is the shape?"}, {"from": "gpt", "value": "blue"}]


def image_folder_with(folder: Path, good: Iterable[str] = ("ok.png",), corrupt: Iterable[str] = ()) -> Path:
    """`folder` holding a blue 16x16 PNG per name in `good` and a cut-short PNG per name in `corrupt`."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for name in good:
        Image.new("RGB", (16, 16), (0, 0, 200)).save(folder / name)
    for name in corrupt:
        (folder / name).write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    return folder


def llava_record(i: int, image: str = "ok.png", turns: list = GOOD_TURNS) -> dict:
    """Sample `s<i>` in LLaVA's JSON layout."""
    return {"id": f"s{i}", "image": image, "conversations": turns}


def write_json_lines(path: Path, lines: list) -> Path:
    """One line per item: a string as it is (so that a line can be malformed), anything else as JSON."""
    import json

    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path
