"""Helpers shared by the tests: tiny configurations and models, script imports and `accelerate launch` command lines.

Plain functions and constants only; fixtures (the module-wide `one_thread` among them) live in `conftest.py`. A test
module that needs something another test module defines takes it from here, so that no test file imports another.
Not part of the package: nothing in `defocus_mllm` imports this module.
"""

from __future__ import annotations

import base64
import functools
import importlib.util
import io
import json
import os
import string
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Iterable, Optional

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

from defocus_mllm import DefocusVisionConfig, build_llava
from defocus_mllm.prompts import SHORT_ANSWER_INSTRUCTION
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
    import defocus_mllm.evaluation.runner as runner

    asked: list = []
    real = runner.generate_answers

    def counting(model, processor, samples, **kw):
        asked.extend(s.question_id for s in samples)
        return real(model, processor, samples, **kw)

    monkeypatch.setattr(runner, "generate_answers", counting)
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


# ------------------------------------------------------------------------------------------ evaluation datasets
# Tiny fixture datasets of every benchmark in both input layouts (LLaVA-1.5's eval folders and lmms-lab parquet files),
# with real small images: the loader, end-to-end and official-rule tests all build their data with these.
COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255)]


def _image(i: int, size: int = 24) -> Image.Image:
    img = Image.new("RGB", (size, size), COLORS[i % len(COLORS)])
    img.putpixel((i % size, 0), (0, 0, 0))  # every image differs
    return img


def _save(path: Path, i: int) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    _image(i).save(path)
    return path.name


def png_bytes(i: int) -> bytes:
    buf = io.BytesIO()
    _image(i).save(buf, format="PNG")
    return buf.getvalue()


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_parquet(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=2)  # several row groups on purpose


def hf_image(i: int) -> dict:
    return {"bytes": png_bytes(i), "path": f"{i}.png"}


def _q(text: str) -> str:
    return f"{text}\n{SHORT_ANSWER_INSTRUCTION}"


# Each builder writes one benchmark in one layout under `root` and returns the keyword arguments of
# `Benchmark.load` / `run_benchmark` plus what the tests expect.


def vqav2_llava(root: Path) -> dict:
    d = root / "vqav2"
    qs = []
    for i in range(3):
        name = _save(d / "test2015" / f"COCO_test2015_{i:012d}.jpg", i)
        qs.append({"question_id": 100 + i, "image": name, "text": _q(f"What color is image {i}?"), "category": "default"})
    write_jsonl(d / "llava_vqav2_mscoco_test-dev2015.jsonl", qs)
    write_jsonl(d / "llava_vqav2_mscoco_test2015.jsonl", qs + [{"question_id": 999, "image": "x.jpg", "text": "?"}])
    return {"kwargs": {"data": d}, "count": 3, "scored": False, "submission": 4}


def vqav2_llava_val(root: Path) -> dict:
    d = root / "vqav2val"
    qs, anns = [], []
    for i in range(3):
        name = _save(d / "val2014" / f"COCO_val2014_{i:012d}.jpg", i)
        qs.append({"question_id": 200 + i, "image": name, "text": _q(f"How many things {i}?")})
        anns.append({"question_id": 200 + i, "answer_type": "number" if i else "yes/no",
                     "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1}
                                 for j, a in enumerate(["2"] * 4 + ["two"] * 3 + ["3"] * 3)]})
    write_jsonl(d / "llava_vqav2_val.jsonl", qs)
    (d / "v2_mscoco_val2014_annotations.json").write_text(json.dumps({"annotations": anns}))
    return {"kwargs": {"data": d, "question_file": d / "llava_vqav2_val.jsonl", "image_folder": d / "val2014",
                       "annotation_file": d / "v2_mscoco_val2014_annotations.json"},
            "count": 3, "scored": True, "submission": 3}


def vqav2_hf(root: Path) -> dict:
    d = root / "VQAv2"
    val = [{"question_id": 300 + i, "question": f"What is {i}?", "image": hf_image(i), "answer_type": "other",
            "answers": [{"answer": "red", "answer_confidence": "yes", "answer_id": j} for j in range(1, 11)]}
           for i in range(5)]
    test = [{"question_id": 400 + i, "question": f"What is {i}?", "image": hf_image(i), "answer_type": None,
             "answers": None} for i in range(2)]
    write_parquet(d / "data" / "validation-00000-of-00001.parquet", val)
    write_parquet(d / "data" / "testdev-00000-of-00001.parquet", test)
    return {"kwargs": {"data": d, "split": "validation"}, "count": 5, "scored": True, "submission": 5}


def gqa_llava(root: Path) -> dict:
    d = root / "gqa"
    qs, gt = [], {}
    for i in range(4):
        name = _save(d / "data" / "images" / f"n{i}.jpg", i)
        qs.append({"question_id": f"20{i}", "image": name, "text": _q(f"Is it {i}?")})
        gt[f"20{i}"] = {"answer": "yes" if i % 2 else "no", "imageId": f"n{i}", "isBalanced": True,
                        "types": {"structural": "verify", "semantic": "attr", "detailed": "existC"}}
    write_jsonl(d / "llava_gqa_testdev_balanced.jsonl", qs)
    (d / "data" / "testdev_balanced_questions.json").write_text(json.dumps(gt))
    return {"kwargs": {"data": d}, "count": 4, "scored": True}


def gqa_hf(root: Path) -> dict:
    d = root / "GQA"
    qs = [{"id": f"q{i}", "imageId": f"n{i % 2}", "question": f"Where is {i}?", "answer": "left",
           "fullAnswer": "It is on the left.", "isBalanced": True,
           "types": {"structural": "query", "semantic": "rel", "detailed": "relS"}} for i in range(3)]
    ims = [{"id": f"n{i}", "image": hf_image(i)} for i in range(2)]
    write_parquet(d / "testdev_balanced_instructions" / "testdev-00000-of-00001.parquet", qs)
    write_parquet(d / "testdev_balanced_images" / "testdev-00000-of-00001.parquet", ims)
    return {"kwargs": {"data": d}, "count": 3, "scored": True}


def textvqa_llava(root: Path) -> dict:
    d = root / "textvqa"
    qs, anns = [], []
    for i, (img, q) in enumerate([("a1", "what brand is this?"), ("a1", "what number is shown?"), ("b2", "what does it say?")]):
        _save(d / "train_images" / f"{img}.jpg", i)
        # LLaVA's file stores the image id as question_id, so two questions on one image share it
        qs.append({"question_id": img, "image": f"{img}.jpg",
                   "text": f"{q}\nReference OCR token: ACME, 42\n{SHORT_ANSWER_INSTRUCTION}"})
        anns.append({"question_id": 500 + i, "image_id": img, "question": q.capitalize(), "answers": ["acme"] * 10})
    write_jsonl(d / "llava_textvqa_val_v051_ocr.jsonl", qs)
    (d / "TextVQA_0.5.1_val.json").write_text(json.dumps({"data": anns}))
    return {"kwargs": {"data": d}, "count": 3, "scored": True}


def textvqa_hf(root: Path) -> dict:
    d = root / "textvqa_hf"
    rows = [{"question_id": 600 + i, "question": f"what is written {i}?", "image": hf_image(i),
             "answers": ["stop"] * 10, "ocr_tokens": ["STOP", "sign"]} for i in range(3)]
    write_parquet(d / "data" / "validation-00000-of-00001.parquet", rows)
    return {"kwargs": {"data": d}, "count": 3, "scored": True}


def vizwiz_llava(root: Path) -> dict:
    d = root / "vizwiz"
    qs = []
    for i in range(3):
        name = _save(d / "test" / f"VizWiz_test_{i:08d}.jpg", i)
        qs.append({"question_id": i, "image": name,
                   "text": f"What is this {i}?\nWhen the provided information is insufficient, respond with "
                           f"'Unanswerable'.\n{SHORT_ANSWER_INSTRUCTION}"})
    write_jsonl(d / "llava_test.jsonl", qs)
    return {"kwargs": {"data": d}, "count": 3, "scored": False, "submission": 3}


def vizwiz_hf(root: Path) -> dict:
    d = root / "VizWiz-VQA"
    rows = [{"question_id": f"VizWiz_val_{i:08d}", "question": f"What is {i}?", "image": hf_image(i),
             "answers": ["unanswerable"] * 6 + ["blue"] * 4, "category": "other"} for i in range(3)]
    write_parquet(d / "data" / "val-00000-of-00001.parquet", rows)
    return {"kwargs": {"data": d}, "count": 3, "scored": True, "submission": 3}


def pope_llava(root: Path) -> dict:
    d = root / "pope"
    qs, labels = [], {}
    qid = 1
    for cat in ("adversarial", "popular", "random"):
        labels[cat] = []
        for k in range(2):
            name = _save(d / "val2014" / f"COCO_val2014_{qid:012d}.jpg", qid)
            text = f"Is there a dog in the image {qid}?"
            qs.append({"question_id": qid, "image": name, "text": _q(text), "category": cat})
            labels[cat].append({"question_id": k + 1, "image": name, "text": text, "label": "yes" if k == 0 else "no"})
            qid += 1
    write_jsonl(d / "llava_pope_test.jsonl", qs)
    for cat, rows in labels.items():
        write_jsonl(d / "coco" / f"coco_pope_{cat}.json", rows)
    return {"kwargs": {"data": d}, "count": 6, "scored": True}


def pope_hf(root: Path) -> dict:
    d = root / "POPE"
    rows = [{"id": str(i), "question_id": str(i + 1), "question": f"Is there a cat {i}?", "answer": "yes" if i % 2 else "no",
             "image_source": f"COCO_val2014_{i:012d}", "image": hf_image(i),
             "category": ("adversarial", "popular", "random")[i % 3]} for i in range(6)]
    write_parquet(d / "data" / "test-00000-of-00001.parquet", rows)
    return {"kwargs": {"data": d}, "count": 6, "scored": True}


def scienceqa_llava(root: Path) -> dict:
    d = root / "scienceqa"
    items, problems = [], {}
    for i in range(4):
        pid = str(10 + i)
        choices = ["cat", "dog", "bird"][: 2 + i % 2]
        problems[pid] = {"question": f"Which animal {i}?", "choices": choices, "answer": i % len(choices),
                         "hint": "", "split": "test"}
        opts = "\n".join(f"{'ABC'[j]}. {c}" for j, c in enumerate(choices))
        item = {"id": pid, "conversations": [{"from": "human", "value": f"<image>\nContext: N/A\nWhich animal {i}?\n{opts}"},
                                             {"from": "gpt", "value": "ABC"[i % len(choices)]}]}
        if i != 3:  # the last one has no image: not part of ScienceQA-IMG
            _save(d / "images" / "test" / pid / "image.png", i)
            item["image"] = f"{pid}/image.png"
        items.append(item)
    (d / "llava_test_CQM-A.json").write_text(json.dumps(items))
    (d / "problems.json").write_text(json.dumps(problems))
    (d / "pid_splits.json").write_text(json.dumps({"test": list(problems)}))
    return {"kwargs": {"data": d}, "count": 3, "scored": True}


def scienceqa_hf(root: Path) -> dict:
    d = root / "ScienceQA"
    rows = [{"image": hf_image(i), "question": f"Which is {i}?", "choices": ["x", "y", "z"], "answer": i % 3,
             "hint": "A hint." if i == 0 else "", "subject": "natural science"} for i in range(3)]
    write_parquet(d / "ScienceQA-IMG" / "test-00000-of-00001.parquet", rows)
    return {"kwargs": {"data": d}, "count": 3, "scored": True}


def mme_llava(root: Path) -> dict:
    """LLaVA-1.5's MME layout as released: ``llava_mme.jsonl`` uses the image path as ``question_id`` and
    asks without MME's " Please answer yes or no." (LLaVA's instruction instead); the release keeps the
    answers in ``<category>/questions_answers_YN/<stem>.txt`` (categories with ``images/``) or beside the
    image, and some of its questions have two spaces before "Please"."""
    d = root / "MME"
    img_root = d / "MME_Benchmark_release_version"
    qs = []
    layout = [("artwork", "images/10002.jpg", "questions_answers_YN/10002.txt", " "),
              ("code_reasoning", "0020.png", "0020.txt", "  ")]
    for n, (cat, img, txt, space) in enumerate(layout):
        _save(img_root / cat / img, n)
        q_yes, q_no = f"Is this {cat} A?", f"Is this {cat} B?"
        (img_root / cat / txt).parent.mkdir(parents=True, exist_ok=True)
        (img_root / cat / txt).write_text(f"{q_yes}{space}Please answer yes or no.\tYes\n"
                                          f"{q_no}{space}Please answer yes or no.\tNo\n")
        for q in (q_yes, q_no):
            qs.append({"question_id": f"{cat}/{img}", "image": f"{cat}/{img}", "text": _q(q), "category": cat})
    write_jsonl(d / "llava_mme.jsonl", qs)
    return {"kwargs": {"data": d}, "count": 4, "scored": True}


def mme_hf(root: Path) -> dict:
    d = root / "MME_hf"
    rows = []
    for n, cat in enumerate(["existence", "existence", "numerical_calculation"]):
        for ans in ("Yes", "No"):
            rows.append({"question_id": f"{cat}/{n}.png", "image": hf_image(n), "question": f"Q {n} {ans}? Please answer yes or no.",
                         "answer": ans, "category": cat})
    write_parquet(d / "data" / "test-00000-of-00001.parquet", rows)
    return {"kwargs": {"data": d}, "count": 6, "scored": True}


def mmbench_llava(root: Path) -> dict:
    d = root / "mmbench"
    d.mkdir(parents=True, exist_ok=True)
    header = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source", "l2-category",
              "comment", "split"]
    rows = [
        [0, "What colour is it?", "nan", "red", "green", "blue", "yellow", "A", "color", "", "s", "l2", "nan", "dev"],
        [1, "Which shape?", "Look closely.", "circle", "square", "nan", "nan", "B", "shape", "", "s", "l2", "nan", "dev"],
        [2, 'Say "hi"?', "nan", "yes", "no", "maybe", "nan", "C", "misc", "", "s", "l2", "nan", "dev"],
    ]
    lines = ["\t".join(header)]
    for i, r in enumerate(rows):
        r[9] = base64.b64encode(png_bytes(i)).decode()
        lines.append("\t".join(str(x) if '"' not in str(x) else '"' + str(x).replace('"', '""') + '"' for x in r))
    (d / "mmbench_dev_20230712.tsv").write_text("\n".join(lines) + "\n")
    return {"kwargs": {"data": d}, "count": 4 + 2 + 3, "scored": True}


def mmbench_hf(root: Path) -> dict:
    d = root / "MMBench" / "en"
    rows = [{"index": i, "question": f"Pick {i}", "hint": None, "A": "a", "B": "b", "C": "c" if i else None,
             "D": None, "answer": "AB"[i % 2], "category": "cat", "image": hf_image(i), "source": "s",
             "L2-category": "l2", "comment": None, "split": "dev"} for i in range(3)]
    write_parquet(d / "dev-00000-of-00001.parquet", rows)
    return {"kwargs": {"data": d}, "count": 2 + 3 + 3, "scored": True}


FIXTURES = {
    ("vqav2", "llava"): vqav2_llava,
    ("vqav2", "llava-val"): vqav2_llava_val,
    ("vqav2", "hf"): vqav2_hf,
    ("gqa", "llava"): gqa_llava,
    ("gqa", "hf"): gqa_hf,
    ("textvqa", "llava"): textvqa_llava,
    ("textvqa", "hf"): textvqa_hf,
    ("vizwiz", "llava"): vizwiz_llava,
    ("vizwiz", "hf"): vizwiz_hf,
    ("pope", "llava"): pope_llava,
    ("pope", "hf"): pope_hf,
    ("scienceqa", "llava"): scienceqa_llava,
    ("scienceqa", "hf"): scienceqa_hf,
    ("mme", "llava"): mme_llava,
    ("mme", "hf"): mme_hf,
    ("mmbench", "llava"): mmbench_llava,
    ("mmbench", "hf"): mmbench_hf,
}


def make_fixture(name: str, layout: str, root: Path) -> dict:
    """Write benchmark `name` in `layout` under `root`; `{"kwargs": load / run_benchmark arguments, "count": questions,
    "scored": whether answers are known}` (easy-VQA needs no files)."""
    if name == "easy-vqa":
        return {"kwargs": {}, "count": None, "scored": True}
    return FIXTURES[(name, layout)](root)


def outputs_with_and_without_grad(fn, inputs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`fn(*inputs)` three ways: on copies that require grad, under `inference_mode`, and under `no_grad` on copies
    that require grad (the paths that keep no autograd state)."""
    with_grad = fn(*[t.clone().requires_grad_() for t in inputs])
    with torch.inference_mode():
        y_inference = fn(*inputs)
    with torch.no_grad():
        y_no_grad = fn(*[t.clone().requires_grad_() for t in inputs])
    return with_grad, y_inference, y_no_grad


def triton_interpreter_results(script: str, timeout: int) -> dict:
    """Run the test module `script` as a script in a fresh interpreter with `TRITON_INTERPRET=1` (Triton picks its CPU
    interpreter when imported) and the default backends, and return the JSON of its last output line; skipped
    without triton."""
    import subprocess

    import pytest

    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (the `dev` extra installs it)")
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop("DEFOCUS_MIXER_BACKEND", None)
    env.pop("DEFOCUS_SCAN_BACKEND", None)
    proc = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"interpreter run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])
