"""Benchmark definitions: where the inputs are, how questions are worded, how answers are scored.

Two input layouts are read for every benchmark except easy-VQA (which ships with its PyPI package):

* **LLaVA-1.5's evaluation layout** (``playground/data/eval/<benchmark>/`` after following LLaVA's
  ``Evaluation.md``): a question file (``.jsonl`` with ``question_id``, ``image``, ``text`` and for some
  benchmarks ``category``; ScienceQA's is a LLaVA conversation ``.json``; MMBench's a ``.tsv`` with
  base64 images), an image folder, and the annotation files LLaVA's scoring scripts read. The
  question texts of these files already end with LLaVA's instruction; it is not added twice.
* **The lmms-lab Hugging Face datasets layout**: a local copy (``huggingface-cli download
  lmms-lab/<name> --repo-type dataset --local-dir DIR``) of parquet files with embedded images; the
  instruction is appended to the question here, exactly as LLaVA-1.5 (and lmms-eval) word it.

Each benchmark scores with the rules of one official script, re-implemented in ``metrics.py`` and
``answer_processing.py``; ``docs/evaluation.md`` has the table (benchmark, script and version, rules)
and, per benchmark, the files and the split names.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from statistics import fmean
from typing import Any

from ..data.easy_vqa import (
    EASY_VQA_INSTRUCTION,
    EASY_VQA_KINDS,
    easy_vqa_prompt,
    easy_vqa_question_kind,
    easy_vqa_questions,
)
from ..llava import LETTER_ANSWER_INSTRUCTION as LETTER_ANSWER
from ..llava import SHORT_ANSWER_INSTRUCTION as SHORT_ANSWER
from ..llava import UNANSWERABLE_INSTRUCTION as UNANSWERABLE
from ..llava import with_instruction
from .answer_processing import evalai_answer, evalai_vqa_accuracy, vqa_accuracy
from .metrics import (
    CIRCULAR_OFFSET,
    SQA_OPTIONS,
    can_infer,
    circular_shift,
    easy_vqa_scores,
    extract_sqa_letter,
    gqa_accuracy,
    mmbench_circular_accuracy,
    mme_scores,
    pope_metrics,
)
from .sources import (
    BenchmarkDataError,
    BytesImage,
    ImageRef,
    ParquetImage,
    ParquetImageColumn,
    PathImage,
    Sample,
    check_images_exist,
    is_none,
    make_ids_unique,
    parquet_columns,
    published_splits,
    read_json,
    read_jsonl,
    read_parquet_rows,
    read_tsv,
    require,
    resolve,
    select_split,
)


def _answers_from(obj: Mapping[str, Any]) -> list[str] | None:
    """Ground truth carried inline by a question record: ``answers`` (strings or VQA-style dicts),
    ``answer`` or ``label``."""
    if obj.get("answers") is not None:
        return [a["answer"] if isinstance(a, Mapping) else str(a) for a in obj["answers"]]
    for key in ("answer", "label"):
        if obj.get(key) is not None:
            return [str(obj[key])]
    return None


_FROM_RECORD: Any = object()  # `_sample` default: take the value from the record


def check_count(name: str, value: Any, optional: bool = False) -> None:
    """``limit``, ``batch_size``, ``max_new_tokens``: a whole number of at least 1 (``None`` too when ``optional``).
    Python's slicing would read a negative ``limit`` as "all but the last", so it is refused rather than used."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be a whole number of at least 1")


# ---------------------------------------------------------------------------------------------
# Base class
# ---------------------------------------------------------------------------------------------


class Benchmark:
    """Base class. Subclasses set the class attributes and implement the loaders and :meth:`score`."""

    name: str = ""
    title: str = ""  # column title in results tables
    instruction: str = SHORT_ANSWER
    max_new_tokens: int = 128
    # LLaVA-1.5 layout defaults, relative to --data
    llava_question_file: str | None = None
    llava_image_folder: str | None = None
    llava_annotation: str | None = None
    # (metric key, column title) shown in results tables
    headline: tuple[tuple[str, str], ...] = (("accuracy", ""),)
    # set by load(): the split that was read (lmms-lab split name, or the LLaVA question file's stem)
    split: str | None = None
    _hf_split: str | None = None
    # added to the error for a parquet file without an image column
    _missing_image_hint: str = ""

    # ------------------------------------------------------------------ loading

    def load(
        self,
        data: str | Path | None = None,
        *,
        split: str | None = None,
        question_file: str | Path | None = None,
        image_folder: str | Path | None = None,
        annotation_file: str | Path | None = None,
        limit: int | None = None,
        check_images: bool = True,
    ) -> list[Sample]:
        """Read the benchmark's questions (images stay on disk until asked for)."""
        check_count("limit", limit, optional=True)
        if data is None and question_file is None:
            raise BenchmarkDataError(
                f"benchmark {self.name!r} needs --data (a LLaVA-1.5 eval folder or a local lmms-lab dataset "
                f"folder); see docs/evaluation.md"
            )
        base = Path(data) if data is not None else Path(question_file).parent
        if data is not None and not base.exists():
            raise BenchmarkDataError(f"data path {base} does not exist")
        layout = self._layout(base, question_file)
        if layout == "hf":
            samples = self.load_hf(base, split)
            self.split = self._hf_split
        else:
            if base.is_file() and question_file is None:
                question_file, base = base, base.parent
            qfile = resolve(base, question_file, self.llava_question_file)
            folder = resolve(base, image_folder, self.llava_image_folder) if self.llava_image_folder else base
            samples = self.load_llava(base, qfile, folder, annotation_file)
            self.split = split or Path(qfile).stem
        samples = make_ids_unique(samples)
        if limit is not None:
            samples = self.apply_limit(samples, limit)
        if check_images:
            check_images_exist(samples)
        return samples

    def _layout(self, base: Path, question_file: str | Path | None) -> str:
        if question_file is not None:
            return "llava"
        if base.is_file():
            return "hf" if base.suffix == ".parquet" else "llava"
        if self.llava_question_file and (base / self.llava_question_file).is_file():
            return "llava"
        if any(base.rglob("*.parquet")):
            return "hf"
        expected = f"the LLaVA question file {base / self.llava_question_file}" if self.llava_question_file else ""
        raise BenchmarkDataError(
            f"{base}: found neither {expected or 'a LLaVA question file'} nor .parquet files (lmms-lab layout) "
            f"for benchmark {self.name!r}; pass --question-file to name the question file"
        )

    def apply_limit(self, samples: list[Sample], limit: int) -> list[Sample]:
        return samples[:limit]

    def load_llava(self, base: Path, question_file: Path, image_folder: Path, annotation_file) -> list[Sample]:
        raise NotImplementedError

    def load_hf(self, base: Path, split: str | None) -> list[Sample]:
        raise NotImplementedError

    # helpers shared by the loaders -------------------------------------------------------

    def _sample(self, record: Mapping[str, Any], image: ImageRef, *, qid: Any = _FROM_RECORD,
                text: str | None = None, answers: Any = _FROM_RECORD, **meta: Any) -> Sample:
        """The :class:`Sample` of one question record: its ``question_id``, its text (``text`` in LLaVA's
        files, ``question`` in lmms-lab's) followed by the benchmark's instruction, and the ground truth it
        carries (:func:`_answers_from`), each unless given; ``meta`` as given."""
        if qid is _FROM_RECORD:
            qid = record["question_id"]
        if text is None:
            text = record["text"] if "text" in record else record["question"]
        if answers is _FROM_RECORD:
            answers = _answers_from(record)
        return Sample(qid, with_instruction(text, self.instruction), image, answers, meta)

    def _llava_jsonl(self, question_file: Path, image_folder: Path,
                     required=("question_id", "image", "text")) -> Iterator[tuple[dict, str, ImageRef]]:
        """(record, where, image) for each line of a LLaVA question .jsonl."""
        for lineno, obj in read_jsonl(question_file):
            where = f"{question_file}:{lineno}"
            require(obj, required, where)
            yield obj, where, PathImage(image_folder / str(obj["image"]))

    def _hf_rows(self, base: Path, split: str | None, image_column: str = "image",
                 required: tuple[str, ...] = ()) -> Iterator[tuple[dict, str, ImageRef]]:
        """(row, where, image ref) for each row of the chosen split's parquet files; a file without the image
        column is an error naming it."""
        self._hf_split, files = select_split(published_splits(base), split, base)
        for path in files:
            columns = parquet_columns(path)
            if image_column not in columns:
                # every benchmark here asks about an image: a question without one cannot be put to the model
                raise BenchmarkDataError(f"{path}: no {image_column!r} column, so its questions have no images "
                                         f"(columns: {', '.join(columns)}){self._missing_image_hint}")
            images = ParquetImageColumn(path, image_column)
            for i, row in enumerate(read_parquet_rows(path, skip=(image_column,))):
                where = f"{path} (row {i})"
                require(row, required, where)
                yield row, where, ParquetImage(images, i)

    # ------------------------------------------------------------------ scoring

    def score(self, samples: list[Sample], answers: Mapping[Any, str]) -> dict[str, Any]:
        raise NotImplementedError

    def submission(self, samples: list[Sample], answers: Mapping[Any, str], data: str | Path | None) -> Any:
        """The file a benchmark's evaluation server expects, or None."""
        return None

    def headline_values(self, metrics: Mapping[str, Any]) -> dict[str, float | None]:
        return {title or self.title: metrics.get(key) for key, title in self.headline}


def _percent_by(values: list[tuple[Any, float]]) -> dict[str, float]:
    """Mean (in %) of the values of each key, keys sorted; None keys are left out."""
    groups: dict[str, list[float]] = defaultdict(list)
    for key, value in values:
        if key is not None:
            groups[str(key)].append(value)
    return {k: 100.0 * fmean(v) for k, v in sorted(groups.items())}


# =============================================================================================
# VQA-style soft accuracy: VQAv2, TextVQA, VizWiz
# =============================================================================================


class _SoftVQA(Benchmark):
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
            per = _percent_by([(s.meta.get(key), a) for s, a in accs])
            if per:
                out[f"per_{key}"] = per
        return out


def _vqav2_accuracy(prediction: str, answers: list[str]) -> float:
    # LLaVA submits evalai_answer(output); the VQA server scores it with the VQA tool's rules
    return vqa_accuracy(evalai_answer(prediction), answers)


class VQAv2(_SoftVQA):
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
            samples.append(self._sample(obj, image, answers=_answers_from(a) if a else _answers_from(obj),
                                        image_name=obj["image"], answer_type=a.get("answer_type"),
                                        question_type=a.get("question_type")))
        self._question_file = question_file
        return samples

    def load_hf(self, base, split):
        samples = [self._sample(row, image, answers=_answers_from(row) if row.get("answers") else None,
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


class TextVQA(_SoftVQA):
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
                                        answers=list(a["answers"]) if a else _answers_from(obj),
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


class VizWiz(_SoftVQA):
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
            samples.append(self._sample(obj, image, answers=_answers_from(a) if a else _answers_from(obj),
                                        image_name=obj["image"], answer_type=a.get("answer_type")))
        return samples

    def load_hf(self, base, split):
        # lmms-lab's question_id is the image name without its extension ("VizWiz_test_00000000")
        return [self._sample(row, image, answers=_answers_from(row) if row.get("answers") else None,
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


# =============================================================================================
# GQA
# =============================================================================================


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
            samples.append(self._sample(obj, image, answers=[a["answer"]] if a else _answers_from(obj),
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
            per = _percent_by([(s.meta.get(key), a) for s, a in accs])
            if per:
                out[f"per_{key}_type"] = per
        return out


# =============================================================================================
# POPE
# =============================================================================================


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
            answers = _answers_from(obj)
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


# =============================================================================================
# ScienceQA-IMG
# =============================================================================================


def _format_choices(choices: list[str]) -> str:
    return "\n".join(f"{SQA_OPTIONS[i]}. {c}" for i, c in enumerate(choices))


class ScienceQA(Benchmark):
    name = "scienceqa"
    title = "SQA-IMG"
    instruction = LETTER_ANSWER
    llava_question_file = "llava_test_CQM-A.json"
    llava_image_folder = "images/test"
    llava_annotation = "problems.json"
    _missing_image_hint = " (use the ScienceQA-IMG configuration)"
    _the_answer_is = re.compile(r"The answer is ([A-E])")

    def load_llava(self, base, question_file, image_folder, annotation_file):
        items = read_json(question_file, "question file")
        if not isinstance(items, list):
            raise BenchmarkDataError(f"{question_file}: expected a JSON list of LLaVA conversations")
        ann_path = resolve(base, annotation_file, self.llava_annotation)
        problems = read_json(ann_path, "annotation file") if ann_path is not None and ann_path.is_file() else {}
        samples = []
        for i, item in enumerate(items):
            where = f"{question_file} (item {i})"
            require(item, ("id", "conversations"), where)
            if "image" not in item:
                continue  # ScienceQA-IMG: only the questions with an image
            convs = item["conversations"]
            if not convs or "value" not in convs[0]:
                raise BenchmarkDataError(f"{where} (id={item['id']!r}): no human turn in 'conversations'")
            text = convs[0]["value"].replace("<image>", "").strip()
            pid = str(item["id"])
            if problems:
                if pid not in problems:
                    raise BenchmarkDataError(f"{where}: problem id {pid!r} not in {ann_path}")
                p = problems[pid]
                answer, n_choices = SQA_OPTIONS[p["answer"]], len(p["choices"])
            else:
                # without problems.json, read the reference from the gpt turn ("B" or "The answer is B.")
                ref = convs[1]["value"].strip() if len(convs) > 1 else ""
                m = self._the_answer_is.search(ref)
                answer = ref if ref in SQA_OPTIONS else (m.group(1) if m else None)
                if answer is None:
                    raise BenchmarkDataError(f"{where} (id={pid!r}): no answer letter in the gpt turn and no {ann_path}")
                n_choices = len(re.findall(r"(?m)^[A-E]\. ", text)) or len(SQA_OPTIONS)
            samples.append(self._sample(item, PathImage(image_folder / item["image"]), qid=pid, text=text,
                                        answers=[answer], num_choices=n_choices))
        return samples

    def load_hf(self, base, split):
        samples = []
        for row, where, image in self._hf_rows(base, split, required=("question", "choices", "answer")):
            choices = list(row["choices"])
            context = f"Context: {row['hint']}\n" if not is_none(row.get("hint")) else ""
            samples.append(self._sample(row, image, qid=len(samples) if row.get("id") is None else row["id"],
                                        text=f"{context}{row['question']}\n{_format_choices(choices)}",
                                        answers=[SQA_OPTIONS[int(row["answer"])]], num_choices=len(choices)))
        return samples

    def score(self, samples, answers):
        """``eval_science_qa.py``: the extracted letter (:func:`extract_sqa_letter`) must be the answer's."""
        scored = [s for s in samples if s.answers]
        out: dict[str, Any] = {"num_questions": len(samples), "num_scored": len(scored)}
        if scored:
            letters = [extract_sqa_letter(answers[s.question_id], s.meta["num_choices"]) for s in scored]
            out["accuracy"] = 100.0 * fmean(letter == s.answers[0] for letter, s in zip(letters, scored))
            out["unparsed"] = sum(letter is None for letter in letters)
        return out


# =============================================================================================
# MME
# =============================================================================================

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
            answers = _answers_from(obj)
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


# =============================================================================================
# MMBench (circular evaluation)
# =============================================================================================


class MMBench(Benchmark):
    """MMBench's official files (the dev TSV LLaVA uses, lmms-lab's ``dev`` split) already hold the
    circular copies of each question, at ``index + k * 1,000,000`` with the options rotated: every row
    is asked once, as it is. Only a file without such copies is rotated here (copy ``r`` shows option
    ``(i + r) mod n`` at position ``i``, as LLaVA's ``--all-rounds``, with index ``index + r * 1,000,000``).
    Scoring is VLMEvalKit's (v0.2) exact-matching circular evaluation."""

    name = "mmbench"
    title = "MMBench"
    instruction = LETTER_ANSWER
    llava_question_file = "mmbench_dev_20230712.tsv"
    llava_image_folder = None  # images are base64 inside the TSV
    headline = (("circular", "MMBench"),)
    letters = ("A", "B", "C", "D")

    def _question(self, row: Mapping[str, Any], where: str) -> tuple[int, str, list[str], str | None]:
        """(index, question text with hint, options shown, answer letter or None) of one row."""
        options = []
        for letter in self.letters:
            if is_none(row.get(letter)):
                break
            options.append(str(row[letter]))
        if len(options) < 2:
            raise BenchmarkDataError(f"{where} (index={row.get('index')!r}): fewer than two options")
        answer = None if is_none(row.get("answer")) else str(row["answer"]).strip()
        if answer is not None and answer not in self.letters[: len(options)]:
            raise BenchmarkDataError(f"{where} (index={row.get('index')!r}): answer {answer!r} is not an option letter")
        try:
            index = int(row["index"])
        except (TypeError, ValueError) as e:
            raise BenchmarkDataError(f"{where}: index {row.get('index')!r} is not an integer") from e
        question = str(row["question"])
        if not is_none(row.get("hint")):
            question = f"{row['hint']}\n{question}"
        return index, question, options, answer

    def _samples(self, rows: list[tuple[Mapping[str, Any], ImageRef, str]]) -> list[Sample]:
        parsed = [(self._question(row, where), row, image) for row, image, where in rows]
        has_copies = any(index >= CIRCULAR_OFFSET for (index, *_), _, _ in parsed)
        samples = []
        for (index, question, options, answer), row, image in parsed:
            meta = {"category": row.get("category"), "l2_category": row.get("l2-category", row.get("L2-category"))}
            for r in range(1 if has_copies else len(options)):
                shown = circular_shift(options, r)
                # the correct option sits at position (answer - r) mod n in copy r
                letter = None if answer is None else self.letters[(self.letters.index(answer) - r) % len(options)]
                text = question + "".join(f"\n{self.letters[i]}. {o}" for i, o in enumerate(shown))
                copy = index + r * CIRCULAR_OFFSET
                samples.append(self._sample(row, image, qid=copy, text=text,
                                            answers=None if letter is None else [letter],
                                            index=copy, options=dict(zip(self.letters, shown)), **meta))
        return samples

    def load_llava(self, base, question_file, image_folder, annotation_file):
        rows = []
        for lineno, row in read_tsv(question_file):
            where = f"{question_file}:{lineno}"
            require(row, ("index", "question", "image"), where)
            rows.append((row, BytesImage(row["image"], f"{question_file} (index {row['index']})"), where))
        return self._samples(rows)

    def load_hf(self, base, split):
        rows = []
        for row, where, image in self._hf_rows(base, split, required=("index", "question")):
            rows.append((row, image, where))
        return self._samples(rows)

    def apply_limit(self, samples, limit):
        # --limit counts questions (groups), each kept with all its copies wherever they are in the file
        keep: dict[int, None] = {}
        for s in samples:
            group = s.meta["index"] % CIRCULAR_OFFSET
            if group not in keep and len(keep) < limit:
                keep[group] = None
        return [s for s in samples if s.meta["index"] % CIRCULAR_OFFSET in keep]

    def score(self, samples, answers):
        records = [{"index": s.meta["index"], "category": s.meta.get("category"),
                    "l2_category": s.meta.get("l2_category"),
                    "correct": can_infer(answers[s.question_id], s.meta["options"]) == s.answers[0]}
                   for s in samples if s.answers]
        out: dict[str, Any] = {"num_questions": len({s.meta["index"] % CIRCULAR_OFFSET for s in samples}),
                               "num_rows": len(samples)}
        if records:
            out.update(mmbench_circular_accuracy(records))
        return out


# =============================================================================================
# easy-VQA
# =============================================================================================

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
            per = _percent_by([(s.meta["kind"], x["exact_match"]) for s, x in scores])
            out["per_kind"] = {k: per[k] for k in EASY_VQA_KINDS if k in per}
            out["vqa_accuracy"] = 100.0 * fmean(x["vqa_accuracy"] for _, x in scores)
        return out


BENCHMARKS: dict[str, type[Benchmark]] = {
    cls.name: cls for cls in (VQAv2, GQA, TextVQA, VizWiz, POPE, ScienceQA, MME, MMBench, EasyVQA)
}


def get_benchmark(name: str) -> Benchmark:
    """A fresh benchmark object by name (``vqav2``, ``gqa``, ``textvqa``, ``vizwiz``, ``pope``,
    ``scienceqa``, ``mme``, ``mmbench``, ``easy-vqa``)."""
    key = name.lower().replace("_", "-")
    key = {"easyvqa": "easy-vqa", "sqa": "scienceqa", "science-qa": "scienceqa"}.get(key, key)
    if key not in BENCHMARKS:
        raise KeyError(f"unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}")
    return BENCHMARKS[key]()
