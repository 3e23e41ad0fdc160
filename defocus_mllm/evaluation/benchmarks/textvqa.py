"""TextVQA: LLaVA-1.5's val question file (with reference OCR tokens) or lmms-lab/textvqa; LLaVA's
``TextVQAAccuracyEvaluator`` (EvalAI processing of the output and of every answer)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ...prompts import SHORT_ANSWER_INSTRUCTION as SHORT_ANSWER
from ..answer_processing import evalai_vqa_accuracy
from ..sources import (
    BenchmarkDataError,
    read_json,
    resolve,
)
from .base import answers_from
from .soft_vqa import SoftVQABenchmark


class TextVQA(SoftVQABenchmark):
    name = "textvqa"
    title = "TextVQA"
    llava_question_file = "llava_textvqa_val_v051_ocr.jsonl"
    llava_image_folder = "train_images"
    llava_annotation = "TextVQA_0.5.1_val.json"
    # LLaVA's eval_textvqa.py: m4c TextVQAAccuracyEvaluator (EvalAI processing of the output and all answers)
    accuracy_fn = staticmethod(evalai_vqa_accuracy)

    @staticmethod
    def _question_of(text: str) -> str:
        """The bare question of a LLaVA TextVQA prompt (OCR-token and instruction lines dropped)."""
        lines = [l for l in text.split("\n") if l.strip()]
        lines = [l for l in lines if not l.startswith("Reference OCR token:") and l.strip() != SHORT_ANSWER]
        return (lines[0] if lines else "").strip().lower()

    def load_llava(self, base, question_file, image_folder, annotation_file):
        ann_path = resolve(base, annotation_file, self.llava_annotation)
        by_key, by_id = {}, {}
        if ann_path is not None and ann_path.is_file():
            for a in read_json(ann_path, "annotation file")["data"]:
                by_key[(str(a["image_id"]), a["question"].strip().lower())] = a
                by_id[a["question_id"]] = a
        elif annotation_file is not None:
            raise BenchmarkDataError(f"annotation file {ann_path} not found")
        samples = []
        for obj, where, image in self._llava_jsonl(question_file, image_folder):
            a: Mapping[str, Any] = {}
            if by_key:
                # LLaVA's file stores the image id in `question_id`; match on (image, question) as
                # LLaVA's eval_textvqa.py does, then use TextVQA's real (unique) question id
                key = (Path(str(obj["image"])).stem, self._question_of(obj["text"]))
                a = by_key.get(key) or by_key.get((str(obj["question_id"]), key[1])) or by_id.get(obj["question_id"])
                if a is None:
                    raise BenchmarkDataError(f"{where}: question {obj['question_id']!r} ({key[1]!r}) not found in {ann_path}")
            samples.append(self._sample(obj, image, qid=a.get("question_id", obj["question_id"]),
                                        answers=list(a["answers"]) if a else answers_from(obj),
                                        image_name=obj["image"], answer_type=a.get("answer_type"),
                                        question_type=a.get("question_type")))
        return samples

    def load_hf(self, base, split):
        samples = []
        for row, where, image in self._hf_rows(base, split, required=("question_id", "question")):
            text = row["question"]
            if row.get("ocr_tokens"):
                # LLaVA-1.5's TextVQA numbers are with the reference OCR tokens in the prompt
                text = f"{text}\nReference OCR token: {', '.join(row['ocr_tokens'])}"
            samples.append(self._sample(row, image, text=text,
                                        answers=list(row["answers"]) if row.get("answers") else None,
                                        answer_type=row.get("answer_type"), question_type=row.get("question_type")))
        return samples
