"""`--skip_bad_samples true` does what the README says: every kind of bad sample (malformed JSON line, unknown speaker,
unreadable image found while training, in the main process or in dataloader workers) is skipped and listed exactly
once; a batch of bad samples only is skipped; image paths that leave the image folder are refused unless allowed."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from defocus_mllm.data.conversations import BadSampleError, load_llava_json
from defocus_mllm.data.supervised import IGNORE_INDEX, SupervisedCollator, SupervisedDataset
from defocus_mllm.llava import prepare_tokenizer
from defocus_mllm.training.tiny_lm import train_tokenizer
from helpers import TINY_RECIPE_ARGS as TINY, load_script

ROOT = Path(__file__).resolve().parents[1]
GOOD_TURNS = [{"from": "human", "value": "<image>\nwhat color is the shape?"}, {"from": "gpt", "value": "blue"}]


@pytest.fixture(scope="module")
def tokenizer():
    return prepare_tokenizer(train_tokenizer(["what color is the shape?", "blue", "USER: ASSISTANT:"], vocab_size=150))


class _Processor:
    def __call__(self, images, return_tensors):
        return {"pixel_values": torch.stack([torch.tensor(np.asarray(im.resize((8, 8))), dtype=torch.float32)
                                             .permute(2, 0, 1) for im in images])}


def _dataset(convs, tokenizer, **kw):
    return SupervisedDataset(convs, tokenizer, _Processor(), tokenizer.convert_tokens_to_ids("<image>"), 3,
                             show_progress=False, **kw)


def _images(folder: Path, good=("ok.png",), corrupt=()) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in good:
        Image.new("RGB", (16, 16), (0, 0, 200)).save(folder / name)
    for name in corrupt:
        (folder / name).write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    return folder


def _record(i, image="ok.png", turns=GOOD_TURNS):
    return {"id": f"s{i}", "image": image, "conversations": turns}


def _jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def test_malformed_lines_and_unknown_speakers_are_skipped_and_listed(tokenizer, tmp_path):
    folder = _images(tmp_path / "images")
    data = _jsonl(tmp_path / "data.jsonl", [_record(0), '{"id": "s1", "conversations": [', _record(2),
                                            _record(3, turns=[{"from": "bot", "value": "<image>\nhi"},
                                                              {"from": "gpt", "value": "blue"}])])
    with pytest.raises(BadSampleError, match=r"data\.jsonl:2: malformed JSON line"):
        _dataset(load_llava_json(data, folder), tokenizer)
    dataset = _dataset(load_llava_json(data, folder, skip_bad_samples=True), tokenizer, skip_bad_samples=True)
    assert len(dataset) == 2 and len(dataset.skipped) == 2
    assert "data.jsonl:2: malformed JSON line" in dataset.skipped[0]
    assert "data.jsonl:4 (sample 's3'): turn 0 has unknown speaker 'bot'" in dataset.skipped[1]


def test_hf_rows_with_an_unknown_role_are_skipped_and_listed(tokenizer):
    from defocus_mllm.data.conversations import load_hf_messages

    class Rows(list):
        column_names = ["messages"]

    rows = Rows([{"messages": [{"role": "user", "content": "what color is the shape?"},
                               {"role": "assistant", "content": "blue"}]},
                 {"messages": [{"role": "narrator", "content": "hi"}, {"role": "assistant", "content": "blue"}]}])
    with pytest.raises(BadSampleError, match=r"chat\[1\]: message 0 needs a role"):
        load_hf_messages(rows, name="chat")
    dataset = _dataset(load_hf_messages(rows, name="chat", skip_bad_samples=True), tokenizer, skip_bad_samples=True)
    assert len(dataset) == 1 and dataset.skipped == ["chat[1]: message 0 needs a role of user/assistant/system"]


@pytest.mark.parametrize("name, why", [("/etc/hostname", "absolute"), ("../secret.png", "outside"),
                                       ("sub/../../secret.png", "outside")])
def test_image_paths_leaving_the_image_folder_are_refused_unless_allowed(name, why, tmp_path):
    folder = _images(tmp_path / "images")
    data = tmp_path / "data.json"
    data.write_text(json.dumps([_record(0, image=name), _record(1, image="sub/../ok.png")]))
    with pytest.raises(BadSampleError, match=rf"data\.json\[0\] \(sample 's0'\): image path {name!r} .*{why}"):
        load_llava_json(data, folder)
    convs = load_llava_json(data, folder, skip_bad_samples=True)
    assert convs[0].meta["error"] and convs[1].images == [folder / "sub/../ok.png"]
    allowed = load_llava_json(data, folder, allow_images_outside_folder=True)
    assert allowed[0].images == [Path(name) if name.startswith("/") else folder / name]


def test_an_unreadable_image_is_listed_once_however_often_it_is_read(tokenizer, tmp_path):
    folder = _images(tmp_path / "images", corrupt=("bad.png",))
    data = tmp_path / "data.json"
    data.write_text(json.dumps([_record(0, image="bad.png"), _record(1)]))
    dataset = _dataset(load_llava_json(data, folder), tokenizer, skip_bad_samples=True)
    collate = dataset.collator()
    for _epoch in range(3):
        batch = collate([dataset[0], dataset[1]])
        assert batch["input_ids"].shape[0] == 1
    assert len(dataset.skipped) == 1 and "sample 's0'" in dataset.skipped[0]


def test_a_batch_of_bad_samples_only_is_skipped_by_the_trainer(tokenizer, tmp_path):
    from defocus_mllm.training import LlavaTrainer, LlavaTrainingArguments
    from helpers import build_tiny_llava

    collate = SupervisedCollator(pad_token_id=0)
    batch = collate([None, None])
    assert batch["labels"].eq(IGNORE_INDEX).all()  # nothing to learn from
    model, _ = build_tiny_llava()
    trainer = LlavaTrainer(model=model, args=LlavaTrainingArguments(output_dir=str(tmp_path), use_cpu=True,
                                                                    report_to="none"))
    loss = trainer.compute_loss(model, dict(batch))
    assert loss.item() == 0.0 and loss.requires_grad  # a zero step that every process can take together
    loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


def test_recipe_lists_skips_from_dataloader_workers_once_and_survives_an_all_bad_batch(tmp_path):
    """4 unreadable images first (sequential order, batch 4: the first batch is all bad), 4 good samples, a malformed
    line and an unknown speaker; 2 epochs on 2 dataloader workers."""
    folder = _images(tmp_path / "images", corrupt=[f"bad{i}.png" for i in range(4)])
    lines = [_record(i, image=f"bad{i}.png") for i in range(4)] + [_record(4 + i) for i in range(4)]
    lines += ["{not json", _record(9, turns=[{"from": "robot", "value": "<image>\nhi"}, GOOD_TURNS[1]])]
    data = _jsonl(tmp_path / "data.jsonl", lines)
    out = tmp_path / "out"
    recipe = load_script(ROOT / "recipes" / "finetune.py", "recipe_finetune_bad_samples")
    metrics = recipe.main([*TINY, "--data_path", str(data), "--image_folder", str(folder), "--output_dir", str(out),
                           "--skip_bad_samples", "true", "--dataloader_num_workers", "2", "--num_train_epochs", "2",
                           "--per_device_train_batch_size", "4", "--train_sampling_strategy", "sequential",
                           "--dataloader_persistent_workers", "false"])
    listed = (out / "skipped_samples.txt").read_text().splitlines()
    assert metrics["skipped_samples"] == 6 and len(listed) == 6 and len(set(listed)) == 6
    for i in range(4):
        assert sum(f"(sample 's{i}')" in line for line in listed) == 1
    assert any("data.jsonl:9: malformed JSON line" in line for line in listed)
    assert any("unknown speaker 'robot'" in line for line in listed)
