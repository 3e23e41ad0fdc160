"""VQAv2: LLaVA-1.5's test-dev question file or lmms-lab/VQAv2; the VQA server's soft accuracy on EvalAI-processed
outputs, and the submission file the server expects."""

from __future__ import annotations

from pathlib import Path

from ..answer_processing import evalai_answer, vqa_accuracy
from ..sources import (
    BenchmarkDataError,
    read_json,
    read_jsonl,
)
from .base import answers_from
from .soft_vqa import SoftVQABenchmark


def _vqav2_accuracy(prediction: str, answers: list[str]) -> float:
    # LLaVA submits evalai_answer(output); the VQA server scores it with the VQA tool's rules
    return vqa_accuracy(evalai_answer(prediction), answers)


class VQAv2(SoftVQABenchmark):
    name = "vqav2"
    title = "VQAv2"
    llava_question_file = "llava_vqav2_mscoco_test-dev2015.jsonl"
    llava_image_folder = "test2015"
    # the full test2015 question list: LLaVA pads the test-dev submission with empty answers for the
    # test questions not in test-dev, which the server expects
    llava_test_all = "llava_vqav2_mscoco_test2015.jsonl"
    accuracy_fn = staticmethod(_vqav2_accuracy)
    _question_file: Path | None = None

    def load_llava(self, base, question_file, image_folder, annotation_file):
        gt = {}
        if annotation_file is not None:
            ann = read_json(annotation_file, "annotation file")
            for a in ann["annotations"] if isinstance(ann, dict) else ann:
                gt[a["question_id"]] = a
        samples = []
        for obj, where, image in self._llava_jsonl(question_file, image_folder):
            a = gt.get(obj["question_id"])
            if gt and a is None:
                raise BenchmarkDataError(f"{where}: question_id {obj['question_id']!r} not in {annotation_file}")
            a = a or {}
            samples.append(self._sample(obj, image, answers=answers_from(a) if a else answers_from(obj),
                                        image_name=obj["image"], answer_type=a.get("answer_type"),
                                        question_type=a.get("question_type")))
        self._question_file = question_file
        return samples

    def load_hf(self, base, split):
        samples = [self._sample(row, image, answers=answers_from(row) if row.get("answers") else None,
                                answer_type=row.get("answer_type"), question_type=row.get("question_type"))
                   for row, where, image in self._hf_rows(base, split, required=("question_id", "question"))]
        self._question_file = None
        return samples

    def submission(self, samples, answers, data):
        """``[{"question_id", "answer"}]`` as LLaVA's ``scripts/convert_vqav2_for_submission.py`` writes it:
        every answer through :func:`evalai_answer`; when LLaVA's full test2015 question file is beside the
        question file, one entry per test2015 question in that file's order, ``""`` for those not asked."""
        out = {s.question_id: evalai_answer(answers[s.question_id]) for s in samples if s.question_id in answers}
        if self._question_file is not None:
            full = Path(self._question_file).parent / self.llava_test_all
            if full.is_file() and Path(self._question_file).name != self.llava_test_all:
                return [{"question_id": obj["question_id"], "answer": out.get(obj["question_id"], "")}
                        for _, obj in read_jsonl(full)]
        return [{"question_id": qid, "answer": a} for qid, a in out.items()]
