"""MME: LLaVA-1.5's question file with the release's answer files, or lmms-lab/MME; MME's ``calculation.py``
(accuracy plus accuracy+ per subtask, perception and cognition sums)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ...prompts import SHORT_ANSWER_INSTRUCTION as SHORT_ANSWER
from ..sources import (
    BenchmarkDataError,
)
from .base import Benchmark, answers_from


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


_MME_SUFFIX = " Please answer yes or no."


def mme_ground_truth(root: Path) -> dict[tuple[str, str, str], str]:
    """MME's answers as LLaVA's ``convert_answer_to_mme.py`` (``get_gt``) reads the release: for each
    category folder, the ``.txt`` files of ``questions_answers_YN/`` (when the folder has ``images/``) or
    of the folder itself; each line ``question<TAB>answer`` (the whole line stripped first). Keys are
    ``(category, txt file name, question)``."""
    gt: dict[tuple[str, str, str], str] = {}
    if not root.is_dir():
        raise BenchmarkDataError(f"MME release folder {root} not found (it holds the answer .txt files)")
    for category_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        qa_dir = category_dir / "questions_answers_YN" if (category_dir / "images").exists() else category_dir
        for txt in sorted(qa_dir.glob("*.txt")):
            for lineno, line in enumerate(txt.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                fields = line.strip().split("\t")
                if len(fields) != 2:
                    raise BenchmarkDataError(f"{txt}:{lineno}: expected 'question<TAB>answer', got {line!r}")
                gt[(category_dir.name, txt.name, fields[0])] = fields[1]
    return gt


class MME(Benchmark):
    name = "mme"
    title = "MME"
    llava_question_file = "llava_mme.jsonl"
    llava_image_folder = "MME_Benchmark_release_version"
    headline = (("perception", "MME-P"), ("cognition", "MME-C"))

    def load_llava(self, base, question_file, image_folder, annotation_file):
        """LLaVA's ``llava_mme.jsonl`` asks each question without MME's " Please answer yes or no." and with
        LLaVA's short-answer instruction; its ground truth is found as ``convert_answer_to_mme.py`` finds it:
        category and answer file from the ``question_id`` (``artwork/images/14777.jpg`` -> ``artwork``,
        ``14777.txt``), the question from the prompt without the instruction, stripped, plus
        " Please answer yes or no." (with two spaces where MME's file has two)."""
        gt_root = Path(annotation_file) if annotation_file is not None else image_folder
        gt = mme_ground_truth(gt_root)
        samples = []
        for obj, where, image in self._llava_jsonl(question_file, image_folder):
            qid = str(obj["question_id"])
            category = qid.split("/")[0]
            txt = qid.split("/")[-1].split(".")[0] + ".txt"
            answers = answers_from(obj)
            if answers is None:
                question = obj["text"]
                if SHORT_ANSWER in question:
                    question = question.replace(SHORT_ANSWER, "").strip()
                if _MME_SUFFIX.strip() not in question:
                    question += _MME_SUFFIX
                    if (category, txt, question) not in gt:
                        question = question.replace(_MME_SUFFIX, " " + _MME_SUFFIX)
                if (category, txt, question) not in gt:
                    raise BenchmarkDataError(f"{where}: no answer for question {qid!r} ({question!r}) in "
                                             f"{gt_root / category} (questions_answers_YN/){txt}")
                answers = [gt[(category, txt, question)]]
            samples.append(self._sample(obj, image, answers=answers, category=category,
                                        image_key=f"{category}/{txt[:-len('.txt')]}"))
        return samples

    def load_hf(self, base, split):
        """lmms-eval's MME prompt (``mme_doc_to_text``, default kwargs): the question stripped, without
        " Please answer yes or no.", then "\\nAnswer the question using a single word or phrase."."""
        samples = []
        for row, where, image in self._hf_rows(base, split, required=("question_id", "question", "category")):
            text = row["question"].strip().replace(_MME_SUFFIX, "") + "\n" + SHORT_ANSWER
            samples.append(self._sample(row, image, text=text, category=row["category"],
                                        image_key=f"{row['category']}/{Path(str(row['question_id'])).stem}"))
        return samples

    def score(self, samples, answers):
        records = [{"category": s.meta["category"], "image": s.meta["image_key"],
                    "prediction": answers[s.question_id], "answer": s.answers[0]} for s in samples if s.answers]
        out: dict[str, Any] = {"num_questions": len(samples)}
        if records:
            out.update(mme_scores(records))
        return out
