"""A tiny, fully local language model and tokenizer: the offline default's LM, trained from scratch on the
training text (nothing here touches a model hub)."""

from __future__ import annotations

from typing import Any, Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import LlamaConfig, PreTrainedTokenizerFast

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


__all__ = ["SPECIAL_TOKENS", "tiny_llama_config", "train_tokenizer"]
