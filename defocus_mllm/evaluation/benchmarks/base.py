"""The `Benchmark` base class: where a benchmark's inputs are, how its questions are worded, how its answers are scored.

Two input layouts are read for every benchmark except easy-VQA (which ships with its PyPI package):

* **LLaVA-1.5's evaluation layout** (``playground/data/eval/<benchmark>/`` after following LLaVA's
  ``Evaluation.md``): a question file (``.jsonl`` with ``question_id``, ``image``, ``text`` and for some
  benchmarks ``category``; ScienceQA's is a LLaVA conversation ``.json``; MMBench's a ``.tsv`` with
  base64 images), an image folder, and the annotation files LLaVA's scoring scripts read. The
  question texts of these files already end with LLaVA's instruction; it is not added twice.
* **The lmms-lab Hugging Face datasets layout**: a local copy (``huggingface-cli download
  lmms-lab/<name> --repo-type dataset --local-dir DIR``) of parquet files with embedded images; the
  instruction is appended to the question here, exactly as LLaVA-1.5 (and lmms-eval) word it.

Each benchmark is one module of this package holding its loaders and the rules of the official script it scores
with (the VQA answer normalisation, which several share, is ``evaluation/answer_processing.py``);
``docs/evaluation.md`` has the table (benchmark, script and version, rules) and, per benchmark, the files and the
split names.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Mapping
from pathlib import Path
from statistics import fmean
from typing import Any

from ...prompts import SHORT_ANSWER_INSTRUCTION as SHORT_ANSWER
from ...prompts import with_instruction
from ..sources import (
    BenchmarkDataError,
    ImageRef,
    ParquetImage,
    ParquetImageColumn,
    PathImage,
    Sample,
    check_images_exist,
    make_ids_unique,
    parquet_columns,
    published_splits,
    read_jsonl,
    read_parquet_rows,
    require,
    resolve,
    select_split,
)


def answers_from(obj: Mapping[str, Any]) -> list[str] | None:
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
        carries (:func:`answers_from`), each unless given; ``meta`` as given."""
        if qid is _FROM_RECORD:
            qid = record["question_id"]
        if text is None:
            text = record["text"] if "text" in record else record["question"]
        if answers is _FROM_RECORD:
            answers = answers_from(record)
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


def percent_by(values: list[tuple[Any, float]]) -> dict[str, float]:
    """Mean (in %) of the values of each key, keys sorted; None keys are left out."""
    groups: dict[str, list[float]] = defaultdict(list)
    for key, value in values:
        if key is not None:
            groups[str(key)].append(value)
    return {k: 100.0 * fmean(v) for k, v in sorted(groups.items())}
