"""POPE: LLaVA-1.5's question and label files or lmms-lab/POPE; LLaVA's yes/no rule and the mean over the three
splits of accuracy, precision, recall and F1."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from statistics import fmean
from typing import Any

from ..sources import (
    BenchmarkDataError,
    Sample,
    read_jsonl,
    resolve,
)
from .base import Benchmark, answers_from


def parse_yes_no_pope(text: str) -> str:
    """LLaVA's POPE rule (``eval_pope.py``): keep the first sentence, drop commas, split on spaces;
    "no" if the words contain "No", "no" or "not", otherwise "yes" (so anything else counts as yes)."""
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def pope_metrics(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """Accuracy, precision, recall, F1 (positive class "yes") and the ratio of "yes" answers.

    ``predictions`` are raw model outputs (parsed with :func:`parse_yes_no_pope`); ``labels`` are
    "yes"/"no" (case and surrounding spaces ignored), anything else is a ``ValueError``, as in lmms-eval's
    POPE task (LLaVA's script would count it as a yes). Where LLaVA would divide by zero, the ratio is
    reported as 0.0.
    """
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    tp = fp = tn = fn = 0
    for i, (pred, label) in enumerate(zip(predictions, labels)):
        norm = label.strip().lower() if isinstance(label, str) else None
        if norm not in ("yes", "no"):
            raise ValueError(f"POPE label {i} is {label!r}; labels must be 'yes' or 'no'")
        p = parse_yes_no_pope(pred) == "yes"
        y = norm == "yes"
        if p and y:
            tp += 1
        elif p:
            fp += 1
        elif y:
            fn += 1
        else:
            tn += 1
    n = tp + fp + tn + fn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": (tp + tn) / n if n else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": (tp + fp) / n if n else 0.0,
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "count": n,
    }


def _pope_label(value: Any, where: str, question_id: Any) -> str:
    """A POPE label as lmms-eval's ``pope`` task reads it (lower-cased, stripped, then asserted to be "yes" or "no").
    LLaVA's ``eval_pope.py`` counts every label other than "no" as a yes, so labels written as 1/0 or true/false would
    score a model that always says yes at 100%; they are refused naming the file and the question instead."""
    label = value.strip().lower() if isinstance(value, str) else None
    if label not in ("yes", "no"):
        raise BenchmarkDataError(f"{where}: the label of question {question_id!r} is {value!r}; POPE labels must be "
                                 f"'yes' or 'no'")
    return label


class POPE(Benchmark):
    name = "pope"
    title = "POPE"
    llava_question_file = "llava_pope_test.jsonl"
    llava_image_folder = "val2014"
    llava_annotation = "coco"  # folder of coco_pope_{adversarial,popular,random}.json label files
    headline = (("f1", "POPE F1"), ("accuracy", "POPE acc"))
    splits = ("adversarial", "popular", "random")

    def load_llava(self, base, question_file, image_folder, annotation_file):
        records = list(self._llava_jsonl(question_file, image_folder, ("question_id", "image", "text", "category")))
        label_dir = resolve(base, annotation_file, self.llava_annotation)
        labels: dict[str, list[dict]] = {}
        if label_dir is not None and label_dir.is_dir():
            for f in sorted(label_dir.glob("coco_pope_*.json")):
                labels[f.stem[len("coco_pope_"):]] = [obj for _, obj in read_jsonl(f)]
        # LLaVA's eval_pope.py pairs the k-th question of a category with the k-th line of its label
        # file; we do the same and check that the images agree
        position: dict[str, int] = defaultdict(int)
        samples = []
        for obj, where, image in records:
            cat = obj["category"]
            answers = answers_from(obj)
            if cat in labels:
                k = position[cat]
                position[cat] += 1
                if k >= len(labels[cat]):
                    raise BenchmarkDataError(f"{where}: question {obj['question_id']!r} has no label line "
                                             f"(coco_pope_{cat}.json has {len(labels[cat])})")
                lab = labels[cat][k]
                if "image" in lab and Path(str(lab["image"])).name != Path(str(obj["image"])).name:
                    raise BenchmarkDataError(f"{where}: question {obj['question_id']!r} is about {obj['image']!r} but "
                                             f"line {k + 1} of coco_pope_{cat}.json is about {lab['image']!r}")
                answers = [_pope_label(lab.get("label"), f"line {k + 1} of {label_dir / f'coco_pope_{cat}.json'}",
                                       obj["question_id"])]
            elif answers is not None:
                answers = [_pope_label(answers[0], where, obj["question_id"])]
            samples.append(self._sample(obj, image, answers=answers, category=cat))
        return samples

    def load_hf(self, base, split):
        samples = []
        for row, where, image in self._hf_rows(base, split, required=("question_id", "question", "category")):
            answer = row.get("answer", row.get("label"))
            answers = None if answer is None else [_pope_label(answer, where, row["question_id"])]
            samples.append(self._sample(row, image, answers=answers, category=row["category"]))
        return samples

    def score(self, samples, answers):
        out: dict[str, Any] = {"num_questions": len(samples)}
        per_split = {}
        by_cat: dict[str, list[Sample]] = defaultdict(list)
        for s in samples:
            if s.answers:
                by_cat[s.meta["category"]].append(s)
        for cat in sorted(by_cat):
            ss = by_cat[cat]
            per_split[cat] = pope_metrics([answers[s.question_id] for s in ss], [s.answers[0] for s in ss])
        if per_split:
            out["per_split"] = per_split
            # LLaVA-1.5 reports the mean over the three splits
            for key in ("accuracy", "precision", "recall", "f1", "yes_ratio"):
                out[key] = 100.0 * fmean(m[key] for m in per_split.values())
        return out
