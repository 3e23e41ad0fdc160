"""Results rows and the side-by-side summary table (no model needed), and eval/run.py's `--summary` over the
folders of two tiny saved models that share a folder name."""

import json

import pytest

from defocus_mllm.evaluation import results_row, summarize_dirs, summary_table
from evaluation_helpers import EASY_VQA_ARGS as EASY, eval_run_script

run = eval_run_script()


def _report(model, benchmark, headline, split="test"):
    return {"model": model, "benchmark": benchmark, "split": split, "num_questions": 10, "headline": headline}


def test_results_row_with_header():
    row = results_row(_report("m", "pope", {"POPE F1": 85.1234, "POPE acc": None}), header=True)
    assert row.splitlines() == [
        "| model | benchmark | split | questions | POPE F1 | POPE acc |",
        "|---|---|---|---|---|---|",
        "| m | pope | test | 10 | 85.12 | - |",
    ]


def test_summary_table_puts_runs_side_by_side():
    reports = [
        _report("model-b", "easy-vqa", {"easy-VQA": 50.0}),
        _report("model-a", "mme", {"MME-P": 1200.5, "MME-C": 300.0}),
        _report("model-a", "gqa", {"GQA": 61.234}),
        _report("model-b", "gqa", {"GQA": 40.0}),
    ]
    lines = summary_table(reports).splitlines()
    # benchmarks in LLaVA's table order regardless of the order of the runs
    assert lines[0] == "| model | GQA | MME-P | MME-C | easy-VQA |"
    assert lines[1] == "|---|---|---|---|---|"
    assert "| model-a | 61.23 | 1200.50 | 300.00 | - |" in lines
    assert "| model-b | 40.00 | - | - | 50.00 |" in lines
    assert len(lines) == 4


def test_summary_table_separates_splits():
    table = summary_table([_report("m", "vqav2", {"VQAv2": 70.0}, "validation"),
                           _report("m", "vqav2", {"VQAv2": None}, "testdev")])
    assert table.splitlines()[0] == "| model | VQAv2 (testdev) | VQAv2 (validation) |"
    assert table.splitlines()[2] == "| m | - | 70.00 |"


def test_summarize_dirs_reads_metrics_json(tmp_path):
    for name, value in (("a", 1.0), ("b", 2.0)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps(_report(name, "gqa", {"GQA": value})))
    assert summarize_dirs([tmp_path / "a", tmp_path / "b"]).splitlines()[2:] == ["| a | 1.00 |", "| b | 2.00 |"]
    with pytest.raises(FileNotFoundError, match="metrics.json"):
        summarize_dirs([tmp_path])


def _keyed(model, benchmark, headline, fingerprint, split="test"):
    return {**_report(model, benchmark, headline, split), "run_key": {"model": fingerprint, "processor": "p"}}


def test_models_of_the_same_name_get_a_row_each():
    # run1/final and run2/final: both named "final"; the fingerprints tell them apart
    table = summary_table([_keyed("final", "gqa", {"GQA": 10.0}, "aaaaaaaaaaaa11"),
                           _keyed("final", "gqa", {"GQA": 20.0}, "bbbbbbbbbbbb22"),
                           _keyed("final", "pope", {"POPE F1": 80.0}, "aaaaaaaaaaaa11")])
    assert table.splitlines()[2:] == ["| final [aaaaaaaaaa] | 10.00 | 80.00 |", "| final [bbbbbbbbbb] | 20.00 | - |"]


def test_two_runs_for_one_cell_are_refused_naming_both(tmp_path):
    for name, value in (("x", 1.0), ("y", 2.0)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps(_keyed("m", "gqa", {"GQA": value}, "f" * 12)))
    with pytest.raises(ValueError, match=rf"{tmp_path / 'x'} and {tmp_path / 'y'} both hold 'GQA' of model 'm'"):
        summarize_dirs([tmp_path / "x", tmp_path / "y"])


def test_the_summary_keeps_models_of_the_same_folder_name_apart(two_models, tmp_path, capsys):
    a, b = two_models  # run1/final and run2/final, as it were
    run.main(["--model", str(a), *EASY, "--output", str(tmp_path / "a")])
    run.main(["--model", str(b), *EASY, "--output", str(tmp_path / "b")])
    capsys.readouterr()
    assert run.main(["--summary", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    rows = capsys.readouterr().out.splitlines()[2:]
    keys = [json.loads((tmp_path / d / "run.json").read_text())["key"]["model"][:10] for d in "ab"]
    assert len(rows) == 2 and keys[0] != keys[1]
    assert all(any(row.startswith(f"| final [{key}] |") for row in rows) for key in keys), rows
    # the same model twice on one benchmark would fill one cell twice: refused, naming both folders
    run.main(["--model", str(a), *EASY, "--limit", "2", "--output", str(tmp_path / "a2")])
    capsys.readouterr()
    assert run.main(["--summary", str(tmp_path / "a"), str(tmp_path / "a2")]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "a") in err and str(tmp_path / "a2") in err and "both hold 'easy-VQA'" in err
