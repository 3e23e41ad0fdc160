"""`defocus_mllm.prompts`: a leaf module (no package imports), and the one prompt `chat`, the evaluation and the
lmms-eval plugin all build."""

import ast
import inspect

import pytest

from defocus_mllm import llava, prompts
from defocus_mllm.prompts import LLAVA_V1_CHAT_TEMPLATE, SHORT_ANSWER_INSTRUCTION, build_prompt


class _Processor:
    """Records what `build_prompt` asks the chat template to render."""

    chat_template = LLAVA_V1_CHAT_TEMPLATE

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        self.call = (messages, add_generation_prompt, tokenize)
        return "rendered"


def test_prompts_imports_nothing_from_the_package():
    tree = ast.parse(inspect.getsource(prompts))
    imported = [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    imported += [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    relative = [node for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level > 0]
    assert not relative and not [m for m in imported if m.startswith("defocus_mllm")], imported


def test_build_prompt_puts_the_image_first_and_asks_for_the_answer():
    question = f"What shape is it?\n{SHORT_ANSWER_INSTRUCTION}"
    processor = _Processor()
    assert build_prompt(processor, question) == "rendered"
    assert processor.call == ([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
                              True, False)
    build_prompt(processor, "hi", image=False)
    assert processor.call[0] == [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]


def test_build_prompt_refuses_a_processor_without_a_chat_template():
    processor = _Processor()
    processor.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        build_prompt(processor, "hi")


def test_llava_keeps_the_old_names():
    for name in ("IMAGE_TOKEN", "SHORT_ANSWER_INSTRUCTION", "LETTER_ANSWER_INSTRUCTION", "UNANSWERABLE_INSTRUCTION",
                 "LLAVA_V1_CHAT_TEMPLATE", "LLAVA_V1_SYSTEM", "with_instruction"):
        assert getattr(llava, name) is getattr(prompts, name)
