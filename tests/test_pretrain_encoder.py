"""Encoder pretraining: augmentation, image-classification data, optimizer groups, metrics, and the recipe itself
(in-process on a Hugging Face dataset; under `accelerate launch`, single process and 2-process DeepSpeed ZeRO-2)."""

import json
import os
import random
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from transformers import AutoModelForImageClassification, EvalPrediction

import defocus_mllm  # noqa: F401  (registers the Auto classes)
from defocus_mllm import DefocusForImageClassification, DefocusVisionConfig
from defocus_mllm.data.augment import (
    ImageClassificationTransform,
    MixupCutmix,
    RandAugment,
    load_augment_factory,
    one_hot_smoothed,
    random_resized_crop_box,
)
from defocus_mllm.data.image_classification import (
    HFImageClassificationDataset,
    ImageClassificationCollator,
    ImageFolderDataset,
    PreprocessedImageDataset,
    RepeatedAugmentationSampler,
)
from defocus_mllm.training.encoder_trainer import encoder_param_groups, layer_id, top_k_accuracy
from defocus_mllm.llava import build_llava
from defocus_mllm.training.tiny_lm import tiny_llama_config, train_tokenizer
from helpers import accelerate_launch_command, load_script

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "pretrain_encoder.py"
TINY_CONFIG = REPO / "recipes" / "configs" / "encoder_tiny.yaml"
SHAPES = ("circle", "square", "triangle")


def draw_shape(shape: str, rng: random.Random, size: int = 40) -> Image.Image:
    image = Image.new("RGB", (size, size), tuple(rng.randrange(256) for _ in range(3)))
    draw, color = ImageDraw.Draw(image), tuple(rng.randrange(256) for _ in range(3))
    x, y, r = rng.randint(12, size - 12), rng.randint(12, size - 12), rng.randint(7, 11)
    if shape == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=color)
    elif shape == "square":
        draw.rectangle((x - r, y - r, x + r, y + r), fill=color)
    else:
        draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=color)
    return image


@pytest.fixture(scope="module")
def shapes_folder(tmp_path_factory) -> Path:
    """`train/<shape>/*.{png,jpg}` (12 per class) and `val/<shape>/*` (4 per class): real image files."""
    root, rng = tmp_path_factory.mktemp("shapes"), random.Random(0)
    for split, count in (("train", 12), ("val", 4)):
        for shape in SHAPES:
            folder = root / split / shape
            folder.mkdir(parents=True)
            for i in range(count):
                draw_shape(shape, rng).save(folder / f"{i}.{'png' if i % 2 else 'jpg'}")
    return root


def load_recipe():
    return load_script(RECIPE, "pretrain_encoder_recipe")


# --- augmentation ---------------------------------------------------------------------------------------------------

def test_random_resized_crop_box_stays_inside_and_respects_the_ranges():
    rng = random.Random(0)
    for _ in range(200):
        left, top, right, bottom = random_resized_crop_box(50, 30, (0.2, 0.9), (3 / 4, 4 / 3), rng)
        assert 0 <= left < right <= 50 and 0 <= top < bottom <= 30
        area = (right - left) * (bottom - top) / 1500
        assert 0.15 < area < 0.95 or (right - left, bottom - top) in ((40, 30), (50, 30), (30, 30))


def test_train_and_eval_transforms_shapes_and_normalisation():
    image = Image.fromarray(np.full((48, 64, 3), 128, dtype=np.uint8))
    train = ImageClassificationTransform(32, train=True, color_jitter=0.4, random_erase=1.0, seed=0)
    assert train(image).shape == (3, 32, 32)
    evaluation = ImageClassificationTransform(32, train=False)
    out = evaluation(image)
    expected = (128 / 255 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    assert out.shape == (3, 32, 32) and torch.allclose(out[:, 10, 10], expected, atol=1e-5)
    with pytest.raises(ValueError, match="scale"):
        ImageClassificationTransform(32, train=True, scale=(0.5, 0.2))


def test_mixup_and_cutmix_targets():
    labels = torch.tensor([0, 1, 2, 1])
    smoothed = one_hot_smoothed(labels, 3, 0.1)
    assert torch.allclose(smoothed.sum(-1), torch.ones(4)) and smoothed[0, 0] == pytest.approx(0.9 + 0.1 / 3)
    x = torch.stack([torch.full((3, 8, 8), float(i)) for i in range(4)])
    mixup = MixupCutmix(3, mixup_alpha=0.8, cutmix_alpha=0.0, label_smoothing=0.0, seed=1)
    mixed, targets = mixup(x, labels)
    lam = 1 - float(mixed[0, 0, 0, 0]) / 3  # sample 0 (all zeros) mixes with the flipped batch's sample 3 (all 3s)
    assert torch.allclose(targets[0], lam * torch.eye(3)[0] + (1 - lam) * torch.eye(3)[1], atol=1e-5)
    cutmix = MixupCutmix(3, mixup_alpha=0.0, cutmix_alpha=1.0, label_smoothing=0.0, seed=2)
    for _ in range(5):
        mixed, targets = cutmix(x, labels)
        pasted = (mixed[0, 0] == 3).float().mean()  # share of sample 0's pixels taken from sample 3
        assert targets[0, 1] == pytest.approx(float(pasted), abs=1e-6)  # labels follow the pasted area exactly
        assert torch.allclose(targets.sum(-1), torch.ones(4))
    off = MixupCutmix(3, mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.0, label_smoothing=0.1)
    same, soft = off(x, labels)
    assert torch.equal(same, x) and torch.allclose(soft, smoothed)


def test_rand_augment_parses_the_release_string_and_keeps_the_image_size():
    augment = RandAugment("rand-m9-mstd0.5-inc1", seed=0)
    assert (augment.num_layers, augment.magnitude, augment.magnitude_std) == (2, 9.0, 0.5)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    outputs = [np.asarray(augment(image)) for _ in range(20)]
    assert all(o.shape == (32, 32, 3) for o in outputs)
    assert sum(not np.array_equal(o, np.asarray(image)) for o in outputs) >= 10
    with pytest.raises(ValueError, match="bad part"):
        RandAugment("rand-q3")
    factory = load_augment_factory("defocus_mllm.data.augment:rand_augment")
    assert isinstance(factory(image_size=32), RandAugment)
    with pytest.raises(ValueError, match="augment_fn"):
        load_augment_factory("defocus_mllm.data.augment:nope")


# --- data -----------------------------------------------------------------------------------------------------------

def test_image_folder_dataset(shapes_folder, tmp_path):
    tf = ImageClassificationTransform(32, train=False)
    train = ImageFolderDataset(shapes_folder / "train", tf)
    assert train.classes == list(SHAPES) and len(train) == 36
    batch = ImageClassificationCollator()([train[0], train[35]])
    assert batch["pixel_values"].shape == (2, 3, 32, 32) and batch["labels"].tolist() == [0, 2]
    val = ImageFolderDataset(shapes_folder / "val", tf, classes=train.classes)
    assert sorted(set(val.targets)) == [0, 1, 2]
    # errors name the folder or file
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ImageFolderDataset(tmp_path / "nowhere", tf)
    (tmp_path / "odd" / "hexagon").mkdir(parents=True)
    draw_shape("circle", random.Random(0)).save(tmp_path / "odd" / "hexagon" / "a.png")
    with pytest.raises(ValueError, match="hexagon"):
        ImageFolderDataset(tmp_path / "odd", tf, classes=train.classes)
    (tmp_path / "bad" / "circle").mkdir(parents=True)
    (tmp_path / "bad" / "circle" / "broken.jpg").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="broken.jpg"):
        ImageFolderDataset(tmp_path / "bad", tf)[0]


def test_preprocessed_dataset_gives_what_the_lazy_one_gives(shapes_folder, tmp_path):
    lazy = ImageFolderDataset(shapes_folder / "train", ImageClassificationTransform(32, train=False))
    once = PreprocessedImageDataset(lazy)
    assert len(once) == len(lazy) and once.classes == lazy.classes and once.targets == lazy.targets
    assert PreprocessedImageDataset.num_bytes(lazy) == 36 * 3 * 32 * 32 * 4
    for index in (0, 17, 35):
        assert torch.equal(once[index]["pixel_values"], lazy[index]["pixel_values"])
        assert once[index]["labels"] == lazy[index]["labels"]
    batch = ImageClassificationCollator()([once[0], once[35]])
    assert batch["pixel_values"].shape == (2, 3, 32, 32) and batch["labels"].tolist() == [0, 2]
    # a corrupt file is named while preprocessing, before any training step
    (tmp_path / "bad" / "circle").mkdir(parents=True)
    draw_shape("circle", random.Random(0)).save(tmp_path / "bad" / "circle" / "a.png")
    (tmp_path / "bad" / "circle" / "broken.jpg").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="broken.jpg"):
        PreprocessedImageDataset(ImageFolderDataset(tmp_path / "bad", ImageClassificationTransform(32, train=False)))


def test_hf_dataset_columns_are_checked():
    datasets = pytest.importorskip("datasets")
    images = [draw_shape("square", random.Random(i)) for i in range(2)]
    ds = datasets.Dataset.from_dict({"img": images, "y": [0, 1]}).cast_column("img", datasets.Image())
    wrapped = HFImageClassificationDataset(ds, ImageClassificationTransform(32, train=False), "img", "y")
    assert wrapped[1]["pixel_values"].shape == (3, 32, 32) and wrapped[1]["labels"] == 1
    with pytest.raises(ValueError, match="'image'"):
        HFImageClassificationDataset(ds, ImageClassificationTransform(32, train=False))


def test_repeated_augmentation_sampler():
    sampler = RepeatedAugmentationSampler(10, repeats=3, seed=0)
    indices = list(sampler)
    assert len(indices) == 10 and len(set(indices)) == 4
    assert indices[0] == indices[1] == indices[2]
    sampler.set_epoch(1)
    assert list(sampler) != indices


# --- optimizer groups and metrics -----------------------------------------------------------------------------------

def test_param_groups_weight_decay_rule_and_layer_decay():
    model = DefocusForImageClassification(DefocusVisionConfig.from_preset("mamba-tiny"))  # depth 4
    assert layer_id("defocus.patch_embed.proj.weight", 4) == 0 and layer_id("defocus.cls_token", 4) == 0
    assert layer_id("defocus.blocks.2.mixer.in_proj.weight", 4) == 3 and layer_id("head.weight", 4) == 5
    groups = encoder_param_groups(model, weight_decay=0.05, learning_rate=1e-3)
    decayed = {n for g in groups if g["weight_decay"] > 0 for n in g["names"]}
    assert "defocus.blocks.0.mixer.in_proj.weight" in decayed and "head.weight" in decayed
    for name in ("defocus.cls_token", "defocus.blocks.0.mixer.A_log", "defocus.blocks.0.mixer.D",
                 "defocus.blocks.0.mixer.freq", "defocus.blocks.0.norm.weight", "head.bias"):
        assert name not in decayed
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    layered = encoder_param_groups(model, weight_decay=0.05, learning_rate=1e-3, layer_decay=0.5)
    lr_of = {n: g["lr"] for g in layered for n in g["names"]}
    assert lr_of["head.weight"] == pytest.approx(1e-3)
    assert lr_of["defocus.blocks.3.mixer.in_proj.weight"] == pytest.approx(5e-4)
    assert lr_of["defocus.patch_embed.proj.weight"] == pytest.approx(1e-3 * 0.5 ** 5)


def test_top_k_accuracy():
    logits = np.array([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5]])
    metrics = top_k_accuracy(EvalPrediction(predictions=logits, label_ids=np.array([1, 1, 0])), ks=(1, 2))
    assert metrics == pytest.approx({"top1": 100 / 3, "top2": 200 / 3})


# --- the recipe -----------------------------------------------------------------------------------------------------

def test_recipe_trains_on_a_saved_hf_dataset_with_layer_decay(tmp_path, shapes_folder):
    datasets = pytest.importorskip("datasets")
    rng = random.Random(1)
    splits = {}
    for split, count in (("train", 8), ("validation", 2)):
        images = [draw_shape(s, rng) for s in SHAPES for _ in range(count)]
        labels = [i for i in range(3) for _ in range(count)]
        features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(SHAPES))})
        splits[split] = datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)
    datasets.DatasetDict(splits).save_to_disk(tmp_path / "hf")
    recipe = load_recipe()
    metrics = recipe.main(["--config", str(TINY_CONFIG), "--dataset_name", str(tmp_path / "hf"),
                           "--output_dir", str(tmp_path / "out"), "--num_train_epochs", "2", "--layer_decay", "0.7",
                           "--repeated_aug", "2", "--augment_fn", "defocus_mllm.data.augment:rand_augment",
                           "--disable_tqdm", "true"])
    assert {"eval_top1", "eval_top5", "train_loss"} <= set(metrics)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["id2label"] == {"0": "circle", "1": "square", "2": "triangle"}
    # the saved classifier directory is a LLaVA vision tower: its encoder weights, the head dropped
    tokenizer = train_tokenizer(["what shape is it?", "circle", "square", "triangle"], vocab_size=128)
    llava, processor = build_llava(vision_tower=tmp_path / "out", language_model=tiny_llama_config(len(tokenizer) + 1),
                                   tokenizer=tokenizer)
    classifier = AutoModelForImageClassification.from_pretrained(tmp_path / "out")
    tower = llava.model.vision_tower.state_dict()
    assert tower.keys() == classifier.defocus.state_dict().keys()
    assert all(torch.equal(tower[name], t) for name, t in classifier.defocus.state_dict().items())
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what shape is it?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(images=[draw_shape("circle", rng)], text=[prompt], return_tensors="pt")
    assert inputs["pixel_values"].shape[-1] == 32 and torch.isfinite(llava(**inputs).logits).all()
    with pytest.raises(ValueError, match="unknown argument"):
        bad = tmp_path / "bad.yaml"
        bad.write_text("learning_rat: 0.1\n")
        recipe.main(["--config", str(bad)])


def _launch(tmp_path: Path, shapes_folder: Path, output: Path, *launch_args: str) -> Path:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    cmd = [*accelerate_launch_command(*launch_args), str(RECIPE),
           "--config", str(TINY_CONFIG), "--train_dir", str(shapes_folder / "train"),
           "--validation_dir", str(shapes_folder / "val"), "--output_dir", str(output), "--num_train_epochs", "3",
           "--disable_tqdm", "true", "--use_cpu", "true"]
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return output


def _check_run(output: Path, world_size: int) -> None:
    history = json.loads((output / "trainer_state.json").read_text())["log_history"]
    per_epoch = [(e["epoch"], e["drop_path_rate"]) for e in history if "drop_path_rate" in e and "loss" not in e]
    # encoder_tiny.yaml schedules 0.05 -> 0.3 over the 3 epochs
    assert [e for e, _ in per_epoch] == [0, 1, 2]
    assert [r for _, r in per_epoch] == pytest.approx([0.05, 0.175, 0.3])
    train_logs = [e for e in history if "loss" in e]
    assert train_logs and all("drop_path_rate" in e for e in train_logs)
    steps_per_epoch = -(-36 // (16 * world_size))
    assert max(e["step"] for e in history) == 3 * steps_per_epoch  # the data were sharded across the processes
    assert any("eval_top1" in e for e in history)

    model = AutoModelForImageClassification.from_pretrained(output).eval()
    assert isinstance(model, DefocusForImageClassification) and model.config.num_labels == 3
    assert model.config.use_scheduled_drop_path and model.config.image_size == 32
    x = ImageClassificationTransform(32, train=False)(draw_shape("circle", random.Random(5))).unsqueeze(0)
    logits = model(x).logits
    assert logits.shape == (1, 3) and torch.isfinite(logits).all()


@pytest.mark.slow
def test_accelerate_launch_single_process(tmp_path, shapes_folder):
    output = _launch(tmp_path, shapes_folder, tmp_path / "single", "--num_processes", "1")
    _check_run(output, world_size=1)


@pytest.mark.slow
def test_accelerate_launch_deepspeed_zero2_two_processes(tmp_path, shapes_folder):
    # no train_batch_size: the Trainer fills the batch sizes in from its own arguments (docs/method.md §7)
    ds_config = tmp_path / "zero2.json"
    ds_config.write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto",
                                     "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
                                     "bf16": {"enabled": "auto"}}))
    output = _launch(tmp_path, shapes_folder, tmp_path / "zero2", "--num_processes", "2", "--use_deepspeed",
                     "--deepspeed_config_file", str(ds_config))
    _check_run(output, world_size=2)
