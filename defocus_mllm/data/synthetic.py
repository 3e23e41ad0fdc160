"""Procedural image-classification tasks that need the whole image (for over-focus studies; fully offline).

`majority_colour_images`: objects of three colours are scattered over a grid of cells; the label is the colour that
occurs most often. Object shape, size, position within a cell, colour shade and background noise are nuisance
variables. Because the winning colour often leads by a single object, a model that reads only part of the image, or
attends to a few tokens, cannot do much better than chance on those images: every object counts the same, wherever
it is (`partial_view_accuracy` measures how far a part of the image gets).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageDraw

MAJORITY_COLOURS = {"red": (220, 50, 40), "green": (40, 190, 60), "blue": (50, 80, 230)}
# class id -> name; the label of a sample is the index of its majority colour here
MAJORITY_COLOUR_NAMES = tuple(MAJORITY_COLOURS)
# Count draws tried before a (total, margin) request is declared impossible; a feasible request needs a handful.
_MAX_DRAWS = 1000


@dataclass
class MajorityColourSample:
    image: Image.Image
    label: int
    counts: tuple[int, ...]  # objects per colour
    cells: list[tuple[int, int, int]]  # (row, column, colour) of each object
    grid: int  # cells per side

    @property
    def margin(self) -> int:
        """How many objects the winning colour leads the runner-up by (1: the hardest images)."""
        ordered = sorted(self.counts, reverse=True)
        return ordered[0] - ordered[1]


def _draw_object(draw: ImageDraw.ImageDraw, shape: int, box: tuple[int, int, int, int], colour: tuple) -> None:
    left, top, right, bottom = box
    if shape == 0:
        draw.ellipse(box, fill=colour)
    elif shape == 1:
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([((left + right) / 2, top), (left, bottom), (right, bottom)], fill=colour)


def _draw_counts(rng: np.random.Generator, min_objects: int, max_objects: int, margin_one: bool) -> np.ndarray:
    """Objects per colour with no tie for the first place, and a lead of exactly one object iff `margin_one`."""
    num_colours = len(MAJORITY_COLOURS)
    for _ in range(_MAX_DRAWS):
        total = int(rng.integers(min_objects, max_objects + 1))
        counts = rng.multinomial(total, np.ones(num_colours) / num_colours)
        ordered = np.sort(counts)[::-1]
        margin = ordered[0] - ordered[1]
        if margin > 0 and (margin == 1) == margin_one:
            return counts
    raise ValueError(f"no object counts in [{min_objects}, {max_objects}] give a "
                     f"{'lead of one' if margin_one else 'lead of two or more'} in {_MAX_DRAWS} draws")


def majority_colour_sample(rng: np.random.Generator, image_size: int = 32, grid: int = 4, min_objects: int = 5,
                           max_objects: int = 11, margin_one_share: float = 0.6,
                           min_object_size: Optional[int] = None) -> MajorityColourSample:
    """One image of the majority-colour task.

    Args:
        image_size, grid: the image is `grid x grid` cells of `image_size // grid` (at least 4) pixels, at most one
            object per cell.
        min_objects, max_objects: object count range (at most `grid ** 2`).
        margin_one_share: probability that the winning colour leads the runner-up by exactly one object (the
            hardest images); the other images lead by two or more. Ties never occur.
        min_object_size: smallest object side in pixels (default `max(3, 5/8 of a cell)`); the largest is one pixel
            less than a cell, so objects in neighbouring cells never touch. A wide range decouples a colour's
            pixel area from its object count.
    """
    cell = image_size // grid
    if cell < 4:
        raise ValueError(f"cells of {image_size} // {grid} = {cell} px are too small to draw in (at least 4)")
    if not 1 <= min_objects <= max_objects <= grid * grid:
        raise ValueError(f"need 1 <= min_objects={min_objects} <= max_objects={max_objects} <= grid**2={grid * grid}")
    min_size = max(3, cell * 5 // 8) if min_object_size is None else min_object_size
    if not 1 <= min_size <= cell - 1:
        raise ValueError(f"min_object_size={min_size} must lie in [1, {cell - 1}] for cells of {cell} px")
    if not 0.0 <= margin_one_share <= 1.0:
        raise ValueError(f"margin_one_share={margin_one_share} must lie in [0, 1]")
    # Choose the kind of image first, then draw counts of that kind: the share is exact in expectation (filtering
    # free draws by a coin flip would skew it towards whichever margin the multinomial produces more often).
    counts = _draw_counts(rng, min_objects, max_objects, margin_one=bool(rng.random() < margin_one_share))
    total = int(counts.sum())
    noise = rng.integers(20, 70, size=(image_size, image_size, 3))
    image = Image.fromarray(noise.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    colours = list(MAJORITY_COLOURS.values())
    positions = rng.permutation(grid * grid)[:total]
    colour_ids = rng.permutation(np.repeat(np.arange(len(colours)), counts))
    cells = []
    for position, colour_id in zip(positions, colour_ids):
        row, col = divmod(int(position), grid)
        size = int(rng.integers(min_size, cell))
        left = col * cell + int(rng.integers(0, cell - size + 1))
        top = row * cell + int(rng.integers(0, cell - size + 1))
        jitter = rng.integers(-25, 26, size=3)
        colour = tuple(int(v) for v in np.clip(np.array(colours[colour_id]) + jitter, 0, 255))
        _draw_object(draw, int(rng.integers(0, 3)), (left, top, left + size - 1, top + size - 1), colour)
        cells.append((row, col, int(colour_id)))
    return MajorityColourSample(image, int(np.argmax(counts)), tuple(int(c) for c in counts), cells, grid)


def majority_colour_images(num_images: int, seed: Union[int, Sequence[int]],
                           **kwargs) -> list[MajorityColourSample]:
    """`num_images` samples of the majority-colour task from one seed (an int or a sequence such as
    `(seed, split)`; see `majority_colour_sample` for the keyword arguments)."""
    rng = np.random.default_rng(seed)
    return [majority_colour_sample(rng, **kwargs) for _ in range(num_images)]


def partial_view_accuracy(samples: Sequence[MajorityColourSample], rows: int, from_bottom: bool = True) -> float:
    """Accuracy of the best rule that sees only `rows` grid rows (the last ones, where a causal model's final tokens
    are, or the first): majority colour among the visible objects, ties split evenly. Measures how much of the task
    a model that ignores the rest of the image can solve (`rows=0`: chance, `rows=grid`: 1)."""
    if not samples:
        raise ValueError("partial_view_accuracy needs at least one sample")
    correct = 0.0
    for sample in samples:
        visible = [c for r, _, c in sample.cells if (r >= sample.grid - rows if from_bottom else r < rows)]
        counts = np.bincount(np.asarray(visible, dtype=np.int64), minlength=len(sample.counts))
        best = np.flatnonzero(counts == counts.max())
        correct += float(sample.label in best) / len(best)
    return correct / len(samples)


class TensorImageDataset(torch.utils.data.Dataset):
    """Pre-transformed images held in memory as `{"pixel_values", "labels"}` items (the encoder pretraining
    collator's input)."""

    def __init__(self, pixel_values: torch.Tensor, labels: torch.Tensor) -> None:
        if len(pixel_values) != len(labels):
            raise ValueError(f"{len(pixel_values)} images but {len(labels)} labels")
        self.pixel_values, self.labels = pixel_values, labels

    @classmethod
    def from_samples(cls, samples: Sequence[MajorityColourSample],
                     transform: Callable[[Image.Image], torch.Tensor]) -> "TensorImageDataset":
        """Apply `transform` (PIL image -> `[3, H, W]` tensor) to every sample's image once."""
        pixel_values = torch.stack([transform(sample.image) for sample in samples])
        return cls(pixel_values, torch.tensor([sample.label for sample in samples], dtype=torch.long))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        return {"pixel_values": self.pixel_values[index], "labels": int(self.labels[index])}
