"""Batched greedy answering (:func:`generate_answers`): left-padded batches of questions about images, each batch's
answers appended to a prediction file as they come, so an interrupted run loses at most one batch.

The rest of what this module once held has its own module (each name is still importable from here):
:mod:`~defocus_mllm.evaluation.runner` (``run_benchmark``, ``load_model``), :mod:`~defocus_mllm.evaluation.predictions`
(prediction files, resume), :mod:`~defocus_mllm.evaluation.fingerprints` (``run_key``, model and processor
fingerprints) and :mod:`~defocus_mllm.evaluation.distributed`; the prompt is :func:`defocus_mllm.prompts.build_prompt`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..images import distinct_objects, to_model
from ..prompts import build_prompt
from ._compat import moved_names
from .benchmarks.base import check_count
from .predictions import append_safe, prediction_record
from .sources import BenchmarkDataError, Sample

logger = logging.getLogger(__name__)


class _LeftPadding:
    """Left padding for batched generation (new tokens must follow each prompt directly), and a pad
    token when the tokenizer has none; both restored on exit."""

    def __init__(self, tokenizer: Any):
        self.tok = tokenizer

    def __enter__(self):
        self.side, self.pad = self.tok.padding_side, self.tok.pad_token
        self.tok.padding_side = "left"
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        return self.tok

    def __exit__(self, *exc):
        self.tok.padding_side = self.side
        if self.pad is None:
            self.tok.pad_token = None
        return False


def _unusable_images(processor: Any, batch: Sequence[Sample], images: list, prompts: list[str]) -> dict[Any, str]:
    """After the processor failed on a batch: the questions whose image fails on its own, with the
    reason (empty when every image passes alone, i.e. the batch failed for another reason)."""
    bad: dict[Any, str] = {}
    for s, image, prompt in zip(batch, images, prompts):
        try:
            processor(images=[image], text=[prompt], return_tensors="pt")
        except Exception as err:  # the image processors raise ValueError, TypeError, ...
            bad[s.question_id] = (f"image {s.image.describe()} for question {s.question_id!r} cannot be used by "
                                  f"the model's image processor: {type(err).__name__}: {err}")
    return bad


def _image_key(image: Any) -> Any:
    """What identifies an image reference within a batch: the (frozen) reference itself, else its identity."""
    try:
        hash(image)
    except TypeError:
        return id(image)
    return image


def _each_image_encoded_once(model: Any, inputs: Mapping[str, Any], images: list) -> Mapping[str, Any]:
    """The batch's inputs with the vision tower run once per distinct image (`images[i]` is question i's loaded
    image object), handed to `generate` as pre-encoded images (`mm_encoder_outputs`), where the model takes them
    (transformers' LLaVA); other inputs and models are left as they are."""
    firsts, index = distinct_objects(images)
    supports = getattr(model, "_supports_mm_encoder_outputs", None)
    if (len(firsts) == len(images) or set(inputs) != {"input_ids", "attention_mask", "pixel_values"}
            or supports is None or not supports() or not hasattr(model, "get_image_features")):
        return inputs
    encoded = model.get_image_features(pixel_values=inputs["pixel_values"][firsts], return_dict=True)
    features = encoded.pooler_output  # one [tokens, hidden] per distinct image
    encoded.pooler_output = [features[image] for image in index]
    return {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"],
            "mm_encoder_outputs": {"image": encoded}}


def _cut_at_stop(text: str, stop: Sequence[str] | None) -> str:
    if stop:
        cuts = [text.find(t) for t in stop if t and t in text]
        if cuts:
            text = text[: min(cuts)]
    return text


@torch.inference_mode()
def generate_answers(
    model: Any,
    processor: Any,
    samples: Sequence[Sample],
    *,
    batch_size: int = 8,
    max_new_tokens: int = 128,
    output_file: str | Path | None = None,
    show_progress: bool = True,
    desc: str | None = None,
    generation_kwargs: Mapping[str, Any] | None = None,
    stop: Sequence[str] | None = None,
    skip_bad_images: bool = False,
    errors: dict[Any, str] | None = None,
) -> dict[Any, str]:
    """Answer ``samples`` with greedy decoding, ``batch_size`` questions at a time (left-padded).

    Returns ``{question_id: answer}``. With ``output_file``, each batch's answers are appended to it as
    JSON lines (``question_id``, ``prompt``, ``image``, ``answer``) and flushed, so an interrupted run
    loses at most one batch. The model is put in eval mode for the call and restored afterwards.

    ``generation_kwargs`` are passed to ``model.generate`` over the greedy defaults (``do_sample=False``,
    ``num_beams=1``); each answer is cut before the first of the ``stop`` strings, if any.

    An image that cannot be read, or that the processor rejects (e.g. smaller than one patch), raises
    :class:`BenchmarkDataError` naming the file and the question. With ``skip_bad_images`` the question
    is left out of the returned answers instead, its reason goes to ``errors`` (when given) and to the
    output file (``answer`` null, ``error``), and a warning is logged.
    """
    from tqdm.auto import tqdm

    check_count("batch_size", batch_size)
    check_count("max_new_tokens", max_new_tokens)
    tokenizer = getattr(processor, "tokenizer", processor)
    was_training = model.training
    model.eval()
    gen_kwargs = {"do_sample": False, "num_beams": 1, **(generation_kwargs or {})}
    out_f = append_safe(Path(output_file)) if output_file is not None else None
    answers: dict[Any, str] = {}

    def record(s: Sample, answer: str | None, error: str | None = None) -> None:
        if answer is not None:
            answers[s.question_id] = answer
        else:
            logger.warning("skipping question %r: %s", s.question_id, error)
            if errors is not None:
                errors[s.question_id] = error
        if out_f is not None:
            out_f.write(json.dumps(prediction_record(s, answer, error), ensure_ascii=False) + "\n")

    try:
        with _LeftPadding(tokenizer), tqdm(total=len(samples), desc=desc, disable=not show_progress) as bar:
            for start in range(0, len(samples), batch_size):
                batch = list(samples[start : start + batch_size])
                images, usable, loaded = [], [], {}
                for s in batch:
                    # the questions about one image share one loaded object, which the image processor then
                    # preprocesses once
                    key = _image_key(s.image)
                    try:
                        if key not in loaded:
                            loaded[key] = s.load_image()  # raises naming the file and the question
                        images.append(loaded[key])
                        usable.append(s)
                    except BenchmarkDataError as err:
                        if not skip_bad_images:
                            raise
                        record(s, None, str(err))
                prompts = [build_prompt(processor, s.prompt) for s in usable]
                inputs = None
                if usable:
                    try:
                        inputs = processor(images=images, text=prompts, padding=True, return_tensors="pt")
                    except Exception as err:
                        bad = _unusable_images(processor, usable, images, prompts)
                        if not bad:
                            raise
                        if not skip_bad_images:
                            raise BenchmarkDataError(next(iter(bad.values()))) from err
                        for s in usable:
                            if s.question_id in bad:
                                record(s, None, bad[s.question_id])
                        keep = [i for i, s in enumerate(usable) if s.question_id not in bad]
                        usable = [usable[i] for i in keep]
                        images, prompts = [images[i] for i in keep], [prompts[i] for i in keep]
                        if usable:
                            inputs = processor(images=images, text=prompts, padding=True, return_tensors="pt")
                if inputs is not None:
                    inputs = to_model(inputs, model)
                    generated = model.generate(**_each_image_encoded_once(model, inputs, images),
                                               max_new_tokens=max_new_tokens,
                                               pad_token_id=tokenizer.pad_token_id, **gen_kwargs)
                    new_tokens = generated[:, inputs["input_ids"].shape[1] :]
                    texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
                    for s, text in zip(usable, texts):
                        record(s, _cut_at_stop(text, stop).strip())
                if out_f is not None:
                    out_f.flush()
                bar.update(len(batch))
    finally:
        if out_f is not None:
            out_f.close()
        model.train(was_training)
    return answers


# names that moved out of this module, under their old names
__getattr__ = moved_names(
    __name__, (".runner", ".predictions", ".fingerprints", ".distributed"),
    renamed={"_append_safe": "append_safe", "_prediction_files": "prediction_files", "_write_json": "write_json",
             "_split": "split_between", "_gather": "gather", "_state": "distributed_state",
             "_clear_outputs": "clear_outputs", "_read_run_info": "read_run_info", "_resume_problems": "resume_problems"},
)
