"""Image-classification data for encoder pretraining: an image-folder tree or a Hugging Face dataset.

* `ImageListDataset`: `(path, class id)` pairs.
* `ImageFolderDataset`: the ImageNet layout, `root/<class name>/<image>`; class ids follow the sorted class names
  (as torchvision's `ImageFolder`), and a validation folder reuses the training folder's mapping.
* `HFImageClassificationDataset`: any `datasets.Dataset` with an image column and an integer label column.
* `PreprocessedImageDataset`: any of these with its (deterministic) transform applied once to every image.
* `ImageClassificationCollator`: stacks `{"pixel_values", "labels"}`.
* `RepeatedAugmentationSampler`: DeiT's repeated augmentation for the Trainer.

Images load lazily through `defocus_mllm.images.load_image`, the loader of every other path (transparency onto
white, 16-bit and float images scaled to 8 bits); a missing or corrupt file raises an error naming it.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler
from tqdm.auto import tqdm

from ..images import load_image, to_rgb

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")

Transform = Callable[[Image.Image], torch.Tensor]


load_rgb_image = load_image  # the package's one image loader, under the name this module has always used


def find_classes(root: str | os.PathLike) -> list[str]:
    """Sorted names of the class sub-folders of `root`."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"Image folder {root} does not exist or is not a directory")
    classes = sorted(entry.name for entry in root.iterdir() if entry.is_dir() and not entry.name.startswith("."))
    if not classes:
        raise ValueError(f"Image folder {root} has no class sub-folders (expected {root}/<class>/<image>)")
    return classes


class ImageListDataset(Dataset):
    """`(path, class id)` pairs -> `{"pixel_values": transform(image), "labels": class id}`, images read lazily."""

    def __init__(self, samples: Sequence[tuple[str | os.PathLike, int]], transform: Transform,
                 classes: Sequence[str]) -> None:
        if not samples:
            raise ValueError("An image-classification dataset needs at least one image")
        self.samples = [(str(path), int(label)) for path, label in samples]
        self.classes = list(classes)
        self.transform = transform

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path, label = self.samples[index]
        return {"pixel_values": self.transform(load_rgb_image(path)), "labels": label}


class ImageFolderDataset(ImageListDataset):
    """`root/<class>/<image>` -> `{"pixel_values": transform(image), "labels": class id}`.

    Args:
        root: the split folder (e.g. `imagenet/train`).
        transform: PIL image -> tensor (e.g. `ImageClassificationTransform`).
        classes: the class names in id order; default the sorted sub-folders of `root`. Pass the training split's
            `classes` for the validation split so the ids agree; a validation class missing from it is an error.
    """

    def __init__(self, root: str | os.PathLike, transform: Transform, classes: Optional[Sequence[str]] = None) -> None:
        self.root = Path(root)
        found = find_classes(self.root)
        self.classes = list(classes) if classes is not None else found
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        unknown = sorted(set(found) - set(self.class_to_idx))
        if unknown:
            raise ValueError(f"Image folder {self.root} has classes absent from the training classes: {unknown[:5]}")
        samples: list[tuple[str, int]] = []
        for name in found:
            for dirpath, _, filenames in sorted(os.walk(self.root / name, followlinks=True)):
                for filename in sorted(filenames):
                    if filename.lower().endswith(IMAGE_EXTENSIONS):
                        samples.append((os.path.join(dirpath, filename), self.class_to_idx[name]))
        if not samples:
            raise ValueError(f"Image folder {self.root} has no images with extensions {IMAGE_EXTENSIONS}")
        super().__init__(samples, transform, self.classes)


class HFImageClassificationDataset(Dataset):
    """A `datasets.Dataset` with an image column (PIL images, file paths or `{"bytes"/"path"}` dicts) and an integer
    label column -> `{"pixel_values", "labels"}`."""

    def __init__(self, dataset, transform: Transform, image_column: str = "image", label_column: str = "label") -> None:
        missing = [c for c in (image_column, label_column) if c not in dataset.column_names]
        if missing:
            raise ValueError(f"Dataset has no column(s) {missing}; its columns are {dataset.column_names} "
                             f"(set image_column / label_column)")
        self.dataset, self.transform = dataset, transform
        self.image_column, self.label_column = image_column, label_column
        feature = dataset.features.get(label_column) if getattr(dataset, "features", None) else None
        self.classes: Optional[list[str]] = list(feature.names) if hasattr(feature, "names") else None

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.dataset[index]
        image, label = row[self.image_column], row[self.label_column]
        if isinstance(image, (str, os.PathLike)):
            image = load_rgb_image(image)
        elif isinstance(image, dict):
            image = (load_rgb_image(image["bytes"], name=f"sample {index}") if image.get("bytes")
                     else load_rgb_image(image["path"]))
        elif isinstance(image, Image.Image):
            image = to_rgb(image, name=f"sample {index}")
        else:
            raise ValueError(f"Sample {index}: column {self.image_column!r} holds {type(image).__name__}, not an image")
        if not isinstance(label, int) or isinstance(label, bool):
            raise ValueError(f"Sample {index}: column {self.label_column!r} holds {label!r}, not an integer class id")
        return {"pixel_values": self.transform(image), "labels": label}


class PreprocessedImageDataset(Dataset):
    """A classification dataset with its transform applied once to every image, kept as one `[N, C, H, W]` tensor.

    For a small set trained for many epochs with a deterministic transform (the offline LLaVA recipe's vision
    warm-up: 3,578 easy-VQA images for 20 epochs), where decoding and preprocessing every image again each epoch is
    a large share of the step time. Never for random augmentations: every epoch would see the same draw.
    """

    def __init__(self, dataset: Dataset, show_progress: bool = False) -> None:
        first = dataset[0]
        self.pixel_values = torch.empty((len(dataset), *first["pixel_values"].shape), dtype=first["pixel_values"].dtype)
        self.labels = torch.empty(len(dataset), dtype=torch.long)
        for index in tqdm(range(len(dataset)), desc="preprocessing images", disable=not show_progress):
            sample = first if index == 0 else dataset[index]
            self.pixel_values[index], self.labels[index] = sample["pixel_values"], int(sample["labels"])
        self.classes = getattr(dataset, "classes", None)

    @staticmethod
    def num_bytes(dataset: Dataset) -> int:
        """The memory the preprocessed tensor of `dataset` would take (its first image times its length)."""
        pixels = dataset[0]["pixel_values"]
        return len(dataset) * pixels.numel() * pixels.element_size()

    @property
    def targets(self) -> list[int]:
        return self.labels.tolist()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"pixel_values": self.pixel_values[index], "labels": int(self.labels[index])}


class ImageClassificationCollator:
    """Stack samples into `{"pixel_values": [B, 3, H, W], "labels": [B]}`."""

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return {"pixel_values": torch.stack([s["pixel_values"] for s in samples]),
                "labels": torch.tensor([int(s["labels"]) for s in samples], dtype=torch.long)}


class RepeatedAugmentationSampler(Sampler[int]):
    """DeiT's repeated augmentation: each epoch draws `ceil(n / repeats)` images and yields each `repeats` times in a
    row (each copy gets its own random augmentation), truncated to `n` indices so an epoch keeps its length.

    The Trainer's distributed dataloader deals consecutive batches to different processes, so the copies of one
    image mostly land in the same batch; the effect DeiT wants (several views of fewer images per epoch) holds.
    """

    def __init__(self, num_samples: int, repeats: int = 3, seed: int = 0) -> None:
        if repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {repeats}")
        self.num_samples, self.repeats, self.seed, self.epoch = num_samples, repeats, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        chosen = torch.randperm(self.num_samples, generator=generator)[: math.ceil(self.num_samples / self.repeats)]
        return iter(chosen.repeat_interleave(self.repeats)[: self.num_samples].tolist())
