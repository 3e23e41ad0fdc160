"""Image-classification augmentation without torchvision (PIL for geometry and colour, tensors for the rest).

The training transform follows the DeiT / timm ImageNet recipe the release was trained with: random resized
crop (bicubic), horizontal flip, an optional stronger PIL augmentation (RandAugment, `rand_augment`), colour
jitter when no stronger augmentation is given, normalisation, random erasing; mixup / cutmix act on whole
batches (`MixupCutmix`). The evaluation transform is the released encoders' (docs/method.md §6.4): resize the short side to
`int(256 / 224 * size)`, centre-crop, normalise with the ImageNet mean / std.

Stronger augmentation plugs in as any callable `PIL.Image -> PIL.Image` passed as `pil_augment`, applied after
crop and flip; the recipe builds one from a dotted path (`augment_fn: "package.module:factory"`, called as
`factory(image_size=..., mean=...)`), see `load_augment_factory`.
"""

from __future__ import annotations

import importlib
import math
import random
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

from ..images import to_rgb

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EVAL_CROP_PCT = 224 / 256

PilAugment = Callable[[Image.Image], Image.Image]


def _random_streams(seed: Optional[int]) -> tuple[random.Random, Optional[torch.Generator]]:
    """Private `(random.Random, torch.Generator)` for an int seed; the global streams for `None`."""
    if seed is None:
        return random._inst, None  # the module-level generator behind `random.random()`
    return random.Random(seed), torch.Generator().manual_seed(seed)


def to_normalized_tensor(image: Image.Image, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """RGB PIL image -> `[3, H, W]` float tensor scaled to [0, 1] then normalised with `mean` / `std`."""
    array = np.asarray(to_rgb(image), dtype=np.float32) / 255.0
    tensor = torch.from_numpy(array).permute(2, 0, 1).contiguous()
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (tensor - mean_t) / std_t


def random_resized_crop_box(
    width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float], rng: random.Random
) -> tuple[int, int, int, int]:
    """Inception-style crop box `(left, top, right, bottom)`: area fraction in `scale`, log-uniform aspect in `ratio`;
    falls back to the largest centred crop within `ratio` after 10 failed tries (as torchvision / timm do)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            left = rng.randint(0, width - w)
            top = rng.randint(0, height - h)
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def color_jitter(image: Image.Image, strength: float, rng: random.Random) -> Image.Image:
    """Brightness, contrast and saturation each scaled by a factor in `[1 - strength, 1 + strength]`, random order."""
    ops = [ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color]
    rng.shuffle(ops)
    for op in ops:
        image = op(image).enhance(rng.uniform(max(0.0, 1 - strength), 1 + strength))
    return image


def random_erase_(
    tensor: torch.Tensor, probability: float, generator: Optional[torch.Generator] = None, area: tuple[float, float] = (0.02, 1 / 3),
    log_aspect: tuple[float, float] = (math.log(0.3), math.log(1 / 0.3)),
) -> torch.Tensor:
    """Random erasing (Zhong et al.; timm's "pixel" mode, one box) in place on a normalised `[C, H, W]` tensor:
    with `probability`, a random box is filled with per-pixel standard-normal noise."""
    if probability <= 0 or torch.rand((), generator=generator).item() >= probability:
        return tensor
    channels, height, width = tensor.shape
    for _ in range(10):
        target = height * width * float(torch.empty(()).uniform_(*area, generator=generator))
        aspect = math.exp(float(torch.empty(()).uniform_(*log_aspect, generator=generator)))
        h = int(round(math.sqrt(target * aspect)))
        w = int(round(math.sqrt(target / aspect)))
        if 0 < h < height and 0 < w < width:
            top = int(torch.randint(0, height - h + 1, (), generator=generator))
            left = int(torch.randint(0, width - w + 1, (), generator=generator))
            tensor[:, top:top + h, left:left + w] = torch.randn((channels, h, w), generator=generator)
            break
    return tensor


class ImageClassificationTransform:
    """PIL image -> normalised `[3, size, size]` tensor, for training (`train=True`) or evaluation.

    Args:
        size: output side.
        train: training augmentation (random resized crop, flip, ...) or the deterministic evaluation transform.
        mean, std: normalisation; take them from the encoder's image processor (`from_image_processor`).
        scale, ratio: random-resized-crop area fraction and aspect-ratio ranges.
        hflip: probability of a horizontal flip.
        color_jitter: brightness / contrast / saturation strength, used only when `pil_augment` is None (timm
            likewise skips colour jitter when RandAugment is on).
        pil_augment: optional stronger augmentation, any `PIL.Image -> PIL.Image` callable (e.g. `RandAugment`).
        random_erase: probability of random erasing on the normalised tensor.
        crop_pct: evaluation centre-crop fraction: the short side is resized to `int(size / crop_pct)` first.
        seed: `None` draws from the global `random` / torch generators (which the Trainer seeds per run and per
            DataLoader worker); an int gives this transform private, reproducible streams.
    """

    def __init__(
        self,
        size: int,
        train: bool,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        color_jitter: float = 0.0,
        pil_augment: Optional[PilAugment] = None,
        random_erase: float = 0.0,
        crop_pct: float = EVAL_CROP_PCT,
        seed: Optional[int] = None,
    ) -> None:
        if size <= 0:
            raise ValueError(f"ImageClassificationTransform: size must be positive, got {size}")
        if not (0 < scale[0] <= scale[1] <= 1):
            raise ValueError(f"ImageClassificationTransform: scale={scale} must satisfy 0 < min <= max <= 1")
        self.size, self.train = size, train
        self.mean, self.std = tuple(mean), tuple(std)
        self.scale, self.ratio = tuple(scale), tuple(ratio)
        self.hflip, self.color_jitter, self.pil_augment = hflip, color_jitter, pil_augment
        self.random_erase, self.crop_pct = random_erase, crop_pct
        self.rng, self.generator = _random_streams(seed)

    @classmethod
    def from_image_processor(cls, processor, train: bool, **kwargs) -> "ImageClassificationTransform":
        """Size and normalisation read from a Hugging Face image processor (e.g. the encoder's), so that training
        and serving agree."""
        size = getattr(processor, "crop_size", None) or getattr(processor, "size", None)
        if isinstance(size, dict):
            size = size.get("height") or size.get("shortest_edge")
        if not isinstance(size, int):
            raise ValueError(f"Cannot read an image size from {type(processor).__name__} (size={size!r})")
        return cls(size=size, train=train, mean=processor.image_mean, std=processor.image_std, **kwargs)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = to_rgb(image)  # the package's one rule for modes (defocus_mllm.images)
        if self.train:
            box = random_resized_crop_box(image.width, image.height, self.scale, self.ratio, self.rng)
            image = image.resize((self.size, self.size), Image.Resampling.BICUBIC, box=box)
            if self.rng.random() < self.hflip:
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            if self.pil_augment is not None:
                image = self.pil_augment(image)
            elif self.color_jitter > 0:
                image = color_jitter(image, self.color_jitter, self.rng)
            tensor = to_normalized_tensor(image, self.mean, self.std)
            return random_erase_(tensor, self.random_erase, self.generator)
        return to_normalized_tensor(resize_center_crop(image, self.size, self.crop_pct), self.mean, self.std)


def resize_center_crop(image: Image.Image, size: int, crop_pct: float = EVAL_CROP_PCT) -> Image.Image:
    """Resize the short side to `int(size / crop_pct)` (bicubic), then centre-crop `size` x `size`."""
    short = int(size / crop_pct)
    width, height = image.size
    if width <= height:
        new_w, new_h = short, max(short, int(round(height * short / width)))
    else:
        new_w, new_h = max(short, int(round(width * short / height))), short
    image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return image.crop((left, top, left + size, top + size))


def one_hot_smoothed(labels: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """`[B]` class ids -> `[B, num_classes]` targets with `smoothing` spread uniformly (timm's convention)."""
    off = smoothing / num_classes
    targets = torch.full((labels.shape[0], num_classes), off, dtype=torch.float32, device=labels.device)
    return targets.scatter_(1, labels.long().view(-1, 1), 1.0 - smoothing + off)


class MixupCutmix:
    """Mixup / CutMix on a batch (timm's "batch" mode): one `lam` per batch, each sample mixed with the batch
    flipped end to end; returns mixed pixels and soft targets (with label smoothing folded in).

    Args:
        num_classes: size of the soft targets.
        mixup_alpha, cutmix_alpha: Beta parameters; 0 turns that kind off (the release: 0.8 and 1.0).
        prob: probability of mixing a batch at all.
        switch_prob: with both on, probability of CutMix instead of Mixup (the release: 0.5).
        label_smoothing: folded into the targets (the release: 0.1).
        seed: `None` uses the global `random` stream (seeded by the Trainer); an int gives a private stream.
    """

    def __init__(self, num_classes: int, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0, prob: float = 1.0,
                 switch_prob: float = 0.5, label_smoothing: float = 0.1, seed: Optional[int] = None) -> None:
        if mixup_alpha < 0 or cutmix_alpha < 0:
            raise ValueError(f"MixupCutmix: alphas must be >= 0, got mixup={mixup_alpha}, cutmix={cutmix_alpha}")
        self.num_classes = num_classes
        self.mixup_alpha, self.cutmix_alpha = mixup_alpha, cutmix_alpha
        self.prob, self.switch_prob, self.label_smoothing = prob, switch_prob, label_smoothing
        self.rng = _random_streams(seed)[0]

    @property
    def active(self) -> bool:
        return self.prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)

    def __call__(self, pixel_values: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if labels.dim() != 1:
            raise ValueError(f"MixupCutmix expects class ids of shape [B], got {tuple(labels.shape)}")
        targets = one_hot_smoothed(labels, self.num_classes, self.label_smoothing)
        if not self.active or self.rng.random() >= self.prob:
            return pixel_values, targets
        use_cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha <= 0 or self.rng.random() < self.switch_prob)
        alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
        lam = self.rng.betavariate(alpha, alpha)
        flipped = pixel_values.flip(0)
        if use_cutmix:
            height, width = pixel_values.shape[-2:]
            cut = math.sqrt(1.0 - lam)
            cut_h, cut_w = int(height * cut), int(width * cut)
            cy, cx = self.rng.randrange(height), self.rng.randrange(width)
            top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
            left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
            pixel_values = pixel_values.clone()
            pixel_values[..., top:bottom, left:right] = flipped[..., top:bottom, left:right]
            # the box is clipped at the border, so the label weight follows the area actually pasted
            lam = 1.0 - (bottom - top) * (right - left) / (height * width)
        else:
            pixel_values = pixel_values * lam + flipped * (1.0 - lam)
        return pixel_values, targets * lam + targets.flip(0) * (1.0 - lam)


def load_augment_factory(path: str) -> Callable[..., PilAugment]:
    """Resolve `"package.module:factory"` (or `"package.module.factory"`) to the factory callable."""
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    # configs written before the package was split into layers name the old module
    module_name = {"defocus_mllm.augment": __name__}.get(module_name, module_name)
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"augment_fn={path!r}: cannot import {attr!r} from {module_name!r} ({err})") from err
    if not callable(factory):
        raise ValueError(f"augment_fn={path!r} is not callable")
    return factory


def _signed(value: float, rng: random.Random) -> float:
    return -value if rng.random() < 0.5 else value


def _affine(image: Image.Image, matrix: tuple, fill: tuple[int, ...]) -> Image.Image:
    return image.transform(image.size, Image.Transform.AFFINE, matrix, resample=Image.Resampling.BILINEAR, fillcolor=fill)


def _solarize_add(image: Image.Image, add: int, threshold: int = 128) -> Image.Image:
    lut = [min(255, i + add) if i < threshold else i for i in range(256)]
    return image.point(lut * len(image.getbands()))


# RandAugment's "increasing" op set (timm's `inc1`): a larger magnitude always means a stronger distortion.
# Each entry maps (image, level in [0, 1], rng, fill colour) to the augmented image.
_RAND_AUGMENT_OPS: dict[str, Callable[[Image.Image, float, random.Random, tuple], Image.Image]] = {
    "AutoContrast": lambda im, lv, rng, fill: ImageOps.autocontrast(im),
    "Equalize": lambda im, lv, rng, fill: ImageOps.equalize(im),
    "Invert": lambda im, lv, rng, fill: ImageOps.invert(im),
    "Rotate": lambda im, lv, rng, fill: im.rotate(_signed(30.0 * lv, rng), resample=Image.Resampling.BILINEAR,
                                                  fillcolor=fill),
    "Posterize": lambda im, lv, rng, fill: ImageOps.posterize(im, max(1, 4 - int(lv * 4))),
    "Solarize": lambda im, lv, rng, fill: ImageOps.solarize(im, 256 - int(lv * 256)),
    "SolarizeAdd": lambda im, lv, rng, fill: _solarize_add(im, int(lv * 110)),
    "Color": lambda im, lv, rng, fill: ImageEnhance.Color(im).enhance(1.0 + _signed(0.9 * lv, rng)),
    "Contrast": lambda im, lv, rng, fill: ImageEnhance.Contrast(im).enhance(1.0 + _signed(0.9 * lv, rng)),
    "Brightness": lambda im, lv, rng, fill: ImageEnhance.Brightness(im).enhance(1.0 + _signed(0.9 * lv, rng)),
    "Sharpness": lambda im, lv, rng, fill: ImageEnhance.Sharpness(im).enhance(1.0 + _signed(0.9 * lv, rng)),
    "ShearX": lambda im, lv, rng, fill: _affine(im, (1, _signed(0.3 * lv, rng), 0, 0, 1, 0), fill),
    "ShearY": lambda im, lv, rng, fill: _affine(im, (1, 0, 0, _signed(0.3 * lv, rng), 1, 0), fill),
    "TranslateX": lambda im, lv, rng, fill: _affine(im, (1, 0, _signed(0.45 * lv, rng) * im.width, 0, 1, 0), fill),
    "TranslateY": lambda im, lv, rng, fill: _affine(im, (1, 0, 0, 0, 1, _signed(0.45 * lv, rng) * im.height), fill),
}


class RandAugment:
    """RandAugment (Cubuk et al.) on PIL images, parsed from a timm-style string such as the release's
    `"rand-m9-mstd0.5-inc1"`: `n` ops per image (default 2) drawn with replacement from the increasing op set, each
    applied with probability `p` (default 0.5) at magnitude `m` of 10 plus Gaussian noise of std `mstd`."""

    def __init__(self, config: str = "rand-m9-mstd0.5-inc1", mean: Sequence[float] = IMAGENET_MEAN,
                 seed: Optional[int] = None) -> None:
        parts = config.split("-")
        if parts[0] != "rand":
            raise ValueError(f"RandAugment config {config!r} must start with 'rand-'")
        self.num_layers, self.magnitude, self.magnitude_std, self.prob = 2, 9.0, 0.0, 0.5
        for part in parts[1:]:
            key = "".join(c for c in part if c.isalpha())
            value = part[len(key):]
            try:
                if key == "m":
                    self.magnitude = float(value)
                elif key == "mstd":
                    self.magnitude_std = float(value)
                elif key == "n":
                    self.num_layers = int(value)
                elif key == "p":
                    self.prob = float(value)
                elif key == "inc":
                    if not int(value):
                        raise ValueError("only the increasing op set (inc1) is implemented")
                else:
                    raise ValueError(f"unknown key {key!r}")
            except ValueError as err:
                raise ValueError(f"RandAugment config {config!r}: bad part {part!r} ({err})") from None
        self.fill = tuple(int(round(255 * m)) for m in mean)
        self.rng = _random_streams(seed)[0]

    def __call__(self, image: Image.Image) -> Image.Image:
        for name in self.rng.choices(list(_RAND_AUGMENT_OPS), k=self.num_layers):
            if self.rng.random() >= self.prob:
                continue
            magnitude = self.magnitude
            if self.magnitude_std > 0:
                magnitude = self.rng.gauss(magnitude, self.magnitude_std)
            level = min(10.0, max(0.0, magnitude)) / 10.0
            image = _RAND_AUGMENT_OPS[name](image, level, self.rng, self.fill)
        return image


def rand_augment(image_size: int, mean: Sequence[float] = IMAGENET_MEAN, config: str = "rand-m9-mstd0.5-inc1",
                 seed: Optional[int] = None) -> RandAugment:
    """`augment_fn` factory for the release's RandAugment (`augment_fn: "defocus_mllm.augment:rand_augment"`)."""
    del image_size  # the ops scale with the image themselves
    return RandAugment(config, mean=mean, seed=seed)
