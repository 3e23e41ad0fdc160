"""One image loader for every path (training, evaluation, chat, encoder pretraining, diagnostics), and its rule for
modes: transparency onto white, 16-bit and float scaled to 8 bits, anything else converted or refused by name; the
image processor's ImageNet normalisation."""

import numpy as np
import pytest
import torch
from PIL import Image

from defocus_mllm.encoder.image_processing import DefocusImageProcessor, load_image, to_rgb

# A 16-bit image with a dark left half (1000 of 65535) and a bright right half (60000 of 65535): scaled to 8 bits
# the halves are round(1000 * 255 / 65535) = 4 and round(60000 * 255 / 65535) = 233.
DARK16, BRIGHT16 = 1000, 60000
DARK8, BRIGHT8 = 4, 233
# The release's (and LLaVA-1.5's CLIP-free) ImageNet normalisation (timm's IMAGENET_DEFAULT_MEAN / STD), written out
# rather than read off the processor.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _sixteen_bit_png(path):
    array = np.full((32, 32), DARK16, dtype=np.uint16)
    array[:, 16:] = BRIGHT16
    Image.fromarray(array).save(path)
    with Image.open(path) as image:
        assert image.mode == "I;16"  # what Pillow opens a 16-bit grayscale PNG as
    return path


def _transparent_png(path):
    # fully transparent pixels whose stored colour is black: a viewer shows white
    Image.new("RGBA", (32, 32), (0, 0, 0, 0)).save(path)
    return path


def _processor():
    return DefocusImageProcessor(crop_size={"height": 32, "width": 32}, patch_size=8)


def _via_training(path):
    from defocus_mllm.data.conversations import Conversation
    from defocus_mllm.data.supervised import SupervisedDataset
    from defocus_mllm.training.tiny_lm import train_tokenizer
    from defocus_mllm.llava import prepare_tokenizer

    seen = []

    class Recorder:
        def __call__(self, images, return_tensors):
            seen.extend(images)
            return {"pixel_values": torch.zeros(len(images), 3, 8, 8)}

    tokenizer = prepare_tokenizer(train_tokenizer(["what is it?", "grey", "USER: ASSISTANT:"], vocab_size=120))
    conv = Conversation("s0", [path], [{"role": "user", "content": "<image>\nwhat is it?"},
                                       {"role": "assistant", "content": "grey"}])
    dataset = SupervisedDataset([conv], tokenizer, Recorder(), tokenizer.convert_tokens_to_ids("<image>"), 2,
                                show_progress=False)
    dataset[0]
    return seen[0]


def _via_evaluation(path):
    from defocus_mllm.evaluation.sources import PathImage

    return PathImage(path).load()


def _via_evaluation_bytes(path):
    from defocus_mllm.evaluation.sources import BytesImage

    return BytesImage(path.read_bytes()).load()


def _via_encoder_pretraining(path):
    from defocus_mllm.data.image_classification import ImageListDataset

    return ImageListDataset([(path, 0)], transform=lambda image: image, classes=["a"])[0]["pixel_values"]


def _via_encoder_pretraining_hf_dataset(path):
    """A Hugging Face image-classification dataset hands PIL images of the file's own mode to the transform."""
    from defocus_mllm.data.augment import ImageClassificationTransform
    from defocus_mllm.data.image_classification import HFImageClassificationDataset

    class Rows(list):
        column_names = ["image", "label"]
        features = None

    seen = []
    with Image.open(path) as image:
        image.load()
        dataset = HFImageClassificationDataset(Rows([{"image": image, "label": 0}]), seen.append)
        dataset[0]
    tensor = ImageClassificationTransform(size=32, train=False, mean=(0, 0, 0), std=(1, 1, 1), crop_pct=1.0)(seen[0])
    return Image.fromarray(np.rint(tensor.permute(1, 2, 0).numpy() * 255).astype(np.uint8))


def _via_chat_processor(path):
    """What `chat` feeds the encoder: the processor's pixels, un-normalised with the ImageNet constants."""
    with Image.open(path) as image:
        image.load()
        pixels = _processor()(images=[image], return_tensors="pt")["pixel_values"][0]
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    raw = (pixels * std + mean).clamp(0, 1)
    return Image.fromarray(np.rint(raw.permute(1, 2, 0).numpy() * 255).astype(np.uint8))


def _via_chat_path(path):
    return _processor().fetch_images(str(path))


class _Stopped(Exception):
    pass


PATHS = {"training": _via_training, "evaluation": _via_evaluation, "evaluation bytes": _via_evaluation_bytes,
         "encoder pretraining": _via_encoder_pretraining,
         "encoder pretraining (HF dataset)": _via_encoder_pretraining_hf_dataset,
         "chat processor": _via_chat_processor, "chat path": _via_chat_path}


@pytest.mark.parametrize("path_name", sorted(PATHS))
def test_sixteen_bit_png_keeps_its_contrast_on_every_path(path_name, tmp_path):
    image = PATHS[path_name](_sixteen_bit_png(tmp_path / "gray16.png"))
    array = np.asarray(image)
    assert image.mode == "RGB" and array.shape[-1] == 3
    height, width = array.shape[:2]
    left, right = array[height // 2, width // 4], array[height // 2, 3 * width // 4]
    assert np.abs(left.astype(int) - DARK8).max() <= 1 and np.abs(right.astype(int) - BRIGHT8).max() <= 1, (left, right)


@pytest.mark.parametrize("path_name", sorted(PATHS))
def test_transparent_pixels_are_white_on_every_path(path_name, tmp_path):
    image = PATHS[path_name](_transparent_png(tmp_path / "clear.png"))
    assert np.abs(np.asarray(image).astype(int) - 255).max() <= 1


def test_diagnostics_read_images_with_the_same_loader(tmp_path, monkeypatch):
    from defocus_mllm.encoder import diagnostics
    from defocus_mllm.encoder.diagnostics import cli

    seen = []
    monkeypatch.setattr(cli, "load_diagnostic_model", lambda *a, **k: (_ for _ in ()).throw(_Stopped()))
    import defocus_mllm.images as images

    real = images.load_image
    monkeypatch.setattr(images, "load_image", lambda source, *a, **k: seen.append(real(source)) or seen[-1])
    with pytest.raises(_Stopped):
        diagnostics.diagnose(["mamba-tiny"], _sixteen_bit_png(tmp_path / "gray16.png"), figures=False)
    assert len(seen) == 1 and np.asarray(seen[0])[16, 24, 0] == BRIGHT8


def test_one_loader_serves_every_path():
    import defocus_mllm.images as images
    from defocus_mllm.data import image_classification, supervised
    from defocus_mllm.encoder import image_processing
    from defocus_mllm import llava

    for module in (image_processing, supervised, llava):
        # a module that converts PIL images itself converts them with the one rule (llava and supervised leave that
        # to load_image, which takes a PIL image or a path)
        assert module.load_image is images.load_image, module.__name__
        assert getattr(module, "to_rgb", images.to_rgb) is images.to_rgb, module.__name__
    assert image_classification.load_rgb_image is images.load_image


def _mode_image(mode: str) -> Image.Image:
    """A 2x1 image of `mode` with a dark and a bright pixel, in the mode's own value range."""
    if mode.startswith("I;16"):
        order = {"I;16B": ">", "I;16": "<", "I;16L": "<", "I;16N": "="}[mode]
        return Image.frombytes(mode, (2, 1), np.array([5000, 60000], dtype=f"{order}u2").tobytes())
    if mode == "I":
        return Image.fromarray(np.array([[5000, 60000]], dtype=np.int32))
    if mode == "F":
        return Image.fromarray(np.array([[0.1, 0.9]], dtype=np.float32))
    if mode == "LAB":
        return Image.frombytes("LAB", (2, 1), bytes([20, 0, 0, 230, 0, 0]))  # a*, b* are signed bytes: 0 is grey
    rgb = Image.fromarray(np.array([[[20, 20, 20], [230, 230, 230]]], dtype=np.uint8))
    if mode in ("PA", "La", "RGBa"):
        return rgb.convert({"PA": "P", "La": "L", "RGBa": "RGB"}[mode]).convert({"PA": "PA", "La": "LA",
                                                                                  "RGBa": "RGBA"}[mode]).convert(mode)
    return rgb.convert(mode)


@pytest.mark.parametrize("mode", sorted(Image.MODES))
def test_every_mode_pillow_opens_keeps_its_contrast_or_is_refused_by_name(mode):
    try:
        image = _mode_image(mode)
    except ValueError:
        pytest.skip(f"Pillow cannot build a {mode} image here")
    try:
        rgb = to_rgb(image)
    except ValueError as err:
        assert repr(mode) in str(err)
        return
    array = np.asarray(rgb).astype(int)
    assert rgb.mode == "RGB" and array.shape == (1, 2, 3)
    assert array[0, 1].mean() - array[0, 0].mean() > 100, (mode, array.tolist())


@pytest.mark.parametrize("values, dtype", [([0, 70000], np.int32), ([-5, 200], np.int32), ([0.0, np.nan], np.float32),
                                           ([0.0, 1e6], np.float32)])
def test_values_without_a_brightness_are_refused(values, dtype):
    image = Image.fromarray(np.array([values], dtype=dtype))
    with pytest.raises(ValueError, match=f"mode {image.mode!r}"):
        to_rgb(image)


def test_a_file_that_is_not_an_image_is_named(tmp_path):
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ValueError, match="notes.png"):
        load_image(tmp_path / "notes.png")
    with pytest.raises(FileNotFoundError, match="gone.png"):
        load_image(tmp_path / "gone.png")


# ------------------------------------------------------------------ issue 24: extreme aspect ratios


def _striped(width: int, height: int) -> Image.Image:
    """A smooth picture of any shape (bilinear blow-up of a small random one)."""
    small = np.random.default_rng(0).random((max(2, height // 8), max(2, width // 8), 3))
    return Image.fromarray((small * 255).astype(np.uint8)).resize((width, height), Image.BILINEAR)


def _saved_processor(tmp_path, do_pad: bool) -> DefocusImageProcessor:
    """The image processor as training builds it (`image_aspect_ratio`), then as evaluation and chat load it."""
    from transformers import AutoProcessor

    from helpers import build_tiny_llava

    _, processor = build_tiny_llava()
    processor.image_processor.set_image_size(224)  # the crop path's short side is then 256, as in the release
    processor.image_processor.do_pad = do_pad
    processor.save_pretrained(tmp_path / "model")
    loaded = AutoProcessor.from_pretrained(tmp_path / "model").image_processor
    assert type(loaded) is DefocusImageProcessor and loaded.do_pad is do_pad
    return loaded


@pytest.mark.parametrize("do_pad", [True, False], ids=["pad", "crop"])
@pytest.mark.parametrize("size", [(6000, 16), (16, 6000)], ids=["wide", "tall"])
def test_an_extreme_aspect_ratio_never_builds_an_image_past_the_budget(do_pad, size, tmp_path, monkeypatch):
    from defocus_mllm.encoder import image_processing

    processor = _saved_processor(tmp_path, do_pad)
    built = []
    for name in ("pad_to_square", "resize"):
        original = getattr(DefocusImageProcessor, name)

        def spy(self, image, *args, _original=original, **kwargs):
            out = _original(self, image, *args, **kwargs)
            built.append(out.shape[-1] * out.shape[-2])
            return out

        monkeypatch.setattr(DefocusImageProcessor, name, spy)
    pixels = processor(_striped(*size), return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 224, 224) and torch.isfinite(pixels).all()
    # a 6000 x 16 image of a few kilobytes: padded first it would be a 6000 x 6000 canvas (36M pixels), resized
    # first to a short side of 256 a 96000 x 256 image (24.6M pixels)
    assert built and max(built) <= image_processing.MAX_INTERMEDIATE_PIXELS == 4096 * 4096


@pytest.mark.parametrize("do_pad", [True, False], ids=["pad", "crop"])
def test_the_bounded_image_is_what_the_unbounded_rule_gives(do_pad, tmp_path, monkeypatch):
    from defocus_mllm.encoder import image_processing

    processor = _saved_processor(tmp_path, do_pad)
    # just past the budget either way: a 4200^2 canvas, or a 256 x 76800 resize
    extreme, ordinary = _striped(4200 if do_pad else 12000, 40), _striped(640, 480)
    bounded = [processor(image, return_tensors="pt")["pixel_values"] for image in (extreme, ordinary)]
    monkeypatch.setattr(image_processing, "MAX_INTERMEDIATE_PIXELS", 10 ** 12)
    unbounded = [processor(image, return_tensors="pt")["pixel_values"] for image in (extreme, ordinary)]
    if do_pad:  # resizing before padding differs only by the filter's blur across the image's edge
        assert (bounded[0] - unbounded[0]).abs().mean() < 0.01
    else:  # the centre crop lies far inside what the first crop keeps
        torch.testing.assert_close(bounded[0], unbounded[0], rtol=0, atol=1e-6)
    # ordinary shapes are within the budget: processed exactly as before (LLaVA-1.5's pad, the release's crop)
    torch.testing.assert_close(bounded[1], unbounded[1], rtol=0, atol=0)


def test_to_model_moves_inputs_and_casts_only_the_pixels():
    from transformers import BatchFeature

    from defocus_mllm.images import to_model

    model = torch.nn.Linear(2, 2).to(torch.bfloat16)
    inputs = BatchFeature({"input_ids": torch.tensor([[1, 2]]), "pixel_values": torch.zeros(1, 3, 4, 4)})
    out = to_model(inputs, model)
    assert out["pixel_values"].dtype == torch.bfloat16 and out["input_ids"].dtype == torch.int64
    assert to_model(BatchFeature({"input_ids": torch.tensor([[1]])}), model)["input_ids"].dtype == torch.int64


def test_the_image_processor_normalises_with_the_imagenet_mean_and_std():
    from defocus_mllm import DefocusImageProcessor
    from defocus_mllm.data.augment import ImageClassificationTransform

    colour = (255, 0, 128)
    expected = torch.tensor([(c / 255 - m) / s for c, m, s in zip(colour, IMAGENET_MEAN, IMAGENET_STD)])
    # = (2.2489, -2.0357, 0.4265): a solid image stays solid through resizing and cropping
    image = Image.new("RGB", (48, 40), colour)
    for do_pad in (False, True):
        processor = DefocusImageProcessor(crop_size={"height": 32, "width": 32}, patch_size=8, do_pad=do_pad)
        pixels = processor(images=[image], return_tensors="pt")["pixel_values"][0]
        torch.testing.assert_close(pixels[:, 16, 16], expected, atol=2e-3, rtol=0)
    torch.testing.assert_close(ImageClassificationTransform(32, train=False)(image)[:, 16, 16], expected,
                               atol=2e-3, rtol=0)


@pytest.mark.parametrize("return_tensors", ["pt", "np", None])
def test_an_image_passed_several_times_in_one_call_is_preprocessed_once(monkeypatch, return_tensors):
    """Batched evaluation passes one image object per question; the pixels are those of one call per image, in
    the order asked, and each distinct object is converted once."""
    rng = np.random.default_rng(0)
    first, second = (Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)) for _ in range(2))
    processor = _processor()
    alone = {id(im): np.asarray(processor([im], return_tensors="np")["pixel_values"][0]) for im in (first, second)}
    converted = []
    original = DefocusImageProcessor.process_image
    monkeypatch.setattr(DefocusImageProcessor, "process_image",
                        lambda self, image, *a, **k: converted.append(image) or original(self, image, *a, **k))
    asked = [first, first, second, first, second]
    pixels = processor(asked, return_tensors=return_tensors)["pixel_values"]
    assert len(pixels) == len(asked)
    assert [id(im) for im in converted] == [id(first), id(second)]
    for image, got in zip(asked, pixels):
        np.testing.assert_array_equal(np.asarray(got), alone[id(image)])
