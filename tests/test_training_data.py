"""LLaVA training data: the three sources, assistant-only labels, image token expansion, truncation, bad samples
(`--skip_bad_samples`: every kind is skipped and listed once; image paths that leave the image folder are refused)."""

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from defocus_mllm.data.conversations import BadSampleError, Conversation, load_hf_dataset, load_llava_json
from defocus_mllm.data.easy_vqa import (
    EASY_VQA_COLORS,
    EASY_VQA_SHAPES,
    easy_vqa_color_and_shape,
    load_easy_vqa,
    load_easy_vqa_labels,
)
from defocus_mllm.data.supervised import (
    IGNORE_INDEX,
    SupervisedCollator,
    SupervisedDataset,
    assistant_char_spans_batch,
    tokenize_conversation,
    tokenize_conversations,
)
from defocus_mllm.llava import prepare_tokenizer
from defocus_mllm.prompts import LLAVA_V1_CHAT_TEMPLATE, render_llava_v1
from defocus_mllm.training.tiny_lm import train_tokenizer
from helpers import image_folder_with as _images, llava_record as _record, write_json_lines as _jsonl

NUM_IMAGE_TOKENS = 5


@pytest.fixture(scope="module")
def tokenizer():
    texts = ["what color is the shape?", "blue", "red circle", "describe the picture", "a cat on a mat",
             "USER: ASSISTANT: A chat between"]
    return prepare_tokenizer(train_tokenizer(texts, vocab_size=200))


@pytest.fixture
def image_folder(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(folder / name)
    return folder


class _Processor:
    """Stands in for the image processor: the dataset only needs `pixel_values` of a fixed shape."""

    def __call__(self, images, return_tensors):
        return {"pixel_values": torch.stack([torch.tensor(np.asarray(im.resize((8, 8))), dtype=torch.float32)
                                             .permute(2, 0, 1) for im in images])}


def _dataset(convs, tokenizer, **kw):
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    return SupervisedDataset(convs, tokenizer, _Processor(), image_id, NUM_IMAGE_TOKENS, show_progress=False, **kw)


def _llava_record(i, image="a.png", turns=None):
    turns = turns or [{"from": "human", "value": "<image>\nwhat color is the shape?"}, {"from": "gpt", "value": "blue"}]
    record = {"id": f"s{i}", "conversations": turns}
    if image is not None:
        record["image"] = image
    return record


def test_labels_cover_exactly_the_assistant_replies(tokenizer):
    messages = [{"role": "user", "content": "<image>\nwhat color is the shape?"},
                {"role": "assistant", "content": "blue"},
                {"role": "user", "content": "describe the picture"},
                {"role": "assistant", "content": "a red circle"}]
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    tokens = tokenize_conversation(tokenizer, messages, image_id, NUM_IMAGE_TOKENS)
    assert tokens.input_ids.count(image_id) == NUM_IMAGE_TOKENS
    assert len(tokens.input_ids) == len(tokens.labels)
    learned = [t for t in tokens.labels if t != IGNORE_INDEX]
    text = tokenizer.decode(learned, skip_special_tokens=False)
    assert text.replace(" ", "") == "blue</s>aredcircle</s>".replace(" ", "")
    # the replies in the labels are exactly the tokens at those positions
    for t, l in zip(tokens.input_ids, tokens.labels):
        assert l == IGNORE_INDEX or l == t


RENDER_CASES = [
    [{"role": "user", "content": "<image>\nwhat color is the shape?"}, {"role": "assistant", "content": "blue"},
     {"role": "user", "content": "describe the picture"}, {"role": "assistant", "content": "a red circle"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
     {"role": "assistant", "content": "yes"}, {"role": "user", "content": "and?"}],
    [{"role": "system", "content": [{"type": "text", "text": "Be"}, {"type": "text", "text": "brief."}]},
     {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what"}, {"type": "image"},
                                  {"type": "text", "text": "is it?"}]},
     {"role": "assistant", "content": [{"type": "text", "text": "a cat"}]},
     {"role": "user", "content": []}, {"role": "assistant", "content": ""}],
]


@pytest.mark.parametrize("messages", RENDER_CASES)
def test_the_python_llava_v1_rendering_is_the_templates(tokenizer, messages):
    # the Jinja path, forced by a template that differs only by a comment, is the reference: prefix by prefix
    jinja = copy.copy(tokenizer)
    jinja.chat_template = LLAVA_V1_CHAT_TEMPLATE + "{# the same template #}"
    expected = assistant_char_spans_batch(jinja, [messages])[0]
    assert expected[0] == tokenizer.apply_chat_template(messages, tokenize=False)
    assert render_llava_v1(messages, tokenizer.eos_token) == expected
    assert tokenizer.chat_template == LLAVA_V1_CHAT_TEMPLATE  # the fixture takes the fast path
    assert assistant_char_spans_batch(tokenizer, [messages])[0] == expected
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    assert tokenize_conversations(tokenizer, [messages], image_id, 3) == \
        tokenize_conversations(jinja, [messages], image_id, 3)


def _per_token_reference(tokenizer, messages, image_id, num_image_tokens):
    """The labelling rule token by token: learned when the token has characters and its first character lies in a
    reply span; each image token becomes `num_image_tokens` unlearned ones."""
    text, spans = assistant_char_spans_batch(tokenizer, [messages])[0]
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids, labels = [], []
    for token, (start, end) in zip(encoded["input_ids"], encoded["offset_mapping"]):
        repeat = num_image_tokens if token == image_id else 1
        learned = token != image_id and end > start and any(a <= start < b for a, b in spans)
        input_ids += [token] * repeat
        labels += [token if learned else IGNORE_INDEX] * repeat
    return input_ids, labels


def test_a_batch_labels_each_conversation_as_the_rule_does_alone(tokenizer):
    """Conversations tokenized together (their reply spans in one array) get exactly the labels of the per-token
    rule applied to each alone, whatever their neighbours: long, short, no reply, image-only."""
    batch = [*RENDER_CASES, [{"role": "user", "content": "hi"}], [{"role": "user", "content": "<image>"},
             {"role": "assistant", "content": "a cat on a mat"}]] * 2
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    together = tokenize_conversations(tokenizer, batch, image_id, 3)
    assert len(together) == len(batch)
    for messages, tokens in zip(batch, together):
        assert (tokens.input_ids, tokens.labels) == _per_token_reference(tokenizer, messages, image_id, 3)
    assert any(label != IGNORE_INDEX for tokens in together for label in tokens.labels)


def test_what_the_python_rendering_does_not_handle_goes_to_the_template(tokenizer):
    late_system = [{"role": "user", "content": "hi"}, {"role": "system", "content": "Be brief."}]
    assert render_llava_v1(late_system, "</s>") is None
    assert render_llava_v1([{"role": "tool", "content": "42"}], "</s>") is None
    assert render_llava_v1([{"role": "user", "content": None}], "</s>") is None
    late_system.append({"role": "assistant", "content": "ok"})
    spans = assistant_char_spans_batch(tokenizer, [late_system])[0]  # rendered by the template itself
    assert spans[0] == tokenizer.apply_chat_template(late_system, tokenize=False) == "Be brief. USER: hi ASSISTANT: ok</s>"
    assert spans[1] == [(len("Be brief. USER: hi ASSISTANT:"), len(spans[0]))]


def test_llava_json_and_jsonl_and_text_only(tokenizer, image_folder, tmp_path):
    records = [_llava_record(0), _llava_record(1, image="b.png"),
               _llava_record(2, image=None, turns=[{"from": "human", "value": "hi"}, {"from": "gpt", "value": "red"}])]
    (tmp_path / "data.json").write_text(json.dumps(records))
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    for name in ("data.json", "data.jsonl"):
        convs = load_llava_json(tmp_path / name, image_folder)
        assert [len(c.images) for c in convs] == [1, 1, 0]
        dataset = _dataset(convs, tokenizer)
        batch = SupervisedCollator(tokenizer.pad_token_id)([dataset[i] for i in range(3)])
        assert batch["pixel_values"].shape == (2, 3, 8, 8)  # the text-only sample brings no image
        assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
        assert (batch["input_ids"] == tokenizer.convert_tokens_to_ids("<image>")).sum() == 2 * NUM_IMAGE_TOKENS
        assert sorted(dataset.lengths) == sorted(batch["attention_mask"].sum(1).tolist())


def test_hf_messages_dataset(tokenizer, image_folder, tmp_path):
    import datasets

    image = Image.open(image_folder / "a.png")
    rows = {"messages": [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color?"}]},
                          {"role": "assistant", "content": [{"type": "text", "text": "blue"}]}]],
            "images": [[image]]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "hf"))
    convs = load_hf_dataset(tmp_path / "hf")
    assert convs[0].messages[0]["content"] == "<image>\nwhat color?" and len(convs[0].images) == 1
    item = _dataset(convs, tokenizer)[0]
    assert item["pixel_values"].shape == (1, 3, 8, 8)


def test_easy_vqa_conversations():
    convs = load_easy_vqa("train", turns_per_sample=3, limit=5)
    assert {len(c.images) for c in convs} == {1}
    assert all(1 <= len(c.messages) // 2 <= 3 and c.messages[0]["content"].startswith("<image>\n") for c in convs)
    assert all("Answer the question using a single word or phrase." in c.messages[0]["content"] for c in convs)
    captions = load_easy_vqa("train", captions=True, limit=5)
    assert len(captions) == 5 and all(c.messages[1]["content"].startswith("a ") for c in captions)
    # the curriculum: phases in order, each shuffled; "all" repeated twice holds the plain conversations twice
    plain = load_easy_vqa("train", turns_per_sample=2, limit=20)
    curriculum = load_easy_vqa("train", turns_per_sample=2, limit=20, curriculum="described, open, all*2")
    phase = [c.id.split("-")[2] if c.id.split("-")[2] in ("described", "open") else "all" for c in curriculum]
    assert phase == sorted(phase, key=["described", "open", "all"].index) and phase.count("all") == 2 * len(plain)
    described = [c for c, p in zip(curriculum, phase) if p == "described"]
    opening = [c for c, p in zip(curriculum, phase) if p == "open"]
    every = [c for c, p in zip(curriculum, phase) if p == "all"]
    assert len(opening) > 10 and not {m["content"] for c in opening for m in c.messages[1::2]} & {"yes", "no"}
    assert sum(len(c.messages) for c in opening) // 2 == sum(
        m["content"] not in ("yes", "no") for c in plain for m in c.messages[1::2])

    def questions(convs):
        return sorted((m["content"].split("\n")[-2], r["content"]) for c in convs
                      for m, r in zip(c.messages[::2], c.messages[1::2]))

    first_pass = [c for c in every if not c.id.endswith("-pass2")]
    assert sorted(c.id for c in first_pass) == sorted(c.id for c in plain) and len(set(c.id for c in every)) == len(every)
    assert questions(every) == sorted(questions(plain) * 2)
    # described: no image; the first question opens with the image's colour and shape, which answer every question
    assert described and not any(c.images for c in described)
    assert not any("<image>" in m["content"] for c in described for m in c.messages)
    for conv in described:
        color, shape = conv.messages[0]["content"].split("\n")[0].rstrip(".").split()[1:]
        for question, answer in zip(conv.messages[::2], conv.messages[1::2]):
            assert _easy_vqa_answer(question["content"].split("\n")[-2], color, shape) == answer["content"]
    for bad in ("open, everything", "all*0", "all*two", ""):
        with pytest.raises(ValueError, match="curriculum"):
            load_easy_vqa("train", limit=2, curriculum=bad or ",")
    with pytest.raises(ValueError, match="curriculum"):
        load_easy_vqa("train", limit=2, captions=True, curriculum="all")
    # balanced yes/no: as many "yes" as "no" among plain and among negated questions; open questions all kept
    balanced = load_easy_vqa("train", limit=300, balance_yes_no=True)
    counts = {}
    for c in balanced:
        question, answer = c.messages[0]["content"].split("\n")[1], c.messages[1]["content"]
        negated = " not " in f" {question} " or " no " in f" {question} "
        counts[(negated, answer)] = counts.get((negated, answer), 0) + 1
    assert counts[(False, "yes")] == counts[(False, "no")] > 20 and counts[(True, "yes")] == counts[(True, "no")] > 20
    def open_answers(convs):
        return sorted(c.messages[1]["content"] for c in convs if c.messages[1]["content"] not in ("yes", "no"))

    assert open_answers(balanced) == open_answers(load_easy_vqa("train", limit=300))


def test_easy_vqa_color_and_shape_from_open_and_yes_no_answers():
    assert easy_vqa_color_and_shape([("what color is the rectangle?", "brown")]) == ("brown", "rectangle")
    assert easy_vqa_color_and_shape([("what is the red shape?", "circle")]) == ("red", "circle")
    # "no" to a positive question and "yes" to a negated one both rule a value out; two of three shapes out = known
    ruled_out = [("does the image contain a circle?", "no"), ("is there not a triangle in the image?", "yes"),
                 ("is no yellow shape present?", "yes"), ("is there a teal shape?", "yes")]
    assert easy_vqa_color_and_shape(ruled_out) == ("teal", "rectangle")
    assert easy_vqa_color_and_shape([("is there a blue shape?", "no")]) == (None, None)


def _easy_vqa_answer(question: str, color: str, shape: str) -> str:
    """What an image holding one `color` `shape` answers to an easy-VQA question."""
    words = question.rstrip("?").split()
    if words[0] == "what":
        return color if "color" in words else shape
    named = [w for w in words if w in EASY_VQA_SHAPES or w in EASY_VQA_COLORS]
    present = all(w in (color, shape) for w in named)
    return "yes" if present != ("not" in words or "no" in words) else "no"


def test_easy_vqa_labels_answer_every_question_of_their_image():
    from easy_vqa import get_test_questions

    paths, labels, classes = load_easy_vqa_labels("test")
    assert len(classes) == 24 and len(paths) == len(labels) > 800  # of 1,000 test images
    label_of = {int(p.stem): classes[y].split() for p, y in zip(paths, labels)}
    checked = 0
    for question, answer, image_id in zip(*get_test_questions()):
        if image_id in label_of:
            assert _easy_vqa_answer(question, *label_of[image_id]) == answer, (image_id, question)
            checked += 1
    assert checked > 7000


def test_truncation_drops_samples_whose_image_would_be_cut(tokenizer, image_folder, tmp_path):
    long_question = "what color is the shape? " * 10
    records = [_llava_record(0),  # fits
               _llava_record(1, turns=[{"from": "human", "value": long_question + "<image>"},
                                       {"from": "gpt", "value": "blue"}]),  # image tokens past the limit
               _llava_record(2, turns=[{"from": "human", "value": "<image>\nhi"}, {"from": "gpt", "value": "red"},
                                       {"from": "human", "value": long_question}, {"from": "gpt", "value": "blue"}])]
    (tmp_path / "data.json").write_text(json.dumps(records))
    convs = load_llava_json(tmp_path / "data.json", image_folder)
    limit = max(len(tokenize_conversation(tokenizer, convs[0].messages, tokenizer.convert_tokens_to_ids("<image>"),
                                          NUM_IMAGE_TOKENS).input_ids), 60)
    dataset = _dataset(convs, tokenizer, model_max_length=limit)
    assert dataset.dropped_too_long == 1 and dataset.truncated == 1 and len(dataset) == 2
    assert max(dataset.lengths) == limit


@pytest.mark.parametrize("case, message", [
    ("missing_image", r"data\.json\[0\] \(sample 's0'\): image file not found: .*nope\.png"),
    ("no_assistant", r"data\.json\[0\] \(sample 's0'\): the conversation has no assistant turn"),
    ("marker_mismatch", r"data\.json\[0\] \(sample 's0'\): 2 <image> marker\(s\) in the text but 1 image"),
])
def test_bad_samples_name_file_and_sample_or_are_skipped(case, message, tokenizer, image_folder, tmp_path):
    bad = {"missing_image": _llava_record(0, image="nope.png"),
           "no_assistant": _llava_record(0, turns=[{"from": "human", "value": "<image>\nhi"}]),
           "marker_mismatch": _llava_record(0, turns=[{"from": "human", "value": "<image>\n<image>\nhi"},
                                                      {"from": "gpt", "value": "blue"}])}[case]
    (tmp_path / "data.json").write_text(json.dumps([bad, _llava_record(1)]))
    convs = load_llava_json(tmp_path / "data.json", image_folder)
    with pytest.raises(BadSampleError, match=message):
        _dataset(convs, tokenizer)
    dataset = _dataset(convs, tokenizer, skip_bad_samples=True)
    assert len(dataset) == 1 and len(dataset.skipped) == 1 and "1 bad sample(s) skipped" in dataset.report()


def test_malformed_json_line_is_named(tmp_path):
    (tmp_path / "data.jsonl").write_text(json.dumps(_llava_record(0)) + "\n{\"id\": \"s1\", \"conversations\": [\n")
    with pytest.raises(BadSampleError, match=r"data\.jsonl:2: malformed JSON line"):
        load_llava_json(tmp_path / "data.jsonl")
    (tmp_path / "data.json").write_text("[{]")
    with pytest.raises(BadSampleError, match=r"data\.json: malformed JSON"):
        load_llava_json(tmp_path / "data.json")
    (tmp_path / "speaker.json").write_text(json.dumps([_llava_record(0, turns=[{"from": "bot", "value": "x"}])]))
    with pytest.raises(BadSampleError, match=r"speaker\.json\[0\] \(sample 's0'\): turn 0 has unknown speaker"):
        load_llava_json(tmp_path / "speaker.json")


def test_corrupt_image_found_while_training_is_named_or_skipped(tokenizer, image_folder):
    (image_folder / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    conv = Conversation("s0", [image_folder / "a.png"],
                        [{"role": "user", "content": "<image>\nhi"}, {"role": "assistant", "content": "blue"}],
                        "data.json[0]")
    with pytest.raises(BadSampleError, match=r"data\.json\[0\] \(sample 's0'\): Cannot read image file .*a\.png"):
        _dataset([conv], tokenizer)[0]
    dataset = _dataset([conv, Conversation("s1", [image_folder / "b.png"], conv.messages)], tokenizer,
                       skip_bad_samples=True)
    batch = SupervisedCollator(tokenizer.pad_token_id)([dataset[0], dataset[1]])
    assert batch["input_ids"].shape[0] == 1 and len(dataset.skipped) == 1


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


class _CountingProcessor(_Processor):
    def __init__(self):
        self.calls = 0

    def __call__(self, images, return_tensors):
        self.calls += len(images)
        return super().__call__(images, return_tensors)


def test_the_image_cache_decodes_each_file_once_within_its_budget(tokenizer, image_folder):
    convs = [Conversation(id=str(i), images=[image_folder / name],
                          messages=[{"role": "user", "content": "<image>\nwhat color is the shape?"},
                                    {"role": "assistant", "content": "blue"}])
             for i, name in enumerate(["a.png", "b.png", "a.png", "b.png"])]
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    reference = SupervisedDataset(convs, tokenizer, _Processor(), image_id, NUM_IMAGE_TOKENS, show_progress=False)
    one_image = 3 * 8 * 8 * 4  # the stand-in processor's fp32 [3, 8, 8]
    for budget, decoded in ((0, 8), (one_image, 5), (2 * one_image, 2)):
        processor = _CountingProcessor()
        dataset = SupervisedDataset(convs, tokenizer, processor, image_id, NUM_IMAGE_TOKENS, show_progress=False,
                                    image_cache_bytes=budget)
        for _ in range(2):  # two epochs
            for i in range(len(dataset)):
                assert torch.equal(dataset[i]["pixel_values"], reference[i]["pixel_values"])
        assert processor.calls == decoded, budget


def test_in_memory_images_are_not_cached(tokenizer):
    image = Image.new("RGB", (8, 8), (255, 0, 0))
    conv = Conversation(id="0", images=[image], messages=[{"role": "user", "content": "<image>\ncolor?"},
                                                          {"role": "assistant", "content": "red"}])
    processor = _CountingProcessor()
    dataset = SupervisedDataset([conv], tokenizer, processor, tokenizer.convert_tokens_to_ids("<image>"),
                                NUM_IMAGE_TOKENS, show_progress=False, image_cache_bytes=2**20)
    first = dataset[0]["pixel_values"].clone()
    image.paste((0, 0, 255), (0, 0, 8, 8))  # the caller edits its image: the next read sees the edit
    assert not torch.equal(dataset[0]["pixel_values"], first) and processor.calls == 2
