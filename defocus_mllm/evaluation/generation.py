"""Batched greedy answering, resumable prediction files, multi-process splitting, and the one call
that runs a benchmark end to end (:func:`run_benchmark`), shared by ``eval/run.py`` and the training
recipes so that both report the same number for the same model.

Files in ``output_dir``:

* ``predictions.rank<k>.jsonl`` - written by process ``k`` while it answers, one line per question,
  flushed after every batch. A run that is interrupted leaves these behind; the next run with the
  same ``output_dir`` reads them (and ``predictions.jsonl``) and answers only what is missing.
* ``predictions.jsonl`` - all answers (``question_id``, ``prompt``, ``image``, ``answer``) in question
  order, written by the main process at the end; the rank files are then removed. A question whose
  image could not be used (only with ``skip_bad_images``) has ``answer`` null and an ``error``.
* ``run.json`` - what determines the answers (:func:`run_key`: the model's weights and config, the
  processor, the benchmark and split, the generation settings), written before the first answer. A
  run over a folder whose ``run.json`` differs stops with :class:`ResumeMismatchError` (or, with
  ``overwrite``, discards the old outputs): answers of another model or other settings are never reused.
* ``metrics.json``, ``results.md`` and, for benchmarks with an evaluation server, ``submission.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .report import results_markdown
from .sources import BenchmarkDataError, BytesImage, ParquetImage, PathImage, Sample
from .tasks import Benchmark, check_count, get_benchmark

logger = logging.getLogger(__name__)

PREDICTIONS = "predictions.jsonl"
METRICS = "metrics.json"
RESULTS = "results.md"
SUBMISSION = "submission.json"
RUN_INFO = "run.json"


# ---------------------------------------------------------------------------------------------
# Prompts and generation
# ---------------------------------------------------------------------------------------------


def build_prompt(processor: Any, text: str) -> str:
    """The chat-formatted prompt for one image and one user text, ready for the model to answer."""
    if getattr(processor, "chat_template", None) is None:
        raise ValueError("the processor has no chat template; save the model with build_llava's processor")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


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


def _append_safe(path: Path):
    """Open ``path`` for appending after dropping a partial last line left by an interrupted write."""
    if path.exists() and path.stat().st_size:
        with path.open("rb+") as f:
            data = f.read()
            if not data.endswith(b"\n"):
                f.truncate(data.rfind(b"\n") + 1)
    return path.open("a", encoding="utf-8")


def image_identity(sample: Sample) -> str:
    """A short, location-independent identity of a question's image, stored with each answer so that a
    resumed run notices a question whose image changed: file name and size for files, file name and
    row for parquet images, a content hash for embedded bytes."""
    image = sample.image
    if isinstance(image, PathImage):
        try:
            size = image.path.stat().st_size
        except OSError:
            size = "missing"
        return f"{image.path.name}:{size}"
    if isinstance(image, ParquetImage):
        return f"{image.column.path.name}#{image.row}:{image.column.column}"
    if isinstance(image, BytesImage):
        raw = image.data.encode() if isinstance(image.data, str) else bytes(image.data)
        return "sha1:" + hashlib.sha1(raw).hexdigest()[:16]
    return image.describe()


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
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    gen_kwargs = {"do_sample": False, "num_beams": 1, **(generation_kwargs or {})}
    out_f = _append_safe(Path(output_file)) if output_file is not None else None
    answers: dict[Any, str] = {}

    def record(s: Sample, answer: str | None, error: str | None = None) -> None:
        if answer is not None:
            answers[s.question_id] = answer
        else:
            logger.warning("skipping question %r: %s", s.question_id, error)
            if errors is not None:
                errors[s.question_id] = error
        if out_f is not None:
            rec = {"question_id": s.question_id, "prompt": s.prompt, "image": image_identity(s), "answer": answer}
            if error is not None:
                rec["error"] = error
            out_f.write(json.dumps(rec, ensure_ascii=False) + "\n")

    try:
        with _LeftPadding(tokenizer), tqdm(total=len(samples), desc=desc, disable=not show_progress) as bar:
            for start in range(0, len(samples), batch_size):
                batch = list(samples[start : start + batch_size])
                images, usable = [], []
                for s in batch:
                    try:
                        images.append(s.load_image())  # raises naming the file and the question
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
                    # floating tensors (pixel values) follow the model's dtype; ids stay integer
                    inputs = inputs.to(device)
                    if "pixel_values" in inputs:
                        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
                    generated = model.generate(**inputs, max_new_tokens=max_new_tokens,
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


# ---------------------------------------------------------------------------------------------
# Prediction files
# ---------------------------------------------------------------------------------------------


def read_predictions(paths: Iterable[str | Path]) -> dict[Any, dict[str, Any]]:
    """Records from prediction files keyed by question id (the first record of an id wins). Lines
    that do not parse (a write cut short) are skipped with a warning."""
    records: dict[Any, dict[str, Any]] = {}
    for path in paths:
        path = Path(path)
        if not path.is_file():
            continue
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    qid = rec["question_id"]
                    rec["answer"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    logger.warning("%s:%d: skipping an unreadable prediction line", path, lineno)
                    continue
                _check_prediction(rec, path, lineno)
                records.setdefault(qid, rec)
    return records


def _check_prediction(rec: Mapping[str, Any], path: Path, lineno: int) -> None:
    """A line that parses but does not hold what this module writes (an edited file) is an error naming the file,
    line and field: a list id cannot key an answer and a number is not an answer the scoring rules can read."""
    qid, answer = rec["question_id"], rec["answer"]
    if isinstance(qid, bool) or not isinstance(qid, (str, int)):
        raise BenchmarkDataError(f"{path}:{lineno}: 'question_id' must be a string or an integer, not "
                                 f"{type(qid).__name__} ({qid!r})")
    if answer is not None and not isinstance(answer, str):
        raise BenchmarkDataError(f"{path}:{lineno}: 'answer' of question {qid!r} must be a string (or null), not "
                                 f"{type(answer).__name__} ({answer!r})")
    for key in ("prompt", "image", "error"):
        if rec.get(key) is not None and not isinstance(rec[key], str):
            raise BenchmarkDataError(f"{path}:{lineno}: {key!r} of question {qid!r} must be a string, not "
                                     f"{type(rec[key]).__name__}")


def _prediction_files(output_dir: Path) -> list[Path]:
    return [output_dir / PREDICTIONS, *sorted(output_dir.glob("predictions.rank*.jsonl"))]


# ---------------------------------------------------------------------------------------------
# Distributed helpers (accelerate is optional)
# ---------------------------------------------------------------------------------------------


class _SingleProcess:
    num_processes, process_index, is_main_process = 1, 0, True

    def wait_for_everyone(self):
        pass


def distributed_state():
    """accelerate's ``PartialState`` (a single-process stand-in without accelerate).

    On a machine without CUDA, ``accelerate launch --multi_gpu --num_processes N`` starts N processes
    but ``PartialState()`` would leave each of them alone (it only uses gloo when asked for the CPU),
    so all N would answer every question and write the same files. Asking for the CPU when the
    launcher's ``WORLD_SIZE`` says there are several processes joins them into one gloo group.
    """
    try:
        from accelerate import PartialState
    except ImportError:
        return _SingleProcess()
    if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return PartialState(cpu=True)
    return PartialState()


_state = distributed_state


def is_main_process() -> bool:
    """True in the process that writes the outputs (always, without ``accelerate launch``)."""
    return _state().is_main_process


def _split(state, items: list) -> list:
    """This process's share. Shares are padded to equal length (the last item repeats) so every process
    runs the same number of batches, which DeepSpeed ZeRO-3 needs; repeated answers are dropped later."""
    if state.num_processes == 1 or not items:
        return items
    with state.split_between_processes(items, apply_padding=True) as mine:
        return list(mine)


def _gather(state, obj: list) -> list:
    if state.num_processes == 1:
        return obj
    from accelerate.utils import gather_object

    return gather_object(obj)


# ---------------------------------------------------------------------------------------------
# What determines the answers: the key a resumed run must match
# ---------------------------------------------------------------------------------------------


class ResumeMismatchError(ValueError):
    """An output folder holds answers made by another model, processor, benchmark split or generation
    settings (or by a version that did not record them); the message says what differs."""


_VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "_commit_hash", "_attn_implementation_autoset"}


def _strip_volatile(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {k: _strip_volatile(v) for k, v in obj.items() if k not in _VOLATILE_CONFIG_KEYS}
    if isinstance(obj, (list, tuple)):
        return [_strip_volatile(v) for v in obj]
    return obj


def _json_bytes(obj: Any) -> bytes:
    # objects JSON cannot hold are named by type only, so no memory address ends up in a hash
    return json.dumps(obj, sort_keys=True, default=lambda o: type(o).__name__).encode()


def _tensor_sample(t: torch.Tensor, k: int) -> bytes:
    """The raw bytes of ``k`` elements of ``t`` evenly spaced in its flattened order (all if fewer),
    picked with integer arithmetic so that CPU and GPU pick the same ones."""
    flat = t.detach().reshape(-1)
    n = flat.numel()
    if n > k:
        idx = torch.arange(k, dtype=torch.int64) * (n - 1) // (k - 1)
        flat = flat[idx.to(flat.device)]
    return flat.cpu().contiguous().view(torch.uint8).numpy().tobytes()


def model_fingerprint(model: Any, elements_per_tensor: int = 4096) -> str:
    """A hash of the model as it is in memory: its config (less paths and versions), and each parameter
    and persistent buffer's name, shape, dtype and the bytes of ``elements_per_tensor`` evenly spaced
    elements. Two checkpoints of one training run differ in practically every trained tensor, so they
    get different fingerprints; the same checkpoint loaded twice (also from a copied folder) gets the
    same one; loading it in another dtype changes it (the answers may change too). DeepSpeed ZeRO-3
    parameters are gathered one at a time (every process must call this, as :func:`run_benchmark` does).
    """
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        h.update(_json_bytes(_strip_volatile(config.to_dict())))

    def add(name: str, t: torch.Tensor) -> None:
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(_tensor_sample(t, elements_per_tensor))

    for name, p in model.named_parameters():
        if hasattr(p, "ds_id"):  # partitioned by DeepSpeed ZeRO-3
            import deepspeed

            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                add(name, p.data)
        else:
            add(name, p.data)
    for module_name, module in model.named_modules():
        for name, buf in module.named_buffers(recurse=False):
            if buf is not None and name not in getattr(module, "_non_persistent_buffers_set", ()):
                add(f"{module_name}.{name}" if module_name else name, buf)
    return h.hexdigest()


def processor_fingerprint(processor: Any) -> str:
    """A hash of what the processor contributes to the answers: its settings (image size, patch size,
    normalisation, ...), the chat template and the tokenizer's vocabulary and special tokens."""
    tok = getattr(processor, "tokenizer", processor)
    parts: dict[str, Any] = {"class": type(processor).__name__,
                             "chat_template": getattr(processor, "chat_template", None)}
    if processor is not tok and hasattr(processor, "to_dict"):
        parts["settings"] = processor.to_dict()
    if hasattr(tok, "get_vocab"):
        parts["tokenizer"] = {
            "class": type(tok).__name__,
            "vocab": hashlib.sha256(_json_bytes(sorted(tok.get_vocab().items()))).hexdigest(),
            "special_tokens": getattr(tok, "special_tokens_map", None),
        }
        backend = getattr(tok, "backend_tokenizer", None)
        if backend is not None and hasattr(backend, "to_str"):
            # the same vocabulary splits text differently under other merges, normaliser or pre-tokeniser rules
            parts["tokenizer"]["pipeline"] = hashlib.sha256(backend.to_str().encode()).hexdigest()
    return hashlib.sha256(_json_bytes(parts)).hexdigest()


# versions, and switches that change what `generate` returns or how fast, never which tokens it picks (training
# turns `use_cache` off and the saved model back on: the same weights must keep the same key)
_VOLATILE_GENERATION_KEYS = {"transformers_version", "_from_model_config", "_commit_hash", "use_cache",
                             "output_attentions", "output_hidden_states", "output_scores", "output_logits",
                             "return_dict_in_generate"}


def generation_settings(model: Any) -> dict[str, Any]:
    """The model's generation config as ``generate`` applies it under this module's greedy decoding: the saved
    ``generation_config.json`` (repetition penalty, stop tokens, banned words, ...) with ``do_sample`` and
    ``num_beams`` overridden as :func:`generate_answers` does. Fields that are not set are left out."""
    config = getattr(model, "generation_config", None)
    if config is None:
        return {}
    values = config.to_diff_dict() if hasattr(config, "to_diff_dict") else dict(config)
    values = {k: v for k, v in values.items() if k not in _VOLATILE_GENERATION_KEYS}
    values.update(do_sample=False, num_beams=1)
    return json.loads(_json_bytes(values))


def run_key(model: Any, processor: Any, benchmark: Benchmark, max_new_tokens: int) -> dict[str, Any]:
    """Everything a stored answer depends on beyond its question, prompt and image (which each
    prediction line records): the model, the processor, the benchmark and split, and the generation
    settings (``max_new_tokens`` and the model's generation config, see :func:`generation_settings`). The
    batch size, the number of processes and ``limit`` are not part of it: they change
    which questions are asked together, not what the answer to a question is."""
    return {
        "model": model_fingerprint(model),
        "processor": processor_fingerprint(processor),
        "benchmark": benchmark.name,
        "split": benchmark.split,
        "generation": {"decoding": "greedy", "max_new_tokens": max_new_tokens,
                       "generation_config": generation_settings(model)},
    }


_KEY_WHAT = {
    "model": "the model's weights or config differ",
    "processor": "the processor differs (chat template, tokenizer or image settings)",
    "benchmark": "the benchmark differs",
    "split": "the benchmark split (or LLaVA question file) differs",
    "generation": "the generation settings differ (max_new_tokens, or the model's generation_config.json)",
}


def _key_differences(stored: Mapping[str, Any], key: Mapping[str, Any]) -> list[str]:
    out = []
    for field, what in _KEY_WHAT.items():
        old, new = stored.get(field), key.get(field)
        if old != new:
            if field in ("model", "processor"):
                old, new = str(old)[:12], str(new)[:12]
            out.append(f"{what} (folder: {old!r}, now: {new!r})")
    return out


def _outputs_present(out_dir: Path) -> bool:
    return any(p.is_file() for p in [*_prediction_files(out_dir), out_dir / METRICS])


def _clear_outputs(out_dir: Path) -> None:
    for path in [*_prediction_files(out_dir), out_dir / METRICS, out_dir / RESULTS, out_dir / SUBMISSION,
                 out_dir / RUN_INFO]:
        path.unlink(missing_ok=True)


def _read_run_info(out_dir: Path) -> dict[str, Any] | None:
    path = out_dir / RUN_INFO
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        return info if isinstance(info, dict) and isinstance(info.get("key"), dict) else {"key": {}}
    except json.JSONDecodeError:
        return {"key": {}}


def _resume_problems(out_dir: Path, key: Mapping[str, Any], samples: Sequence[Sample],
                     done: Mapping[Any, Mapping[str, Any]]) -> list[str]:
    """Why the answers in ``out_dir`` may not be reused for this run (empty when they may)."""
    info = _read_run_info(out_dir)
    if info is None:
        if _outputs_present(out_dir):
            return [(f"it holds answers but no {RUN_INFO} (written by an older version, or deleted), so nothing "
                     "says which model and settings made them")]
        return []
    problems = _key_differences(info["key"], key)
    for s in samples:
        rec = done.get(s.question_id)
        if rec is None or rec.get("error") is not None:  # skipped questions are asked again anyway
            continue
        if rec.get("prompt", s.prompt) != s.prompt:
            problems.append(f"question {s.question_id!r} was answered with a different prompt "
                            f"({rec.get('prompt')!r} instead of {s.prompt!r})")
            break
        ident = image_identity(s)
        if rec.get("image", ident) != ident:
            problems.append(f"question {s.question_id!r} was answered about another image "
                            f"({rec.get('image')!r} instead of {ident!r})")
            break
    return problems


# ---------------------------------------------------------------------------------------------
# One benchmark, end to end
# ---------------------------------------------------------------------------------------------


def run_benchmark(
    model: Any,
    processor: Any,
    benchmark: str | Benchmark,
    data: str | Path | None = None,
    *,
    split: str | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    output_dir: str | Path | None = None,
    model_name: str | None = None,
    question_file: str | Path | None = None,
    image_folder: str | Path | None = None,
    annotation_file: str | Path | None = None,
    show_progress: bool = True,
    skip_bad_images: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Load a benchmark, answer its questions (resuming from ``output_dir`` if it holds earlier
    answers; split over processes under ``accelerate launch``), score them and return the report.

    The returned dict (also written to ``output_dir/metrics.json``) has ``benchmark``, ``split``,
    ``model``, ``num_questions``, ``metrics`` (the benchmark's full metrics), ``headline`` (the
    numbers shown in results tables) and ``unanswered`` (questions skipped for a bad image). Every
    process returns the same dict.

    Resuming: ``output_dir/run.json`` records :func:`run_key`. Answers in the folder are reused only
    when the key matches and each stored answer's prompt and image are this run's; otherwise the run
    stops with :class:`ResumeMismatchError`, or, with ``overwrite``, deletes the folder's outputs and
    starts afresh.

    A question whose image cannot be read or processed stops the run with :class:`BenchmarkDataError`
    naming the file and the question; with ``skip_bad_images`` it is scored as unanswered (an empty
    answer), listed under ``unanswered``, and asked again by the next run over the same folder.

    Example, at the end of training::

        report = run_benchmark(model, processor, "easy-vqa", limit=500, output_dir="out/eval-easy-vqa")
        print(report["headline"])  # {'easy-VQA': 87.4}
    """
    for option, value in (("limit", limit), ("batch_size", batch_size), ("max_new_tokens", max_new_tokens)):
        check_count(option, value, optional=option != "batch_size")
    bench = get_benchmark(benchmark) if isinstance(benchmark, str) else benchmark
    state = _state()
    samples = bench.load(data, split=split, question_file=question_file, image_folder=image_folder,
                         annotation_file=annotation_file, limit=limit)
    if not samples:
        raise ValueError(f"benchmark {bench.name!r} has no questions to answer (data={data}, split={split})")
    if max_new_tokens is None:
        max_new_tokens = bench.max_new_tokens
    out_dir = Path(output_dir) if output_dir is not None else None

    done: dict[Any, dict[str, Any]] = {}
    key = None
    if out_dir is not None:
        key = run_key(model, processor, bench, max_new_tokens)  # on every process (ZeRO-3 gathers)
        if state.is_main_process:
            out_dir.mkdir(parents=True, exist_ok=True)
        state.wait_for_everyone()
        # every process reads the same files and reaches the same decision
        done = read_predictions(_prediction_files(out_dir))
        problems = _resume_problems(out_dir, key, samples, done)
        if problems and not overwrite:
            raise ResumeMismatchError(
                f"{out_dir} holds the outputs of another run: {'; '.join(problems)}. Its answers are not "
                f"reused: choose another output folder, or pass overwrite=True (eval/run.py: --overwrite) to "
                f"delete them and start afresh"
            )
        # nobody may write before everyone has read: the split of the remaining work must agree
        state.wait_for_everyone()
        if problems:
            logger.warning("%s: discarding the outputs of another run (%s)", out_dir, "; ".join(problems))
            done = {}
        if state.is_main_process:
            if problems:
                _clear_outputs(out_dir)
            if problems or _read_run_info(out_dir) is None:
                _write_json(out_dir / RUN_INFO, {"key": key, "model_name": model_name or _model_name(model)})
        state.wait_for_everyone()
        # questions skipped for a bad image are asked again (the image may have been fixed)
        done = {qid: rec for qid, rec in done.items() if rec.get("error") is None and rec["answer"] is not None}

    todo = [s for s in samples if s.question_id not in done]
    if done:
        logger.info("%s: %d of %d questions already answered in %s", bench.name, len(samples) - len(todo),
                    len(samples), out_dir)
    mine = _split(state, todo)
    part = out_dir / f"predictions.rank{state.process_index}.jsonl" if out_dir is not None else None
    errors: dict[Any, str] = {}
    new = generate_answers(model, processor, mine, batch_size=batch_size, max_new_tokens=max_new_tokens,
                           output_file=part, show_progress=show_progress and state.is_main_process,
                           desc=bench.name, skip_bad_images=skip_bad_images, errors=errors) if mine else {}
    gathered = _gather(state, [(s.question_id, new.get(s.question_id), errors.get(s.question_id)) for s in mine
                               if s.question_id in new or s.question_id in errors])

    answers = {qid: rec["answer"] for qid, rec in done.items()}
    failed: dict[Any, str] = {}
    for qid, text, error in gathered:
        if error is not None:
            failed.setdefault(qid, error)
        else:
            answers.setdefault(qid, text)
    missing = [s.question_id for s in samples if s.question_id not in answers and s.question_id not in failed]
    if missing:
        raise RuntimeError(f"{len(missing)} questions were not answered, e.g. {missing[:5]}")
    unanswered = [{"question_id": s.question_id, "error": failed[s.question_id]} for s in samples
                  if s.question_id not in answers]
    if unanswered:
        logger.warning("%s: %d question(s) unanswered (bad images), scored as wrong; listed under 'unanswered' "
                       "in metrics.json", bench.name, len(unanswered))

    scored = {**answers, **{u["question_id"]: "" for u in unanswered}}
    metrics = bench.score(samples, scored)
    report = {
        "benchmark": bench.name,
        "split": bench.split,
        "model": model_name or _model_name(model),
        "num_questions": len(samples),
        "headline": bench.headline_values(metrics),
        "metrics": metrics,
        "unanswered": {"count": len(unanswered), "questions": unanswered},
        "generation": {"batch_size": batch_size, "max_new_tokens": max_new_tokens, "limit": limit,
                       "num_processes": state.num_processes},
    }
    if key is not None:
        report["run_key"] = key
    if out_dir is not None and state.is_main_process:
        _write_outputs(out_dir, bench, samples, scored, done, report, data, failed)
    state.wait_for_everyone()
    return report


def _model_name(model: Any) -> str:
    path = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", "")
    return Path(str(path)).name or type(model).__name__


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _write_outputs(out_dir: Path, bench: Benchmark, samples: list[Sample], answers: dict, done: dict,
                   report: dict, data, failed: Mapping[Any, str] = {}) -> None:
    # merged predictions in question order; answers to questions outside this run (e.g. an earlier run
    # without --limit) are kept after them rather than thrown away
    in_run = {s.question_id for s in samples}
    tmp = out_dir / (PREDICTIONS + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for s in samples:
            rec = {"question_id": s.question_id, "prompt": s.prompt, "image": image_identity(s),
                   "answer": answers[s.question_id]}
            if s.question_id in failed:
                rec.update(answer=None, error=failed[s.question_id])
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        for qid, rec in done.items():
            if qid not in in_run:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    os.replace(tmp, out_dir / PREDICTIONS)
    for part in out_dir.glob("predictions.rank*.jsonl"):
        part.unlink()
    _write_json(out_dir / METRICS, report)
    (out_dir / RESULTS).write_text(results_markdown(report), encoding="utf-8")
    submission = bench.submission(samples, answers, data)
    if submission is not None:
        _write_json(out_dir / SUBMISSION, submission)


# ---------------------------------------------------------------------------------------------
# Loading a saved model
# ---------------------------------------------------------------------------------------------


def load_model(model_dir: str | Path, dtype: str = "auto", device: str | torch.device | None = None):
    """``(model, processor)`` of a saved directory in eval mode, on this process's device (or ``device``).

    ``dtype``: ``auto`` (bfloat16 on a GPU that supports it, else float32), ``float32``, ``bfloat16`` or
    ``float16``. Used by ``eval/run.py`` and the lmms-eval plugin, so both evaluate the same model.
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import defocus_mllm  # noqa: F401  (registers the De-focus encoder with the Auto classes)

    if device is None:
        device = getattr(distributed_state(), "device", None)
        if device is None:  # no accelerate installed
            device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if dtype == "auto":
        use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        torch_dtype = torch.bfloat16 if use_bf16 else torch.float32
    elif isinstance(dtype, torch.dtype):
        torch_dtype = dtype
    else:
        torch_dtype = getattr(torch, str(dtype))
    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch_dtype).to(device)
    return model.eval(), processor
