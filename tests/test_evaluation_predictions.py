"""Prediction files (evaluation/predictions.py): reading them back, appending after an interrupted write, the
merged file a run leaves, and an edited prediction of the wrong type named when a run resumes over it."""

import json
from pathlib import Path

import pytest

from defocus_mllm.evaluation import BenchmarkDataError
from defocus_mllm.evaluation.predictions import (
    PREDICTIONS,
    append_safe,
    prediction_record,
    read_predictions,
    write_predictions,
)
from defocus_mllm.evaluation.sources import PathImage, Sample
from evaluation_helpers import EASY_VQA_ARGS as EASY, eval_run_script, read_jsonl as _lines

run = eval_run_script()


def test_read_predictions_skips_broken_lines_and_keeps_first(tmp_path):
    a, b = tmp_path / "predictions.jsonl", tmp_path / "predictions.rank1.jsonl"
    a.write_text(json.dumps({"question_id": 1, "prompt": "p", "answer": "x"}) + "\n"
                 + "not json\n"
                 + json.dumps({"question_id": "q2", "answer": "y"}) + "\n"
                 + json.dumps({"answer": "no id"}) + "\n")
    b.write_text(json.dumps({"question_id": 1, "answer": "later"}) + "\n" + '{"question_id": 3, "ans')
    recs = read_predictions([a, b, tmp_path / "missing.jsonl"])
    assert set(recs) == {1, "q2"}
    assert recs[1]["answer"] == "x"


def test_append_safe_drops_a_partial_last_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"question_id": 1, "answer": "a"}\n{"question_id": 2, "ans')
    with append_safe(path) as f:
        f.write('{"question_id": 3, "answer": "c"}\n')
    assert [json.loads(line)["question_id"] for line in path.read_text().splitlines()] == [1, 3]
    with append_safe(tmp_path / "new.jsonl") as f:
        f.write("x\n")
    assert (tmp_path / "new.jsonl").read_text() == "x\n"


def test_write_predictions_keeps_question_order_errors_and_older_answers(tmp_path):
    samples = [Sample(i, f"q{i}", PathImage(Path(f"{i}.png"))) for i in (2, 1)]
    older = {9: {"question_id": 9, "prompt": "old", "image": "9.png:missing", "answer": "kept"}}
    (tmp_path / "predictions.rank0.jsonl").write_text("")
    write_predictions(tmp_path, samples, {2: "two", 1: ""}, older, {1: "bad image"})
    lines = [json.loads(line) for line in (tmp_path / PREDICTIONS).read_text().splitlines()]
    assert lines == [prediction_record(samples[0], "two"), prediction_record(samples[1], None, "bad image"), older[9]]
    assert lines[1]["answer"] is None and lines[1]["error"] == "bad image" and "error" not in lines[0]
    assert not list(tmp_path.glob("predictions.rank*.jsonl"))


@pytest.mark.parametrize("edit, message", [
    (lambda rec: {**rec, "answer": 5}, r"predictions\.jsonl:1: 'answer' of question 0 must be a string \(or null\), "
                                       r"not int"),
    (lambda rec: {**rec, "question_id": [0]}, r"predictions\.jsonl:1: 'question_id' must be a string or an integer, "
                                              r"not list"),
])
def test_an_edited_prediction_of_the_wrong_type_is_named(edit, message, two_models, tmp_path):
    a, _ = two_models
    out = tmp_path / "out"
    run.main(["--model", str(a), *EASY, "--output", str(out)])
    lines = _lines(out / "predictions.jsonl")
    lines[0] = edit(lines[0])
    (out / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    with pytest.raises(BenchmarkDataError, match=message):
        run.main(["--model", str(a), *EASY, "--output", str(out)])
