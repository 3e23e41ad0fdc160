"""Values pinned from outside the code: each test fails if its one line goes wrong (the drop-path rescale, the
per-part learning rates, the truncation rule, the ImageNet normalisation, the projector's feature layer, the
converter's `module.` prefix), where a looser "it runs / it is finite" test would pass."""

from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import TrainerCallback

from defocus_mllm.encoder.modeling_defocus import drop_path
from helpers import TINY_RECIPE_ARGS as TINY, build_tiny_llava, load_script

ROOT = Path(__file__).resolve().parents[1]


def test_drop_path_keeps_a_branch_with_probability_1_minus_rate_and_rescales_it_by_1_over_keep():
    # Stochastic depth (Huang et al. 2016; timm's `drop_path`): a kept branch is divided by keep = 1 - rate so that
    # its expectation is unchanged. rate 0.25: every value is 0 or 1 / 0.75 = 4/3.
    torch.manual_seed(0)
    out = drop_path(torch.ones(20000, 3, 2), rate=0.25, training=True)
    assert out.unique().tolist() == [0.0, pytest.approx(4 / 3)]
    per_sample = out[:, 0, 0]
    assert (out == per_sample[:, None, None]).all()  # the whole branch of a sample is kept or dropped together
    kept = (per_sample > 0).float().mean().item()
    assert kept == pytest.approx(0.75, abs=4 * (0.75 * 0.25 / 20000) ** 0.5)
    assert torch.equal(drop_path(torch.ones(4, 3), rate=0.25, training=False), torch.ones(4, 3))


class _OptimizerGroups(TrainerCallback):
    """Records, when training begins, the learning rate the optimizer gives each named parameter."""

    def __init__(self):
        self.lr: dict[str, float] = {}

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        by_id = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
        self.lr = {name: by_id[id(p)] for name, p in model.named_parameters() if id(p) in by_id}


@pytest.mark.parametrize("lora", [False, True])
def test_the_finetune_recipe_gives_the_projector_and_the_tower_their_own_learning_rates(tmp_path, lora):
    groups = _OptimizerGroups()
    recipe = load_script(ROOT / "recipes" / "finetune.py", "recipe_finetune_lr")
    extra = ["--lora_enable", "true", "--lora_r", "4", "--lora_alpha", "8"] if lora else []
    recipe.main([*TINY, "--output_dir", str(tmp_path), "--max_steps", "1", "--learning_rate", "1e-3",
                 "--projector_lr", "2e-5", "--vision_tower_lr", "3e-4", "--train_vision_tower", "true",
                 "--lr_scheduler_type", "constant", *extra], callbacks=[groups])
    parts = {"projector": [], "tower": [], "lm": []}
    for name, lr in groups.lr.items():
        part = "projector" if "multi_modal_projector" in name else "tower" if "vision_tower" in name else "lm"
        parts[part].append(lr)
    assert parts["projector"] and set(parts["projector"]) == {2e-5}
    assert parts["tower"] and set(parts["tower"]) == {3e-4}
    assert parts["lm"] and set(parts["lm"]) == {1e-3}


def test_a_sample_whose_image_would_be_cut_by_truncation_is_dropped():
    """An image must never be cut: truncating inside its placeholder block leaves the model fewer image tokens than
    the encoder produces. The image starts before the limit and ends after it, so the first image token fits and
    the last does not."""
    from defocus_mllm.data.conversations import Conversation
    from defocus_mllm.data.supervised import SupervisedDataset, tokenize_conversation
    from defocus_mllm.llava import prepare_tokenizer
    from defocus_mllm.training.tiny_lm import train_tokenizer

    tokenizer = prepare_tokenizer(train_tokenizer(["hi", "red", "what color?", "blue", "USER: ASSISTANT:"],
                                                  vocab_size=120))
    image_id, n_image = tokenizer.convert_tokens_to_ids("<image>"), 6
    straddling = Conversation("s0", [Image.new("RGB", (8, 8))], [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "red"},  # a reply before the image
        {"role": "user", "content": "<image>\nwhat color?"}, {"role": "assistant", "content": "blue"}])
    short = Conversation("s1", [], [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "red"}])
    ids = tokenize_conversation(tokenizer, straddling.messages, image_id, n_image).input_ids
    first = ids.index(image_id)
    limit = first + n_image // 2  # inside the image block
    assert ids[limit - 1] == image_id and ids[limit] == image_id
    dataset = SupervisedDataset([straddling, short], tokenizer, None, image_id, n_image, model_max_length=limit,
                                show_progress=False)
    assert dataset.dropped_too_long == 1 and dataset.truncated == 0 and len(dataset) == 1


# The release's ImageNet normalisation (timm's IMAGENET_DEFAULT_MEAN / STD), written out, not read off the code.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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


def test_the_projector_reads_the_encoder_final_layernorm_output_by_default():
    """`vision_feature_layer=-1`: the projector sees the encoder's last (LayerNorm) output, the well-scaled one."""
    from defocus_mllm.training import ModelArguments

    assert ModelArguments().vision_feature_layer == -1
    torch.manual_seed(0)
    model, processor = build_tiny_llava()
    assert model.config.vision_feature_layer == -1
    pixels = processor.image_processor(images=[Image.new("RGB", (32, 32), (10, 200, 30))],
                                       return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=pixels).pooler_output[0]
        tower = model.model.vision_tower(pixels, output_hidden_states=True)
        expected = model.model.multi_modal_projector(tower.last_hidden_state)[0]
    torch.testing.assert_close(features, expected)
    # and the last hidden state is the final LayerNorm's output: zero mean and unit variance before its affine part
    norm = model.model.vision_tower.norm
    raw = (tower.last_hidden_state - norm.bias) / norm.weight
    torch.testing.assert_close(raw.mean(-1), torch.zeros(raw.shape[:-1]), atol=1e-4, rtol=0)
    torch.testing.assert_close(raw.var(-1, unbiased=False), torch.ones(raw.shape[:-1]), atol=1e-2, rtol=0)


def test_the_converter_strips_the_module_prefix_of_ddp_checkpoints(tmp_path):
    from defocus_mllm.encoder.convert import convert_checkpoint
    from release_checkpoint import GROUP, release_state_dict

    sd = release_state_dict()
    torch.save({"model": sd}, tmp_path / "plain.pth")
    torch.save({"model": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "ddp.pth")  # saved from a DDP wrap
    plain = convert_checkpoint(tmp_path / "plain.pth", group_norm_size=GROUP).state_dict()
    ddp = convert_checkpoint(tmp_path / "ddp.pth", group_norm_size=GROUP).state_dict()
    assert plain.keys() == ddp.keys()
    assert all(torch.equal(plain[k], ddp[k]) for k in plain)
    assert torch.equal(ddp["defocus.cls_token"], sd["cls_token"])
