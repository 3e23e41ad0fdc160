"""What determines the answers to a benchmark, beyond each question, prompt and image: the model (a fingerprint of
its weights and config), the processor, the benchmark split and the generation settings. A resumed run must match
this key (:func:`run_key`)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import torch

from .benchmarks import Benchmark


_VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "_commit_hash", "_attn_implementation_autoset"}


def _strip_volatile(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {k: _strip_volatile(v) for k, v in obj.items() if k not in _VOLATILE_CONFIG_KEYS}
    if isinstance(obj, (list, tuple)):
        return [_strip_volatile(v) for v in obj]
    return obj


def _json_bytes(obj: Any) -> bytes:
    # objects JSON cannot hold are named by type only, so no memory address ends up in a hash
    return json.dumps(obj, sort_keys=True, default=lambda o: type(o).__name__).encode()


def _tensor_sample(t: torch.Tensor, k: int) -> bytes:
    """The raw bytes of ``k`` elements of ``t`` evenly spaced in its flattened order (all if fewer),
    picked with integer arithmetic so that CPU and GPU pick the same ones."""
    flat = t.detach().reshape(-1)
    n = flat.numel()
    if n > k:
        idx = torch.arange(k, dtype=torch.int64) * (n - 1) // (k - 1)
        flat = flat[idx.to(flat.device)]
    return flat.cpu().contiguous().view(torch.uint8).numpy().tobytes()


def model_fingerprint(model: Any, elements_per_tensor: int = 4096) -> str:
    """A hash of the model as it is in memory: its config (less paths and versions), and each parameter
    and persistent buffer's name, shape, dtype and the bytes of ``elements_per_tensor`` evenly spaced
    elements. Two checkpoints of one training run differ in practically every trained tensor, so they
    get different fingerprints; the same checkpoint loaded twice (also from a copied folder) gets the
    same one; loading it in another dtype changes it (the answers may change too). DeepSpeed ZeRO-3
    parameters are gathered one at a time (every process must call this, as :func:`run_benchmark` does).
    """
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        h.update(_json_bytes(_strip_volatile(config.to_dict())))

    def add(name: str, t: torch.Tensor) -> None:
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(_tensor_sample(t, elements_per_tensor))

    for name, p in model.named_parameters():
        if hasattr(p, "ds_id"):  # partitioned by DeepSpeed ZeRO-3
            import deepspeed

            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                add(name, p.data)
        else:
            add(name, p.data)
    for module_name, module in model.named_modules():
        for name, buf in module.named_buffers(recurse=False):
            if buf is not None and name not in getattr(module, "_non_persistent_buffers_set", ()):
                add(f"{module_name}.{name}" if module_name else name, buf)
    return h.hexdigest()


def processor_fingerprint(processor: Any) -> str:
    """A hash of what the processor contributes to the answers: its settings (image size, patch size,
    normalisation, ...), the chat template and the tokenizer's vocabulary and special tokens."""
    tok = getattr(processor, "tokenizer", processor)
    parts: dict[str, Any] = {"class": type(processor).__name__,
                             "chat_template": getattr(processor, "chat_template", None)}
    if processor is not tok and hasattr(processor, "to_dict"):
        parts["settings"] = processor.to_dict()
    if hasattr(tok, "get_vocab"):
        parts["tokenizer"] = {
            "class": type(tok).__name__,
            "vocab": hashlib.sha256(_json_bytes(sorted(tok.get_vocab().items()))).hexdigest(),
            "special_tokens": getattr(tok, "special_tokens_map", None),
        }
        backend = getattr(tok, "backend_tokenizer", None)
        if backend is not None and hasattr(backend, "to_str"):
            # the same vocabulary splits text differently under other merges, normaliser or pre-tokeniser rules
            parts["tokenizer"]["pipeline"] = hashlib.sha256(backend.to_str().encode()).hexdigest()
    return hashlib.sha256(_json_bytes(parts)).hexdigest()


# versions, and switches that change what `generate` returns or how fast, never which tokens it picks (training
# turns `use_cache` off and the saved model back on: the same weights must keep the same key)
_VOLATILE_GENERATION_KEYS = {"transformers_version", "_from_model_config", "_commit_hash", "use_cache",
                             "output_attentions", "output_hidden_states", "output_scores", "output_logits",
                             "return_dict_in_generate"}


def generation_settings(model: Any) -> dict[str, Any]:
    """The model's generation config as ``generate`` applies it under the evaluation's greedy decoding: the saved
    ``generation_config.json`` (repetition penalty, stop tokens, banned words, ...) with ``do_sample`` and
    ``num_beams`` overridden as :func:`generate_answers` does. Fields that are not set are left out."""
    config = getattr(model, "generation_config", None)
    if config is None:
        return {}
    values = config.to_diff_dict() if hasattr(config, "to_diff_dict") else dict(config)
    values = {k: v for k, v in values.items() if k not in _VOLATILE_GENERATION_KEYS}
    values.update(do_sample=False, num_beams=1)
    return json.loads(_json_bytes(values))


def run_key(model: Any, processor: Any, benchmark: Benchmark, max_new_tokens: int) -> dict[str, Any]:
    """Everything a stored answer depends on beyond its question, prompt and image (which each
    prediction line records): the model, the processor, the benchmark and split, and the generation
    settings (``max_new_tokens`` and the model's generation config, see :func:`generation_settings`). The
    batch size, the number of processes and ``limit`` are not part of it: they change
    which questions are asked together, not what the answer to a question is."""
    return {
        "model": model_fingerprint(model),
        "processor": processor_fingerprint(processor),
        "benchmark": benchmark.name,
        "split": benchmark.split,
        "generation": {"decoding": "greedy", "max_new_tokens": max_new_tokens,
                       "generation_config": generation_settings(model)},
    }
