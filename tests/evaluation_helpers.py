"""Evaluation helpers: `eval/run.py` as a module, a tiny De-focus LLaVA saved to disk, benchmark command-line
arguments, result files, and a record of the questions a run asks."""

from __future__ import annotations

import functools
import json
import string
from pathlib import Path
from types import ModuleType

import torch
from helpers import load_script


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


# A short easy-VQA run of eval/run.py (the package's own questions: no files to build).
EASY_VQA_ARGS = ["--benchmark", "easy-vqa", "--limit", "4", "--batch-size", "4", "--quiet"]


def answers(out: Path) -> list[str]:
    """The answers of a finished run's `predictions.jsonl`, in file order."""
    return [r["answer"] for r in read_jsonl(out / "predictions.jsonl")]
