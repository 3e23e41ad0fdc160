"""easy-VQA, the offline benchmark: the test split of the ``easy-vqa`` package; exact match of the normalised output
and answer (no official script)."""

from __future__ import annotations

from pathlib import Path
from statistics import fmean
from typing import Any

from ..answer_processing import normalize_answer, vqa_accuracy
from ..sources import (
    BenchmarkDataError,
    PathImage,
    Sample,
    check_images_exist,
)
from .base import Benchmark, check_count, percent_by
from ...data.easy_vqa import (
    EASY_VQA_INSTRUCTION,
    EASY_VQA_KINDS,
    easy_vqa_prompt,
    easy_vqa_question_kind,
    easy_vqa_questions,
)


def easy_vqa_scores(prediction: str, answer: str) -> dict[str, float]:
    """easy-VQA has one answer per question. ``exact_match``: the normalised prediction equals the
    normalised answer (the headline number). ``vqa_accuracy``: the official VQA soft accuracy with the
    answer given by all ten annotators; since the official code skips normalisation when all answers
    agree, this is a raw (case- and punctuation-sensitive) match."""
    return {
        "exact_match": float(normalize_answer(prediction) == normalize_answer(answer)),
        "vqa_accuracy": vqa_accuracy(prediction, [answer] * 10),
    }


class EasyVQA(Benchmark):
    """The easy-VQA test split from the ``easy-vqa`` PyPI package (1,000 images, 9,673 questions). No
    official script: the headline is the exact match of the normalised output and answer."""

    name = "easy-vqa"
    title = "easy-VQA"
    instruction = EASY_VQA_INSTRUCTION
    max_new_tokens = 16

    def load(self, data=None, *, split=None, question_file=None, image_folder=None, annotation_file=None,
             limit=None, check_images=True):
        check_count("limit", limit, optional=True)
        self.split = split or "test"
        try:
            questions, answers, image_ids, paths = easy_vqa_questions(self.split)
        except (ImportError, ValueError) as e:
            raise BenchmarkDataError(str(e)) from e
        samples = []
        for i, (q, a, image_id) in enumerate(zip(questions, answers, image_ids)):
            if image_id not in paths:
                raise BenchmarkDataError(f"easy-VQA {self.split} question {i}: image {image_id} missing from the package")
            # the question's index in the package's list is its id (the package has no ids of its own)
            samples.append(Sample(i, easy_vqa_prompt(q), PathImage(Path(paths[image_id])), [a],
                                  {"image_id": image_id, "kind": easy_vqa_question_kind(q, a)}))
        if limit is not None:
            samples = samples[:limit]
        if check_images:
            check_images_exist(samples)
        return samples

    def score(self, samples, answers):
        """``accuracy``: % of outputs whose :func:`normalize_answer` equals the answer's (the headline);
        ``per_kind``: the same per question kind (open colour, open shape, yes/no colour, yes/no shape);
        ``vqa_accuracy``: the VQA tool's soft accuracy with the answer given by all ten annotators."""
        scores = [(s, easy_vqa_scores(answers[s.question_id], s.answers[0])) for s in samples]
        out: dict[str, Any] = {"num_questions": len(samples)}
        if scores:
            out["accuracy"] = 100.0 * fmean(x["exact_match"] for _, x in scores)
            per = percent_by([(s.meta["kind"], x["exact_match"]) for s, x in scores])
            out["per_kind"] = {k: per[k] for k in EASY_VQA_KINDS if k in per}
            out["vqa_accuracy"] = 100.0 * fmean(x["vqa_accuracy"] for _, x in scores)
        return out
