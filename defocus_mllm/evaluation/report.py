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


def _model_identity(report: Mapping[str, Any]) -> tuple[str, str]:
    """What tells two models apart: the weights and processor fingerprints of the run key (the name alone is often a
    folder name such as `final` that many models share); reports without a run key fall back to the name."""
    key = report.get("run_key") or {}
    return str(key.get("model", "")), str(key.get("processor", ""))


def summary_table(reports: Sequence[Mapping[str, Any]], sources: Sequence[str] | None = None) -> str:
    """Runs side by side: one row per model, one column per headline number (benchmarks in LLaVA's
    table order). A benchmark run on several splits gets one column per split.

    Rows are keyed by the model's fingerprint (:func:`_model_identity`), not its name: models of the same name get
    one row each, named with the start of their fingerprint. Two runs that would fill the same cell (one model, one
    benchmark and split, e.g. run twice with another ``--limit``) are an error naming both (``sources``: where each
    report was read from)."""
    sources = list(sources) if sources is not None else [f"report {i}" for i in range(len(reports))]
    splits: dict[str, set] = {}
    names: dict[str, set] = {}
    for r in reports:
        splits.setdefault(r["benchmark"], set()).add(r.get("split"))
        names.setdefault(str(r.get("model")), set()).add(_model_identity(r))
    columns: list[str] = []
    rows: dict[tuple, dict[str, Any]] = {}
    filled: dict[tuple, str] = {}
    order = sorted(range(len(reports)), key=lambda i: (
        _ORDER.index(reports[i]["benchmark"]) if reports[i]["benchmark"] in _ORDER else 99, str(reports[i].get("split"))))
    for i in order:
        r, name = reports[i], str(reports[i].get("model"))
        identity = _model_identity(r)
        label = name if len(names[name]) == 1 else f"{name} [{identity[0][:10] or 'no fingerprint'}]"
        for title, value in (r.get("headline") or {}).items():
            col = f"{title} ({r.get('split')})" if len(splits[r["benchmark"]]) > 1 else title
            if col not in columns:
                columns.append(col)
            cell = (label, identity, col)
            if cell in filled:
                raise ValueError(f"{filled[cell]} and {sources[i]} both hold {col!r} of model {label!r} (same weights "
                                 f"and processor, same benchmark and split); summarise one of them")
            filled[cell] = sources[i]
            rows.setdefault((label, identity), {})[col] = value
    lines = ["| model | " + " | ".join(columns) + " |", "|---|" + "|".join("---" for _ in columns) + "|"]
    for (label, _), values in rows.items():
        lines.append(f"| {label} | " + " | ".join(_fmt(values.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def summarize_dirs(run_dirs: Iterable[str | Path]) -> str:
    """:func:`summary_table` of the ``metrics.json`` files in ``run_dirs``."""
    run_dirs = [str(d) for d in run_dirs]
    return summary_table([load_report(d) for d in run_dirs], sources=run_dirs)
