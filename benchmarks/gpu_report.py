"""The report of benchmarks/gpu_run.py: its subprocesses' output read back, and results.md rendered from results.json.

Nothing here runs a model or imports torch: `parse_train_logs` / `summarize_training` read the Trainer's printed
logs, `error_lines` picks what a failed part's table shows, `render_markdown` writes the tables and the goals'
verdicts (`goal_line`, `fused_path_goals`).
"""

from __future__ import annotations

import ast
import math
import re
from typing import Any, Optional

ENCODERS = ("defocus-mamba-base", "defocus-mamba-base+graph", "vit-b16", "clip-vit-l14")
ENCODER_LABELS = {"defocus-mamba-base": "Mamba-B/16", "defocus-mamba-base+graph": "Mamba-B/16 CUDA graph",
                  "vit-b16": "ViT-B/16", "clip-vit-l14": "CLIP-L/14"}
GRAPHED = "defocus-mamba-base+graph"  # the Mamba-B rows of the same model replayed as a CUDA graph


# ------------------------------------------------------------------------------------------------ training logs

LOG_LINE = re.compile(r"^\{.*'loss'.*\}\s*$")


def parse_train_logs(lines: list[tuple[float, str]]) -> list[dict[str, Any]]:
    """The Trainer's per-step log dicts (printed with `disable_tqdm`), each with the time its line arrived."""
    logs = []
    for stamp, line in lines:
        if not LOG_LINE.match(line.strip()):
            continue
        # older transformers print bare floats, whose repr of a diverged loss (nan, inf) is no Python literal
        text = re.sub(r"(?<![\w'])(-?inf|nan)(?![\w'])", r"'\1'", line.strip())
        try:
            record = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            continue
        entry = {"t": stamp}
        for key, value in record.items():
            try:
                entry[key] = float(value)
            except (TypeError, ValueError):
                entry[key] = value
        logs.append(entry)
    return logs


def summarize_training(logs: list[dict[str, Any]], global_batch: int) -> dict[str, Any]:
    """Losses (finite? falling?) and the steady-state samples/s between the logged steps after the first three."""
    losses = [entry["loss"] for entry in logs if isinstance(entry.get("loss"), float)]
    summary: dict[str, Any] = {"steps_logged": len(losses), "losses": [round(x, 4) for x in losses]}
    if not losses:
        return summary
    third = max(1, len(losses) // 3)
    first, last = sum(losses[:third]) / third, sum(losses[-third:]) / third
    summary.update(loss_first=round(losses[0], 4), loss_last=round(losses[-1], 4),
                   loss_finite=all(math.isfinite(x) for x in losses), loss_falling=last < first,
                   loss_first_third_mean=round(first, 4), loss_last_third_mean=round(last, 4))
    timed = [entry["t"] for entry in logs if isinstance(entry.get("loss"), float)]
    skip = min(3, len(timed) - 2)
    if skip >= 0 and len(timed) - skip >= 2 and timed[-1] > timed[skip]:
        summary["steady_samples_per_s"] = round((len(timed) - 1 - skip) * global_batch / (timed[-1] - timed[skip]), 2)
    return summary


def trainer_memory(metrics: dict[str, Any]) -> Optional[float]:
    """Peak GPU memory allocated during training (GiB) from the Trainer's memory metrics, when it reported them."""
    keys = ("before_init_mem_gpu", "init_mem_gpu_alloc_delta", "train_mem_gpu_alloc_delta",
            "train_mem_gpu_peaked_delta")
    if not all(k in metrics for k in keys):
        return None
    return round(sum(float(metrics[k]) for k in keys) / 2**30, 3)


def error_lines(lines: list[str], keep: int = 4) -> list[str]:
    """The last few distinct lines that name an exception (what a failed part's report shows)."""
    found: list[str] = []
    for line in reversed(lines):
        text = line.strip()
        if re.search(r"(Error|Exception|error:)", text) and "ChildFailedError" not in text and "raise " not in text:
            text = text[:300]
            if text not in found:
                found.append(text)
            if len(found) == keep:
                break
    return found[::-1]


# ---------------------------------------------------------------------------------------------------- results.md

def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def _throughput_table(rows: list[dict[str, Any]], mode: str) -> list[str]:
    cells = {(r["resolution"], r["model"]): r for r in rows if r["mode"] == mode}
    resolutions = sorted({res for res, _ in cells})
    models = [m for m in ENCODERS if any(m == model for _, model in cells)]
    if not resolutions:
        return ["(no measurements)"]
    head = (["px", "tokens per image"] + [f"{ENCODER_LABELS[m]} img/s" for m in models]
            + ["Mamba ÷ ViT-B", "Mamba ÷ CLIP-L"] + (["Mamba graph ÷ ViT-B"] if GRAPHED in models else [])
            + [f"{ENCODER_LABELS[m]} tok/s" for m in models]
            + [f"{ENCODER_LABELS[m]} peak GiB" for m in models])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for res in resolutions:
        row = [cells.get((res, m), {}) for m in models]
        tokens = " / ".join(str(r.get("tokens", "–")) for r in row)

        def rate(r: dict[str, Any], key: str) -> str:
            return _fmt(r.get(key)) if r.get("status") == "ok" else (r.get("status", "–").split(":")[0] or "–")

        def ratio(other: str, ours: str = "defocus-mamba-base") -> str:
            a, b = cells.get((res, ours), {}), cells.get((res, other), {})
            if a.get("status") == "ok" and b.get("status") == "ok":
                return f"{a['images_per_s'] / b['images_per_s']:.2f}x"
            return "–"

        lines.append("| " + " | ".join([str(res), tokens] + [rate(r, "images_per_s") for r in row]
                                       + [ratio("vit-b16"), ratio("clip-vit-l14")]
                                       + ([ratio("vit-b16", GRAPHED)] if GRAPHED in models else [])
                                       + [rate(r, "tokens_per_s") for r in row]
                                       + [_fmt(r.get("peak_mem_gib"), 2) for r in row]) + " |")
    return lines


def goal_line(rows: list[dict[str, Any]]) -> Optional[str]:
    """Issue 17's goal at the largest resolution: Mamba-B >= 1.5x ViT-B/16's inference images/s, less peak memory."""
    inference = {(r["resolution"], r["model"]): r for r in rows if r["mode"] == "inference" and r["status"] == "ok"}
    shared = sorted(res for res, m in inference if m == "defocus-mamba-base" and (res, "vit-b16") in inference)
    if not shared:
        return None
    res = shared[-1]
    mamba, vit = inference[(res, "defocus-mamba-base")], inference[(res, "vit-b16")]
    speed = mamba["images_per_s"] / vit["images_per_s"]
    verdict = f"{speed:.2f}x ViT-B/16's inference throughput ({'meets' if speed >= 1.5 else 'misses'} the 1.5x goal)"
    if mamba.get("peak_mem_gib") is not None and vit.get("peak_mem_gib") is not None:
        less = mamba["peak_mem_gib"] < vit["peak_mem_gib"]
        verdict += (f", peak memory {mamba['peak_mem_gib']:.2f} vs {vit['peak_mem_gib']:.2f} GiB "
                    f"({'less' if less else 'not less'})")
    return f"At {res} px De-focus Mamba-B runs at {verdict}."


def fused_path_goals(rows: list[dict[str, Any]]) -> list[str]:
    """Issue 26's goals for the fused Triton path: Mamba-B >= 0.5x ViT-B/16's inference images/s at the smallest
    resolution, and forward + backward >= 1.0x at the largest (the 1.5x inference goal is `goal_line`'s)."""
    lines = []
    for mode, pick, goal in (("inference", min, 0.5), ("train", max, 1.0)):
        cells = {(r["resolution"], r["model"]): r for r in rows if r["mode"] == mode and r["status"] == "ok"}
        shared = [res for res, m in cells if m == "defocus-mamba-base" and (res, "vit-b16") in cells]
        if not shared:
            continue
        res = pick(shared)
        speed = cells[(res, "defocus-mamba-base")]["images_per_s"] / cells[(res, "vit-b16")]["images_per_s"]
        label = "inference" if mode == "inference" else "forward + backward"
        graphed = cells.get((res, GRAPHED))
        extra = (f" ({graphed['images_per_s'] / cells[(res, 'vit-b16')]['images_per_s']:.2f}x replayed as a CUDA "
                 f"graph)" if graphed else "")
        lines.append(f"At {res} px Mamba-B's {label} runs at {speed:.2f}x ViT-B/16's{extra}: "
                     f"{'meets' if speed >= goal else 'misses'} the {goal:g}x goal.")
    return lines


def render_markdown(results: dict[str, Any]) -> str:
    meta, env, versions = results["meta"], results.get("env", {}), results.get("versions", {})
    title = "GPU run" + (" — DRY RUN on the CPU (tiny sizes; the numbers mean nothing)" if meta["dry_run"] else "")
    lines = [f"# {title}", "",
             f"Started {meta.get('started')}, {meta.get('elapsed_s')} s elapsed of a {meta.get('budget_s')} s budget"
             f"{'' if meta.get('finished') else ' (still running or cut short)'}.", "",
             f"- card: {env.get('gpu') or meta.get('host', {}).get('nvidia_smi') or env.get('device', 'not read')}"
             + (f" ({env['gpu_memory_gib']} GiB, sm {env['capability']})" if env.get("gpu") else ""),
             f"- scan backend: {meta.get('scan_backend')} (available: "
             f"{', '.join(env.get('scan_backends_available', []))}"
             + ("; NOT registered by `import defocus_mllm`" if env.get("scan_backend_registered_by_import") is False
                else "") + ")",
             "- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items() if v), ""]
    lines += ["## Parts", "", "| part | status | seconds | timeout s |", "|---|---|---|---|"]
    for name, record in results["parts"].items():
        lines.append(f"| {name} | {record.get('status')} | {_fmt(record.get('seconds'))} | "
                     f"{_fmt(record.get('timeout_s'))} |")
    for name, record in results["parts"].items():
        if record.get("errors"):
            lines += ["", f"{name} failed with:", "", "```"] + record["errors"] + ["```"]
    if results.get("kernels"):
        lines += ["", "## Kernels: `benchmarks/check_cuda_kernels.py`", "", "```"] + results["kernels"] + ["```"]
    rows = results.get("throughput", [])
    if rows:
        batches = sorted({(r["resolution"], r["batch"]) for r in rows})
        lines += ["", "## Encoder throughput (bf16, random weights, one process, one card)", "",
                  "Batch per resolution (the same for every encoder): "
                  + ", ".join(f"{res} px: {b}" for res, b in batches) + ". Peak memory: the model's weights plus "
                  "everything its measurement allocated (`torch.cuda.max_memory_allocated`).", "",
                  "### Inference", ""] + _throughput_table(rows, "inference")
        lines += ["", "### Forward + backward (train mode, mean of the output as the loss)", ""]
        lines += _throughput_table(rows, "train")
        goal = goal_line(rows)
        if goal:
            lines += ["", goal]
        lines += [""] + fused_path_goals(rows) if fused_path_goals(rows) else []
    if results.get("lm"):
        lm = results["lm"]
        lines += ["", f"Language model: {lm['shape']} ({lm['model_type']}), {lm['parameters'] / 1e6:.1f}M parameters, "
                      f"vocabulary {lm['vocab_size']}, random init, saved in {lm['dtype']}."]
    if results.get("recipes"):
        lines += ["", "## Recipes: `accelerate launch` + DeepSpeed, one process, bf16, activation checkpointing", "",
                  "| run | from | steps logged | loss first → last | finite | falling | samples/s (steady) | "
                  "samples/s (Trainer) | peak allocated GiB | peak GPU used GiB | seconds | status |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, r in results["recipes"].items():
            trainer = r.get("trainer", {})
            cells = [name, r.get("from"), r.get("steps_logged", 0),
                     f"{_fmt(r.get('loss_first'), 3)} → {_fmt(r.get('loss_last'), 3)}", _fmt(r.get("loss_finite")),
                     _fmt(r.get("loss_falling")), _fmt(r.get("steady_samples_per_s"), 2),
                     _fmt(trainer.get("train_samples_per_second"), 2), _fmt(r.get("peak_allocated_gib"), 2),
                     _fmt(r.get("peak_gpu_used_gib"), 2), _fmt(r.get("seconds")), r.get("status")]
            lines.append("| " + " | ".join(map(str, cells)) + " |")
    if results.get("reload"):
        lines += ["", "## Reload with `AutoModelForImageTextToText` (bf16) and generate", "",
                  "| model | status | load s | answers (question → answer / gold) |", "|---|---|---|---|"]
        for entry in results["reload"]:
            answers = "; ".join(f"{qa['question']} → {qa['answer']!r} / {qa['gold']}"
                                for qa in entry.get("answers", []))
            lines.append(f"| {entry['model_dir']} | {entry['status']} | {_fmt(entry.get('load_s'))} | {answers} |")
    return "\n".join(lines) + "\n"
