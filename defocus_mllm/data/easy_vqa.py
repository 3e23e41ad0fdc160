"""easy-VQA, the offline data set of this project, in one place for training and evaluation.

The `easy-vqa` PyPI package ships 4,000 train / 1,000 test 64x64 images of one coloured shape each and 38,575 /
9,673 questions with 13 answers (3 shapes, 8 colours, yes / no). Training reads them as conversations
(`load_easy_vqa`: multi-turn per image, captions for stage 1, or an ordered curriculum), the vision warm-up as
'<color> <shape>' labels (`load_easy_vqa_labels`), and the evaluation as questions (`easy_vqa_questions`), all
asked with the same prompt (`easy_vqa_prompt`).

Why the offline default needs a curriculum, and what each phase is for, is explained once, in
docs/easy_vqa.md.
"""

from __future__ import annotations

import random
from collections import defaultdict
from pathlib import Path
from typing import Optional

from ..prompts import IMAGE_TOKEN, SHORT_ANSWER_INSTRUCTION, with_instruction
from .conversations import Conversation

EASY_VQA_INSTRUCTION = SHORT_ANSWER_INSTRUCTION
EASY_VQA_SHAPES = ("circle", "rectangle", "triangle")
EASY_VQA_COLORS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
YES_NO = ("yes", "no")


def easy_vqa_prompt(question: str) -> str:
    """The question as training and evaluation ask it (LLaVA-1.5's short-answer instruction)."""
    return with_instruction(question, EASY_VQA_INSTRUCTION)




def easy_vqa_questions(split: str) -> tuple[list[str], list[str], list[int], dict[int, str]]:
    """`(questions, answers, image ids, {image id: image path})` of one split, as the package ships them."""
    try:
        from easy_vqa import get_test_image_paths, get_test_questions, get_train_image_paths, get_train_questions
    except ImportError as err:
        raise ImportError("easy-VQA needs the `easy-vqa` package: pip install 'defocus-mllm[train]'") from err
    if split not in ("train", "test"):
        raise ValueError(f"easy-VQA has splits 'train' and 'test', not {split!r}")
    questions, answers, image_ids = get_train_questions() if split == "train" else get_test_questions()
    paths = get_train_image_paths() if split == "train" else get_test_image_paths()
    return list(questions), list(answers), list(image_ids), paths


def _easy_vqa_by_image(split: str) -> tuple[dict[int, list[tuple[str, str]]], dict[int, str]]:
    """`({image id: [(question, answer), ...]}, {image id: image path})` of one easy-VQA split."""
    questions, answers, image_ids, paths = easy_vqa_questions(split)
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
    sampling), e.g. `"described*3, open, all*2"`: `described` (text only, the image replaced by its description),
    `open` (the open questions alone), `all` (every question); `*N` repeats a phase N times, each pass regrouped and
    reshuffled. docs/easy_vqa.md says what each phase is for.
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
            if a in YES_NO:
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
        qa = [(q, a) for q, a in qa if a not in YES_NO] if phase == "open" else qa[:]
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
        elif answer in YES_NO:
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


EASY_VQA_KINDS = ("open colour", "open shape", "yes/no colour", "yes/no shape")


def easy_vqa_question_kind(question: str, answer: str) -> str:
    """The kind of an easy-VQA question, one of `EASY_VQA_KINDS`: open when the answer is a colour or a shape
    ("what color is the circle?" -> open colour), yes/no otherwise, about a colour when the question names one
    ("is there not a red shape?" -> yes/no colour) and about a shape when it does not ("is a circle present?")."""
    if answer in EASY_VQA_COLORS:
        return "open colour"
    if answer in EASY_VQA_SHAPES:
        return "open shape"
    words = question.rstrip("?").split()
    return "yes/no colour" if any(w in EASY_VQA_COLORS for w in words) else "yes/no shape"


__all__ = [
    "EASY_VQA_COLORS",
    "EASY_VQA_INSTRUCTION",
    "EASY_VQA_KINDS",
    "EASY_VQA_PHASES",
    "EASY_VQA_SHAPES",
    "easy_vqa_color_and_shape",
    "easy_vqa_prompt",
    "easy_vqa_question_kind",
    "easy_vqa_questions",
    "load_easy_vqa",
    "load_easy_vqa_labels",
    "parse_easy_vqa_curriculum",
]

