"""`chat` at its edges: no image, an http(s) URL, and a prompt longer than the language model's position table."""

import http.server
import logging
import threading

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor

from defocus_mllm import chat
from helpers import free_port, input_dependent_tiny_llava

POSITIONS = 256  # the tiny Llama's position table (a prompt with an image is ~140 tokens)


@pytest.fixture(scope="module")
def tiny():
    return input_dependent_tiny_llava(max_position_embeddings=POSITIONS)


def _picture() -> Image.Image:
    rng = np.random.default_rng(3)
    return Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8))


def test_chat_without_an_image_answers_text_only(tiny):
    model, processor = tiny
    messages = [{"role": "user", "content": [{"type": "text", "text": "what color is the shape?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert "<image>" not in prompt
    inputs = processor(text=[prompt], return_tensors="pt")
    with torch.no_grad():
        expected = model.generate(**inputs, max_new_tokens=4, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    answer = chat(model, processor, None, "what color is the shape?", max_new_tokens=4)
    assert answer == processor.tokenizer.decode(expected, skip_special_tokens=True).strip()


@pytest.fixture
def server(tmp_path):
    """A local HTTP server over `tmp_path` (the test machine has no internet)."""
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path), **k)  # noqa: E731
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_chat_fetches_an_http_url_like_a_local_file(tiny, tmp_path, server):
    model, processor = tiny
    _picture().save(tmp_path / "pic.png")
    from_url = chat(model, processor, f"{server}/pic.png", "what shape is in the image?", max_new_tokens=4)
    assert from_url == chat(model, processor, tmp_path / "pic.png", "what shape is in the image?", max_new_tokens=4)
    # a URL that does not answer with an image is named whole, never turned into a file path ("http:/...")
    with pytest.raises(ValueError, match=f"Cannot fetch image {server}/missing.png"):
        chat(model, processor, f"{server}/missing.png", "hi")
    closed = f"http://127.0.0.1:{free_port()}/pic.png"
    with pytest.raises(ValueError, match=f"Cannot fetch image {closed}"):
        processor(images=[closed], text=["<image>\nhi"], return_tensors="pt")


def test_saved_tokenizer_carries_the_language_model_position_limit(tiny, tmp_path):
    model, processor = tiny
    assert processor.tokenizer.model_max_length == POSITIONS
    processor.save_pretrained(tmp_path)
    assert AutoProcessor.from_pretrained(tmp_path).tokenizer.model_max_length == POSITIONS


def test_an_over_long_prompt_is_refused_and_an_over_long_answer_is_capped(tiny, caplog):
    model, processor = tiny
    with pytest.raises(ValueError, match=rf"prompt is \d+ tokens .* {POSITIONS} positions"):
        chat(model, processor, _picture(), "what color is the shape? " * 30)
    question = "what color is the shape?"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    length = processor(images=[_picture()], text=[prompt], return_tensors="pt")["input_ids"].shape[1]
    assert length < POSITIONS
    with caplog.at_level(logging.WARNING, logger="defocus_mllm"):
        answer = chat(model, processor, _picture(), question, max_new_tokens=500, min_new_tokens=500)
    assert f"{POSITIONS - length} new tokens" in caplog.text
    assert len(processor.tokenizer(answer, add_special_tokens=False)["input_ids"]) <= POSITIONS - length


def test_training_cuts_samples_at_the_language_model_positions(tiny, tmp_path, caplog):
    from defocus_mllm.data.conversations import Conversation
    from defocus_mllm.training import DataArguments, LlavaTrainingArguments, build_supervised_dataset

    model, processor = tiny
    long = Conversation("s0", [], [{"role": "user", "content": "what color is the shape?"},
                                   {"role": "assistant", "content": "red " * 200}])
    args = LlavaTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    with caplog.at_level(logging.WARNING, logger="defocus_mllm"):
        dataset = build_supervised_dataset([long], model, processor, DataArguments(model_max_length=4096), args)
    assert max(dataset.lengths) == POSITIONS and f"language model's {POSITIONS} positions" in caplog.text
