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
