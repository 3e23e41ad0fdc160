"""Reading benchmark inputs: question files, image folders and parquet files with embedded images.

Images are never decoded at load time: each :class:`Sample` carries a small image reference that
opens the file (or decodes the bytes) when the generation loop asks for it. Parquet image columns are
read one row group at a time, so a ``--limit 100`` run on VQAv2 touches only the first row groups.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import sys
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from ..images import to_rgb


class BenchmarkDataError(ValueError):
    """A benchmark input is missing or malformed; the message names the file and the question."""


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------


class ImageRef:
    """Lazily loaded image. Subclasses implement :meth:`_open`; :meth:`load` returns an RGB PIL image."""

    def describe(self) -> str:
        raise NotImplementedError

    def _open(self) -> Image.Image:
        raise NotImplementedError

    def load(self) -> Image.Image:
        image = self._open()
        image.load()
        return to_rgb(image, name=self.describe())


@dataclass(frozen=True)
class PathImage(ImageRef):
    path: Path

    def describe(self) -> str:
        return str(self.path)

    def exists(self) -> bool:
        return self.path.is_file()

    def _open(self) -> Image.Image:
        return Image.open(self.path)


@dataclass(frozen=True)
class BytesImage(ImageRef):
    """Encoded image bytes (or a base64 string, as MMBench's TSV files store them)."""

    data: bytes | str
    origin: str = "embedded image"

    def describe(self) -> str:
        return self.origin

    def _open(self) -> Image.Image:
        raw = base64.b64decode(self.data) if isinstance(self.data, str) else self.data
        return Image.open(io.BytesIO(raw))


class ParquetImageColumn:
    """Reads one image column of a parquet file row group by row group, keeping the last one."""

    def __init__(self, path: Path, column: str = "image"):
        import pyarrow.parquet as pq

        self.path = Path(path)
        self.column = column
        self._file = _parquet_call(self.path, pq.ParquetFile, self.path)
        names = list(self._file.schema_arrow.names)
        if column not in names:
            raise BenchmarkDataError(f"{self.path}: no {column!r} column to read images from (columns: "
                                     f"{', '.join(names)})")
        offsets = [0]
        for i in range(self._file.num_row_groups):
            offsets.append(offsets[-1] + self._file.metadata.row_group(i).num_rows)
        self._offsets = offsets
        self._cached: tuple[int, list[Any]] | None = None

    def get(self, row: int) -> Any:
        import bisect

        group = bisect.bisect_right(self._offsets, row) - 1
        if self._cached is None or self._cached[0] != group:
            table = self._file.read_row_group(group, columns=[self.column])
            self._cached = (group, table.column(self.column).to_pylist())
        return self._cached[1][row - self._offsets[group]]


@dataclass(frozen=True)
class ParquetImage(ImageRef):
    column: ParquetImageColumn
    row: int

    def describe(self) -> str:
        return f"{self.column.path} (row {self.row}, column {self.column.column!r})"

    def _open(self) -> Image.Image:
        value = self.column.get(self.row)
        # `datasets` stores images as {"bytes": ..., "path": ...}; bytes may be absent when the path
        # points to a file next to the parquet file.
        if isinstance(value, dict):
            if value.get("bytes"):
                return Image.open(io.BytesIO(value["bytes"]))
            if value.get("path"):
                p = Path(value["path"])
                return Image.open(p if p.is_absolute() else self.column.path.parent / p)
        elif isinstance(value, (bytes, bytearray)):
            return Image.open(io.BytesIO(value))
        raise BenchmarkDataError(f"{self.describe()}: no image data")


# ---------------------------------------------------------------------------------------------
# Samples
# ---------------------------------------------------------------------------------------------


@dataclass
class Sample:
    """One question to ask. ``prompt`` is the user text (question plus the benchmark's instruction);
    ``answers`` is None when the split has no public ground truth; ``meta`` holds what a benchmark's
    metric needs (category, options, ...)."""

    question_id: str | int
    prompt: str
    image: ImageRef
    answers: list[str] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def load_image(self) -> Image.Image:
        try:
            return self.image.load()
        except FileNotFoundError as e:
            raise BenchmarkDataError(
                f"image {self.image.describe()} for question {self.question_id!r} not found"
            ) from e
        except BenchmarkDataError:
            raise
        except Exception as e:  # PIL raises several types for corrupt files
            raise BenchmarkDataError(
                f"cannot read image {self.image.describe()} for question {self.question_id!r}: {e}"
            ) from e


def check_images_exist(samples: list[Sample], max_listed: int = 5) -> None:
    """Fail before any generation if path-based images are missing, naming files and question ids."""
    missing = [s for s in samples if isinstance(s.image, PathImage) and not s.image.exists()]
    if missing:
        listed = "; ".join(f"question {s.question_id!r}: {s.image.describe()}" for s in missing[:max_listed])
        more = f" (and {len(missing) - max_listed} more)" if len(missing) > max_listed else ""
        raise BenchmarkDataError(f"{len(missing)} image(s) not found: {listed}{more}")


def make_ids_unique(samples: list[Sample]) -> list[Sample]:
    """LLaVA's question files reuse one id for several questions in some benchmarks (MME uses the image
    path, TextVQA the image id). Predictions are keyed by question id, so repeated ids get a ``#k``
    suffix (k-th occurrence in file order, from 0): deterministic, hence stable across resumed runs."""
    counts = Counter(s.question_id for s in samples)
    seen: Counter = Counter()
    for s in samples:
        if counts[s.question_id] > 1:
            k = seen[s.question_id]
            seen[s.question_id] += 1
            s.meta.setdefault("source_question_id", s.question_id)
            s.question_id = f"{s.question_id}#{k}"
    return samples


# ---------------------------------------------------------------------------------------------
# Question files
# ---------------------------------------------------------------------------------------------


def nonblank_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line) for each line of a text file that is not blank."""
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                yield lineno, line


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yields (line number, object) for each non-empty line; malformed lines raise with file and line."""
    path = Path(path)
    if not path.is_file():
        raise BenchmarkDataError(f"question file {path} not found")
    for lineno, line in nonblank_lines(path):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise BenchmarkDataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from e
        if not isinstance(obj, dict):
            raise BenchmarkDataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        yield lineno, obj


def read_json(path: str | Path, what: str = "file") -> Any:
    path = Path(path)
    if not path.is_file():
        raise BenchmarkDataError(f"{what} {path} not found")
    try:
        with path.open(encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise BenchmarkDataError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from e


def require(obj: dict[str, Any], keys: tuple[str, ...], where: str) -> None:
    """Raise naming the file/line and the question id when a record lacks a required key."""
    missing = [k for k in keys if k not in obj or obj[k] is None]
    if missing:
        qid = obj.get("question_id", obj.get("id", obj.get("index")))
        who = f" (question_id={qid!r})" if qid is not None else ""
        raise BenchmarkDataError(f"{where}{who}: missing key(s) {', '.join(map(repr, missing))}")


def read_tsv(path: str | Path) -> Iterator[tuple[int, dict[str, str]]]:
    """Rows of a tab-separated file with a header (MMBench). Yields (line number, row)."""
    path = Path(path)
    if not path.is_file():
        raise BenchmarkDataError(f"question file {path} not found")
    csv.field_size_limit(sys.maxsize)  # base64 images are far longer than csv's default limit
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        for row in reader:
            yield reader.line_num, row


# ---------------------------------------------------------------------------------------------
# Parquet (the lmms-lab Hugging Face datasets layout)
# ---------------------------------------------------------------------------------------------


def published_splits(base: Path) -> dict[str, list[Path]]:
    """The parquet files under ``base`` by the name their dataset publishes them under: ``<split>``
    for the default configuration (files at the top or in ``data/``, e.g. VQAv2's ``validation``) and
    ``<config>/<split>`` for a named one (GQA's ``testdev_balanced_instructions/testdev``, ScienceQA's
    ``ScienceQA-IMG/test``, MMBench's ``en/dev``). The split is the Hub's file-name prefix
    (``<split>-00000-of-00001.parquet``); the configuration is the folder."""
    files = sorted(base.rglob("*.parquet")) if base.is_dir() else [base]
    out: dict[str, list[Path]] = {}
    for f in files:
        split = f.stem.split("-")[0] if "-of-" in f.stem else f.stem
        config = f.parent.relative_to(base).as_posix() if base.is_dir() else ""
        config = "" if config in (".", "data") else config.removesuffix("/data")
        out.setdefault(f"{config}/{split}" if config else split, []).append(f)
    return out


def select_split(found: Mapping[str, list[Path]], split: str | None, base: Path,
                 what: str = "") -> tuple[str, list[Path]]:
    """The one published split ``split`` names: a full name (``en/dev``), a configuration
    (``testdev_balanced_instructions``) or a split (``validation``). Without ``split`` the folder must
    hold a single one. The errors list the splits found."""
    names = sorted(found)
    if not names:
        raise BenchmarkDataError(f"{base}: no {what}parquet files")
    if split is None:
        if len(names) > 1:
            raise BenchmarkDataError(f"{base} holds several {what}splits {names}; choose one with --split")
        return names[0], found[names[0]]
    wanted = split.strip("/")
    matches = [n for n in names if wanted in (n, n.rpartition("/")[0], n.rpartition("/")[2])]
    if not matches:
        raise BenchmarkDataError(f"{base}: no {what}split {split!r}; available splits: {names}")
    if len(matches) > 1:
        raise BenchmarkDataError(f"{base}: --split {split!r} matches several {what}splits {matches}; name one of them")
    return matches[0], found[matches[0]]


def _parquet_call(path: Path, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` with pyarrow's errors on a corrupt or truncated file (which do not name
    it) raised as :class:`BenchmarkDataError` naming ``path``."""
    try:
        return fn(*args, **kwargs)
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError, ArrowIOError an OSError
        if isinstance(err, (BenchmarkDataError, FileNotFoundError)):
            raise
        raise BenchmarkDataError(f"cannot read parquet file {path}: {type(err).__name__}: {err}") from err


def parquet_columns(path: Path) -> list[str]:
    import pyarrow.parquet as pq

    return list(_parquet_call(path, pq.ParquetFile, path).schema_arrow.names)


def read_parquet_rows(path: Path, skip: tuple[str, ...] = ("image",)) -> list[dict[str, Any]]:
    """All rows of a parquet file as dicts, without the (large) image columns."""
    import pyarrow.parquet as pq

    names = [c for c in parquet_columns(path) if c not in skip]
    return _parquet_call(path, lambda: pq.read_table(path, columns=names).to_pylist())


def is_none(value: Any) -> bool:
    """Empty option/hint cells: None, NaN, or the strings "nan"/"none" (as in MMBench's TSV files)."""
    if value is None:
        return True
    if isinstance(value, float) and value != value:
        return True
    return isinstance(value, str) and value.strip().lower() in ("nan", "none", "")


def resolve(base: Path, path: str | os.PathLike | None, default: str | None) -> Path | None:
    """An explicit path (absolute, or relative to the working directory) or ``base / default``."""
    if path is not None:
        return Path(path)
    if default is None:
        return None
    return base / default
