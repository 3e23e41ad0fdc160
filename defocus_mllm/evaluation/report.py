"""Markdown rendering of benchmark reports: one row per run, and several runs side by side."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

_ORDER = ("vqav2", "gqa", "vizwiz", "scienceqa", "textvqa", "pope", "mme", "mmbench", "easy-vqa")


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def results_row(report: Mapping[str, Any], header: bool = False) -> str:
    """``| model | benchmark | split | questions | <headline numbers> |`` for one run (with the header)."""
    headline = report.get("headline") or {}
    cols = ["model", "benchmark", "split", "questions", *headline]
    row = [report.get("model"), report.get("benchmark"), report.get("split"), report.get("num_questions"),
           *headline.values()]
    lines = []
    if header:
        lines += ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines.append("| " + " | ".join(_fmt(v) for v in row) + " |")
    return "\n".join(lines)


def breakdown_tables(metrics: Mapping[str, Any]) -> str:
    """One Markdown table per breakdown of a benchmark's metrics (every ``per_<type>`` entry holding
    numbers: easy-VQA's ``per_kind``, VQAv2's ``per_answer_type``, GQA's ``per_structural_type``, ...),
    or "" when there is none."""
    blocks = []
    for key, values in metrics.items():
        if (key.startswith("per_") and isinstance(values, Mapping) and values
                and all(isinstance(v, (int, float)) for v in values.values())):
            lines = [f"| {key[len('per_'):].replace('_', ' ')} | accuracy |", "|---|---|"]
            lines += [f"| {name} | {_fmt(float(value))} |" for name, value in values.items()]
            blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def results_markdown(report: Mapping[str, Any]) -> str:
    """The content of ``results.md``: :func:`results_row` with its header, then the breakdown tables."""
    extra = breakdown_tables(report.get("metrics") or {})
    return results_row(report, header=True) + ("\n\n" + extra if extra else "") + "\n"


def load_report(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / "metrics.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} an eval/run.py output directory?")
    return json.loads(path.read_text(encoding="utf-8"))


def summary_table(reports: Sequence[Mapping[str, Any]]) -> str:
    """Runs side by side: one row per model, one column per headline number (benchmarks in LLaVA's
    table order). A benchmark run on several splits gets one column per split."""
    splits: dict[str, set] = {}
    for r in reports:
        splits.setdefault(r["benchmark"], set()).add(r.get("split"))
    columns: list[str] = []
    rows: dict[str, dict[str, Any]] = {}
    for r in sorted(reports, key=lambda r: (_ORDER.index(r["benchmark"]) if r["benchmark"] in _ORDER else 99,
                                            str(r.get("split")))):
        for title, value in (r.get("headline") or {}).items():
            col = f"{title} ({r.get('split')})" if len(splits[r["benchmark"]]) > 1 else title
            if col not in columns:
                columns.append(col)
            rows.setdefault(str(r.get("model")), {})[col] = value
    lines = ["| model | " + " | ".join(columns) + " |", "|---|" + "|".join("---" for _ in columns) + "|"]
    for model, values in rows.items():
        lines.append(f"| {model} | " + " | ".join(_fmt(values.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def summarize_dirs(run_dirs: Iterable[str | Path]) -> str:
    """:func:`summary_table` of the ``metrics.json`` files in ``run_dirs``."""
    return summary_table([load_report(d) for d in run_dirs])
