"""VizWiz-VQA: LLaVA-1.5's test question file or lmms-lab/VizWiz-VQA; lmms-eval's EvalAI soft accuracy where answers
are public, and the submission file of the evaluation server."""

from __future__ import annotations


from ...prompts import SHORT_ANSWER_INSTRUCTION as SHORT_ANSWER
from ...prompts import UNANSWERABLE_INSTRUCTION as UNANSWERABLE
from ..answer_processing import evalai_answer, evalai_vqa_accuracy
from ..sources import (
    BenchmarkDataError,
    read_json,
)
from .base import answers_from
from .soft_vqa import SoftVQABenchmark


class VizWiz(SoftVQABenchmark):
    name = "vizwiz"
    title = "VizWiz"
    instruction = f"{UNANSWERABLE}\n{SHORT_ANSWER}"
    llava_question_file = "llava_test.jsonl"
    llava_image_folder = "test"
    # lmms-eval's vizwiz_vqa_process_results (LLaVA scores VizWiz only on the server)
    accuracy_fn = staticmethod(evalai_vqa_accuracy)
    breakdowns = ("answer_type",)

    def load_llava(self, base, question_file, image_folder, annotation_file):
        gt = {}
        if annotation_file is not None:
            # VizWiz's own annotation format: [{"image", "question", "answers": [{"answer", ...}], ...}]
            for a in read_json(annotation_file, "annotation file"):
                gt[a["image"]] = a
        samples = []
        for obj, where, image in self._llava_jsonl(question_file, image_folder):
            a = gt.get(obj["image"])
            if gt and a is None:
                raise BenchmarkDataError(f"{where}: image {obj['image']!r} (question_id {obj['question_id']!r}) "
                                         f"not in {annotation_file}")
            a = a or {}
            samples.append(self._sample(obj, image, answers=answers_from(a) if a else answers_from(obj),
                                        image_name=obj["image"], answer_type=a.get("answer_type")))
        return samples

    def load_hf(self, base, split):
        # lmms-lab's question_id is the image name without its extension ("VizWiz_test_00000000")
        return [self._sample(row, image, answers=answers_from(row) if row.get("answers") else None,
                             image_name=self._image_name(str(row["question_id"])), answer_type=row.get("category"))
                for row, where, image in self._hf_rows(base, split, required=("question_id", "question"))]

    @staticmethod
    def _image_name(question_id: str) -> str:
        """lmms-eval's submission name ``f"{question_id}.jpg"`` (not doubled if already there)."""
        return question_id if question_id.endswith(".jpg") else f"{question_id}.jpg"

    def submission(self, samples, answers, data):
        """``[{"image", "answer"}]`` as LLaVA's ``scripts/convert_vizwiz_for_submission.py`` writes it: the
        question file's ``image`` (``VizWiz_test_00000000.jpg``; ``<question_id>.jpg`` for lmms-lab, as
        lmms-eval) and the answer through :func:`evalai_answer`."""
        return [{"image": s.meta["image_name"], "answer": evalai_answer(answers[s.question_id])}
                for s in samples if s.question_id in answers]
