"""Prediction files and resuming: what an output folder holds, reading it back, and whether its answers may be reused.

Files in ``output_dir``:

* ``predictions.rank<k>.jsonl`` - written by process ``k`` while it answers, one line per question,
  flushed after every batch. A run that is interrupted leaves these behind; the next run with the
  same ``output_dir`` reads them (and ``predictions.jsonl``) and answers only what is missing.
* ``predictions.jsonl`` - all answers (``question_id``, ``prompt``, ``image``, ``answer``) in question
  order, written by the main process at the end; the rank files are then removed. A question whose
  image could not be used (only with ``skip_bad_images``) has ``answer`` null and an ``error``.
* ``run.json`` - what determines the answers (:func:`~defocus_mllm.evaluation.fingerprints.run_key`: the model's weights and config, the
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

from .sources import BenchmarkDataError, BytesImage, ParquetImage, PathImage, Sample, nonblank_lines

logger = logging.getLogger(__name__)

PREDICTIONS = "predictions.jsonl"
METRICS = "metrics.json"
RESULTS = "results.md"
SUBMISSION = "submission.json"
RUN_INFO = "run.json"


def append_safe(path: Path):
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


def prediction_record(sample: Sample, answer: str | None, error: str | None = None) -> dict[str, Any]:
    """One line of a prediction file: the question's id, prompt and image identity, and its answer (None, with the
    ``error``, for a question whose image could not be used)."""
    record = {"question_id": sample.question_id, "prompt": sample.prompt, "image": image_identity(sample),
              "answer": answer}
    if error is not None:
        record["error"] = error
    return record


def write_predictions(out_dir: Path, samples: Sequence[Sample], answers: Mapping[Any, str],
                      done: Mapping[Any, Mapping[str, Any]], failed: Mapping[Any, str]) -> None:
    """``predictions.jsonl``: every question of the run in question order (``failed`` ones with their error), then
    the answers in ``done`` to questions outside this run (e.g. an earlier run without ``limit``), kept rather than
    thrown away; the rank files go."""
    in_run = {s.question_id for s in samples}
    tmp = out_dir / (PREDICTIONS + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for s in samples:
            error = failed.get(s.question_id)
            rec = prediction_record(s, None if error is not None else answers[s.question_id], error)
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        for qid, rec in done.items():
            if qid not in in_run:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    os.replace(tmp, out_dir / PREDICTIONS)
    for part in out_dir.glob("predictions.rank*.jsonl"):
        part.unlink()


def read_predictions(paths: Iterable[str | Path]) -> dict[Any, dict[str, Any]]:
    """Records from prediction files keyed by question id (the first record of an id wins). Lines
    that do not parse (a write cut short) are skipped with a warning."""
    records: dict[Any, dict[str, Any]] = {}
    for path in paths:
        path = Path(path)
        if not path.is_file():
            continue
        for lineno, line in nonblank_lines(path):
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


def prediction_files(output_dir: Path) -> list[Path]:
    """The merged prediction file and the rank files an interrupted run left, in the order they are read."""
    return [output_dir / PREDICTIONS, *sorted(output_dir.glob("predictions.rank*.jsonl"))]


class ResumeMismatchError(ValueError):
    """An output folder holds answers made by another model, processor, benchmark split or generation
    settings (or by a version that did not record them); the message says what differs."""


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
    return any(p.is_file() for p in [*prediction_files(out_dir), out_dir / METRICS])


def clear_outputs(out_dir: Path) -> None:
    """Delete what a run wrote to ``out_dir`` (``overwrite``: the answers of another run)."""
    for path in [*prediction_files(out_dir), out_dir / METRICS, out_dir / RESULTS, out_dir / SUBMISSION,
                 out_dir / RUN_INFO]:
        path.unlink(missing_ok=True)


def read_run_info(out_dir: Path) -> dict[str, Any] | None:
    """``run.json`` of ``out_dir`` (an empty key when it is unreadable), or None when there is none."""
    path = out_dir / RUN_INFO
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        return info if isinstance(info, dict) and isinstance(info.get("key"), dict) else {"key": {}}
    except json.JSONDecodeError:
        return {"key": {}}


def resume_problems(out_dir: Path, key: Mapping[str, Any], samples: Sequence[Sample],
                    done: Mapping[Any, Mapping[str, Any]]) -> list[str]:
    """Why the answers in ``out_dir`` may not be reused for this run (empty when they may)."""
    info = read_run_info(out_dir)
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


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON through a temporary file, so an interrupted write never leaves half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
