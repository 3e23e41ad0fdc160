"""Per-benchmark metrics: answer parsing rules and aggregate scores.

Each function re-implements, rule by rule, the official script its benchmark's numbers are reported
with (LLaVA-1.5's scripts, or the tool LLaVA defers to); the docstrings name the script and the version
read, and ``docs/evaluation.md`` has the table. Where a rule is surprising (ScienceQA not accepting
"A.", GQA not stripping spaces), the docstring says so: changing it would change the numbers.
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
    """LLaVA-1.5's GQA post-processing (``scripts/convert_gqa_for_eval.py``): ``text.rstrip('.').lower()``,
    in that order and nothing else: trailing periods go, spaces are *not* stripped ("yes ." keeps its
    space; LLaVA's generation has already stripped the output, as ours does)."""
    return text.rstrip(".").lower()


def gqa_accuracy(prediction: str, answer: str) -> float:
    """GQA's ``eval.py``: ``predicted == gold``, the processed prediction against the annotation's answer
    as it is (GQA's answers are lower-case already), 1.0 or 0.0."""
    return float(normalize_gqa_answer(prediction) == answer)


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


# ---------------------------------------------------------------------------------------------
# ScienceQA
# ---------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------
# MME
# ---------------------------------------------------------------------------------------------

MME_PERCEPTION = (
    "existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR",
)
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def parse_yes_no_mme(text: str) -> str:
    """MME's rule (``eval_tool/calculation.py``, ``parse_pred_ans`` after ``pred_ans.lower()``): "yes"/"no"
    as is; otherwise "yes", then "no", searched in the first four characters; else "other" (always wrong).
    No stripping and no period removal (lmms-eval's variant does both and maps "y"/"n"; not followed)."""
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
    one image, normally two), ``prediction`` and ``answer`` ("Yes"/"No"), as ``calculation.py`` computes
    them: per subtask ``acc`` = % of questions right ("other" is wrong), ``acc_plus`` = % of images with
    both questions right, ``score = acc + acc_plus`` (max 200); ``perception`` sums the 10 perception
    subtasks (max 2000), ``cognition`` the 4 cognition subtasks (max 800); a subtask absent from the
    records adds nothing. ``calculation.py`` pairs consecutive lines of a subtask's file; LLaVA's and
    lmms-lab's files keep the two questions of an image next to each other, so grouping by image (as
    lmms-eval does) gives the same pairs.
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
