"""The procedural majority-colour task of the over-focus study (defocus_mllm.data.synthetic)."""

import numpy as np
import pytest
import torch

from defocus_mllm.data.augment import ImageClassificationTransform
from defocus_mllm.data.synthetic import (
    MAJORITY_COLOUR_NAMES,
    TensorImageDataset,
    majority_colour_images,
    majority_colour_sample,
    partial_view_accuracy,
)


def test_labels_counts_and_cells_agree_and_seeds_reproduce():
    samples = majority_colour_images(50, seed=(3, 0), min_object_size=3)
    again = majority_colour_images(50, seed=(3, 0), min_object_size=3)
    other = majority_colour_images(50, seed=(3, 1), min_object_size=3)
    assert [np.asarray(s.image).tobytes() for s in samples] == [np.asarray(s.image).tobytes() for s in again]
    assert [s.cells for s in samples] != [s.cells for s in other]
    for s in samples:
        assert s.image.size == (32, 32) and 5 <= len(s.cells) <= 11
        assert len({(r, c) for r, c, _ in s.cells}) == len(s.cells)  # one object per cell
        assert tuple(np.bincount([c for _, _, c in s.cells], minlength=3)) == s.counts
        assert s.counts[s.label] == max(s.counts) and sorted(s.counts)[-2] < max(s.counts)  # no tie
        assert s.margin == max(s.counts) - sorted(s.counts)[-2]


def test_every_object_is_drawn_in_its_cell_in_its_colour():
    # the background stays below 70 in every channel and each colour has one channel above 160: a cell holds
    # bright pixels iff it holds an object, and their brightest channel is the object's colour (red, green, blue)
    for s in majority_colour_images(20, seed=1, min_object_size=3):
        pixels, cell = np.asarray(s.image).astype(int), 32 // s.grid
        objects = {(r, c): colour for r, c, colour in s.cells}
        for row in range(s.grid):
            for col in range(s.grid):
                patch = pixels[row * cell:(row + 1) * cell, col * cell:(col + 1) * cell].reshape(-1, 3)
                bright = patch[patch.max(-1) > 120]
                if (row, col) in objects:
                    assert len(bright) >= 3
                    assert set(bright.argmax(-1).tolist()) == {objects[row, col]}
                else:
                    assert len(bright) == 0


@pytest.mark.parametrize("share", [0.0, 0.6, 1.0])
def test_margin_one_share_is_the_requested_one(share):
    margins = np.array([s.margin for s in majority_colour_images(600, seed=0, margin_one_share=share)])
    assert (margins >= 1).all()
    # free multinomial draws give a lead of one ~45% of the time: an exact share needs the kind chosen first
    assert (margins == 1).mean() == pytest.approx(share, abs=0.05)


def test_partial_view_accuracy_grows_from_chance_to_one():
    samples = majority_colour_images(300, seed=2)
    accuracies = [partial_view_accuracy(samples, rows) for rows in range(5)]
    assert accuracies[0] == pytest.approx(1 / 3) and accuracies[4] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(accuracies, accuracies[1:]))
    assert accuracies[1] < 0.65  # one row of four leaves most of the task unsolved
    assert partial_view_accuracy(samples, 2, from_bottom=False) < 0.8


def test_invalid_requests_are_refused():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="too small"):
        majority_colour_sample(rng, image_size=12, grid=4)
    with pytest.raises(ValueError, match="grid"):
        majority_colour_sample(rng, grid=3, max_objects=10)
    with pytest.raises(ValueError, match="min_object_size"):
        majority_colour_sample(rng, min_object_size=8)
    with pytest.raises(ValueError, match="lead of one"):  # two objects: a lead of 0 or 2, never 1
        majority_colour_sample(rng, min_objects=2, max_objects=2, margin_one_share=1.0)


def test_tensor_dataset_from_samples():
    samples = majority_colour_images(6, seed=4)
    dataset = TensorImageDataset.from_samples(samples, ImageClassificationTransform(32, train=False, crop_pct=1.0))
    assert len(dataset) == 6 and dataset[5]["pixel_values"].shape == (3, 32, 32)
    assert [dataset[i]["labels"] for i in range(6)] == [s.label for s in samples]
    assert len(MAJORITY_COLOUR_NAMES) == 3
    with pytest.raises(ValueError, match="labels"):
        TensorImageDataset(torch.zeros(2, 3, 8, 8), torch.zeros(3, dtype=torch.long))
