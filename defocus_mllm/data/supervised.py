"""Conversations -> model inputs for LLaVA training: chat template, assistant-only labels, image token expansion.

Text is tokenized once, up front (cheap, and it validates every sample and gives the lengths for length-grouped
batching); images are read lazily in `__getitem__`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..images import load_image
from ..prompts import LLAVA_V1_CHAT_TEMPLATE, render_llava_v1
from .conversations import BadSampleError, Conversation, check_conversation

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
_TOKENIZE_BATCH = 512  # conversations per batched chat-template / tokenizer call


def assistant_char_spans(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """Render `messages` with the chat template; return the text and the character spans of the assistant replies.

    A reply's span runs from the end of the prompt that asks for it (`add_generation_prompt=True`) to the end of the
    conversation rendered up to and including it, so it covers the end-of-turn tokens the model must learn to emit.
    """
    return assistant_char_spans_batch(tokenizer, [messages])[0]


def assistant_char_spans_batch(tokenizer: Any, conversations: Sequence[list[dict[str, str]]]
                               ) -> list[tuple[str, list[tuple[int, int]]]]:
    """`assistant_char_spans` of many conversations, with three batched chat-template calls instead of one call per
    rendered prefix (the per-call overhead was most of the cost of tokenizing a dataset). With the LLaVA-v1 template
    (the one `build_llava` gives a tokenizer without its own) the text and spans come from `render_llava_v1` in one
    pass, with no Jinja render at all."""
    if getattr(tokenizer, "chat_template", None) == LLAVA_V1_CHAT_TEMPLATE and tokenizer.eos_token is not None:
        fast = [render_llava_v1(list(msgs), tokenizer.eos_token) for msgs in conversations]
        if all(result is not None for result in fast):
            return fast
    replies = [[i for i, m in enumerate(msgs) if m["role"] == "assistant"] for msgs in conversations]
    render = lambda batch, gen=False: tokenizer.apply_chat_template(  # noqa: E731
        batch, tokenize=False, add_generation_prompt=gen) if batch else []
    texts = render([list(msgs) for msgs in conversations])
    prompts = iter(render([list(msgs[:i]) for msgs, idx in zip(conversations, replies) for i in idx], gen=True))
    # a reply that ends its conversation ends at the end of the whole text: no render of its own
    upto = iter(render([list(msgs[: i + 1]) for msgs, idx in zip(conversations, replies) for i in idx
                        if i != len(msgs) - 1]))
    out = []
    for text, msgs, idx in zip(texts, conversations, replies):
        spans = []
        for i in idx:
            prompt, rendered = next(prompts), (text if i == len(msgs) - 1 else next(upto))
            start, end = len(prompt), len(rendered)
            if not (text.startswith(rendered) and start <= end):
                raise ValueError("The chat template does not render conversations prefix by prefix; assistant tokens "
                                 "cannot be located")
            spans.append((start, end))
        out.append((text, spans))
    return out


@dataclass
class TokenizedConversation:
    input_ids: list[int]
    labels: list[int]


def tokenize_conversation(tokenizer: Any, messages: list[dict[str, str]], image_token_id: int,
                          num_image_tokens: int) -> TokenizedConversation:
    """Token ids and labels (`-100` except on assistant replies); each `<image>` becomes `num_image_tokens` ids."""
    return tokenize_conversations(tokenizer, [messages], image_token_id, num_image_tokens)[0]


def _encode_with_offsets(tokenizer: Any, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
    """Token ids and character offsets of each text, no special tokens added. A fast tokenizer's backend is called
    directly when no padding or truncation is set on it: transformers' conversion of the encodings to Python
    dictionaries cost as much as the encoding itself."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and backend.padding is None and backend.truncation is None:
        return [(e.ids, e.offsets) for e in backend.encode_batch(texts, add_special_tokens=False)]
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    return list(zip(encoded["input_ids"], encoded["offset_mapping"]))


def tokenize_conversations(tokenizer: Any, conversations: Sequence[list[dict[str, str]]], image_token_id: int,
                           num_image_tokens: int) -> list[TokenizedConversation]:
    """`tokenize_conversation` of many conversations, the template and the tokenizer called once per batch.

    A token is learned when it has characters and its first character lies in an assistant reply's span. All the
    texts' tokens are labelled in one pass of array operations: each text's characters are numbered after the
    previous text's, so every reply span of the batch lies in one sorted array.
    """
    if not conversations:
        return []
    rendered = assistant_char_spans_batch(tokenizer, conversations)
    bos = getattr(tokenizer, "bos_token_id", None)
    # the tokenizer adds BOS by itself (its post-processor) where the template did not write it
    adds_bos = bos is not None and bool(tokenizer.bos_token) and tokenizer("a")["input_ids"][:1] == [bos]
    ids, offsets, span_bounds, lengths, span_counts, shifts = [], [], [], [], [], [0]
    encoded = _encode_with_offsets(tokenizer, [text for text, _ in rendered])
    for (text, spans), (text_ids, text_offsets) in zip(rendered, encoded):
        if adds_bos and not text.startswith(tokenizer.bos_token):
            text_ids, text_offsets = [bos, *text_ids], [(0, 0), *text_offsets]  # BOS has no characters
        ids += text_ids
        offsets += text_offsets
        span_bounds += spans
        lengths.append(len(text_ids))
        span_counts.append(len(spans))
        shifts.append(shifts[-1] + len(text) + 1)
    shifts.pop()
    ids_array = np.asarray(ids, dtype=np.int64)
    starts, ends = np.asarray(offsets, dtype=np.int64).reshape(-1, 2).T + np.repeat(shifts, lengths)
    span_starts, span_ends = np.asarray(span_bounds, dtype=np.int64).reshape(-1, 2).T + np.repeat(shifts, span_counts)
    # the first reply span ending after each token's first character
    after = np.searchsorted(span_ends, starts, side="right")
    in_reply = (ends > starts) & (after < len(span_ends))
    if len(span_starts):
        in_reply &= span_starts[np.minimum(after, len(span_starts) - 1)] <= starts
    is_image = ids_array == image_token_id
    labels = np.where(in_reply & ~is_image, ids_array, IGNORE_INDEX)
    repeats = np.where(is_image, num_image_tokens, 1)  # each image token becomes num_image_tokens of them
    input_ids, labels = np.repeat(ids_array, repeats).tolist(), np.repeat(labels, repeats).tolist()
    bounds = np.concatenate([[0], np.cumsum(repeats)])[np.cumsum([0, *lengths])].tolist()
    return [TokenizedConversation(input_ids[a:b], labels[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


class SupervisedDataset(torch.utils.data.Dataset):
    """LLaVA instruction data as `input_ids`, `labels` and `pixel_values`.

    Samples longer than `model_max_length` are truncated; when truncation would cut into image tokens (or leave no
    reply to learn) the sample is dropped and counted. Bad samples (unreadable records, no assistant turn, image
    markers that do not match the images, missing image files) raise `BadSampleError` naming the file and sample, or
    with `skip_bad_samples=True` are dropped and listed (`skipped`, each sample once). Unreadable images found later,
    while training, are skipped the same way or raise: the item is a `SkippedSample`, which the collator drops and
    passes on (`skipped_samples` in the batch) so that skips found in dataloader worker processes reach the
    `LlavaTrainer`, which lists them here (`record_skipped`).
    """

    def __init__(self, conversations: Sequence[Conversation], tokenizer: Any, image_processor: Any,
                 image_token_id: int, num_image_tokens: int, model_max_length: int = 2048,
                 skip_bad_samples: bool = False, show_progress: bool = True, image_cache_bytes: int = 0) -> None:
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        # Preprocessed images by file path, up to `image_cache_bytes` (per process: dataloader workers fill their own).
        self.image_cache_bytes = image_cache_bytes
        self._image_cache: dict[str, torch.Tensor] = {}
        self._image_cache_used = 0
        self.skip_bad_samples = skip_bad_samples
        self._skipped: dict[str, None] = {}  # messages in the order found, each once
        self.truncated = 0
        self.dropped_too_long = 0
        self.samples: list[tuple[Conversation, TokenizedConversation]] = []
        batch: list[Conversation] = []
        progress = tqdm(total=len(conversations), desc="Tokenizing", disable=not show_progress, mininterval=2)
        for conv in conversations:
            try:
                check_conversation(conv)
                for image in conv.images:
                    if not isinstance(image, Image.Image) and not _exists(image):
                        raise BadSampleError(f"{conv.where()}: image file not found: {image}")
            except BadSampleError as err:
                self._skip(err)
                progress.update(1)
                continue
            batch.append(conv)
            if len(batch) == _TOKENIZE_BATCH:
                self._add(batch, image_token_id, num_image_tokens, model_max_length, progress)
                batch = []
        self._add(batch, image_token_id, num_image_tokens, model_max_length, progress)
        progress.close()
        if self.dropped_too_long:
            logger.warning("%d sample(s) dropped: model_max_length=%d would cut into their image tokens or leave no "
                           "reply", self.dropped_too_long, model_max_length)
        if self.truncated:
            logger.warning("%d sample(s) truncated to model_max_length=%d", self.truncated, model_max_length)
        if not self.samples:
            raise ValueError("No usable training samples" + (f" ({len(self.skipped)} skipped)" if self.skipped else ""))

    def _add(self, batch: list[Conversation], image_token_id: int, num_image_tokens: int, model_max_length: int,
             progress: Any) -> None:
        tokenized = tokenize_conversations(self.tokenizer, [conv.messages for conv in batch], image_token_id,
                                           num_image_tokens)
        for conv, tokens in zip(batch, tokenized):
            tokens = self._fit(tokens, image_token_id, model_max_length)
            if tokens is not None:
                self.samples.append((conv, tokens))
        progress.update(len(batch))

    @property
    def skipped(self) -> list[str]:
        """The bad samples skipped so far, one message each (file, sample, problem)."""
        return list(self._skipped)

    def record_skipped(self, messages: Sequence[str]) -> None:
        """Add skips found elsewhere (dataloader workers, other processes); a sample already listed is not repeated."""
        for message in messages:
            self._skipped.setdefault(str(message), None)

    def _skip(self, err: Exception) -> None:
        if not self.skip_bad_samples:
            raise err
        if str(err) not in self._skipped:
            self._skipped[str(err)] = None
            logger.warning("Skipping bad sample: %s", err)

    def _fit(self, tokens: TokenizedConversation, image_token_id: int, max_length: int
             ) -> Optional[TokenizedConversation]:
        if len(tokens.input_ids) <= max_length:
            return tokens
        image_positions = [i for i, t in enumerate(tokens.input_ids) if t == image_token_id]
        kept_labels = tokens.labels[:max_length]
        if (image_positions and image_positions[-1] >= max_length) or all(l == IGNORE_INDEX for l in kept_labels):
            self.dropped_too_long += 1
            return None
        self.truncated += 1
        return TokenizedConversation(tokens.input_ids[:max_length], kept_labels)

    @property
    def lengths(self) -> list[int]:
        """Token counts, for `LengthGroupedSampler`."""
        return [len(tokens.input_ids) for _, tokens in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Union[dict[str, Any], "SkippedSample"]:
        conv, tokens = self.samples[index]
        item: dict[str, Any] = {"input_ids": torch.tensor(tokens.input_ids), "labels": torch.tensor(tokens.labels)}
        if conv.images:
            try:
                item["pixel_values"] = torch.stack([self._pixels(image) for image in conv.images])
            except (OSError, ValueError) as err:
                error = BadSampleError(f"{conv.where()}: {err}")
                self._skip(error)
                return SkippedSample(str(error))
        return item

    def _pixels(self, image: Any) -> torch.Tensor:
        """One image through the processor, `[C, H, W]`; a file's result is kept while the cache has room (the
        processor is deterministic, so an image seen again, in a later epoch or curriculum phase, is not decoded
        again). In-memory images are not cached: the same object may be edited between reads."""
        key = None if isinstance(image, Image.Image) else str(image)
        if key is not None and key in self._image_cache:
            return self._image_cache[key]
        pixels = self.image_processor(images=[load_image(image)], return_tensors="pt")["pixel_values"][0]
        size = pixels.numel() * pixels.element_size()
        if key is not None and self._image_cache_used + size <= self.image_cache_bytes:
            self._image_cache[key] = pixels
            self._image_cache_used += size
        return pixels

    def collator(self) -> "SupervisedCollator":
        """The collator that batches this dataset's items (padding with the tokenizer's pad token)."""
        return SupervisedCollator(self.tokenizer.pad_token_id)

    def report(self) -> str:
        """One line on what was skipped, truncated or dropped."""
        return (f"{len(self.samples)} samples used; {len(self.skipped)} bad sample(s) skipped; "
                f"{self.dropped_too_long} dropped as too long; {self.truncated} truncated")


def _exists(path: Any) -> bool:
    return Path(path).is_file()


@dataclass
class SkippedSample:
    """What `SupervisedDataset` returns for a sample it skipped while training: the message that lists it."""

    message: str


@dataclass
class SupervisedCollator:
    """Right-pads `input_ids` (pad id) and `labels` (-100), builds the attention mask and concatenates the images of
    the batch in sample order (the order of their `<image>` placeholders).

    Skipped items (`SkippedSample`, or None) are dropped; their messages travel in the batch as `skipped_samples`
    (the `LlavaTrainer` takes them out before the forward pass). A batch whose items were all skipped becomes one
    pad token with nothing to learn and `all_skipped=True`: the `LlavaTrainer` takes a zero-loss step on it, which
    keeps several processes in step where raising would stop the run.
    """

    pad_token_id: int

    def __call__(self, items: list[Union[dict[str, Any], SkippedSample, None]]) -> dict[str, Any]:
        skipped = [item.message for item in items if isinstance(item, SkippedSample)]
        items = [item for item in items if isinstance(item, dict)]
        if not items:
            return {"input_ids": torch.full((1, 1), self.pad_token_id, dtype=torch.long),
                    "labels": torch.full((1, 1), IGNORE_INDEX, dtype=torch.long),
                    "attention_mask": torch.ones((1, 1), dtype=torch.long), "all_skipped": True,
                    "skipped_samples": skipped}
        longest = max(len(item["input_ids"]) for item in items)
        input_ids = torch.full((len(items), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(items), longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(items), longest), dtype=torch.long)
        for row, item in enumerate(items):
            n = len(item["input_ids"])
            input_ids[row, :n], labels[row, :n], attention_mask[row, :n] = item["input_ids"], item["labels"], 1
        batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
        pixels = [item["pixel_values"] for item in items if "pixel_values" in item]
        if pixels:
            batch["pixel_values"] = torch.cat(pixels)
        if skipped:
            batch["skipped_samples"] = skipped
        return batch


__all__ = [
    "IGNORE_INDEX",
    "SkippedSample",
    "SupervisedCollator",
    "SupervisedDataset",
    "TokenizedConversation",
    "assistant_char_spans",
    "tokenize_conversation",
]
