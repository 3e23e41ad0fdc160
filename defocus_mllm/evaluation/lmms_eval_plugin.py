"""An lmms-eval model, ``defocus_llava``, so that a saved De-focus LLaVA runs any lmms-eval task::

    pip install -e ".[lmms-eval]"
    lmms-eval eval --model defocus_llava --model_args pretrained=DIR,dtype=auto --tasks pope --batch_size 8

lmms-eval finds it through the ``lmms_eval.models`` entry-point group (see ``pyproject.toml``), so no
lmms-eval source is touched. The model is loaded as ``eval/run.py`` loads it (:func:`load_model`) and
questions are answered by the project's own loop (:func:`generate_answers`: the processor's chat
template through :func:`build_prompt`, left-padded batches, greedy decoding by default), so
``eval/run.py`` and lmms-eval give the same answer to the same question and image.

Supported: ``generate_until`` (one image per question; the task's ``until``, ``max_new_tokens``,
``temperature``, ``top_p``, ``top_k``, ``num_beams``, ``do_sample`` and ``repetition_penalty``) and
``loglikelihood`` (multiple-choice tasks; the value is the continuation's mean negative log-likelihood per
token, the convention of lmms-eval's own LLaVA models and of its multiple-choice scoring). Not supported: questions with no image or several images
(videos included), and ``generate_until_multi_round``; both raise ``NotImplementedError`` naming the
task and document.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import torch
from lmms_eval.api.instance import GenerationResult
from lmms_eval.api.model import lmms

from ..images import to_model
from ..prompts import IMAGE_TOKEN, build_prompt
from .benchmarks import check_count
from .distributed import distributed_state
from .generation import generate_answers
from .runner import load_model
from .sources import ImageRef, Sample

logger = logging.getLogger(__name__)

MODEL_ID = "defocus_llava"
# lmms-eval generation arguments passed on to `model.generate`; the others are handled here or ignored
_GENERATE_ARGS = ("do_sample", "temperature", "top_p", "top_k", "num_beams", "repetition_penalty")


def manifests():
    """The entry point lmms-eval's model registry loads (group ``lmms_eval.models``)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.DefocusLlava",
                          aliases=("defocus", "defocus_mllm"))]


@dataclass(frozen=True, eq=False)
class InMemoryImage(ImageRef):
    """An image lmms-eval already decoded (a task's ``doc_to_visual``)."""

    image: Any
    origin: str

    def describe(self) -> str:
        return self.origin

    def _open(self):
        return self.image


class Loglikelihood(GenerationResult):
    """One ``loglikelihood`` result, ``(loss, is_greedy)``: unpacks and indexes as that pair. It is a
    ``GenerationResult`` because lmms-eval 0.7.3's evaluator passes a model's results through
    ``unwrap_generation_output``, which turns anything but a string or a ``GenerationResult`` into its
    ``str()`` (a plain tuple would reach the multiple-choice scoring as the text "(1.2, False)")."""

    def __init__(self, loss: float, greedy: bool):
        super().__init__(text=(float(loss), bool(greedy)))

    def __iter__(self):
        return iter(self.text)

    def __getitem__(self, index):
        return self.text[index]

    def __len__(self) -> int:
        return 2


def _flatten(visuals: Any) -> list:
    if visuals is None:
        return []
    if isinstance(visuals, (list, tuple)):
        return [v for item in visuals for v in _flatten(item)]
    return [visuals]


def _count(name: str, value: Any) -> int:
    """A model or task argument that counts something (lmms-eval passes them as text): a whole number of at least 1."""
    try:
        number = int(value) if not isinstance(value, float) or value.is_integer() else None
    except (TypeError, ValueError):
        number = None
    if number is None or isinstance(value, bool):
        raise ValueError(f"defocus_llava needs an integer {name.replace('_', ' ')}, not {value!r}")
    check_count(name, number)
    return number


def _generation_settings(gen_kwargs: dict[str, Any], default_max_new_tokens: int) -> tuple[int, dict, list[str]]:
    """``(max_new_tokens, model.generate keyword arguments, stop strings)`` from a task's generation_kwargs."""
    kwargs = dict(gen_kwargs)
    until = kwargs.pop("until", None)
    stop = [until] if isinstance(until, str) else list(until or [])
    max_new_tokens = kwargs.pop("max_new_tokens", None)
    # a task's 0 is refused, not read as "unset" (which would silently answer with the default length)
    max_new_tokens = default_max_new_tokens if max_new_tokens is None else _count("max_new_tokens", max_new_tokens)
    temperature = float(kwargs.get("temperature") or 0)
    do_sample = bool(kwargs.get("do_sample", False)) or temperature > 0
    generate = {"do_sample": do_sample, "num_beams": int(kwargs.get("num_beams") or 1)}
    if do_sample:
        for key in ("temperature", "top_p", "top_k"):
            if kwargs.get(key) is not None:
                generate[key] = kwargs[key]
    if kwargs.get("repetition_penalty") is not None:
        generate["repetition_penalty"] = float(kwargs["repetition_penalty"])
    ignored = sorted(k for k in kwargs if k not in _GENERATE_ARGS)
    if ignored:
        logger.debug("defocus_llava ignores generation arguments %s", ignored)
    return max_new_tokens, generate, stop


class DefocusLlava(lmms):
    """A saved De-focus LLaVA (``pretrained=DIR``) as an lmms-eval model.

    Model arguments (``--model_args key=value,...``): ``pretrained`` (the saved directory), ``dtype``
    (``auto``: bfloat16 on a GPU that supports it, else float32; ``float32``, ``bfloat16``, ``float16``),
    ``device`` (default: this process's accelerator, else the CPU), ``batch_size`` (also lmms-eval's
    ``--batch_size``; ``auto`` is not supported), ``max_new_tokens`` (used when a task sets none; 128).
    """

    is_simple = True

    def __init__(self, pretrained: str, dtype: str = "auto", device: str | None = None, batch_size: int | str = 8,
                 max_new_tokens: int | str = 128, **kwargs: Any) -> None:
        super().__init__()
        kwargs.pop("max_batch_size", None)
        if kwargs:
            logger.warning("defocus_llava ignores the model arguments %s", sorted(kwargs))
        self.batch_size_per_gpu = _count("batch_size", batch_size)
        self.default_max_new_tokens = _count("max_new_tokens", max_new_tokens)
        state = distributed_state()
        if device is not None and state.num_processes > 1:
            device = None  # one device per process, as accelerate assigns them
        self._model, self._processor = load_model(pretrained, dtype, device)
        self.pretrained = str(pretrained)
        self._rank, self._world_size = state.process_index, state.num_processes

    # ------------------------------------------------------------------ what lmms-eval reads

    @property
    def model(self):
        return self._model

    @property
    def processor(self):
        return self._processor

    @property
    def tokenizer(self):
        return self._processor.tokenizer

    @property
    def config(self):
        return self._model.config

    @property
    def device(self):
        return next(self._model.parameters()).device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    # ------------------------------------------------------------------ requests

    def _doc_image(self, doc_to_visual, doc_id, task, split) -> InMemoryImage:
        visuals = _flatten(doc_to_visual(self.task_dict[task][split][doc_id]))
        if len(visuals) != 1 or isinstance(visuals[0], str):
            kind = "a video or file path" if visuals and isinstance(visuals[0], str) else f"{len(visuals)} images"
            raise NotImplementedError(f"defocus_llava answers questions about exactly one image; task {task!r} "
                                      f"(split {split!r}) document {doc_id} has {kind}")
        return InMemoryImage(visuals[0], f"task {task!r} split {split!r} document {doc_id}")

    @staticmethod
    def _text(context: str) -> str:
        # build_prompt puts the image before the text; an image token in the task's text would be a second one
        return context.replace(IMAGE_TOKEN, "").strip()

    def generate_until(self, requests) -> list[str]:
        groups: dict[str, list[tuple[int, Sample]]] = {}
        settings: dict[str, tuple[int, dict, list[str]]] = {}
        for i, request in enumerate(requests):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            key = json.dumps(gen_kwargs or {}, sort_keys=True, default=str)
            settings.setdefault(key, _generation_settings(gen_kwargs or {}, self.default_max_new_tokens))
            image = self._doc_image(doc_to_visual, doc_id, task, split)
            groups.setdefault(key, []).append((i, Sample(i, self._text(context), image)))
        results: list[str | None] = [None] * len(requests)
        for key, items in groups.items():
            max_new_tokens, generate, stop = settings[key]
            answers = generate_answers(self._model, self._processor, [s for _, s in items],
                                       batch_size=self.batch_size_per_gpu, max_new_tokens=max_new_tokens,
                                       generation_kwargs=generate, stop=stop, show_progress=self.rank == 0,
                                       desc="defocus_llava")
            for i, _ in items:
                results[i] = answers[i]
                context, gen_kwargs = requests[i].args[:2]
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), answers[i])
        return results

    @torch.inference_mode()
    def loglikelihood(self, requests) -> list[Loglikelihood]:
        """For each request: the mean negative log-likelihood of the continuation's tokens after the prompt
        (the chat-formatted context with its image), and whether greedy decoding would produce exactly those
        tokens. A loss rather than a log-probability, as lmms-eval's own LLaVA models return and as its
        multiple-choice scoring expects (it picks the choice with the smallest value)."""
        model, processor, tokenizer = self._model, self._processor, self.tokenizer
        was_training = model.training
        model.eval()
        out = []
        try:
            for request in requests:
                context, target, doc_to_visual, doc_id, task, split = request.args
                doc = self.task_dict[task][split][doc_id]
                continuation = target if isinstance(target, str) else target(doc)
                image = Sample(doc_id, "", self._doc_image(doc_to_visual, doc_id, task, split)).load_image()
                inputs = to_model(processor(images=[image], text=[build_prompt(processor, self._text(context))],
                                            return_tensors="pt"), model)
                # the continuation's own tokens (encoded apart, as lm-eval does), after the prompt's
                cont = torch.tensor([tokenizer(continuation, add_special_tokens=False)["input_ids"]], dtype=torch.long)
                if cont.shape[1] == 0:
                    out.append(Loglikelihood(0.0, True))
                    continue
                n = inputs["input_ids"].shape[1]
                input_ids = torch.cat([inputs["input_ids"], cont.to(self.device)], dim=1)
                mask = torch.ones_like(input_ids)
                logits = model(input_ids=input_ids, attention_mask=mask, pixel_values=inputs["pixel_values"]).logits
                logprobs = torch.log_softmax(logits[0, n - 1 : -1].float(), dim=-1)
                target_ids = cont[0].to(self.device)
                loss = -logprobs.gather(-1, target_ids[:, None]).mean().item()
                greedy = bool((logprobs.argmax(-1) == target_ids).all())
                out.append(Loglikelihood(loss, greedy))
                self.cache_hook.add_partial("loglikelihood", (context, continuation), (float(loss), greedy))
        finally:
            model.train(was_training)
        return out

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("defocus_llava does not implement generate_until_multi_round (multi-round tasks); "
                                  "use single-turn tasks")
