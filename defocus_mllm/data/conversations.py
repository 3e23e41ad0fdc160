"""Sources of multimodal conversations, read into one form: `Conversation(id, images, messages, origin)`.

* LLaVA JSON (`.json` list or `.jsonl`): `{"id", "image": "rel/path.jpg" (or a list), "conversations":
  [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": "..."}, ...]}`; text-only samples have no
  `image`. Paths are relative to an image folder.
* Hugging Face datasets with `messages` (`[{"role", "content"}]`, content a string or a list of `{"type": "image"}`
  / `{"type": "text", "text"}` parts) and `images` (a list of images) columns, from a local directory.
* easy-VQA (the `easy-vqa` PyPI package, offline): questions grouped per image into multi-turn conversations.

Messages always come out with string contents in which each image is a literal `<image>` marker, the form every
chat template can render.
"""

from __future__ import annotations

import json
import os
import random
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from ..llava import IMAGE_TOKEN

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
    """Raise `BadSampleError` if the sample has no assistant turn or its `<image>` markers and images disagree."""
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


def _llava_record(record: Any, origin: str, image_folder: Optional[Path]) -> Conversation:
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
    images = [(image_folder / name) if image_folder is not None else Path(name) for name in names]
    # LLaVA data sometimes omits the marker of a single image; it then goes before the first question.
    if len(images) == 1 and not any(IMAGE_TOKEN in m["content"] for m in messages):
        first_user = next((m for m in messages if m["role"] == "user"), None)
        if first_user is not None:
            first_user["content"] = IMAGE_TOKEN + "\n" + first_user["content"]
    return Conversation(sample_id, images, messages, origin)


def load_llava_json(path: Union[str, os.PathLike], image_folder: Union[str, os.PathLike, None] = None
                    ) -> list[Conversation]:
    """Read a LLaVA-format `.json` (a list) or `.jsonl` file. Malformed JSON raises `BadSampleError` naming the line."""
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
                    raise BadSampleError(f"{path}:{line_no}: malformed JSON line ({err.msg} at column {err.colno})") \
                        from err
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
    return [_llava_record(r, origin, folder) for r, origin in records]


def load_hf_messages(dataset: Any, name: str = "dataset", messages_column: str = "messages",
                     images_column: str = "images") -> list[Conversation]:
    """Conversations from a Hugging Face `datasets.Dataset` with `messages` and (optional) `images` columns."""
    for column in (messages_column,):
        if column not in dataset.column_names:
            raise BadSampleError(f"{name}: no {column!r} column (columns: {dataset.column_names})")
    has_images = images_column in dataset.column_names
    out = []
    for i in range(len(dataset)):
        row = dataset[i]
        where = f"{name}[{i}]"
        raw = row[messages_column]
        if not isinstance(raw, list):
            raise BadSampleError(f"{where}: {messages_column!r} must be a list of messages")
        messages = []
        for k, m in enumerate(raw):
            role = ROLE_NAMES.get(str(m.get("role", "")).lower()) if isinstance(m, dict) else None
            if role is None:
                raise BadSampleError(f"{where}: message {k} needs a role of user/assistant/system")
            messages.append({"role": role, "content": _text_of(m.get("content"), where)})
        images = list(row[images_column] or []) if has_images else []
        out.append(Conversation(str(row.get("id", i)), images, messages, where))
    return out


def load_hf_dataset(path: Union[str, os.PathLike], split: str = "train", **kwargs: Any) -> list[Conversation]:
    """A local Hugging Face dataset directory (`save_to_disk`, or parquet / JSON files `load_dataset` reads)."""
    import datasets

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Dataset not found: {path}")
    if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
        loaded = datasets.load_from_disk(str(path))
    else:
        loaded = datasets.load_dataset(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise BadSampleError(f"{path}: no split {split!r} (splits: {list(loaded)})")
        loaded = loaded[split]
    return load_hf_messages(loaded, name=f"{path}:{split}", **kwargs)


def easy_vqa_prompt(question: str) -> str:
    """The question as the evaluation asks it (LLaVA-1.5's short-answer instruction)."""
    from ..evaluation.benchmarks import EASY_VQA_INSTRUCTION, with_instruction

    return with_instruction(question, EASY_VQA_INSTRUCTION)


EASY_VQA_SHAPES = ("circle", "rectangle", "triangle")
EASY_VQA_COLORS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
_YES_NO = ("yes", "no")


def _easy_vqa_by_image(split: str) -> tuple[dict[int, list[tuple[str, str]]], dict[int, str]]:
    """`({image id: [(question, answer), ...]}, {image id: image path})` of one easy-VQA split."""
    try:
        from easy_vqa import get_test_image_paths, get_test_questions, get_train_image_paths, get_train_questions
    except ImportError as err:
        raise ImportError("easy-VQA needs the `easy-vqa` package: pip install 'defocus-mllm[train]'") from err
    if split not in ("train", "test"):
        raise ValueError(f"easy-VQA has splits 'train' and 'test', not {split!r}")
    questions, answers, image_ids = get_train_questions() if split == "train" else get_test_questions()
    paths = get_train_image_paths() if split == "train" else get_test_image_paths()
    by_image: dict[int, list[tuple[str, str]]] = defaultdict(list)
    for q, a, image_id in zip(questions, answers, image_ids):
        by_image[image_id].append((q, a))
    return by_image, paths


EASY_VQA_PHASES = ("described", "open", "all")


def parse_easy_vqa_curriculum(spec: str) -> list[tuple[str, int]]:
    """`"described*3, open, all*2"` -> `[("described", 3), ("open", 1), ("all", 2)]`."""
    phases = []
    for part in (p.strip() for p in spec.split(",")):
        name, _, times = part.partition("*")
        name = name.strip()
        if name not in EASY_VQA_PHASES or (times and not times.strip().isdigit()) or (times and int(times) < 1):
            raise ValueError(f"easy-VQA curriculum {spec!r}: bad phase {part!r}; phases are "
                             f"{', '.join(EASY_VQA_PHASES)}, each optionally '*N' (N passes), separated by commas")
        phases.append((name, int(times) if times else 1))
    return phases


def load_easy_vqa(split: str = "train", turns_per_sample: int = 1, seed: int = 0, limit: Optional[int] = None,
                  captions: bool = False, curriculum: Optional[str] = None,
                  balance_yes_no: bool = False) -> list[Conversation]:
    """easy-VQA questions as conversations about their image.

    `turns_per_sample > 1` groups that many questions about one image into a multi-turn conversation (as LLaVA's
    instruction data does): the image is encoded once for several answers. `captions=True` instead makes one
    caption-style sample per image ("a red circle."), built from the answers, for projector pretraining.
    `curriculum` orders the list in phases, each shuffled on its own, to be trained on in order (sequential
    sampling), e.g. `"described*3, open, all*2"`:
      * `described`: text-only conversations in which the image is replaced by its description ("a red circle.",
        read off the image's answers): the tiny LM learns to compare and negate from words, cheaply (no image);
      * `open`: the open questions alone ("what color is the shape?"), which teach it to read the image;
      * `all`: every question. `*N` repeats a phase N times, each pass regrouped and reshuffled.
    `balance_yes_no=True` keeps as many "yes" as "no" answers among the plain and among the negated yes/no
    questions (a random subset of the majority answer): easy-VQA's are 5:1, so the question's form alone answers
    83% of them and a model never needs the image for them. `limit` caps the number of images.
    """
    if curriculum and captions:
        raise ValueError("easy-VQA captions (stage-1 data) take no curriculum")
    phases = parse_easy_vqa_curriculum(curriculum) if curriculum else None
    by_image, paths = _easy_vqa_by_image(split)
    by_image = {image_id: by_image[image_id] for image_id in sorted(by_image)[:limit]}
    if balance_yes_no:
        by_image = _balance_yes_no(by_image, seed)
    if phases is None:
        return _easy_vqa_conversations(split, by_image, paths, turns_per_sample, seed, captions)
    rng = random.Random(seed)
    out: list[Conversation] = []
    for phase, times in phases:
        for repeat in range(times):
            part = _easy_vqa_conversations(split, by_image, paths, turns_per_sample, seed + repeat, captions,
                                           phase=phase)
            for conv in part if repeat else ():
                conv.id += f"-pass{repeat + 1}"
            rng.shuffle(part)
            out += part
    return out


def _is_negated(question: str) -> bool:
    words = question.rstrip("?").split()
    return "not" in words or "no" in words


def _balance_yes_no(by_image: dict[int, list[tuple[str, str]]], seed: int) -> dict[int, list[tuple[str, str]]]:
    groups: dict[tuple[bool, str], list[tuple[int, int]]] = defaultdict(list)  # (negated, answer) -> (image, index)
    for image_id, qa in by_image.items():
        for index, (q, a) in enumerate(qa):
            if a in _YES_NO:
                groups[(_is_negated(q), a)].append((image_id, index))
    rng = random.Random(seed)
    dropped = set()
    for negated in (False, True):
        yes, no = groups[(negated, "yes")], groups[(negated, "no")]
        larger, smaller = (yes, no) if len(yes) > len(no) else (no, yes)
        dropped.update(rng.sample(larger, len(larger) - len(smaller)))
    return {image_id: [qa for index, qa in enumerate(qas) if (image_id, index) not in dropped]
            for image_id, qas in by_image.items()}


def _easy_vqa_conversations(split: str, by_image: dict[int, list[tuple[str, str]]], paths: dict[int, str],
                            turns_per_sample: int, seed: int, captions: bool,
                            phase: str = "all") -> list[Conversation]:
    rng = random.Random(seed)
    described = phase == "described"
    out = []
    for image_id in sorted(by_image):
        qa = by_image[image_id]
        origin = f"easy-vqa/{split}/image {image_id}"
        color, shape = easy_vqa_color_and_shape(qa) if captions or described else (None, None)
        if captions:
            caption = " ".join(w for w in ("a", color, shape or "shape") if w) + "."
            messages = [{"role": "user", "content": IMAGE_TOKEN + "\nDescribe the image briefly."},
                        {"role": "assistant", "content": caption}]
            out.append(Conversation(f"{split}-{image_id}", [Path(paths[image_id])], messages, origin))
            continue
        if described and not (color and shape):
            continue  # its answers leave the description open
        # the first question carries the image, or in a described conversation the words in its place
        opening, images = (f"a {color} {shape}.", []) if described else (IMAGE_TOKEN, [Path(paths[image_id])])
        qa = [(q, a) for q, a in qa if a not in _YES_NO] if phase == "open" else qa[:]
        rng.shuffle(qa)
        for start in range(0, len(qa), turns_per_sample):
            messages = []
            for q, a in qa[start:start + turns_per_sample]:
                prefix = opening + "\n" if not messages else ""
                messages += [{"role": "user", "content": prefix + easy_vqa_prompt(q)},
                             {"role": "assistant", "content": a}]
            name = f"{split}-{image_id}-{'' if phase == 'all' else phase + '-'}{start}"
            out.append(Conversation(name, images, messages, origin))
    return out


def easy_vqa_color_and_shape(qa: list[tuple[str, str]]) -> tuple[Optional[str], Optional[str]]:
    """`(color, shape)` of the one shape in an easy-VQA image, deduced from its `(question, answer)` pairs; `None`
    where they do not pin it down.

    Open questions name it ("what color is the rectangle?" -> brown, and the shape is a rectangle); yes/no questions
    confirm or rule out a value ("is no yellow shape present?" -> yes rules yellow out).
    """
    candidates = {"shape": set(EASY_VQA_SHAPES), "color": set(EASY_VQA_COLORS)}
    kind_of = {**{s: "shape" for s in EASY_VQA_SHAPES}, **{c: "color" for c in EASY_VQA_COLORS}}

    def narrow(word: str, present: bool) -> None:
        pool = candidates[kind_of[word]]
        pool.intersection_update({word}) if present else pool.discard(word)

    for question, answer in qa:
        words = question.rstrip("?").split()
        named = [w for w in words if w in kind_of]
        if answer in kind_of:  # an open question; every attribute it names is present
            narrow(answer, True)
            for word in named:
                narrow(word, True)
        elif answer in _YES_NO:
            negated = _is_negated(question)
            for word in named:
                narrow(word, (answer == "yes") != negated)
    return tuple(next(iter(pool)) if len(pool) == 1 else None  # type: ignore[return-value]
                 for pool in (candidates["color"], candidates["shape"]))


def load_easy_vqa_labels(split: str = "train") -> tuple[list[Path], list[int], list[str]]:
    """easy-VQA's images as an image-classification set: `(paths, labels, class names)`, one class per
    "<color> <shape>" (24), read off each image's answers; images whose answers leave it open are left out."""
    by_image, paths = _easy_vqa_by_image(split)
    classes = [f"{c} {s}" for c in EASY_VQA_COLORS for s in EASY_VQA_SHAPES]
    image_paths, labels = [], []
    for image_id in sorted(by_image):
        color, shape = easy_vqa_color_and_shape(by_image[image_id])
        if color and shape:
            image_paths.append(Path(paths[image_id]))
            labels.append(classes.index(f"{color} {shape}"))
    return image_paths, labels, classes


__all__ = [
    "BadSampleError",
    "Conversation",
    "check_conversation",
    "easy_vqa_color_and_shape",
    "easy_vqa_prompt",
    "load_easy_vqa",
    "load_easy_vqa_labels",
    "load_hf_dataset",
    "load_hf_messages",
    "load_llava_json",
    "parse_easy_vqa_curriculum",
]
