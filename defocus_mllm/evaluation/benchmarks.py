"""Benchmark definitions: where the inputs are, how questions are worded, how answers are scored.

Two input layouts are read for every benchmark except easy-VQA (which ships with its PyPI package):

* **LLaVA-1.5's evaluation layout** (``playground/data/eval/<benchmark>/`` after following LLaVA's
  ``Evaluation.md``): a question file (``.jsonl`` with ``question_id``, ``image``, ``text`` and for some
  benchmarks ``category``; ScienceQA's is a LLaVA conversation ``.json``; MMBench's a ``.tsv`` with
  base64 images), an image folder, and the annotation files LLaVA's scoring scripts read. The
  question texts of these files already end with LLaVA's instruction; it is not added twice.
* **The lmms-lab Hugging Face datasets layout**: a local copy (``huggingface-cli download
  lmms-lab/<name> --repo-type dataset --local-dir DIR``) of parquet files with embedded images; the
  instruction is appended to the question here, exactly as LLaVA-1.5 words it.

``docs/evaluation.md`` lists, per benchmark, the files and the command.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from statistics import fmean
from typing import Any

from ..data.easy_vqa import EASY_VQA_INSTRUCTION, easy_vqa_prompt, easy_vqa_questions
from ..llava import LETTER_ANSWER_INSTRUCTION as LETTER_ANSWER
from ..llava import SHORT_ANSWER_INSTRUCTION as SHORT_ANSWER
from ..llava import UNANSWERABLE_INSTRUCTION as UNANSWERABLE
from ..llava import with_instruction
from .answer_processing import normalize_answer, vqa_accuracy
from .metrics import (
    SQA_OPTIONS,
    circular_shift,
    easy_vqa_scores,
    extract_mmbench_letter,
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
    find_parquet_files,
    is_none,
    make_ids_unique,
    parquet_columns,
    read_json,
    read_jsonl,
    read_parquet_rows,
    read_tsv,
    require,
    resolve,
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
            self.split = split or self._hf_split
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

    def _llava_jsonl(self, question_file: Path, image_folder: Path, required=("question_id", "image", "text")):
        """(record, where, image) for each line of a LLaVA question .jsonl."""
        for lineno, obj in read_jsonl(question_file):
            where = f"{question_file}:{lineno}"
            require(obj, required, where)
            yield obj, where, PathImage(image_folder / str(obj["image"]))

    def _hf_rows(self, base: Path, split: str | None, image_column: str = "image"):
        """(row, where, image ref or None) for each row of the chosen split's parquet files."""
        splits = find_parquet_files(base, split)
        if not splits:
            available = sorted(find_parquet_files(base, None))
            raise BenchmarkDataError(f"{base}: no parquet files for split {split!r}; available splits: {available}")
        if len(splits) > 1:
            raise BenchmarkDataError(
                f"{base} holds several splits {sorted(splits)}; choose one with --split"
            )
        (self._hf_split, files), = splits.items()
        folders = sorted({str(f.parent) for f in files})
        if len(folders) > 1:
            # lmms-lab keeps each configuration (MMBench en/cn, ScienceQA-FULL/-IMG) in its own folder
            raise BenchmarkDataError(
                f"split {self._hf_split!r} has parquet files in several folders {folders}; point --data at one"
            )
        for path in files:
            columns = parquet_columns(path)
            images = ParquetImageColumn(path, image_column) if image_column in columns else None
            for i, row in enumerate(read_parquet_rows(path, skip=(image_column,))):
                yield row, f"{path} (row {i})", (ParquetImage(images, i) if images else None)

    # ------------------------------------------------------------------ scoring

    def score(self, samples: list[Sample], answers: Mapping[Any, str]) -> dict[str, Any]:
        raise NotImplementedError

    def submission(self, samples: list[Sample], answers: Mapping[Any, str], data: str | Path | None) -> Any:
        """The file a benchmark's evaluation server expects, or None."""
        return None

    def headline_values(self, metrics: Mapping[str, Any]) -> dict[str, float | None]:
        return {title or self.title: metrics.get(key) for key, title in self.headline}


# =============================================================================================
# VQA-style soft accuracy: VQAv2, TextVQA, VizWiz
# =============================================================================================


class _SoftVQA(Benchmark):
    def _score_vqa(self, samples, answers) -> dict[str, Any]:
        scored = [s for s in samples if s.answers]
        out: dict[str, Any] = {"num_questions": len(samples), "num_scored": len(scored)}
        if not scored:
            out["note"] = "no ground-truth answers in this split: score submission.json on the official server"
            return out
        per_type: dict[str, list[float]] = defaultdict(list)
        accs = []
        for s in scored:
            # the answer is post-processed before scoring, as LLaVA does before submitting
            acc = vqa_accuracy(normalize_answer(answers[s.question_id]), s.answers)
            accs.append(acc)
            if s.meta.get("answer_type"):
                per_type[s.meta["answer_type"]].append(acc)
        out["accuracy"] = 100.0 * fmean(accs)
        if per_type:
            out["per_answer_type"] = {k: 100.0 * fmean(v) for k, v in sorted(per_type.items())}
        return out

    def score(self, samples, answers):
        return self._score_vqa(samples, answers)


class VQAv2(_SoftVQA):
    name = "vqav2"
    title = "VQAv2"
    llava_question_file = "llava_vqav2_mscoco_test-dev2015.jsonl"
    llava_image_folder = "test2015"
    # the full test2015 question list: LLaVA pads the test-dev submission with empty answers for the
    # test questions not in test-dev, which the server expects
    llava_test_all = "llava_vqav2_mscoco_test2015.jsonl"
    _question_file: Path | None = None

    def load_llava(self, base, question_file, image_folder, annotation_file):
        gt = {}
        if annotation_file is not None:
            ann = read_json(annotation_file, "annotation file")
            for a in ann["annotations"] if isinstance(ann, dict) else ann:
                gt[a["question_id"]] = a
        samples = []
        for obj, where, image in self._llava_jsonl(question_file, image_folder):
            answers, meta = _answers_from(obj), {"image_name": obj["image"]}
            a = gt.get(obj["question_id"])
            if a is not None:
                answers = [x["answer"] for x in a["answers"]]
                meta["answer_type"] = a.get("answer_type")
            elif gt:
                raise BenchmarkDataError(f"{where}: question_id {obj['question_id']!r} not in {annotation_file}")
            samples.append(Sample(obj["question_id"], with_instruction(obj["text"], self.instruction), image, answers, meta))
        self._question_file = question_file
        return samples

    def load_hf(self, base, split):
        samples = []
        for row, where, image in self._hf_rows(base, split):
            require(row, ("question_id", "question"), where)
            answers = _answers_from(row) if row.get("answers") else None
            samples.append(Sample(row["question_id"], with_instruction(row["question"], self.instruction), image,
                                  answers, {"answer_type": row.get("answer_type")}))
        self._question_file = None
        return samples

    def submission(self, samples, answers, data):
        """``[{"question_id", "answer"}]`` with post-processed answers (as LLaVA submits), padded with
        empty answers for the rest of test2015 when LLaVA's full test2015 question file is beside the
        question file."""
        out = {s.question_id: normalize_answer(answers[s.question_id]) for s in samples if s.question_id in answers}
        entries = [{"question_id": qid, "answer": a} for qid, a in out.items()]
        if self._question_file is not None:
            full = Path(self._question_file).parent / self.llava_test_all
            if full.is_file() and Path(self._question_file).name != self.llava_test_all:
                for _, obj in read_jsonl(full):
                    if obj["question_id"] not in out:
                        entries.append({"question_id": obj["question_id"], "answer": ""})
        return entries


class TextVQA(_SoftVQA):
    name = "textvqa"
    title = "TextVQA"
    llava_question_file = "llava_textvqa_val_v051_ocr.jsonl"
    llava_image_folder = "train_images"
    llava_annotation = "TextVQA_0.5.1_val.json"

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
            qid, answers = obj["question_id"], _answers_from(obj)
            if by_key:
                # LLaVA's file stores the image id in `question_id`; match on (image, question) as
                # LLaVA's eval_textvqa.py does, then use TextVQA's real (unique) question id
                key = (Path(str(obj["image"])).stem, self._question_of(obj["text"]))
                a = by_key.get(key) or by_key.get((str(qid), key[1])) or by_id.get(qid)
                if a is None:
                    raise BenchmarkDataError(f"{where}: question {qid!r} ({key[1]!r}) not found in {ann_path}")
                qid, answers = a["question_id"], list(a["answers"])
            samples.append(Sample(qid, with_instruction(obj["text"], self.instruction), image, answers,
                                  {"image_name": obj["image"]}))
        return samples

    def load_hf(self, base, split):
        samples = []
        for row, where, image in self._hf_rows(base, split):
            require(row, ("question_id", "question"), where)
            text = row["question"]
            if row.get("ocr_tokens"):
                # LLaVA-1.5's TextVQA numbers are with the reference OCR tokens in the prompt
                text = f"{text}\nReference OCR token: {', '.join(row['ocr_tokens'])}"
            answers = list(row["answers"]) if row.get("answers") else None
            samples.append(Sample(row["question_id"], with_instruction(text, self.instruction), image, answers))
        return samples


class VizWiz(_SoftVQA):
    name = "vizwiz"
    title = "VizWiz"
    instruction = f"{UNANSWERABLE}\n{SHORT_ANSWER}"
    llava_question_file = "llava_test.jsonl"
    llava_image_folder = "test"

    def load_llava(self, base, question_file, image_folder, annotation_file):
        gt = {}
        if annotation_file is not None:
            # VizWiz's own annotation format: [{"image", "question", "answers": [{"answer", ...}], ...}]
            for a in read_json(annotation_file, "annotation file"):
                gt[a["image"]] = a
        samples = []
        for obj, where, image in self._llava_jsonl(question_file, image_folder):
            answers, meta = _answers_from(obj), {"image_name": obj["image"]}
            if gt:
                a = gt.get(obj["image"])
                if a is None:
                    raise BenchmarkDataError(f"{where}: image {obj['image']!r} (question_id {obj['question_id']!r}) "
                                             f"not in {annotation_file}")
                answers = [x["answer"] for x in a["answers"]]
                meta["answer_type"] = a.get("answer_type")
            samples.append(Sample(obj["question_id"], with_instruction(obj["text"], self.instruction), image, answers, meta))
        return samples

    def load_hf(self, base, split):
        samples = []
        for row, where, image in self._hf_rows(base, split):
            require(row, ("question_id", "question"), where)
            answers = _answers_from(row) if row.get("answers") else None
            samples.append(Sample(row["question_id"], with_instruction(row["question"], self.instruction), image,
                                  answers, {"image_name": row.get("image_name") or str(row["question_id"]),
                                            "answer_type": row.get("category")}))
        return samples

    def submission(self, samples, answers, data):
        """VizWiz's server format: ``[{"image", "answer"}]`` with post-processed answers."""
        return [{"image": s.meta.get("image_name", s.question_id), "answer": normalize_answer(answers[s.question_id])}
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

    def load_llava(self, base, question_file, image_folder, annotation_file):
        ann_path = resolve(base, annotation_file, self.llava_annotation)
        gt = read_json(ann_path, "annotation file") if ann_path is not None and ann_path.is_file() else {}
        if annotation_file is not None and not gt:
            raise BenchmarkDataError(f"annotation file {ann_path} not found or empty")
        samples = []
        for obj, where, image in self._llava_jsonl(question_file, image_folder):
            answers = _answers_from(obj)
            if gt:
                a = gt.get(str(obj["question_id"]))
                if a is None:
                    raise BenchmarkDataError(f"{where}: question_id {obj['question_id']!r} not in {ann_path}")
                answers = [a["answer"]]
            samples.append(Sample(obj["question_id"], with_instruction(obj["text"], self.instruction), image, answers))
        return samples

    def load_hf(self, base, split):
        """lmms-lab/GQA keeps questions (``*_instructions``, with ``imageId``) and images (``*_images``,
        ``id`` + ``image``) in separate parquet files; both must be under ``base``."""
        question_files, image_files = [], []
        for files in find_parquet_files(base, None).values():
            for f in files:
                cols = parquet_columns(f)
                (question_files if "question" in cols else image_files if "image" in cols else []).append(f)
        if split is not None:
            question_files = [f for f in question_files if split in str(f.relative_to(base)) or f.stem.startswith(split)]
        if not question_files:
            raise BenchmarkDataError(f"{base}: no GQA question parquet files (with a 'question' column) for split {split!r}")
        parents = sorted({f.parent for f in question_files})
        if len(parents) > 1:
            raise BenchmarkDataError(f"{base}: several GQA question sets {[str(p) for p in parents]}; choose one with --split")
        self._hf_split = parents[0].name
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
                answers = [row["answer"]] if row.get("answer") is not None else None
                samples.append(Sample(str(row["id"]), with_instruction(row["question"], self.instruction), image, answers))
        return samples

    def score(self, samples, answers):
        scored = [s for s in samples if s.answers]
        out: dict[str, Any] = {"num_questions": len(samples), "num_scored": len(scored)}
        if scored:
            out["accuracy"] = 100.0 * fmean(gqa_accuracy(answers[s.question_id], s.answers[0]) for s in scored)
        return out


# =============================================================================================
# POPE
# =============================================================================================


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
                answers = [str(lab["label"])]
            samples.append(Sample(obj["question_id"], with_instruction(obj["text"], self.instruction), image, answers,
                                  {"category": cat}))
        return samples

    def load_hf(self, base, split):
        samples = []
        for row, where, image in self._hf_rows(base, split):
            require(row, ("question_id", "question", "category"), where)
            answers = [row["answer"]] if row.get("answer") is not None else None
            samples.append(Sample(row["question_id"], with_instruction(row["question"], self.instruction), image,
                                  answers, {"category": row["category"]}))
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
            samples.append(Sample(pid, with_instruction(text, self.instruction), PathImage(image_folder / item["image"]),
                                  [answer], {"num_choices": n_choices}))
        return samples

    def load_hf(self, base, split):
        samples = []
        for row, where, image in self._hf_rows(base, split):
            require(row, ("question", "choices", "answer"), where)
            if image is None:
                raise BenchmarkDataError(f"{where}: no image column (use the ScienceQA-IMG configuration)")
            idx = len(samples) if row.get("id") is None else row["id"]
            choices = list(row["choices"])
            context = f"Context: {row['hint']}\n" if not is_none(row.get("hint")) else ""
            text = f"{context}{row['question']}\n{_format_choices(choices)}"
            samples.append(Sample(idx, with_instruction(text, self.instruction), image,
                                  [SQA_OPTIONS[int(row["answer"])]], {"num_choices": len(choices)}))
        return samples

    def score(self, samples, answers):
        scored = [s for s in samples if s.answers]
        out: dict[str, Any] = {"num_questions": len(samples), "num_scored": len(scored)}
        if scored:
            ok = [extract_sqa_letter(answers[s.question_id], s.meta["num_choices"]) == s.answers[0] for s in scored]
            out["accuracy"] = 100.0 * fmean(ok)
            out["unparsed"] = sum(extract_sqa_letter(answers[s.question_id], s.meta["num_choices"]) is None for s in scored)
        return out


# =============================================================================================
# MME
# =============================================================================================


class MME(Benchmark):
    name = "mme"
    title = "MME"
    llava_question_file = "llava_mme.jsonl"
    llava_image_folder = "MME_Benchmark_release_version"
    headline = (("perception", "MME-P"), ("cognition", "MME-C"))

    @staticmethod
    def _read_gt(root: Path, category: str, image: str) -> dict[str, str]:
        """MME's release keeps, per image, a ``<stem>.txt`` of ``question<TAB>answer`` lines, either in
        ``<category>/questions_answers_YN/`` (categories whose images are in ``<category>/images/``) or
        beside the image."""
        stem = Path(image).stem
        for candidate in (root / category / "questions_answers_YN" / f"{stem}.txt", root / category / f"{stem}.txt"):
            if candidate.is_file():
                gt = {}
                for line in candidate.read_text(encoding="utf-8").splitlines():
                    if line.strip():
                        q, _, a = line.rstrip("\n").partition("\t")
                        gt[q.strip()] = a.strip()
                return gt
        return {}

    def load_llava(self, base, question_file, image_folder, annotation_file):
        gt_root = Path(annotation_file) if annotation_file is not None else image_folder
        samples = []
        for obj, where, image in self._llava_jsonl(question_file, image_folder):
            cat = obj.get("category") or str(obj["image"]).split("/")[0]
            question = obj["text"].replace(SHORT_ANSWER, "").strip()
            answers = _answers_from(obj)
            if answers is None:
                gt = self._read_gt(gt_root, cat, str(obj["image"]))
                if question not in gt:
                    raise BenchmarkDataError(f"{where}: no answer for question {obj['question_id']!r} ({question!r}) "
                                             f"in {gt_root / cat} (questions_answers_YN/)<image>.txt")
                answers = [gt[question]]
            samples.append(Sample(obj["question_id"], with_instruction(obj["text"], self.instruction), image, answers,
                                  {"category": cat, "image_key": f"{cat}/{Path(str(obj['image'])).stem}"}))
        return samples

    def load_hf(self, base, split):
        samples = []
        for row, where, image in self._hf_rows(base, split):
            require(row, ("question_id", "question", "category"), where)
            answers = [row["answer"]] if row.get("answer") is not None else None
            samples.append(Sample(row["question_id"], with_instruction(row["question"], self.instruction), image,
                                  answers, {"category": row["category"],
                                            "image_key": f"{row['category']}/{Path(str(row['question_id'])).stem}"}))
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
    name = "mmbench"
    title = "MMBench"
    instruction = LETTER_ANSWER
    llava_question_file = "mmbench_dev_20230712.tsv"
    llava_image_folder = None  # images are base64 inside the TSV
    headline = (("circular", "MMBench"),)
    letters = ("A", "B", "C", "D")

    def _expand(self, row: Mapping[str, Any], image: ImageRef, where: str) -> list[Sample]:
        """One sample per circular pass (pass r shows the options shifted by r)."""
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
        index = row["index"]
        if isinstance(index, str) and index.strip().lstrip("-").isdigit():
            index = int(index)
        question = str(row["question"])
        if not is_none(row.get("hint")):
            question = f"{row['hint']}\n{question}"
        samples = []
        for r in range(len(options)):
            shown = circular_shift(options, r)
            text = question + "".join(f"\n{self.letters[i]}. {o}" for i, o in enumerate(shown))
            meta: dict[str, Any] = {"index": index, "round": r, "category": row.get("category"),
                                    "options": dict(zip(self.letters, shown))}
            answers = None
            if answer is not None:
                # the correct option sits at position (answer - r) mod n in pass r
                answers = [self.letters[(self.letters.index(answer) - r) % len(options)]]
            samples.append(Sample(f"{index}@{r}", with_instruction(text, self.instruction), image, answers, meta))
        return samples

    def load_llava(self, base, question_file, image_folder, annotation_file):
        samples = []
        for lineno, row in read_tsv(question_file):
            where = f"{question_file}:{lineno}"
            require(row, ("index", "question", "image"), where)
            samples += self._expand(row, BytesImage(row["image"], f"{question_file} (index {row['index']})"), where)
        return samples

    def load_hf(self, base, split):
        samples = []
        for row, where, image in self._hf_rows(base, split):
            require(row, ("index", "question"), where)
            if image is None:
                raise BenchmarkDataError(f"{where} (index={row.get('index')!r}): no image column")
            samples += self._expand(row, image, where)
        return samples

    def apply_limit(self, samples, limit):
        # --limit counts source questions; all circular passes of a kept question are kept
        keep, out = [], []
        for s in samples:
            if s.meta["index"] not in keep:
                if len(keep) == limit:
                    break
                keep.append(s.meta["index"])
            out.append(s)
        return out

    def score(self, samples, answers):
        records = []
        for s in samples:
            if s.answers:
                letter = extract_mmbench_letter(answers[s.question_id], s.meta["options"])
                records.append({"index": s.meta["index"], "round": s.meta["round"], "category": s.meta.get("category"),
                                "correct": letter == s.answers[0]})
        out: dict[str, Any] = {"num_questions": len({s.meta["index"] for s in samples}), "num_passes": len(samples)}
        if records:
            out.update(mmbench_circular_accuracy(records))
        return out


# =============================================================================================
# easy-VQA
# =============================================================================================

class EasyVQA(Benchmark):
    """The easy-VQA test split from the ``easy-vqa`` PyPI package (1,000 images, 9,673 questions)."""

    name = "easy-vqa"
    title = "easy-VQA"
    instruction = EASY_VQA_INSTRUCTION
    max_new_tokens = 16

    def load(self, data=None, *, split=None, question_file=None, image_folder=None, annotation_file=None,
             limit=None, check_images=True):
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
                                  {"image_id": image_id}))
        if limit is not None:
            samples = samples[:limit]
        if check_images:
            check_images_exist(samples)
        return samples

    def score(self, samples, answers):
        scores = [easy_vqa_scores(answers[s.question_id], s.answers[0]) for s in samples]
        out: dict[str, Any] = {"num_questions": len(samples)}
        if scores:
            out["accuracy"] = 100.0 * fmean(x["exact_match"] for x in scores)
            out["vqa_accuracy"] = 100.0 * fmean(x["vqa_accuracy"] for x in scores)
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
