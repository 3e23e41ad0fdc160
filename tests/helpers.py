"""Helpers shared by the tests: tiny configurations and models, script imports and `accelerate launch` command lines.

Plain functions and constants only; fixtures (the module-wide `one_thread` among them) live in `conftest.py`. A test
module that needs something another test module defines takes it from here, so that no test file imports another.
Not part of the package: nothing in `defocus_mllm` imports this module.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import string
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Iterable, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

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


def record_asked_questions(monkeypatch) -> list:
    """Wraps the evaluation's `generate_answers` so that every question id it is asked for lands in the returned list
    (to check what a resumed run asks again)."""
    import defocus_mllm.evaluation.generation as generation

    asked: list = []
    real = generation.generate_answers

    def counting(model, processor, samples, **kw):
        asked.extend(s.question_id for s in samples)
        return real(model, processor, samples, **kw)

    monkeypatch.setattr(generation, "generate_answers", counting)
    return asked


# ------------------------------------------------------------------------------------------ selective scan
# The float64 references and the inputs of test_ops, test_cpu_scan, test_triton_scan and test_mamba_mixer_op.
def literal_scan(u, delta, A, B, C):
    """The recurrence as written, one batch, channel, state and step at a time (float64)."""
    batch, dim, length = u.shape
    n_state = A.shape[1]
    y = torch.zeros(batch, dim, length, dtype=torch.float64)
    for b in range(batch):
        for d in range(dim):
            for n in range(n_state):
                s = torch.zeros((), dtype=torch.float64)
                for t in range(length):
                    s = torch.exp(delta[b, d, t] * A[d, n]) * s + delta[b, d, t] * B[b, n, t] * u[b, d, t]
                    y[b, d, t] = y[b, d, t] + C[b, n, t] * s
    return y


def vector_reference(u, delta, A, B, C):
    """The same recurrence vectorised over (b, d, n) for long sequences (float64)."""
    s = torch.zeros(u.shape[0], u.shape[1], A.shape[1], dtype=torch.float64)
    ys = []
    for t in range(u.shape[-1]):
        s = torch.exp(delta[:, :, t, None] * A) * s + (delta[:, :, t] * u[:, :, t])[..., None] * B[:, None, :, t]
        ys.append((s * C[:, None, :, t]).sum(-1))
    return torch.stack(ys, -1)


def make_inputs(batch=2, dim=3, length=7, n_state=4, seed=0, delta_scale=1.0, a_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(batch, dim, length, generator=g),
        (torch.rand(batch, dim, length, generator=g) + 0.05) * delta_scale,
        -(torch.rand(dim, n_state, generator=g) + 0.1) * a_scale,
        torch.randn(batch, n_state, length, generator=g),
        torch.randn(batch, n_state, length, generator=g),
    ]


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12)).item()


class _LargestOutput(TorchDispatchMode):
    """Records the largest tensor any ATen op creates while active."""

    def __init__(self):
        super().__init__()
        self.largest = (None, 0)
        self.calls = []  # (op name, numel) of outputs in new memory (views and no-op casts left out)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in list(args) + list((kwargs or {}).values())
                  if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                if t.untyped_storage().data_ptr() not in inputs:
                    self.calls.append((str(func), t.numel()))
                if t.numel() > self.largest[1]:
                    self.largest = (f"{func}: {tuple(t.shape)}", t.numel())
        return out


def max_tensor_numel(fn, calls=None):
    """`(description, numel)` of the largest tensor created by the ops `fn` runs; `calls` (a list) receives
    `(op, numel)` for each output in new memory."""
    with _LargestOutput() as mode:
        fn()
    if calls is not None:
        calls.extend(mode.calls)
    return mode.largest


# ------------------------------------------------------------------------------------- release checkpoints
# The sizes and a random state dict of a release-layout encoder (test_convert and the tests that convert one).
HIDDEN, DEPTH, INNER, STATE, RANK, GROUP, PATCH, CLASSES = 32, 2, 64, 8, 4, 16, 8, 5


def release_state_dict(seed=0, head="linear", aux=True):
    """A random state dict in the release's key layout (no `defocus.` prefix)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape, s=0.2: torch.randn(*shape, generator=g) * s  # noqa: E731
    sd = {"patch_embed.proj.weight": r(HIDDEN, 3, PATCH, PATCH, s=0.05), "patch_embed.proj.bias": r(HIDDEN),
          "cls_token": r(1, 1, HIDDEN), "norm.weight": 1 + r(HIDDEN), "norm.bias": r(HIDDEN)}
    for i in range(DEPTH):
        p = f"blocks.{i}."
        sd.update({
            p + "norm.weight": 1 + r(HIDDEN), p + "mixer.in_proj.weight": r(2 * INNER, HIDDEN),
            p + "mixer.conv1d.weight": r(INNER, 1, 4, s=0.4), p + "mixer.conv1d.bias": r(INNER),
            p + "mixer.x_proj.weight": r(RANK + 2 * STATE, INNER), p + "mixer.dt_proj.weight": r(INNER, RANK, s=0.5),
            p + "mixer.dt_proj.bias": r(INNER, s=1.0) - 3, p + "mixer.A_log": r(INNER, STATE, s=0.5) + 0.5,
            p + "mixer.D": 1 + r(INNER), p + "mixer.out_proj.weight": r(HIDDEN, INNER),
            p + "mixer.freq": torch.rand(STATE, generator=g),
        })
    heads = ["head"] + (["head2"] if aux else [])
    for h in heads:
        if head == "linear":
            sd.update({f"{h}.weight": r(CLASSES, HIDDEN), f"{h}.bias": r(CLASSES)})
        else:
            sd.update({f"{h}.0.weight": r(3 * HIDDEN, HIDDEN), f"{h}.0.bias": r(3 * HIDDEN),
                       f"{h}.2.weight": r(CLASSES, 3 * HIDDEN), f"{h}.2.bias": r(CLASSES)})
    return sd


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


# ------------------------------------------------------------------------------------------- evaluation


@functools.cache
def eval_run_script() -> ModuleType:
    """`eval/run.py` imported once as module `eval_run`: one module object for every test module (a test that
    patches it patches what the others run)."""
    return load_script(Path(__file__).resolve().parents[1] / "eval" / "run.py", "eval_run")


def build_saved_tiny_llava(path: Path):
    """A tiny De-focus Mamba + Llama LLaVA and its processor, saved to `path`. Weights are drawn with a
    large std so that answers depend on the image and the question (a freshly initialised tiny model
    answers everything the same way, which would hide padding or ordering mistakes)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import (
        CLIPImageProcessor,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    from defocus_mllm import DefocusVisionConfig

    vocab = {"<unk>": 0, "<pad>": 1, "<s>": 2, "</s>": 3, "<image>": 4}
    for ch in string.printable:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")  # one token per character
    tok.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>", extra_special_tokens={"image_token": "<image>"})
    vision = DefocusVisionConfig(hidden_size=32, num_hidden_layers=2, intermediate_size=64, time_step_rank=4,
                                 group_norm_size=16, patch_size=8, image_size=32)
    text = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
                       pad_token_id=1, bos_token_id=2, eos_token_id=3)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=4,
                         vision_feature_select_strategy="full", vision_feature_layer=-1)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}USER: {% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}\n"
        "{% else %}ASSISTANT: {{ m['content'][0]['text'] }}</s>{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    )
    processor = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                  crop_size={"height": 32, "width": 32}),
                               tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="full",
                               num_additional_image_tokens=1, chat_template=template)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return model, processor


def benchmark_cli_args(kwargs: dict) -> list[str]:
    flags = {"data": "--data", "split": "--split", "question_file": "--question-file",
             "image_folder": "--image-folder", "annotation_file": "--annotation-file"}
    out = []
    for key, value in kwargs.items():
        out += [flags[key], str(value)]
    return out


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]
