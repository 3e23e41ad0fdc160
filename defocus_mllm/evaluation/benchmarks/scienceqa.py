"""ScienceQA-IMG: LLaVA-1.5's test conversations or lmms-lab/ScienceQA; LLaVA's ``eval_science_qa.py`` letter
extraction."""

from __future__ import annotations

import re
from statistics import fmean
from typing import Any

from ...prompts import LETTER_ANSWER_INSTRUCTION as LETTER_ANSWER
from ..sources import (
    BenchmarkDataError,
    PathImage,
    is_none,
    read_json,
    require,
    resolve,
)
from .base import Benchmark


SQA_OPTIONS = ("A", "B", "C", "D", "E")
_SQA_THE_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")


def extract_sqa_letter(text: str, num_choices: int = len(SQA_OPTIONS)) -> str | None:
    """LLaVA's ScienceQA letter extraction (``llava/eval/eval_science_qa.py``), on the output as it is (the
    script does not strip; LLaVA's generation, like ours, already has): the whole output is one of
    ``A``-``E``; or it is at least 3 characters, starts with one of them and continues with ". " ("B. cat");
    or ``re.findall(r"The answer is ([A-Z]).")`` finds exactly one letter (the ``.`` there is any
    character, so "The answer is B" at the very end fails). Anything else fails, a bare "B." included:
    that is the rule LLaVA's numbers are computed with. ``get_pred_idx`` then rejects a letter beyond the
    question's choices. Returns the letter, or None (counted wrong)."""
    if text in SQA_OPTIONS:
        letter = text
    elif len(text) >= 3 and text[0] in SQA_OPTIONS and text[1:3] == ". ":
        letter = text[0]
    else:
        found = _SQA_THE_ANSWER_IS.findall(text)
        letter = found[0] if len(found) == 1 else None
    if letter is None or letter not in SQA_OPTIONS[:num_choices]:
        return None
    return letter


def _format_choices(choices: list[str]) -> str:
    return "\n".join(f"{SQA_OPTIONS[i]}. {c}" for i, c in enumerate(choices))


class ScienceQA(Benchmark):
    name = "scienceqa"
    title = "SQA-IMG"
    instruction = LETTER_ANSWER
    llava_question_file = "llava_test_CQM-A.json"
    llava_image_folder = "images/test"
    llava_annotation = "problems.json"
    _missing_image_hint = " (use the ScienceQA-IMG configuration)"
    _the_answer_is = re.compile(r"The answer is ([A-E])")

    def load_llava(self, base, question_file, image_folder, annotation_file):
        items = read_json(question_file, "question file")
        if not isinstance(items, list):
            raise BenchmarkDataError(f"{question_file}: expected a JSON list of LLaVA conversations")
        ann_path = resolve(base, annotation_file, self.llava_annotation)
        problems = read_json(ann_path, "annotation file") if ann_path is not None and ann_path.is_file() else {}
        samples = []
        for i, item in enumerate(items):
            where = f"{question_file} (item {i})"
            require(item, ("id", "conversations"), where)
            if "image" not in item:
                continue  # ScienceQA-IMG: only the questions with an image
            convs = item["conversations"]
            if not convs or "value" not in convs[0]:
                raise BenchmarkDataError(f"{where} (id={item['id']!r}): no human turn in 'conversations'")
            text = convs[0]["value"].replace("<image>", "").strip()
            pid = str(item["id"])
            if problems:
                if pid not in problems:
                    raise BenchmarkDataError(f"{where}: problem id {pid!r} not in {ann_path}")
                p = problems[pid]
                answer, n_choices = SQA_OPTIONS[p["answer"]], len(p["choices"])
            else:
                # without problems.json, read the reference from the gpt turn ("B" or "The answer is B.")
                ref = convs[1]["value"].strip() if len(convs) > 1 else ""
                m = self._the_answer_is.search(ref)
                answer = ref if ref in SQA_OPTIONS else (m.group(1) if m else None)
                if answer is None:
                    raise BenchmarkDataError(f"{where} (id={pid!r}): no answer letter in the gpt turn and no {ann_path}")
                n_choices = len(re.findall(r"(?m)^[A-E]\. ", text)) or len(SQA_OPTIONS)
            samples.append(self._sample(item, PathImage(image_folder / item["image"]), qid=pid, text=text,
                                        answers=[answer], num_choices=n_choices))
        return samples

    def load_hf(self, base, split):
        samples = []
        for row, where, image in self._hf_rows(base, split, required=("question", "choices", "answer")):
            choices = list(row["choices"])
            context = f"Context: {row['hint']}\n" if not is_none(row.get("hint")) else ""
            samples.append(self._sample(row, image, qid=len(samples) if row.get("id") is None else row["id"],
                                        text=f"{context}{row['question']}\n{_format_choices(choices)}",
                                        answers=[SQA_OPTIONS[int(row["answer"])]], num_choices=len(choices)))
        return samples

    def score(self, samples, answers):
        """``eval_science_qa.py``: the extracted letter (:func:`extract_sqa_letter`) must be the answer's."""
        scored = [s for s in samples if s.answers]
        out: dict[str, Any] = {"num_questions": len(samples), "num_scored": len(scored)}
        if scored:
            letters = [extract_sqa_letter(answers[s.question_id], s.meta["num_choices"]) for s in scored]
            out["accuracy"] = 100.0 * fmean(letter == s.answers[0] for letter, s in zip(letters, scored))
            out["unparsed"] = sum(letter is None for letter in letters)
        return out
