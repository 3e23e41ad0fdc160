"""Image processor of the De-focus encoder: the release's evaluation transform on the PIL backend (no torchvision).

Resize the short side to `int(256 / 224 * crop)` (bicubic), centre-crop `crop`, scale to [0, 1] and normalise with
the ImageNet mean / std (docs/method.md §6.4). `do_pad=True` first pads the image to a square with the mean colour, as LLaVA-1.5
does, so that nothing is cropped away. No intermediate image (pad canvas or resized image) exceeds
`MAX_INTERMEDIATE_PIXELS`: an extreme aspect ratio is reduced first (`DefocusImageProcessor._within_budget`). The processor also rejects what the encoder cannot see: an image smaller than
one patch, and unreadable image files (named in the error). Files, URLs and PIL images of any mode are read by
`defocus_mllm.images` (transparency onto white, 16-bit and float images scaled to 8 bits), as on every other path.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import numpy as np
from PIL import Image
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, PILImageResampling, SizeDict
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

from ..images import distinct_objects, load_image, to_rgb

# The release evaluates at 224 after resizing the short side to 256.
RESIZE_RATIO = 256 / 224

# The largest intermediate image the processor builds (the square pad canvas, or the image after the short-side
# resize): 4096 x 4096 pixels, 48 MiB as 8-bit RGB. Past it an image is first reduced (`_within_budget`), so that a
# 20000 x 16 image of a few kilobytes costs what a small one costs, instead of a 20000 x 20000 canvas.
MAX_INTERMEDIATE_PIXELS = 4096 * 4096


class DefocusImageProcessor(LlavaImageProcessorPil):
    r"""
    Constructs a De-focus image processor (PIL backend).

    Args:
        crop_size (`dict`, *optional*, defaults to `{"height": 224, "width": 224}`): the encoder's input size.
        size (`dict`, *optional*): short-side resize target; defaults to `int(256 / 224 * crop)`.
        do_pad (`bool`, *optional*, defaults to `False`): pad to a square with the mean colour before resizing
            (LLaVA-1.5's "pad" aspect-ratio mode) instead of cropping the long side.
        patch_size (`int`, *optional*, defaults to 16): images smaller than one patch are rejected.
    """

    resample = PILImageResampling.BICUBIC
    image_mean = IMAGENET_DEFAULT_MEAN
    image_std = IMAGENET_DEFAULT_STD
    size = {"shortest_edge": int(RESIZE_RATIO * 224)}
    crop_size = {"height": 224, "width": 224}
    patch_size = 16

    def __init__(self, patch_size: int | None = None, **kwargs: Any) -> None:
        crop = kwargs.get("crop_size")
        if crop is not None and "size" not in kwargs:
            # Keep the release's 256/224 resize ratio whatever crop the user picks.
            side = crop["height"] if isinstance(crop, dict) else int(crop)
            kwargs["size"] = {"shortest_edge": int(RESIZE_RATIO * side)}
        super().__init__(**kwargs)
        if patch_size is not None:
            self.patch_size = patch_size

    @classmethod
    def from_vision_config(cls, config: Any, **kwargs: Any) -> "DefocusImageProcessor":
        """A processor for a `DefocusVisionConfig`: crops to its `image_size`, checks against its `patch_size`."""
        size = config.image_size
        return cls(crop_size={"height": size, "width": size}, patch_size=config.patch_size, **kwargs)

    def set_image_size(self, image_size: int) -> None:
        """Change the encoder input size (the number of image tokens follows it in `LlavaProcessor`)."""
        if image_size % self.patch_size:
            raise ValueError(f"image_size={image_size} is not a multiple of the encoder's patch_size={self.patch_size}")
        self.crop_size = {"height": image_size, "width": image_size}
        self.size = {"shortest_edge": int(RESIZE_RATIO * image_size)}

    def _preprocess(self, images: list[np.ndarray], *args: Any, do_pad: Optional[bool] = None,
                    size: Optional[SizeDict] = None, crop_size: Optional[SizeDict] = None, **kwargs: Any):
        if do_pad and crop_size is not None:
            # A padded image is square already: resize it straight to the crop, cropping nothing away (LLaVA-1.5).
            size = SizeDict(shortest_edge=crop_size.height)
        if kwargs.get("do_resize", True):
            images = [self._within_budget(image, do_pad, size, crop_size, kwargs.get("resample")) for image in images]
        return super()._preprocess(images, *args, do_pad=do_pad, size=size, crop_size=crop_size, **kwargs)

    def _preprocess_image_like_inputs(self, images: Any, *args: Any, **kwargs: Any):
        # Several questions about one image pass the same object several times (batched evaluation): each distinct
        # object is converted and preprocessed once, and its pixels repeated in the output.
        if not isinstance(images, (list, tuple)) or any(isinstance(image, (list, tuple)) for image in images):
            return super()._preprocess_image_like_inputs(images, *args, **kwargs)
        firsts, index = distinct_objects(images)
        if len(firsts) == len(images):
            return super()._preprocess_image_like_inputs(images, *args, **kwargs)
        features = super()._preprocess_image_like_inputs([images[i] for i in firsts], *args, **kwargs)
        for key, value in features.items():
            if len(value) == len(firsts):
                features[key] = [value[i] for i in index] if isinstance(value, list) else value[index]
        return features

    def _within_budget(self, image: np.ndarray, do_pad: Optional[bool], size: Optional[SizeDict],
                       crop_size: Optional[SizeDict], resample: Any) -> np.ndarray:
        """The rule that keeps every intermediate image within `MAX_INTERMEDIATE_PIXELS` (training, evaluation and
        chat all go through it). Images within the budget are left alone, so LLaVA-1.5's pad-then-resize and the
        release's resize-then-crop are unchanged for them.

        * Pad: a canvas of `max(H, W)^2` pixels past the budget is never built; the image is first resized (same
          filter, aspect ratio kept, the short side rounded, at least 1 pixel) so that its long side is the crop size,
          then padded to the crop square. This is what pad-then-resize gives, up to the filter's blur at the edge.
        * Crop: an image whose short-side resize would exceed the budget is first centre-cropped along its long side to
          the length that fits; the final centre crop lies far inside it, so only the sub-pixel alignment can differ.
        """
        _, height, width = image.shape  # the backend works channels-first
        long, short = max(height, width), min(height, width)
        if do_pad:
            if crop_size is None or long * long <= MAX_INTERMEDIATE_PIXELS:
                return image
            scale = crop_size.height / long
            target = SizeDict(height=max(1, round(height * scale)), width=max(1, round(width * scale)))
            return self.resize(image, size=target, resample=resample)
        edge = size.shortest_edge if size is not None else None
        if not edge or edge * edge * long <= MAX_INTERMEDIATE_PIXELS * short:
            return image
        keep = max(short, MAX_INTERMEDIATE_PIXELS * short // (edge * edge))
        keep += (long - keep) % 2  # equal margins on both sides, so the centre stays the centre
        start = (long - keep) // 2
        return image[:, start:start + keep, :] if height > width else image[:, :, start:start + keep]

    def fetch_images(self, image_url_or_urls: Any):
        # Paths and URLs go through the package's one loader (its mode rule, errors that name the file or URL).
        if isinstance(image_url_or_urls, (list, tuple)):
            return [self.fetch_images(x) for x in image_url_or_urls]
        if isinstance(image_url_or_urls, (str, os.PathLike, bytes)):
            return load_image(image_url_or_urls)
        return super().fetch_images(image_url_or_urls)

    def process_image(self, image: Any, *args: Any, **kwargs: Any) -> np.ndarray:
        if isinstance(image, Image.Image):
            if min(image.size) < self.patch_size:
                raise ValueError(f"Image of {image.size[0]}x{image.size[1]} pixels is smaller than one "
                                 f"{self.patch_size}x{self.patch_size} patch of the encoder")
            image = to_rgb(image)
        else:
            shape = np.shape(image)
            spatial = shape[:2] if len(shape) == 2 or shape[-1] in (1, 3, 4) else shape[-2:]
            if min(spatial) < self.patch_size:
                raise ValueError(f"Image of shape {tuple(shape)} is smaller than one {self.patch_size}x"
                                 f"{self.patch_size} patch of the encoder")
        return super().process_image(image, *args, **kwargs)


__all__ = ["MAX_INTERMEDIATE_PIXELS", "DefocusImageProcessor", "load_image", "to_rgb"]
