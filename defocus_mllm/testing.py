"""Tiny, fully local models for tests, CPU recipes and examples: nothing here touches a model hub."""

from __future__ import annotations

import importlib.util
import os
import sys
from types import ModuleType
from typing import Any, Iterable, Optional

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import LlamaConfig, PreTrainedTokenizerFast

from .configuration_defocus import DefocusVisionConfig

SPECIAL_TOKENS = {"unk_token": "<unk>", "pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>"}


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512, min_frequency: int = 1) -> PreTrainedTokenizerFast:
    """Train a small BPE tokenizer on `texts` with the `tokenizers` library.

    Words are split on whitespace with a `▁` marker (SentencePiece style) so decoding restores the spaces; every
    printable ASCII character is in the alphabet, so unseen words still tokenise (as characters). Lower-cased, which
    suits VQA answers. The special tokens of Llama (`<unk> <pad> <s> </s>`) come first, then `<image>`.
    """
    tokenizer = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Metaspace(), pre_tokenizers.Punctuation("isolated")])
    tokenizer.decoder = decoders.Metaspace()
    specials = list(SPECIAL_TOKENS.values()) + ["<image>"]
    alphabet = [chr(c) for c in range(32, 127)] + ["\n", "▁"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
                                  initial_alphabet=alphabet, show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **SPECIAL_TOKENS)


def tiny_llama_config(vocab_size: int, hidden_size: int = 64, num_hidden_layers: int = 2,
                      num_attention_heads: int = 4, max_position_embeddings: int = 512, **overrides: Any) -> LlamaConfig:
    """A Llama-architecture LM config of a few hundred thousand parameters."""
    kwargs = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                  num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
                  num_key_value_heads=num_attention_heads, max_position_embeddings=max_position_embeddings,
                  pad_token_id=1, bos_token_id=2, eos_token_id=3, tie_word_embeddings=False)
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def build_tiny_llava(texts: Optional[Iterable[str]] = None, vision: Optional[DefocusVisionConfig] = None,
                     vocab_size: int = 256, **lm_overrides: Any):
    """`(model, processor)`: a tiny De-focus Mamba encoder and a tiny Llama joined by `build_llava`.

    The tokenizer is trained on `texts` (a small default corpus when none is given).
    """
    from .llava import build_llava

    if texts is None:
        texts = ["what shape is in the image?", "what color is the shape?", "is there a red circle?",
                 "yes", "no", "circle", "rectangle", "triangle", "red", "green", "blue", "USER: ASSISTANT:"]
    tokenizer = train_tokenizer(texts, vocab_size=vocab_size)
    vision = vision or DefocusVisionConfig.from_preset("mamba-tiny", hidden_size=32, num_hidden_layers=2,
                                                       intermediate_size=64, image_size=32)
    lm_config = tiny_llama_config(len(tokenizer), **lm_overrides)
    return build_llava(vision, lm_config, tokenizer=tokenizer)


def free_port() -> int:
    """A TCP port nothing listens on now, for a test's `accelerate launch --main_process_port` (two launches on the
    default port at once, from parallel test runs, abort each other's process groups)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def accelerate_launch_command(*launch_args: str) -> list[str]:
    """`python -m accelerate.commands.launch --main_process_port <free> *launch_args` as an argument list."""
    import sys

    return [sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", str(free_port()), *launch_args]


__all__ = ["SPECIAL_TOKENS", "accelerate_launch_command", "free_port", "build_tiny_llava", "tiny_llama_config", "train_tokenizer"]


def load_script(path: str | os.PathLike, name: str) -> ModuleType:
    """Import a script that is not part of the package (a recipe, an `eval/` command) as module `name`."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module
