"""The one image loader: training, evaluation, chat, encoder pretraining and the diagnostics all read images through
`load_image` (a file path, a PIL image, bytes or a URL: wherever a caller may hold either a path or an image) or
`to_rgb` (PIL images), so a model is scored on the pixels it was trained on. `to_model` hands a processor's output to a
model (its device, and its dtype for the pixel values).

The rule, for every mode Pillow opens:

* Transparency is composited onto white (what an image viewer shows), never left to the arbitrary colour stored under
  transparent pixels: RGBA, LA, PA, premultiplied RGBa / La, and images with a transparent colour (`transparency`
  in `image.info`, e.g. palette GIFs and PNGs).
* 16-bit grayscale (`I;16`, `I;16B`, `I;16L`, `I;16N`) is scaled from [0, 65535] to [0, 255]; Pillow's own
  conversion would clip it, turning almost every pixel white.
* 32-bit integer (`I`) and float (`F`) grayscale have no fixed range; the values decide: `I` in [0, 255] is kept,
  `I` in [0, 65535] is scaled as 16-bit; `F` in [0, 1] is scaled by 255, `F` in [0, 255] is kept. Other values
  (negative, larger, NaN / infinite) are refused with an error, as is a mode Pillow cannot convert to RGB.
* Every other mode (1, L, P, RGB, RGBX, CMYK, YCbCr, LAB, HSV) goes through Pillow's conversion to RGB.
* Grayscale results are repeated on the three channels. The EXIF orientation is not applied (LLaVA-1.5 reads its
  training and evaluation images without it).
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

ImageSource = Union[str, os.PathLike, bytes, bytearray, io.IOBase, Image.Image]

SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I;16S", "I;16BS", "I;16LS")
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


class ImageModeError(ValueError):
    """An image whose mode or values cannot be read as RGB without losing its contrast."""


def is_url(source: Any) -> bool:
    return isinstance(source, str) and source.startswith(("http://", "https://"))


def load_image(source: ImageSource, name: Optional[str] = None, timeout: float = 30.0) -> Image.Image:
    """Read an image as RGB by the module's rule (transparency onto white, 16-bit and float scaled to 8 bits).

    `source` is a file path, an `http(s)://` URL (fetched as `transformers.image_utils.load_image` fetches
    them), encoded bytes, a binary file object, or a PIL image. A missing file raises `FileNotFoundError`; an
    unreadable one, a failed download or an unconvertible mode a `ValueError`; both name the file (or `name`).
    """
    if isinstance(source, Image.Image):
        return to_rgb(source, name=name)
    if is_url(source):
        return _load_url(source, timeout)
    if isinstance(source, (bytes, bytearray)):
        source, name = io.BytesIO(source), name or "image bytes"
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"Image file not found: {path}")
        source, name = path, name or str(path)
    name = name or "image"
    try:
        with Image.open(source) as image:
            image.load()
            return to_rgb(image, name=name)
    except ImageModeError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"Cannot read image file {name}: {err}") from err


def to_model(inputs: Any, model: Any) -> Any:
    """A processor's output (a `BatchFeature`) on `model`'s device with `pixel_values` in the model's dtype: the
    processor makes float32 pixels, a bf16 model needs bf16 ones, while token ids and masks stay integer."""
    parameter = next(model.parameters())
    inputs = inputs.to(parameter.device)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(parameter.dtype)
    return inputs


def distinct_objects(items: Sequence[Any]) -> tuple[list[int], list[int]]:
    """`(firsts, index)`: the position of each distinct object's first occurrence (by identity, in order) and, for
    every item, which distinct object it is: `items[i] is items[firsts[index[i]]]`. Batched evaluation passes one
    image object per question, shared by the questions about one image, so each can be processed once."""
    seen: dict[int, int] = {}
    firsts, index = [], []
    for position, item in enumerate(items):
        if id(item) not in seen:
            seen[id(item)] = len(firsts)
            firsts.append(position)
        index.append(seen[id(item)])
    return firsts, index


def _load_url(url: str, timeout: float) -> Image.Image:
    from huggingface_hub.utils import httpx  # the HTTP client (and call) of `transformers.image_utils.load_image`

    try:
        response = httpx.get(url, timeout=timeout, follow_redirects=True)
        response.raise_for_status()
    except httpx.HTTPError as err:
        raise ValueError(f"Cannot fetch image {url}: {err}") from err
    return load_image(response.content, name=url)


def to_rgb(image: Image.Image, name: Optional[str] = None) -> Image.Image:
    """RGB copy of a PIL image of any mode, by the module's rule; a mode that cannot keep its contrast is refused
    with a `ValueError` naming the mode (and `name`)."""
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    if mode in ALPHA_MODES or "transparency" in image.info:
        if mode == "La":
            image = image.convert("LA")
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode in SIXTEEN_BIT_MODES or mode in ("I", "F"):
        return _gray_to_rgb(image, name)
    try:
        return image.convert("RGB")
    except ValueError as err:
        where = f"image {name} " if name else "image "
        raise ImageModeError(f"Cannot read {where}of mode {mode!r}: Pillow cannot convert it to RGB ({err})") from err


def _gray_to_rgb(image: Image.Image, name: Optional[str]) -> Image.Image:
    """16-bit, 32-bit integer and float grayscale to 8 bits by the module's rule."""
    values = np.asarray(image).astype(np.float64)
    where = f"image {name} " if name else "image "
    if not np.isfinite(values).all():
        raise ImageModeError(f"Cannot read {where}of mode {image.mode!r}: it holds NaN or infinite values")
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if image.mode in SIXTEEN_BIT_MODES:
        scale = 255 / 65535
        if low < 0:  # the signed 16-bit variants
            raise ImageModeError(f"Cannot read {where}of mode {image.mode!r}: negative values ({low:g}) have no "
                             f"brightness")
    elif low < 0:
        raise ImageModeError(f"Cannot read {where}of mode {image.mode!r}: negative values ({low:g}) have no brightness")
    elif image.mode == "F" and high <= 1:
        scale = 255.0
    elif high <= 255:
        scale = 1.0
    elif image.mode == "I" and high <= 65535:
        scale = 255 / 65535
    else:
        raise ImageModeError(f"Cannot read {where}of mode {image.mode!r}: values up to {high:g} are outside the ranges "
                         f"it can be read in ([0, 255] or [0, 65535] for 'I', [0, 1] or [0, 255] for 'F')")
    gray = np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)
    return Image.fromarray(gray).convert("RGB")


__all__ = ["ImageModeError", "ImageSource", "distinct_objects", "is_url", "load_image", "to_model", "to_rgb"]
