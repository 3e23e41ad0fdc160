"""The `reload` part of the one-GPU run (docs/gpu.md), run as `gpu_run.py --child reload DIR...`: every stage-2
output reloaded with `AutoModelForImageTextToText` in bf16 and asked a few easy-VQA questions.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from gpu_plan import Plan


def run_reload(plan: Plan, model_dirs: list[Path], out_file: Path) -> None:
    """Child of the `reload` part: load each saved model with `AutoModelForImageTextToText` and answer questions."""
    import torch
    from easy_vqa import get_test_image_paths, get_test_questions
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import defocus_mllm  # noqa: F401 - registers the De-focus encoder with the Auto classes
    from defocus_mllm import chat

    device = "cpu" if plan.dry_run else "cuda"
    questions, answers, image_ids = get_test_questions()
    paths = get_test_image_paths()
    results = []
    for model_dir in model_dirs:
        started = time.time()
        entry: dict[str, Any] = {"model_dir": model_dir.name}
        try:
            model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.bfloat16).to(device).eval()
            processor = AutoProcessor.from_pretrained(model_dir)
            entry["load_s"] = round(time.time() - started, 1)
            entry["dtypes"] = sorted({str(p.dtype).replace("torch.", "") for p in model.parameters()})
            qa = []
            t0 = time.time()
            for i in range(plan.questions):
                answer = chat(model, processor, paths[image_ids[i]], questions[i], max_new_tokens=5)
                qa.append({"question": questions[i], "answer": answer, "gold": answers[i]})
            entry.update(status="ok", answers=qa, generate_s=round(time.time() - t0, 2))
            del model
            if device == "cuda":
                torch.cuda.empty_cache()
        except Exception as exc:  # noqa: BLE001 - the other directories still get their turn
            entry["status"] = f"error: {type(exc).__name__}: {str(exc)[:300]}"
        print(json.dumps(entry), flush=True)
        results.append(entry)
        out_file.write_text(json.dumps(results, indent=1))

