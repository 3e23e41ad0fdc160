"""Batched greedy answering, resumable prediction files, multi-process splitting, and the one call
that runs a benchmark end to end (:func:`run_benchmark`), shared by ``eval/run.py`` and the training
recipes so that both report the same number for the same model.

Files in ``output_dir``:

* ``predictions.rank<k>.jsonl`` - written by process ``k`` while it answers, one line per question,
  flushed after every batch. A run that is interrupted leaves these behind; the next run with the
  same ``output_dir`` reads them (and ``predictions.jsonl``) and answers only what is missing.
* ``predictions.jsonl`` - all answers (``question_id``, ``prompt``, ``answer``) in question order,
  written by the main process at the end; the rank files are then removed.
* ``metrics.json``, ``results.md`` and, for benchmarks with an evaluation server, ``submission.json``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from .benchmarks import Benchmark, get_benchmark
from .report import results_row
from .sources import Sample

logger = logging.getLogger(__name__)

PREDICTIONS = "predictions.jsonl"
METRICS = "metrics.json"
RESULTS = "results.md"
SUBMISSION = "submission.json"


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
) -> dict[Any, str]:
    """Answer ``samples`` with greedy decoding, ``batch_size`` questions at a time (left-padded).

    Returns ``{question_id: answer}``. With ``output_file``, each batch's answers are appended to it as
    JSON lines (``question_id``, ``prompt``, ``answer``) and flushed, so an interrupted run loses at
    most one batch. The model is put in eval mode for the call and restored afterwards.
    """
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    tokenizer = getattr(processor, "tokenizer", processor)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    out_f = _append_safe(Path(output_file)) if output_file is not None else None
    answers: dict[Any, str] = {}
    try:
        with _LeftPadding(tokenizer), tqdm(total=len(samples), desc=desc, disable=not show_progress) as bar:
            for start in range(0, len(samples), batch_size):
                batch = samples[start : start + batch_size]
                prompts = [build_prompt(processor, s.prompt) for s in batch]
                images = [s.load_image() for s in batch]
                inputs = processor(images=images, text=prompts, padding=True, return_tensors="pt")
                # floating tensors (pixel values) follow the model's dtype; ids stay integer
                inputs = inputs.to(device)
                if "pixel_values" in inputs:
                    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
                generated = model.generate(
                    **inputs,
                    do_sample=False,
                    num_beams=1,
                    max_new_tokens=max_new_tokens,
                    pad_token_id=tokenizer.pad_token_id,
                )
                new_tokens = generated[:, inputs["input_ids"].shape[1] :]
                texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
                for s, text in zip(batch, texts):
                    answers[s.question_id] = text.strip()
                    if out_f is not None:
                        out_f.write(json.dumps({"question_id": s.question_id, "prompt": s.prompt,
                                                "answer": answers[s.question_id]}, ensure_ascii=False) + "\n")
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
                records.setdefault(qid, rec)
    return records


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
) -> dict[str, Any]:
    """Load a benchmark, answer its questions (resuming from ``output_dir`` if it holds earlier
    answers; split over processes under ``accelerate launch``), score them and return the report.

    The returned dict (also written to ``output_dir/metrics.json``) has ``benchmark``, ``split``,
    ``model``, ``num_questions``, ``metrics`` (the benchmark's full metrics) and ``headline`` (the
    numbers shown in results tables). Every process returns the same dict.

    Example, at the end of training::

        report = run_benchmark(model, processor, "easy-vqa", limit=500, output_dir="out/eval-easy-vqa")
        print(report["headline"])  # {'easy-VQA': 87.4}
    """
    bench = get_benchmark(benchmark) if isinstance(benchmark, str) else benchmark
    state = _state()
    samples = bench.load(data, split=split, question_file=question_file, image_folder=image_folder,
                         annotation_file=annotation_file, limit=limit)
    if not samples:
        raise ValueError(f"benchmark {bench.name!r} has no questions to answer (data={data}, split={split})")
    max_new_tokens = max_new_tokens or bench.max_new_tokens
    out_dir = Path(output_dir) if output_dir is not None else None

    done: dict[Any, dict[str, Any]] = {}
    if out_dir is not None:
        if state.is_main_process:
            out_dir.mkdir(parents=True, exist_ok=True)
        state.wait_for_everyone()
        done = read_predictions(_prediction_files(out_dir))
        for s in samples:
            rec = done.get(s.question_id)
            if rec is not None and rec.get("prompt", s.prompt) != s.prompt:
                raise ValueError(
                    f"{out_dir} holds an answer to question {s.question_id!r} made with a different prompt "
                    f"({rec.get('prompt')!r} instead of {s.prompt!r}); use a new output directory"
                )
        # nobody may write before everyone has read: the split of the remaining work must agree
        state.wait_for_everyone()

    todo = [s for s in samples if s.question_id not in done]
    if done:
        logger.info("%s: %d of %d questions already answered in %s", bench.name, len(samples) - len(todo),
                    len(samples), out_dir)
    mine = _split(state, todo)
    part = out_dir / f"predictions.rank{state.process_index}.jsonl" if out_dir is not None else None
    new = generate_answers(model, processor, mine, batch_size=batch_size, max_new_tokens=max_new_tokens,
                           output_file=part, show_progress=show_progress and state.is_main_process,
                           desc=bench.name) if mine else {}
    gathered = _gather(state, [(s.question_id, new[s.question_id]) for s in mine if s.question_id in new])

    answers = {qid: rec["answer"] for qid, rec in done.items()}
    for qid, text in gathered:
        answers.setdefault(qid, text)
    missing = [s.question_id for s in samples if s.question_id not in answers]
    if missing:
        raise RuntimeError(f"{len(missing)} questions were not answered, e.g. {missing[:5]}")

    metrics = bench.score(samples, answers)
    report = {
        "benchmark": bench.name,
        "split": bench.split,
        "model": model_name or _model_name(model),
        "num_questions": len(samples),
        "headline": bench.headline_values(metrics),
        "metrics": metrics,
        "generation": {"batch_size": batch_size, "max_new_tokens": max_new_tokens, "limit": limit,
                       "num_processes": state.num_processes},
    }
    if out_dir is not None and state.is_main_process:
        _write_outputs(out_dir, bench, samples, answers, done, report, data)
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
                   report: dict, data) -> None:
    # merged predictions in question order; answers to questions outside this run (e.g. an earlier run
    # without --limit) are kept after them rather than thrown away
    in_run = {s.question_id for s in samples}
    tmp = out_dir / (PREDICTIONS + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for s in samples:
            f.write(json.dumps({"question_id": s.question_id, "prompt": s.prompt, "answer": answers[s.question_id]},
                               ensure_ascii=False) + "\n")
        for qid, rec in done.items():
            if qid not in in_run:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    os.replace(tmp, out_dir / PREDICTIONS)
    for part in out_dir.glob("predictions.rank*.jsonl"):
        part.unlink()
    _write_json(out_dir / METRICS, report)
    (out_dir / RESULTS).write_text(results_row(report, header=True) + "\n", encoding="utf-8")
    submission = bench.submission(samples, answers, data)
    if submission is not None:
        _write_json(out_dir / SUBMISSION, submission)
