"""Name the file when a weights or data file is truncated or corrupt.

`safetensors` and `pyarrow` report a truncated file without its name ("incomplete metadata, file not fully covered",
"Parquet magic bytes not found in footer"), which in a directory of shards, or a dataset of many parquet files, leaves
the user guessing. `find_corrupt_files` checks the headers of the `.safetensors` files and the footers of the
`.parquet` files under a path (cheap: no tensor or row is read); `naming_corrupt_files` re-raises a failed load as a
`CorruptFileError` that names the first bad file it finds.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Union

PathLike = Union[str, os.PathLike]


class CorruptFileError(ValueError):
    """A truncated or corrupt weights / data file; the message names it."""


def _candidates(path: Path, recursive: bool) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        return []
    found = []
    for pattern in ("*.safetensors", "*.parquet"):
        found += sorted(path.rglob(pattern) if recursive else path.glob(pattern))
    return found


def file_problem(path: PathLike) -> str | None:
    """Why a `.safetensors` or `.parquet` file cannot be read (None when its header / footer reads)."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                handle.keys()
        elif path.suffix == ".parquet":
            import pyarrow.parquet as pq

            pq.read_metadata(path)
    except Exception as err:  # each library raises its own types
        return f"{type(err).__name__}: {err}"
    return None


def find_corrupt_files(path: PathLike, recursive: bool = False) -> list[tuple[Path, str]]:
    """`(file, problem)` for each unreadable `.safetensors` / `.parquet` file at `path` (a file or a directory)."""
    return [(file, problem) for file in _candidates(Path(path), recursive)
            if (problem := file_problem(file)) is not None]


@contextmanager
def naming_corrupt_files(path: PathLike, what: str = "file", recursive: bool = False) -> Iterator[None]:
    """Run a load; if it fails and a file under `path` is corrupt, raise a `CorruptFileError` naming that file."""
    try:
        yield
    except CorruptFileError:
        raise
    except Exception as err:
        bad = find_corrupt_files(path, recursive=recursive) if path is not None and os.path.exists(path) else []
        if not bad:
            raise
        file, problem = bad[0]
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise CorruptFileError(f"{file}: truncated or corrupt {what}{more} ({problem})") from err


__all__ = ["CorruptFileError", "file_problem", "find_corrupt_files", "naming_corrupt_files"]
