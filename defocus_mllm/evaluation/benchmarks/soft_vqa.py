"""The base of the benchmarks scored with a VQA-style soft accuracy (VQAv2, TextVQA, VizWiz)."""

from __future__ import annotations

from collections.abc import Callable
from statistics import fmean
from typing import Any

from .base import Benchmark, percent_by


class SoftVQABenchmark(Benchmark):
    """Scores each answer with `accuracy_fn` against the human answers; `accuracy` and a breakdown per `breakdowns`
    key, or only a note when the split has no public answers."""

    # accuracy of one raw model output against the human answers (set per benchmark)
    accuracy_fn: Callable[[str, list[str]], float]
    # metadata keys reported per type, where the split's files carry them
    breakdowns: tuple[str, ...] = ("answer_type", "question_type")

    def score(self, samples, answers):
        scored = [s for s in samples if s.answers]
        out: dict[str, Any] = {"num_questions": len(samples), "num_scored": len(scored)}
        if not scored:
            out["note"] = "no ground-truth answers in this split: score submission.json on the official server"
            return out
        accs = [(s, self.accuracy_fn(answers[s.question_id], s.answers)) for s in scored]
        out["accuracy"] = 100.0 * fmean(a for _, a in accs)
        for key in self.breakdowns:
            per = percent_by([(s.meta.get(key), a) for s, a in accs])
            if per:
                out[f"per_{key}"] = per
        return out
