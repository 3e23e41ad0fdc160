"""Semantic-segmentation data: an offline set built from easy-VQA's images, the mask of each read off its colours.

Every easy-VQA image (64x64 PNG, 4,000 train / 1,000 test) is one solid-coloured shape (circle, rectangle or
triangle) on a near-white background of one colour, with anti-aliased edges: an edge pixel is a blend
`alpha * shape + (1 - alpha) * background`. `shape_mask` reads the mask off the pixels:

1. the background colour is the image's most common colour (at least 72% of the pixels in every image);
2. the shape colour is the most common colour among the pixels far from the background (at least half the largest
   per-channel distance to it), i.e. the interior of the shape;
3. each pixel's coverage `alpha` is its projection on the background-to-shape colour line, and the mask is
   `alpha >= 0.5`: a pixel belongs to the shape when it is at least half shape colour.

An image with no second colour has an empty mask. Labels are `0` (background) and `1` (shape), as
`EASY_VQA_SEGMENTATION_LABELS` names them.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..images import load_image, to_rgb
from .augment import IMAGENET_MEAN, IMAGENET_STD

EASY_VQA_SEGMENTATION_LABELS = ("background", "shape")


def _most_common_colour(pixels: np.ndarray) -> np.ndarray:
    """The most common row of `[N, 3]` 8-bit colours (packed into one integer each: a 1D `unique` is fast)."""
    packed = (pixels[:, 0] << 16) | (pixels[:, 1] << 8) | pixels[:, 2]
    colours, counts = np.unique(packed, return_counts=True)
    colour = colours[counts.argmax()]
    return np.array([colour >> 16, (colour >> 8) & 255, colour & 255], dtype=pixels.dtype)


def shape_mask(image: Image.Image | np.ndarray, coverage: float = 0.5) -> np.ndarray:
    """`[H, W]` bool mask of the one shape of a flat-coloured image on a one-colour background (module docstring):
    the pixels that are at least `coverage` shape colour, with the background the most common colour."""
    pixels = np.asarray(to_rgb(image) if isinstance(image, Image.Image) else image)
    if pixels.ndim != 3 or pixels.shape[-1] != 3:
        raise ValueError(f"shape_mask expects an RGB image [H, W, 3], got shape {pixels.shape}")
    height, width = pixels.shape[:2]
    flat = pixels.reshape(-1, 3).astype(np.int32)
    background = _most_common_colour(flat)
    distance = np.abs(flat - background).max(axis=1)
    if distance.max() == 0:
        return np.zeros((height, width), dtype=bool)
    shape = _most_common_colour(flat[distance * 2 >= distance.max()])
    direction = (shape - background).astype(np.float64)
    alpha = (flat - background) @ direction / (direction @ direction)
    return (alpha >= coverage).reshape(height, width)


def easy_vqa_segmentation(split: str, limit: Optional[int] = None) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """`(images uint8 [N, H, W, 3], masks uint8 [N, H, W], image ids)` of one easy-VQA split, in image-id order;
    `limit` keeps the first N images."""
    try:
        from easy_vqa import get_test_image_paths, get_train_image_paths
    except ImportError as err:
        raise ImportError("easy-VQA needs the `easy-vqa` package: pip install 'defocus-mllm[train]'") from err
    if split not in ("train", "test"):
        raise ValueError(f"easy-VQA has splits 'train' and 'test', not {split!r}")
    paths = get_train_image_paths() if split == "train" else get_test_image_paths()
    ids = sorted(paths)[:limit]
    images = np.stack([np.asarray(load_image(paths[i])) for i in ids])
    masks = np.stack([shape_mask(image) for image in images]).astype(np.uint8)
    return images, masks, ids


class SegmentationDataset(Dataset):
    """In-memory images `[N, H, W, 3]` (uint8) and masks `[N, H, W]` (class ids) ->
    `{"pixel_values": [3, S, S] normalised with the ImageNet mean / std, "labels": [S, S] long}`.

    Images are resized bilinearly and masks by nearest neighbour to `image_size` (when it differs); `hflip` is the
    probability of a random horizontal flip of both (training only).
    """

    def __init__(self, images: np.ndarray, masks: np.ndarray, image_size: Optional[int] = None, hflip: float = 0.0,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        if len(images) != len(masks) or images.shape[1:3] != masks.shape[1:3]:
            raise ValueError(f"images {images.shape} and masks {masks.shape} do not match")
        if len(images) == 0:
            raise ValueError("a segmentation dataset needs at least one image")
        pixels = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255)
        labels = torch.from_numpy(np.ascontiguousarray(masks)).long()
        if image_size is not None and tuple(pixels.shape[-2:]) != (image_size, image_size):
            pixels = torch.nn.functional.interpolate(pixels, size=(image_size, image_size), mode="bilinear",
                                                     align_corners=False, antialias=True)
            labels = torch.nn.functional.interpolate(labels[:, None].float(), size=(image_size, image_size),
                                                     mode="nearest")[:, 0].long()
        mean_t, std_t = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
        self.pixel_values = (pixels - mean_t) / std_t
        self.labels = labels
        self.images = images
        self.hflip = hflip

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        pixels, labels = self.pixel_values[index], self.labels[index]
        if self.hflip and torch.rand(()) < self.hflip:
            pixels, labels = pixels.flip(-1), labels.flip(-1)
        return {"pixel_values": pixels, "labels": labels}


__all__ = [
    "EASY_VQA_SEGMENTATION_LABELS",
    "SegmentationDataset",
    "easy_vqa_segmentation",
    "shape_mask",
]
