"""GQA: LLaVA-1.5's testdev-balanced question file or lmms-lab/GQA; GQA's ``eval.py`` exact match on LLaVA's
post-processed answers."""

from __future__ import annotations

from collections.abc import Mapping
from statistics import fmean
from typing import Any

from ..sources import (
    BenchmarkDataError,
    ImageRef,
    ParquetImage,
    ParquetImageColumn,
    parquet_columns,
    published_splits,
    read_json,
    read_parquet_rows,
    require,
    resolve,
    select_split,
)
from .base import Benchmark, answers_from, percent_by


def normalize_gqa_answer(text: str) -> str:
    """LLaVA-1.5's GQA post-processing (``scripts/convert_gqa_for_eval.py``): ``text.rstrip('.').lower()``,
    in that order and nothing else: trailing periods go, spaces are *not* stripped ("yes ." keeps its
    space; LLaVA's generation has already stripped the output, as ours does)."""
    return text.rstrip(".").lower()


def gqa_accuracy(prediction: str, answer: str) -> float:
    """GQA's ``eval.py``: ``predicted == gold``, the processed prediction against the annotation's answer
    as it is (GQA's answers are lower-case already), 1.0 or 0.0."""
    return float(normalize_gqa_answer(prediction) == answer)


class GQA(Benchmark):
    name = "gqa"
    title = "GQA"
    llava_question_file = "llava_gqa_testdev_balanced.jsonl"
    llava_image_folder = "data/images"
    llava_annotation = "data/testdev_balanced_questions.json"

    @staticmethod
    def _types(record: Mapping[str, Any]) -> dict[str, Any]:
        types = record.get("types") or {}
        return {"structural": types.get("structural"), "semantic": types.get("semantic"),
                "balanced": record.get("isBalanced", True) is not False}

    def load_llava(self, base, question_file, image_folder, annotation_file):
        ann_path = resolve(base, annotation_file, self.llava_annotation)
        gt = read_json(ann_path, "annotation file") if ann_path is not None and ann_path.is_file() else {}
        if annotation_file is not None and not gt:
            raise BenchmarkDataError(f"annotation file {ann_path} not found or empty")
        samples = []
        for obj, where, image in self._llava_jsonl(question_file, image_folder):
            a = gt.get(str(obj["question_id"]))
            if gt and a is None:
                raise BenchmarkDataError(f"{where}: question_id {obj['question_id']!r} not in {ann_path}")
            samples.append(self._sample(obj, image, answers=[a["answer"]] if a else answers_from(obj),
                                        **self._types(a or {})))
        return samples

    def load_hf(self, base, split):
        """lmms-lab/GQA keeps questions (``<tier>_instructions`` configurations, with ``imageId``) and images
        (``<tier>_images``, ``id`` + ``image``) apart; the images come from the configuration that matches
        the chosen questions (``testdev_balanced_instructions`` -> ``testdev_balanced_images``)."""
        questions, images = {}, {}
        for key, files in published_splits(base).items():
            cols = parquet_columns(files[0])
            (questions if "question" in cols else images if "image" in cols else {})[key] = files
        self._hf_split, question_files = select_split(questions, split, base, "GQA question ")
        config, _, tier_split = self._hf_split.rpartition("/")
        image_key = f"{config.removesuffix('_instructions')}_images/{tier_split}"
        image_files = images.get(image_key) or [f for files in images.values() for f in files]
        if not image_files:
            raise BenchmarkDataError(f"{base}: none of its parquet files has an 'image' column, so GQA's questions have "
                                     f"no images (lmms-lab/GQA keeps them in the <tier>_images configurations)")
        image_index: dict[str, ImageRef] = {}
        for f in image_files:
            column = ParquetImageColumn(f)
            for i, row in enumerate(read_parquet_rows(f)):
                image_index[str(row["id"])] = ParquetImage(column, i)
        samples = []
        for f in question_files:
            for i, row in enumerate(read_parquet_rows(f)):
                where = f"{f} (row {i})"
                require(row, ("id", "imageId", "question"), where)
                image = image_index.get(str(row["imageId"]))
                if image is None:
                    raise BenchmarkDataError(f"{where}: image {row['imageId']!r} for question {row['id']!r} "
                                             f"not found in the image parquet files under {base}")
                samples.append(self._sample(row, image, qid=str(row["id"]),
                                            answers=[row["answer"]] if row.get("answer") is not None else None,
                                            **self._types(row)))
        return samples

    def score(self, samples, answers):
        """GQA's ``eval.py`` on LLaVA's converted predictions: balanced questions only, exact match
        (:func:`gqa_accuracy`); ``binary``/``open`` (structural type ``query`` is open), per structural
        and per semantic type."""
        scored = [s for s in samples if s.answers and s.meta.get("balanced", True)]
        out: dict[str, Any] = {"num_questions": len(samples), "num_scored": len(scored)}
        if not scored:
            return out
        accs = [(s, gqa_accuracy(answers[s.question_id], s.answers[0])) for s in scored]
        out["accuracy"] = 100.0 * fmean(a for _, a in accs)
        typed = [(s, a) for s, a in accs if s.meta.get("structural") is not None]
        for kind, keep in (("binary", lambda t: t != "query"), ("open", lambda t: t == "query")):
            values = [a for s, a in typed if keep(s.meta["structural"])]
            if values:
                out[kind] = 100.0 * fmean(values)
        for key in ("structural", "semantic"):
            per = percent_by([(s.meta.get(key), a) for s, a in accs])
            if per:
                out[f"per_{key}_type"] = per
        return out
