"""Sources of multimodal conversations, read into one form: `Conversation(id, images, messages, origin)`.

* LLaVA JSON (`.json` list or `.jsonl`): `{"id", "image": "rel/path.jpg" (or a list), "conversations":
  [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": "..."}, ...]}`; text-only samples have no
  `image`. Paths are relative to an image folder; absolute paths and paths that climb out of it (`..`) are refused
  unless `allow_images_outside_folder=True`.
* Hugging Face datasets with `messages` (`[{"role", "content"}]`, content a string or a list of `{"type": "image"}`
  / `{"type": "text", "text"}` parts) and `images` (a list of images) columns, from a local directory.

(easy-VQA, the offline data set, is read into the same form by `data.easy_vqa`.) Messages always come out with string contents in which each image is a literal `<image>` marker, the form every
chat template can render.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from ..prompts import IMAGE_TOKEN

ROLE_NAMES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class BadSampleError(ValueError):
    """A training sample that cannot be used; the message names the file and the sample."""


@dataclass
class Conversation:
    """One training sample. `images` are file paths or PIL images, one per `<image>` marker in `messages`."""

    id: str
    images: list[Any]
    messages: list[dict[str, str]]
    origin: str = ""  # "file:line" or "dataset[index]", for error messages
    meta: dict[str, Any] = field(default_factory=dict)

    def where(self) -> str:
        return f"{self.origin} (sample {self.id!r})" if self.origin else f"sample {self.id!r}"


def check_conversation(conv: Conversation) -> None:
    """Raise `BadSampleError` if the sample could not be read (see `load_llava_json(skip_bad_samples=True)`), has no
    assistant turn, or its `<image>` markers and images disagree."""
    if conv.meta.get("error"):
        raise BadSampleError(conv.meta["error"])
    if not any(m["role"] == "assistant" and m["content"].strip() for m in conv.messages):
        raise BadSampleError(f"{conv.where()}: the conversation has no assistant turn to learn from")
    markers = sum(m["content"].count(IMAGE_TOKEN) for m in conv.messages)
    if markers != len(conv.images):
        raise BadSampleError(f"{conv.where()}: {markers} {IMAGE_TOKEN} marker(s) in the text but "
                             f"{len(conv.images)} image(s)")


def _text_of(content: Any, where: str) -> str:
    """String content with `<image>` markers from a string or a list of typed parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        images = sum(1 for part in content if isinstance(part, dict) and part.get("type") == "image")
        texts = [part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text"]
        return (IMAGE_TOKEN + "\n") * images + "\n".join(texts)
    raise BadSampleError(f"{where}: message content must be a string or a list of parts, got {type(content).__name__}")


def _image_path(name: Any, where: str, image_folder: Optional[Path], allow_outside: bool) -> Path:
    if not isinstance(name, str) or not name:
        raise BadSampleError(f"{where}: 'image' must hold file paths, got {name!r}")
    path = Path(name)
    if not allow_outside:
        if path.is_absolute():
            raise BadSampleError(f"{where}: image path {name!r} is absolute; data files name images relative to "
                                 f"the image folder (pass --allow_images_outside_folder true to accept it)")
        if Path(os.path.normpath(name)).parts[:1] == ("..",):
            raise BadSampleError(f"{where}: image path {name!r} climbs outside the image folder "
                                 f"(pass --allow_images_outside_folder true to accept it)")
    return image_folder / path if image_folder is not None else path


def _llava_record(record: Any, origin: str, image_folder: Optional[Path], allow_outside: bool = False
                  ) -> Conversation:
    if not isinstance(record, dict):
        raise BadSampleError(f"{origin}: expected a JSON object, got {type(record).__name__}")
    sample_id = str(record.get("id", origin))
    where = f"{origin} (sample {sample_id!r})"
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise BadSampleError(f"{where}: missing or empty 'conversations' list")
    messages = []
    for k, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise BadSampleError(f"{where}: turn {k} needs 'from' and 'value'")
        role = ROLE_NAMES.get(str(turn["from"]).lower())
        if role is None:
            raise BadSampleError(f"{where}: turn {k} has unknown speaker {turn['from']!r} (human/gpt/system)")
        messages.append({"role": role, "content": str(turn["value"])})
    image = record.get("image")
    names = [] if image is None else [image] if isinstance(image, str) else list(image)
    images = [_image_path(name, where, image_folder, allow_outside) for name in names]
    # LLaVA data sometimes omits the marker of a single image; it then goes before the first question.
    if len(images) == 1 and not any(IMAGE_TOKEN in m["content"] for m in messages):
        first_user = next((m for m in messages if m["role"] == "user"), None)
        if first_user is not None:
            first_user["content"] = IMAGE_TOKEN + "\n" + first_user["content"]
    return Conversation(sample_id, images, messages, origin)


def load_llava_json(path: Union[str, os.PathLike], image_folder: Union[str, os.PathLike, None] = None,
                    skip_bad_samples: bool = False, allow_images_outside_folder: bool = False) -> list[Conversation]:
    """Read a LLaVA-format `.json` (a list) or `.jsonl` file.

    A bad record (a malformed `.jsonl` line, an unknown speaker, an image path outside `image_folder`) raises
    `BadSampleError` naming the file and line; with `skip_bad_samples=True` it becomes a placeholder conversation
    whose `meta["error"]` holds that message, so that `SupervisedDataset` skips and lists it with the others.
    A `.json` file that is not valid JSON as a whole is always an error.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Training data file not found: {path}")
    folder = Path(image_folder) if image_folder is not None else path.parent
    records: list[tuple[Any, str]] = []
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    records.append((json.loads(line), f"{path}:{line_no}"))
                except json.JSONDecodeError as err:
                    error = BadSampleError(f"{path}:{line_no}: malformed JSON line ({err.msg} at column {err.colno})")
                    if not skip_bad_samples:
                        raise error from err
                    records.append((error, f"{path}:{line_no}"))
    else:
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except json.JSONDecodeError as err:
            raise BadSampleError(f"{path}: malformed JSON ({err.msg} at line {err.lineno}, column {err.colno})") \
                from err
        if not isinstance(data, list):
            raise BadSampleError(f"{path}: expected a JSON list of samples, got {type(data).__name__}")
        records = [(r, f"{path}[{i}]") for i, r in enumerate(data)]
    conversations = []
    for record, origin in records:
        try:
            if isinstance(record, BadSampleError):
                raise record
            conversations.append(_llava_record(record, origin, folder, allow_images_outside_folder))
        except BadSampleError as err:
            if not skip_bad_samples:
                raise
            conversations.append(Conversation(origin, [], [], origin, meta={"error": str(err)}))
    return conversations


def load_hf_messages(dataset: Any, name: str = "dataset", messages_column: str = "messages",
                     images_column: str = "images", skip_bad_samples: bool = False) -> list[Conversation]:
    """Conversations from a Hugging Face `datasets.Dataset` with `messages` and (optional) `images` columns. A bad
    row raises `BadSampleError`, or with `skip_bad_samples=True` becomes a placeholder that `SupervisedDataset`
    skips and lists (as in `load_llava_json`)."""
    for column in (messages_column,):
        if column not in dataset.column_names:
            raise BadSampleError(f"{name}: no {column!r} column (columns: {dataset.column_names})")
    has_images = images_column in dataset.column_names
    out = []
    for i in range(len(dataset)):
        row = dataset[i]
        where = f"{name}[{i}]"
        try:
            raw = row[messages_column]
            if not isinstance(raw, list):
                raise BadSampleError(f"{where}: {messages_column!r} must be a list of messages")
            messages = []
            for k, m in enumerate(raw):
                role = ROLE_NAMES.get(str(m.get("role", "")).lower()) if isinstance(m, dict) else None
                if role is None:
                    raise BadSampleError(f"{where}: message {k} needs a role of user/assistant/system")
                messages.append({"role": role, "content": _text_of(m.get("content"), where)})
        except BadSampleError as err:
            if not skip_bad_samples:
                raise
            out.append(Conversation(where, [], [], where, meta={"error": str(err)}))
            continue
        images = list(row[images_column] or []) if has_images else []
        out.append(Conversation(str(row.get("id", i)), images, messages, where))
    return out


def load_hf_dataset(path: Union[str, os.PathLike], split: str = "train", **kwargs: Any) -> list[Conversation]:
    """A local Hugging Face dataset directory (`save_to_disk`, or parquet / JSON files `load_dataset` reads)."""
    import datasets

    from ..files import naming_corrupt_files

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Dataset not found: {path}")
    with naming_corrupt_files(path, "data file", recursive=True):
        if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            loaded = datasets.load_from_disk(str(path))
        else:
            loaded = datasets.load_dataset(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise BadSampleError(f"{path}: no split {split!r} (splits: {list(loaded)})")
        loaded = loaded[split]
    return load_hf_messages(loaded, name=f"{path}:{split}", **kwargs)


__all__ = [
    "BadSampleError",
    "Conversation",
    "check_conversation",
    "load_hf_dataset",
    "load_hf_messages",
    "load_llava_json",
]
