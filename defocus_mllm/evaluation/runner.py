"""One benchmark end to end (:func:`run_benchmark`: load, answer with resume, score, write the report), shared by
``eval/run.py`` and the training recipes so that both report the same number for the same model, and loading a saved
model for it (:func:`load_model`)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .benchmarks import Benchmark, check_count, get_benchmark
from .distributed import distributed_state, gather, split_between
from .fingerprints import run_key
from .generation import generate_answers
from .predictions import (
    METRICS,
    RESULTS,
    RUN_INFO,
    SUBMISSION,
    ResumeMismatchError,
    clear_outputs,
    prediction_files,
    read_predictions,
    read_run_info,
    resume_problems,
    write_json,
    write_predictions,
)
from .report import results_markdown
from .sources import Sample

logger = logging.getLogger(__name__)


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
    state = distributed_state()
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
        done = read_predictions(prediction_files(out_dir))
        problems = resume_problems(out_dir, key, samples, done)
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
                clear_outputs(out_dir)
            if problems or read_run_info(out_dir) is None:
                write_json(out_dir / RUN_INFO, {"key": key, "model_name": model_name or _model_name(model)})
        state.wait_for_everyone()
        # questions skipped for a bad image are asked again (the image may have been fixed)
        done = {qid: rec for qid, rec in done.items() if rec.get("error") is None and rec["answer"] is not None}

    todo = [s for s in samples if s.question_id not in done]
    if done:
        logger.info("%s: %d of %d questions already answered in %s", bench.name, len(samples) - len(todo),
                    len(samples), out_dir)
    mine = split_between(state, todo)
    part = out_dir / f"predictions.rank{state.process_index}.jsonl" if out_dir is not None else None
    errors: dict[Any, str] = {}
    new = generate_answers(model, processor, mine, batch_size=batch_size, max_new_tokens=max_new_tokens,
                           output_file=part, show_progress=show_progress and state.is_main_process,
                           desc=bench.name, skip_bad_images=skip_bad_images, errors=errors) if mine else {}
    gathered = gather(state, [(s.question_id, new.get(s.question_id), errors.get(s.question_id)) for s in mine
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


def _write_outputs(out_dir: Path, bench: Benchmark, samples: list[Sample], answers: dict, done: dict,
                   report: dict, data, failed: Mapping[Any, str] = {}) -> None:
    write_predictions(out_dir, samples, answers, done, failed)
    write_json(out_dir / METRICS, report)
    (out_dir / RESULTS).write_text(results_markdown(report), encoding="utf-8")
    submission = bench.submission(samples, answers, data)
    if submission is not None:
        write_json(out_dir / SUBMISSION, submission)


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
