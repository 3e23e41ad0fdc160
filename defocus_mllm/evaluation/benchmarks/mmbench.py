"""MMBench: the dev TSV LLaVA-1.5 uses or lmms-lab/MMBench; VLMEvalKit's (v0.2) exact-matching answer extraction
and circular evaluation."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ...prompts import LETTER_ANSWER_INSTRUCTION as LETTER_ANSWER
from ..sources import (
    BenchmarkDataError,
    BytesImage,
    ImageRef,
    Sample,
    is_none,
    read_tsv,
    require,
)
from .base import Benchmark


# VLMEvalKit v0.2 (open-compass/VLMEvalKit, tag v0.2, commit e4e0263), vlmeval/utils/matching_util.py
MMBENCH_REFUSALS = (
    "Sorry, I can't help with images of people yet.",
    "I can't process this file.",
    "I'm sorry, but without the image provided",
    "Cannot determine the answer",
)
_MMBENCH_SEPARATORS = ".()[],:;!*#{}"
# copies of a question in MMBench's files have index + k * CIRCULAR_OFFSET (k = 1, 2, ...)
CIRCULAR_OFFSET = 1_000_000


def can_infer_option(answer: str, choices: Mapping[str, object]) -> str | None:
    """VLMEvalKit's ``can_infer_option`` (v0.2): an output containing "Failed to obtain answer via API"
    infers nothing; one containing a known refusal ("Cannot determine the answer", ...) is ``"Z"`` (wrong);
    otherwise ``.()[],:;!*#{}`` become spaces and the words are split: exactly one of the ``choices``
    letters among the words is the answer; no letter but a word ``Z`` is ``"Z"``; else None (two or more
    letters: the caller falls back to the option texts). The ``VERBOSE`` quantifier check is off by default
    and not reproduced."""
    if "Failed to obtain answer via API" in answer:
        return None
    if any(refusal in answer for refusal in MMBENCH_REFUSALS):
        return "Z"
    for ch in _MMBENCH_SEPARATORS:
        answer = answer.replace(ch, " ")
    words = answer.split()
    letters = [c for c in choices if c in words]
    if len(letters) == 1:
        return letters[0]
    if not letters and "Z" in words:
        return "Z"
    return None


def can_infer_text(answer: str, choices: Mapping[str, object]) -> str | None:
    """VLMEvalKit's ``can_infer_text`` (v0.2): the one option whose text (lower-cased) occurs in the
    lower-cased output, or None when none or several do."""
    lowered = answer.lower()
    hits = [k for k, v in choices.items() if str(v).lower() in lowered]
    return hits[0] if len(hits) == 1 else None


def can_infer(answer: object, choices: Mapping[str, object]) -> str | None:
    """VLMEvalKit's ``can_infer`` (v0.2), its exact-matching answer extraction (the GPT judge it can fall
    back on is not used): :func:`can_infer_option`, and when that infers nothing, :func:`can_infer_text`.
    ``choices`` maps the letters shown to the option texts, e.g. ``{"A": "cat", "B": "dog"}``. Returns a
    letter, ``"Z"`` (a refusal, never right) or None (nothing inferred, counted wrong)."""
    answer = str(answer)
    return can_infer_option(answer, choices) or can_infer_text(answer, choices)


def mmbench_circular_accuracy(records: Iterable[Mapping[str, object]]) -> dict[str, object]:
    """Circular evaluation as VLMEvalKit's ``mcq_circular_eval`` (v0.2) scores it. Each record is one row
    (one asked copy of a question) with ``index``, ``correct`` (the inferred letter equals the row's
    answer) and optionally ``category`` and ``l2_category``. Rows are grouped by ``index % 1,000,000``;
    a group is scored when its original row (``index < 1,000,000``) is present, and is right only if all
    its rows are right. ``circular`` is the % of groups right (overall, ``per_category``,
    ``per_l2_category``: ``report_acc`` over the original rows); ``vanilla`` is the % of original rows
    right on their own (the single-pass number)."""
    groups: dict[int, list[bool]] = defaultdict(list)
    originals: dict[int, Mapping[str, object]] = {}
    for r in records:
        index = int(r["index"])
        group = index % CIRCULAR_OFFSET
        groups[group].append(bool(r["correct"]))
        if index == group:
            originals[group] = r
    if not originals:
        return {"circular": 0.0, "vanilla": 0.0, "questions": 0}
    hit = {g: all(groups[g]) for g in originals}
    out: dict[str, object] = {
        "circular": 100.0 * sum(hit.values()) / len(hit),
        "vanilla": 100.0 * sum(bool(r["correct"]) for r in originals.values()) / len(originals),
        "questions": len(hit),
    }
    for key, name in (("category", "per_category"), ("l2_category", "per_l2_category")):
        per: dict[str, list[bool]] = defaultdict(list)
        for g, r in originals.items():
            if r.get(key) is not None:
                per[str(r[key])].append(hit[g])
        if per:
            out[name] = {c: 100.0 * sum(v) / len(v) for c, v in sorted(per.items())}
    return out


def circular_shift(options: Sequence[str], shift: int) -> list[str]:
    """The option order of circular copy ``shift`` made for a file without copies: copy r shows option
    ``(i + r) % n`` at position i (copy 0 is the original order), as LLaVA's ``model_vqa_mmbench.py
    --all-rounds`` rotates them."""
    n = len(options)
    return [options[(i + shift) % n] for i in range(n)]


class MMBench(Benchmark):
    """MMBench's official files (the dev TSV LLaVA uses, lmms-lab's ``dev`` split) already hold the
    circular copies of each question, at ``index + k * 1,000,000`` with the options rotated: every row
    is asked once, as it is. Only a file without such copies is rotated here (copy ``r`` shows option
    ``(i + r) mod n`` at position ``i``, as LLaVA's ``--all-rounds``, with index ``index + r * 1,000,000``).
    Scoring is VLMEvalKit's (v0.2) exact-matching circular evaluation."""

    name = "mmbench"
    title = "MMBench"
    instruction = LETTER_ANSWER
    llava_question_file = "mmbench_dev_20230712.tsv"
    llava_image_folder = None  # images are base64 inside the TSV
    headline = (("circular", "MMBench"),)
    letters = ("A", "B", "C", "D")

    def _question(self, row: Mapping[str, Any], where: str) -> tuple[int, str, list[str], str | None]:
        """(index, question text with hint, options shown, answer letter or None) of one row."""
        options = []
        for letter in self.letters:
            if is_none(row.get(letter)):
                break
            options.append(str(row[letter]))
        if len(options) < 2:
            raise BenchmarkDataError(f"{where} (index={row.get('index')!r}): fewer than two options")
        answer = None if is_none(row.get("answer")) else str(row["answer"]).strip()
        if answer is not None and answer not in self.letters[: len(options)]:
            raise BenchmarkDataError(f"{where} (index={row.get('index')!r}): answer {answer!r} is not an option letter")
        try:
            index = int(row["index"])
        except (TypeError, ValueError) as e:
            raise BenchmarkDataError(f"{where}: index {row.get('index')!r} is not an integer") from e
        question = str(row["question"])
        if not is_none(row.get("hint")):
            question = f"{row['hint']}\n{question}"
        return index, question, options, answer

    def _samples(self, rows: list[tuple[Mapping[str, Any], ImageRef, str]]) -> list[Sample]:
        parsed = [(self._question(row, where), row, image) for row, image, where in rows]
        has_copies = any(index >= CIRCULAR_OFFSET for (index, *_), _, _ in parsed)
        samples = []
        for (index, question, options, answer), row, image in parsed:
            meta = {"category": row.get("category"), "l2_category": row.get("l2-category", row.get("L2-category"))}
            for r in range(1 if has_copies else len(options)):
                shown = circular_shift(options, r)
                # the correct option sits at position (answer - r) mod n in copy r
                letter = None if answer is None else self.letters[(self.letters.index(answer) - r) % len(options)]
                text = question + "".join(f"\n{self.letters[i]}. {o}" for i, o in enumerate(shown))
                copy = index + r * CIRCULAR_OFFSET
                samples.append(self._sample(row, image, qid=copy, text=text,
                                            answers=None if letter is None else [letter],
                                            index=copy, options=dict(zip(self.letters, shown)), **meta))
        return samples

    def load_llava(self, base, question_file, image_folder, annotation_file):
        rows = []
        for lineno, row in read_tsv(question_file):
            where = f"{question_file}:{lineno}"
            require(row, ("index", "question", "image"), where)
            rows.append((row, BytesImage(row["image"], f"{question_file} (index {row['index']})"), where))
        return self._samples(rows)

    def load_hf(self, base, split):
        rows = []
        for row, where, image in self._hf_rows(base, split, required=("index", "question")):
            rows.append((row, image, where))
        return self._samples(rows)

    def apply_limit(self, samples, limit):
        # --limit counts questions (groups), each kept with all its copies wherever they are in the file
        keep: dict[int, None] = {}
        for s in samples:
            group = s.meta["index"] % CIRCULAR_OFFSET
            if group not in keep and len(keep) < limit:
                keep[group] = None
        return [s for s in samples if s.meta["index"] % CIRCULAR_OFFSET in keep]

    def score(self, samples, answers):
        records = [{"index": s.meta["index"], "category": s.meta.get("category"),
                    "l2_category": s.meta.get("l2_category"),
                    "correct": can_infer(answers[s.question_id], s.meta["options"]) == s.answers[0]}
                   for s in samples if s.answers]
        out: dict[str, Any] = {"num_questions": len({s.meta["index"] % CIRCULAR_OFFSET for s in samples}),
                               "num_rows": len(samples)}
        if records:
            out.update(mmbench_circular_accuracy(records))
        return out
