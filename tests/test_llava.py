"""The De-focus encoder inside the stock Llava classes: training signal, generation, save/load, PEFT, bad input,
the projector's feature layer, bf16 and ZeRO-3 builds, and no pre-training drop path in the tower."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import defocus_mllm
from defocus_mllm import DefocusVisionConfig, build_llava, chat, count_trainable_parameters, set_trainable
from defocus_mllm.llava import apply_lora
from defocus_mllm.encoder.convert import convert_checkpoint
from defocus_mllm.training.tiny_lm import tiny_llama_config, train_tokenizer
from helpers import build_tiny_llava, free_port, input_dependent_tiny_llava

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ["what shape is it?", "what color is the shape in this picture?", "is it red?"]


def _image(seed: int, size=(40, 48)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def _prompt(processor, question: str) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


@pytest.fixture(scope="module")
def tiny():
    return input_dependent_tiny_llava()


def test_forward_with_labels_trains_the_projector(tiny):
    model, processor = tiny
    inputs = processor(images=[_image(0)], text=[_prompt(processor, QUESTIONS[0]) + " circle"], return_tensors="pt")
    # one placeholder per 8x8 patch of the 32x32 crop, plus the CLS token
    assert (inputs["input_ids"] == model.config.image_token_id).sum() == (32 // 8) ** 2 + 1
    out = model(**inputs, labels=inputs["input_ids"])
    assert torch.isfinite(out.loss)
    out.loss.backward()
    projector_grads = [p.grad for p in model.model.multi_modal_projector.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in projector_grads)
    model.zero_grad(set_to_none=True)


def test_batched_left_padded_greedy_generation_matches_one_by_one(tiny):
    model, processor = tiny
    processor.tokenizer.padding_side = "left"
    images = [_image(i) for i in range(3)]
    prompts = [_prompt(processor, q) for q in QUESTIONS]
    batch = processor(images=images, text=prompts, padding=True, return_tensors="pt")
    assert len(set(batch["attention_mask"].sum(1).tolist())) == 3  # three different lengths
    with torch.no_grad():
        batched = model.generate(**batch, max_new_tokens=6, do_sample=False)[:, batch["input_ids"].shape[1]:]
        for i in range(3):
            alone = processor(images=[images[i]], text=[prompts[i]], return_tensors="pt")
            single = model.generate(**alone, max_new_tokens=6, do_sample=False)[0, alone["input_ids"].shape[1]:]
            assert batched[i, : len(single)].tolist() == single.tolist()
        torch.manual_seed(0)
        sampled = model.generate(**batch, max_new_tokens=6, do_sample=True, temperature=1.5, top_k=0)
    assert sampled.shape[0] == 3 and sampled.shape[1] > batch["input_ids"].shape[1]


def test_chat_answers_and_accepts_a_path(tiny, tmp_path):
    model, processor = tiny
    path = tmp_path / "pic.png"
    _image(1).save(path)
    answer = chat(model, processor, path, QUESTIONS[1], max_new_tokens=4)
    assert isinstance(answer, str) and answer == chat(model, processor, Image.open(path), QUESTIONS[1],
                                                      max_new_tokens=4)


def test_save_load_in_a_fresh_process_and_pipeline(tiny, tmp_path):
    model, processor = tiny
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    image = _image(2)
    image.save(tmp_path / "pic.png")
    inputs = processor(images=[image], text=[_prompt(processor, QUESTIONS[0])], return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    save_file({"logits": logits.contiguous(), **{k: v.contiguous() for k, v in inputs.items()}},
              str(tmp_path / "expected.safetensors"))
    script = textwrap.dedent(f"""
        import torch, transformers
        from PIL import Image
        from safetensors.torch import load_file
        from transformers import AutoModelForImageTextToText, AutoProcessor
        import defocus_mllm
        d = {str(tmp_path / "model")!r}
        model = AutoModelForImageTextToText.from_pretrained(d).eval()
        processor = AutoProcessor.from_pretrained(d)
        expected = load_file({str(tmp_path / "expected.safetensors")!r})
        image = Image.open({str(tmp_path / "pic.png")!r})
        messages = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": {QUESTIONS[0]!r}}}]}}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = processor(images=[image], text=[prompt], return_tensors="pt")
        assert torch.equal(inputs["input_ids"], expected["input_ids"])
        assert torch.equal(inputs["pixel_values"], expected["pixel_values"])
        with torch.no_grad():
            assert torch.equal(model(**inputs).logits, expected["logits"])
        pipe = transformers.pipeline("image-text-to-text", model=d)
        chat = [{{"role": "user", "content": [{{"type": "image", "image": image}}, {{"type": "text", "text": "what?"}}]}}]
        out = pipe(text=chat, max_new_tokens=4, return_full_text=False)
        assert isinstance(out[0]["generated_text"], str), out
        print("OK", type(processor.image_processor).__name__)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK DefocusImageProcessor" in result.stdout


def test_processor_size_change_changes_the_number_of_image_tokens(tiny):
    _, processor = tiny
    image_processor = processor.image_processor
    old = dict(image_processor.crop_size), dict(image_processor.size)
    try:
        image_processor.set_image_size(48)
        inputs = processor(images=[_image(3)], text=["<image>\nhi"], return_tensors="pt")
        assert inputs["pixel_values"].shape[-2:] == (48, 48)
        assert (inputs["input_ids"] == processor.image_token_id).sum() == (48 // 8) ** 2 + 1
        with pytest.raises(ValueError, match="multiple of the encoder's patch_size"):
            image_processor.set_image_size(50)
    finally:
        image_processor.crop_size, image_processor.size = old


def test_lora_on_the_language_model_trains_and_merges(tiny):
    torch.manual_seed(0)
    model, processor = build_tiny_llava()
    projector_size = sum(p.numel() for p in model.model.multi_modal_projector.parameters())
    peft_model = apply_lora(model, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    trainable, total = count_trainable_parameters(peft_model)
    trainable_names = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert all("lora_" in n or "multi_modal_projector.modules_to_save" in n for n in trainable_names)
    assert sum(p.numel() for n, p in peft_model.named_parameters()
               if p.requires_grad and "multi_modal_projector" in n) == projector_size
    assert any("q_proj.lora_A" in n for n in trainable_names) and not any("k_proj.lora" in n for n in trainable_names)
    assert 0 < trainable < total
    inputs = processor(images=[_image(4)], text=[_prompt(processor, QUESTIONS[2]) + " yes"], return_tensors="pt")
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(5):
        loss = peft_model(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    with torch.no_grad():
        before = peft_model(**inputs).logits
    merged = peft_model.merge_and_unload()
    assert not any("lora" in n or "modules_to_save" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits, before, rtol=1e-4, atol=1e-4)


def test_image_token_count_mismatch_is_an_error(tiny):
    _, processor = tiny
    with pytest.raises(ValueError, match="number of images"):
        processor(images=[_image(0), _image(1)], text=["<image>\nwhat is it?"], return_tensors="pt")


def test_image_smaller_than_a_patch_is_an_error(tiny):
    _, processor = tiny
    with pytest.raises(ValueError, match="smaller than one 8x8 patch"):
        processor(images=[_image(0, size=(5, 30))], text=["<image>\nhi"], return_tensors="pt")


def test_corrupt_and_missing_image_files_are_named(tiny, tmp_path):
    model, processor = tiny
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(ValueError, match="broken.jpg"):
        processor(images=[str(bad)], text=["<image>\nhi"], return_tensors="pt")
    with pytest.raises(ValueError, match="broken.jpg"):
        chat(model, processor, bad, "hi")
    with pytest.raises(FileNotFoundError, match="nowhere.png"):
        chat(model, processor, tmp_path / "nowhere.png", "hi")


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "LA", "1"])
def test_non_rgb_images_are_converted(tiny, mode):
    _, processor = tiny
    image = _image(5).convert(mode)
    pixels = processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 32, 32)
    if mode == "L":  # grey stays grey: the three channels agree before normalisation
        std = torch.tensor(processor.image_processor.image_std).view(3, 1, 1)
        mean = torch.tensor(processor.image_processor.image_mean).view(3, 1, 1)
        raw = pixels[0] * std + mean
        torch.testing.assert_close(raw[0], raw[1], atol=1e-5, rtol=0)


def test_converted_release_encoder_serves_as_vision_tower(tmp_path):
    from release_checkpoint import release_state_dict

    torch.save({"model": release_state_dict(seed=1)}, tmp_path / "release.pth")
    convert_checkpoint(tmp_path / "release.pth", tmp_path / "converted", image_size=32)
    tokenizer = train_tokenizer(QUESTIONS, vocab_size=128)
    model, processor = build_llava(tmp_path / "converted", tiny_llama_config(len(tokenizer) + 1),
                                   tokenizer=tokenizer)
    encoder = defocus_mllm.DefocusForImageClassification.from_pretrained(tmp_path / "converted").defocus
    for name, tensor in encoder.state_dict().items():
        assert torch.equal(model.model.vision_tower.state_dict()[name], tensor), name
    inputs = processor(images=[_image(6)], text=[_prompt(processor, QUESTIONS[0])], return_tensors="pt")
    assert torch.isfinite(model(**inputs).logits).all()


def test_build_llava_inputs_and_errors(tmp_path):
    tokenizer = train_tokenizer(QUESTIONS, vocab_size=128)
    lm_config = tiny_llama_config(len(tokenizer) + 1)
    vision = DefocusVisionConfig.from_preset("mamba-tiny", hidden_size=32, num_hidden_layers=1, intermediate_size=64)
    model, processor = build_llava(vision, lm_config, tokenizer=tokenizer, image_size=16)
    assert model.config.vision_config.image_size == 16 and processor.image_processor.crop_size["height"] == 16
    assert model.config.vision_feature_select_strategy == "full"
    assert model.get_input_embeddings().num_embeddings >= len(processor.tokenizer)
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        build_llava(vision, lm_config, tokenizer=tokenizer, image_size=20)
    with pytest.raises(ValueError, match="tokenizer="):
        build_llava(vision, lm_config)
    with pytest.raises(ValueError, match="preset"):
        build_llava("no-such-preset", lm_config, tokenizer=tokenizer)
    # a language model directory brings its own tokenizer
    lm = defocus_mllm.llava.load_language_model(lm_config)
    lm.save_pretrained(tmp_path / "lm")
    tokenizer.save_pretrained(tmp_path / "lm")
    model, processor = build_llava(vision, tmp_path / "lm")
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == model.config.image_token_id
    for name, tensor in lm.model.state_dict().items():
        if "embed_tokens" not in name:
            assert torch.equal(model.model.language_model.state_dict()[name], tensor), name


def test_freezing_helpers(tiny):
    model, _ = tiny
    set_trainable(model, vision_tower=False, projector=True, language_model=False)
    trainable, total = count_trainable_parameters(model)
    assert trainable == sum(p.numel() for p in model.model.multi_modal_projector.parameters())
    assert total == sum(p.numel() for p in model.parameters())
    set_trainable(model, vision_tower=True, language_model=True)
    assert count_trainable_parameters(model) == (total, total)


def test_a_tokenizer_with_its_own_string_only_template_gets_image_parts_flattened():
    tokenizer = train_tokenizer(QUESTIONS + ["<|im_start|> <|im_end|> user assistant"], vocab_size=128)
    tokenizer.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                               "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    model, processor = build_llava(DefocusVisionConfig.from_preset("mamba-tiny", num_hidden_layers=1, image_size=32),
                                   tiny_llama_config(len(tokenizer) + 1), tokenizer=tokenizer)
    prompt = _prompt(processor, "what shape is it?")
    assert prompt == "<|im_start|>user\n<image>\nwhat shape is it?<|im_end|>\n<|im_start|>assistant\n"
    assert processor.tokenizer.chat_template == tokenizer.chat_template  # training renders strings with it directly
    inputs = processor(images=[_image(7)], text=[prompt], return_tensors="pt")
    assert torch.isfinite(model(**inputs).logits).all()


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


TEXTS = ["what shape is in the image?", "circle", "red", "yes", "no", "USER: ASSISTANT:"]


def _batch(model, processor, dtype=torch.float32):
    """One image-question pair as the processor makes it, pixel values in `dtype`."""
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what shape?"}]}],
        add_generation_prompt=True, tokenize=False)
    size = model.config.vision_config.image_size
    image = torch.rand(3, size, size)
    batch = processor(images=[image], text=[prompt], return_tensors="pt", do_rescale=False)
    batch["pixel_values"] = batch["pixel_values"].to(dtype)
    return batch


ZERO3_BUILD = textwrap.dedent("""
    import os, sys
    import deepspeed, torch
    from transformers.integrations import HfDeepSpeedConfig, is_deepspeed_zero3_enabled
    sys.path.insert(0, {tests!r})
    from helpers import build_tiny_llava

    torch.set_num_threads(1)
    deepspeed.init_distributed("gloo")
    ds = HfDeepSpeedConfig({{"zero_optimization": {{"stage": 3}}, "bf16": {{"enabled": True}},
                             "train_micro_batch_size_per_gpu": 1}})
    model, processor = build_tiny_llava()
    assert is_deepspeed_zero3_enabled()  # the ZeRO-3 config is active again after build_llava
    tower = model.model.vision_tower
    assert not any(hasattr(p, "ds_id") for p in tower.parameters()), "the tower is the real one, not re-built"
    assert all(p.device.type != "meta" and p.numel() > 0 for p in tower.parameters())
    assert any(hasattr(p, "ds_id") for p in model.model.language_model.parameters()), "the LM is the ZeRO-3 one"
    dtypes = {{p.dtype for p in model.parameters()}}
    assert dtypes == {{torch.bfloat16}}, dtypes
    print("ZERO3-OK")
""")


@pytest.mark.slow
def test_build_llava_under_zero3_init(tmp_path):
    """A ZeRO-3 config is alive while the recipe builds the model: the meta-device shell must not go through
    `deepspeed.zero.Init` (it crashed in the Mamba mixer's weight init), and the tower / LM must be the real ones."""
    pytest.importorskip("deepspeed")
    script = tmp_path / "zero3_build.py"
    script.write_text(ZERO3_BUILD.format(tests=str(ROOT / "tests")))
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, str(script)], env=env, cwd=ROOT, capture_output=True, text=True,
                            timeout=240)
    assert result.returncode == 0 and "ZERO3-OK" in result.stdout, result.stderr[-3000:]


def test_build_llava_from_bf16_checkpoint_has_one_dtype(tmp_path):
    """A real LM checkpoint loads in bf16: the tower and projector must follow it, so no autocast is needed."""
    tokenizer = train_tokenizer(TEXTS, vocab_size=128)
    lm = __import__("transformers").AutoModelForCausalLM.from_config(tiny_llama_config(len(tokenizer)))
    lm.to(torch.bfloat16).save_pretrained(tmp_path / "lm")
    tokenizer.save_pretrained(tmp_path / "lm")
    vision = DefocusVisionConfig.from_preset("mamba-tiny", hidden_size=32, num_hidden_layers=2,
                                             intermediate_size=64, image_size=32)
    model, processor = build_llava(vision, tmp_path / "lm")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        out = model(**_batch(model, processor, torch.bfloat16))
    assert torch.isfinite(out.logits.float()).all()


def test_bf16_model_with_intermediate_vision_feature_layer():
    """`hidden_states` of intermediate layers come back in the parameters' dtype, not the fp32 residual stream."""
    model, processor = build_tiny_llava(TEXTS, vocab_size=128)
    model.to(torch.bfloat16)
    with torch.no_grad():
        out = model(**_batch(model, processor, torch.bfloat16), vision_feature_layer=-2)
        hidden = model.model.vision_tower(_batch(model, processor, torch.bfloat16)["pixel_values"],
                                          output_hidden_states=True).hidden_states
    assert torch.isfinite(out.logits.float()).all()
    assert {h.dtype for h in hidden} == {torch.bfloat16}


def test_preset_tower_has_no_drop_path_in_llava(monkeypatch):
    """A preset's pre-training drop path (mamba-base: up to 0.75, scheduled) is off in a LLaVA tower."""
    from defocus_mllm.encoder.configuration_defocus import DEFOCUS_PRESETS
    from defocus_mllm.llava import load_vision_tower

    # mamba-base's drop-path settings on a tiny encoder (the real one takes seconds to build)
    base = DEFOCUS_PRESETS["mamba-base"]
    assert base["drop_path_rate"] > 0 and base["use_scheduled_drop_path"]
    small = dict(DEFOCUS_PRESETS["mamba-tiny"], hidden_size=32, num_hidden_layers=3, intermediate_size=64,
                 image_size=32, **{key: base[key] for key in ("drop_path_rate", "min_drop_path_rate",
                                                              "use_scheduled_drop_path")})
    monkeypatch.setitem(DEFOCUS_PRESETS, "mamba-base", small)
    tower = load_vision_tower("mamba-base")
    assert tower.config.drop_path_rate == 0.0 and not tower.config.use_scheduled_drop_path
    assert all(block.drop_path_rate == 0.0 for block in tower.blocks)
    # asked for on purpose (a config): kept
    config = DefocusVisionConfig.from_preset("mamba-tiny", hidden_size=32, num_hidden_layers=3,
                                             intermediate_size=64, image_size=32, drop_path_rate=0.2)
    assert load_vision_tower(config).blocks[-1].drop_path_rate == pytest.approx(0.2)
