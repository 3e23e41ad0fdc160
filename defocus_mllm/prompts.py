"""The prompts, in one place: the image token, the LLaVA-v1 chat template, LLaVA-1.5's answer-format instructions and
:func:`build_prompt`, the one way a question about an image becomes the text a model answers.

A leaf module: it imports nothing from the package, so the data, the model builder and the evaluation share these
strings without importing one another.
"""

from __future__ import annotations

from typing import Any

IMAGE_TOKEN = "<image>"

# LLaVA-1.5's answer-format instructions, appended to a question on a new line (its `llava/eval` question files).
SHORT_ANSWER_INSTRUCTION = "Answer the question using a single word or phrase."
LETTER_ANSWER_INSTRUCTION = "Answer with the option's letter from the given choices directly."
UNANSWERABLE_INSTRUCTION = "When the provided information is insufficient, respond with 'Unanswerable'."

# LLaVA-v1 ("vicuna_v1") conversation format, used when the tokenizer brings no chat template of its own:
#   "{system} USER: <image>\n{question} ASSISTANT: {answer}</s>USER: ..."
# Message contents may be strings or lists of {"type": "image"} / {"type": "text", "text": ...} parts; images are
# placed before the text of their turn, as LLaVA-1.5 does. The `generation` markers let
# `apply_chat_template(..., return_assistant_tokens_mask=True)` find the assistant tokens.
LLAVA_V1_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                   "The assistant gives helpful, detailed, and polite answers to the human's questions.")
LLAVA_V1_CHAT_TEMPLATE = (
    '{%- set ns = namespace(system="' + LLAVA_V1_SYSTEM + '") -%}'
    "{%- for m in messages if m['role'] == 'system' -%}"
    "{%- set ns.system = m['content'] if m['content'] is string else m['content'] | map(attribute='text') | join(' ') -%}"
    "{%- endfor -%}"
    "{{ ns.system }}"
    "{%- for m in messages if m['role'] != 'system' -%}"
    "{%- if m['content'] is string -%}{%- set text = m['content'] -%}{%- set n_images = 0 -%}"
    "{%- else -%}"
    "{%- set text = m['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('\\n') -%}"
    "{%- set n_images = m['content'] | selectattr('type', 'equalto', 'image') | list | length -%}"
    "{%- endif -%}"
    "{%- if m['role'] == 'user' -%}"
    "{{ ' USER: ' }}{{ '<image>\\n' * n_images }}{{ text }}"
    "{%- else -%}"
    "{{ ' ASSISTANT: ' }}{% generation %}{{ text }}{{ eos_token }}{% endgeneration %}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ ' ASSISTANT:' }}{%- endif -%}"
)

# Prepended to a tokenizer's own chat template for the processor: most text templates print `content` as a string,
# while processors pass lists of typed parts. This turns each list into "<image>\n" per image + the joined text.
FLATTEN_CONTENT_PRELUDE = (
    "{%- set flat = namespace(messages=[]) -%}"
    "{%- for m in messages -%}"
    "{%- if m['content'] is string -%}{%- set flat.messages = flat.messages + [m] -%}"
    "{%- else -%}"
    "{%- set n_images = m['content'] | selectattr('type', 'equalto', 'image') | list | length -%}"
    "{%- set text = m['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('\\n') -%}"
    "{%- set flat.messages = flat.messages + [{'role': m['role'], 'content': '<image>\\n' * n_images ~ text}] -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- set messages = flat.messages -%}"
)


def render_llava_v1(messages: list[dict[str, Any]], eos_token: str) -> tuple[str, list[tuple[int, int]]] | None:
    """`LLAVA_V1_CHAT_TEMPLATE` rendered in plain Python, with the character span of each assistant reply.

    The same text as `apply_chat_template(messages, tokenize=False)` with that template, and the same spans as
    rendering prefix by prefix (a reply runs from the end of the prompt that asks for it, ``" ASSISTANT:"``, to the
    end of its end-of-sequence token), in one pass instead of a Jinja render per prefix, which was most of the time
    spent tokenizing a training set. Returns None for what it does not handle the template's way (a system message
    after the conversation started, a role other than system / user / assistant, contents that are neither strings
    nor lists of typed parts): render those with the template itself.
    """
    system, turns, started = LLAVA_V1_SYSTEM, [], False
    for m in messages:
        content = m["content"]
        if m["role"] not in ("system", "user", "assistant"):
            return None
        if isinstance(content, str):
            text, n_images = content, 0
        elif isinstance(content, list) and all(isinstance(part, dict) for part in content):
            text = "\n".join(str(part.get("text", "")) for part in content if part.get("type") == "text")
            n_images = sum(part.get("type") == "image" for part in content)
        else:
            return None
        if m["role"] == "system":
            if started:  # the template would give each prefix another system prompt
                return None
            system = content if isinstance(content, str) else " ".join(str(part.get("text", "")) for part in content)
            continue
        started = True
        turns.append((m["role"], text, n_images))
    out, spans, length = [system], [], len(system)
    for role, text, n_images in turns:
        if role == "user":
            piece = " USER: " + (IMAGE_TOKEN + "\n") * n_images + text
        else:
            piece = " ASSISTANT: " + text + eos_token
            spans.append((length + len(" ASSISTANT:"), length + len(piece)))
        out.append(piece)
        length += len(piece)
    return "".join(out), spans


def with_instruction(question: str, instruction: str) -> str:
    """`question + "\\n" + instruction` unless the question already ends with it (LLaVA's files)."""
    question = question.rstrip()
    if not instruction or question.endswith(instruction):
        return question
    return f"{question}\n{instruction}"


def build_prompt(processor: Any, text: str, *, image: bool = True) -> str:
    """The chat-formatted prompt of one user turn (the image first, when there is one, then `text`), ending where the
    assistant's answer starts: what `chat`, the evaluation and the lmms-eval plugin all give the model."""
    if getattr(processor, "chat_template", None) is None:
        raise ValueError("the processor has no chat template; save the model with build_llava's processor")
    content = [{"type": "text", "text": text}]
    if image:
        content.insert(0, {"type": "image"})
    messages = [{"role": "user", "content": content}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


__all__ = [
    "FLATTEN_CONTENT_PRELUDE",
    "IMAGE_TOKEN",
    "LETTER_ANSWER_INSTRUCTION",
    "LLAVA_V1_CHAT_TEMPLATE",
    "LLAVA_V1_SYSTEM",
    "SHORT_ANSWER_INSTRUCTION",
    "UNANSWERABLE_INSTRUCTION",
    "build_prompt",
    "render_llava_v1",
    "with_instruction",
]
