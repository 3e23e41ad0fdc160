"""Per-benchmark metrics: answer parsing rules and aggregate scores.

Each function follows the evaluation its benchmark's numbers are usually reported with (LLaVA-1.5's
scripts, or the benchmark's own tool where LLaVA defers to it). Where those rules are surprising
(e.g. ScienceQA not accepting "A."), the docstring says so: changing them would change the numbers.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence

from .answer_processing import normalize_answer, vqa_accuracy

# ---------------------------------------------------------------------------------------------
# GQA
# ---------------------------------------------------------------------------------------------


def normalize_gqa_answer(text: str) -> str:
    """LLaVA-1.5's GQA post-processing (``convert_gqa_for_eval.py``): strip, drop trailing periods,
    lower-case. The official GQA script then compares strings exactly."""
    return text.strip().rstrip(".").strip().lower()


def gqa_accuracy(prediction: str, answer: str) -> float:
    """1.0 when the normalised prediction equals the (lower-cased) ground-truth answer, else 0.0."""
    return float(normalize_gqa_answer(prediction) == answer.strip().lower())


# ---------------------------------------------------------------------------------------------
# easy-VQA
# ---------------------------------------------------------------------------------------------


def easy_vqa_scores(prediction: str, answer: str) -> dict[str, float]:
    """easy-VQA has one answer per question. ``exact_match``: the normalised prediction equals the
    normalised answer (the headline number). ``vqa_accuracy``: the official VQA soft accuracy with the
    answer given by all ten annotators; since the official code skips normalisation when all answers
    agree, this is a raw (case- and punctuation-sensitive) match."""
    return {
        "exact_match": float(normalize_answer(prediction) == normalize_answer(answer)),
        "vqa_accuracy": vqa_accuracy(prediction, [answer] * 10),
    }


# ---------------------------------------------------------------------------------------------
# POPE
# ---------------------------------------------------------------------------------------------


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
    "yes"/"no" (anything other than "no" is a yes, as in LLaVA). Where LLaVA would divide by zero, the
    ratio is reported as 0.0.
    """
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    tp = fp = tn = fn = 0
    for pred, label in zip(predictions, labels):
        p = parse_yes_no_pope(pred) == "yes"
        y = label.strip().lower() != "no"
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


# ---------------------------------------------------------------------------------------------
# ScienceQA
# ---------------------------------------------------------------------------------------------

SQA_OPTIONS = ("A", "B", "C", "D", "E")
_SQA_THE_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")


def extract_sqa_letter(text: str, num_choices: int = len(SQA_OPTIONS)) -> str | None:
    """LLaVA's ScienceQA letter extraction (``eval_science_qa.py``), applied to the stripped output:
    the whole output is a letter ("B"), or it starts with a letter followed by ". " ("B. cat"), or it
    contains "The answer is X." exactly once. Anything else (including a bare "B.") fails: that is the
    rule LLaVA's numbers are computed with. Returns None when no valid letter is found or the letter is
    beyond the question's choices."""
    text = text.strip()
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


# ---------------------------------------------------------------------------------------------
# MME
# ---------------------------------------------------------------------------------------------

MME_PERCEPTION = (
    "existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR",
)
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def parse_yes_no_mme(text: str) -> str:
    """MME's rule (``eval_tool/calculation.py``): lower-case; "yes"/"no" as is; otherwise look for "yes",
    then "no", in the first four characters; else "other" (always wrong)."""
    text = text.lower()
    if text in ("yes", "no"):
        return text
    head = text[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return "other"


def mme_scores(records: Iterable[Mapping[str, str]]) -> dict[str, object]:
    """MME scores from records with keys ``category``, ``image`` (the group of questions asked about
    one image, normally two), ``prediction`` and ``answer`` ("Yes"/"No").

    Per subtask: ``acc`` = % of questions right, ``acc_plus`` = % of images with every question right,
    ``score = acc + acc_plus`` (max 200). ``perception`` sums the 10 perception subtasks (max 2000),
    ``cognition`` the 4 cognition subtasks (max 800); a subtask absent from the records adds nothing.
    """
    by_cat: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        ok = parse_yes_no_mme(r["prediction"]) == r["answer"].strip().lower()
        by_cat[r["category"]][r["image"]].append(ok)
    subtasks = {}
    for cat, images in by_cat.items():
        flat = [ok for oks in images.values() for ok in oks]
        acc = 100.0 * sum(flat) / len(flat)
        acc_plus = 100.0 * sum(all(oks) for oks in images.values()) / len(images)
        subtasks[cat] = {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus, "count": len(flat)}
    unknown = sorted(set(subtasks) - set(MME_PERCEPTION) - set(MME_COGNITION))
    return {
        "perception": sum(subtasks[c]["score"] for c in MME_PERCEPTION if c in subtasks),
        "cognition": sum(subtasks[c]["score"] for c in MME_COGNITION if c in subtasks),
        "subtasks": subtasks,
        "unknown_subtasks": unknown,
    }


# ---------------------------------------------------------------------------------------------
# MMBench
# ---------------------------------------------------------------------------------------------

_MMBENCH_STRIP = ".()[],:;!*#{}"


def extract_mmbench_letter(text: str, options: Mapping[str, str]) -> str | None:
    """MMBench's rule-based answer matching (the ``can_infer`` step of the official tool, without its
    ChatGPT fallback, which needs an API): replace ``.()[],:;!*#{}`` by spaces and split; if exactly one
    option letter appears as a word, that is the answer. Otherwise, if exactly one option's text occurs
    in the output (case-insensitive), that option. Otherwise None (counted wrong).

    ``options`` maps the letters shown to the model to the option texts, e.g. {"A": "cat", "B": "dog"}.
    """
    cleaned = text
    for ch in _MMBENCH_STRIP:
        cleaned = cleaned.replace(ch, " ")
    words = cleaned.split()
    letters = [k for k in options if k in words]
    if len(letters) == 1:
        return letters[0]
    if len(letters) == 0:
        lowered = text.lower()
        hits = [k for k, v in options.items() if str(v).lower() in lowered]
        if len(hits) == 1:
            return hits[0]
    return None


def mmbench_circular_accuracy(records: Iterable[Mapping[str, object]]) -> dict[str, float]:
    """Circular evaluation. Each record is one pass over a question with keys ``index`` (the source
    question), ``round`` (0 = original option order), ``correct`` (bool) and optionally ``category``.
    A question counts as right only if every one of its passes is right. ``vanilla`` is the accuracy
    of the round-0 passes alone (the usual single-pass number)."""
    by_q: dict[object, dict[int, bool]] = defaultdict(dict)
    cats: dict[object, str] = {}
    for r in records:
        by_q[r["index"]][int(r["round"])] = bool(r["correct"])
        if r.get("category") is not None:
            cats[r["index"]] = str(r["category"])
    if not by_q:
        return {"circular": 0.0, "vanilla": 0.0, "questions": 0}
    circular = {q: all(rounds.values()) for q, rounds in by_q.items()}
    vanilla = [rounds[0] for rounds in by_q.values() if 0 in rounds]
    out: dict[str, object] = {
        "circular": 100.0 * sum(circular.values()) / len(circular),
        "vanilla": 100.0 * sum(vanilla) / len(vanilla) if vanilla else 0.0,
        "questions": len(circular),
    }
    if cats:
        per_cat: dict[str, list[bool]] = defaultdict(list)
        for q, ok in circular.items():
            per_cat[cats.get(q, "unknown")].append(ok)
        out["per_category"] = {c: 100.0 * sum(v) / len(v) for c, v in sorted(per_cat.items())}
    return out


def circular_shift(options: Sequence[str], shift: int) -> list[str]:
    """The option order shown in circular pass ``shift``: pass r shows option ``(i + r) % n`` at
    position i (pass 0 is the original order), as LLaVA's ``model_vqa_mmbench.py --all-rounds``."""
    n = len(options)
    return [options[(i + shift) % n] for i in range(n)]
