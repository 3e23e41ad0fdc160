"""`LlavaTrainer.compute_loss`: the loss on reply tokens only equals the stock causal-LM loss, in value and in every
gradient, while the LM head sees only the positions that predict a label and the prompt every row shares (the system
message) runs once."""

import pytest
import torch
from PIL import Image

from defocus_mllm.data.conversations import Conversation
from defocus_mllm.data.supervised import IGNORE_INDEX, SupervisedDataset
from defocus_mllm.prompts import LLAVA_V1_SYSTEM
from defocus_mllm.training import LlavaTrainer, LlavaTrainingArguments
from helpers import build_tiny_llava

CONVERSATIONS = [
    [("what color is the shape?", "red"), ("is there a circle?", "yes")],
    [("what shape is in the image?", "triangle")],
    [("is there a blue shape?", "no"), ("what color is the shape?", "green"), ("what shape?", "circle")],
]


def _batch(processor, with_images: bool = True):
    convs = []
    for i, turns in enumerate(CONVERSATIONS):
        messages = []
        for j, (question, answer) in enumerate(turns):
            text = f"<image>\n{question}" if with_images and j == 0 else question
            messages += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]
        image = Image.new("RGB", (32, 32), (40 * i, 200 - 50 * i, 90))
        convs.append(Conversation(id=str(i), images=[image] if with_images else [], messages=messages))
    tokenizer, size = processor.tokenizer, processor.image_processor.crop_size
    image_tokens = (size["height"] // processor.patch_size) * (size["width"] // processor.patch_size) + \
        processor.num_additional_image_tokens
    dataset = SupervisedDataset(convs, tokenizer, processor.image_processor,
                                tokenizer.convert_tokens_to_ids("<image>"), image_tokens, show_progress=False)
    return dataset.collator()([dataset[i] for i in range(len(dataset))])


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model, processor = build_tiny_llava()
    with torch.no_grad():  # large weights, so that a wrong position or a dropped row moves the loss visibly
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    return model.train(), processor


def _trainer(model, tmp_path):
    return LlavaTrainer(model=model, args=LlavaTrainingArguments(output_dir=str(tmp_path), use_cpu=True,
                                                                 report_to="none"))


def _loss_and_grads(loss_fn, model):
    model.zero_grad()
    loss = loss_fn()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("with_images", [True, False])
@pytest.mark.parametrize("num_items", [None, 7])
def test_the_reply_token_loss_is_the_stock_loss_with_the_same_gradients(tiny, tmp_path, with_images, num_items):
    model, processor = tiny
    batch = _batch(processor, with_images)
    assert batch["labels"].ne(IGNORE_INDEX).float().mean() < 0.5  # most positions predict nothing
    trainer = _trainer(model, tmp_path)
    items = None if num_items is None else torch.tensor(num_items)

    def stock():
        outputs = model(**batch, **({} if items is None else {"num_items_in_batch": items}))
        return outputs.loss

    expected, expected_grads = _loss_and_grads(stock, model)
    got, grads = _loss_and_grads(lambda: trainer.compute_loss(model, dict(batch), num_items_in_batch=items), model)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert grads.keys() == expected_grads.keys() and len(grads) > 0
    for name, grad in grads.items():  # float rounding only: within 1e-5 of the gradient's scale
        scale = expected_grads[name].abs().max().item()
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-4, atol=1e-5 * scale,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_the_lm_head_sees_only_the_positions_that_predict_a_label(tiny, tmp_path):
    model, processor = tiny
    batch = _batch(processor)
    seen = []
    handle = model.lm_head.register_forward_hook(lambda module, args, out: seen.append(tuple(args[0].shape)))
    try:
        _trainer(model, tmp_path).compute_loss(model, dict(batch))
    finally:
        handle.remove()
    labels = batch["labels"][:, 1:].ne(IGNORE_INDEX).sum().item()
    hidden = model.config.text_config.hidden_size
    assert seen == [(1, 1, hidden), (labels, hidden)]  # the shared prompt's one row, then the label positions
    assert not model.lm_head._forward_pre_hooks  # the cut lasts one forward


def test_outputs_asked_for_keep_every_position(tiny, tmp_path):
    model, processor = tiny
    batch = _batch(processor)
    loss, outputs = _trainer(model, tmp_path).compute_loss(model, dict(batch), return_outputs=True)
    assert outputs.logits.shape[:2] == batch["input_ids"].shape
    torch.testing.assert_close(loss, model(**batch).loss)


def test_the_shared_prompt_runs_once_for_one_row(tiny, tmp_path):
    model, processor = tiny
    batch = _batch(processor)
    trainer = _trainer(model, tmp_path)
    targets = torch.nn.functional.pad(batch["labels"], (0, 1), value=IGNORE_INDEX)[:, 1:]
    prefix = trainer.shared_prefix_length(model, batch, targets)
    system = processor.tokenizer(LLAVA_V1_SYSTEM, add_special_tokens=False)["input_ids"]
    assert prefix > len(system)  # <s>, the system message and what follows it up to the first image token
    assert (batch["input_ids"][:, :prefix] == batch["input_ids"][:1, :prefix]).all()
    seen = []
    layer = model.model.language_model.layers[0]
    handle = layer.register_forward_hook(lambda module, args, out: seen.append(tuple(args[0].shape[:2])))
    try:
        trainer.compute_loss(model, dict(batch))
    finally:
        handle.remove()
    assert seen == [(1, prefix), (batch["input_ids"].shape[0], batch["input_ids"].shape[1] - prefix)]


def test_no_prefix_is_shared_when_rows_differ_or_a_cache_cannot_be_kept(tiny, tmp_path):
    model, processor = tiny
    batch = _batch(processor)
    targets = torch.nn.functional.pad(batch["labels"], (0, 1), value=IGNORE_INDEX)[:, 1:]
    differing = dict(batch, input_ids=batch["input_ids"].clone())
    differing["input_ids"][1, 1] = processor.tokenizer.convert_tokens_to_ids("<pad>")
    assert _trainer(model, tmp_path).shared_prefix_length(model, differing, targets) == 0
    old = not hasattr(model, "activation_checkpointing_enable")  # the transformers 5.x renaming
    (model.gradient_checkpointing_enable if old else model.activation_checkpointing_enable)()
    try:  # recomputed layers keep no cache
        assert _trainer(model, tmp_path).shared_prefix_length(model, batch, targets) == 0
    finally:
        (model.gradient_checkpointing_disable if old else model.activation_checkpointing_disable)()
    assert _trainer(model, tmp_path).shared_prefix_length(model, batch, targets) > 0
