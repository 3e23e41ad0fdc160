"""`run_benchmark` and eval/run.py on bad inputs: an image smaller than a patch or unreadable is named with its
question (or skipped and counted on request, and asked again once fixed), a corrupt parquet file is named, and counts
below one are refused before anything runs. Tiny models saved to disk, eval/run.py's main() in process."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from defocus_mllm.evaluation import BenchmarkDataError, get_benchmark
from evaluation_fixtures import make_fixture
from evaluation_helpers import EASY_VQA_ARGS as EASY, benchmark_cli_args as _cli_args, eval_run_script
from evaluation_helpers import read_jsonl as _lines, record_asked_questions
from helpers import build_tiny_llava

run = eval_run_script()


@pytest.fixture(scope="module")
def defocus_model_dir(tmp_path_factory):
    """A tiny model with the De-focus image processor, which refuses images smaller than one patch."""
    path = tmp_path_factory.mktemp("defocus_llava")
    model, processor = build_tiny_llava()
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def _pope_with_bad_images(root: Path) -> tuple[dict, Path, Path]:
    fx = make_fixture("pope", "llava", root)
    images = sorted(root.rglob("*.jpg"))
    Image.new("RGB", (1, 1), (255, 0, 0)).save(images[1])  # readable, but smaller than a patch
    images[4].write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return fx, images[1], images[4]


def test_bad_images_are_named_or_skipped_and_counted(defocus_model_dir, tmp_path, monkeypatch):
    fx, tiny, broken = _pope_with_bad_images(tmp_path / "data")
    samples = get_benchmark("pope").load(**fx["kwargs"])
    qid_of = {s.image.path.name: s.question_id for s in samples}
    out = tmp_path / "out"
    args = ["--model", str(defocus_model_dir), "--benchmark", "pope", *_cli_args(fx["kwargs"]),
            "--max-new-tokens", "2", "--batch-size", "3", "--output", str(out), "--quiet"]

    with pytest.raises(BenchmarkDataError) as err:
        run.main(args)
    assert tiny.name in str(err.value) and f"question {qid_of[tiny.name]!r}" in str(err.value)
    assert "smaller than" in str(err.value)

    shutil.rmtree(out)
    run.main(args + ["--skip-bad-images"])
    report = json.loads((out / "metrics.json").read_text())
    skipped = {u["question_id"]: u["error"] for u in report["unanswered"]["questions"]}
    assert report["unanswered"]["count"] == 2 and report["num_questions"] == 6
    assert set(skipped) == {qid_of[tiny.name], qid_of[broken.name]}
    assert tiny.name in skipped[qid_of[tiny.name]] and broken.name in skipped[qid_of[broken.name]]
    preds = {r["question_id"]: r for r in _lines(out / "predictions.jsonl")}
    assert len(preds) == 6 and all(preds[q]["answer"] is None and preds[q]["error"] for q in skipped)
    assert all(isinstance(r["answer"], str) for q, r in preds.items() if q not in skipped)

    # fixed images: the next run over the folder asks exactly the skipped questions again
    Image.new("RGB", (24, 24), (0, 0, 255)).save(tiny)
    Image.new("RGB", (24, 24), (0, 255, 0)).save(broken)
    asked = record_asked_questions(monkeypatch)
    run.main(args)
    assert sorted(asked) == sorted(skipped)
    report = json.loads((out / "metrics.json").read_text())
    assert report["unanswered"]["count"] == 0
    assert all(isinstance(r["answer"], str) for r in _lines(out / "predictions.jsonl"))


def test_unreadable_image_without_skip_names_file_and_question(defocus_model_dir, tmp_path):
    fx, _, broken = _pope_with_bad_images(tmp_path / "data")
    Image.new("RGB", (24, 24)).save(sorted((tmp_path / "data").rglob("*.jpg"))[1])  # leave only the broken file
    with pytest.raises(BenchmarkDataError, match=broken.name):
        run.main(["--model", str(defocus_model_dir), "--benchmark", "pope", *_cli_args(fx["kwargs"]),
                  "--max-new-tokens", "2", "--output", str(tmp_path / "out"), "--quiet"])


@pytest.mark.parametrize("damage", ["truncated", "scrambled"])
def test_corrupt_parquet_names_the_file(defocus_model_dir, tmp_path, damage):
    fx = make_fixture("pope", "hf", tmp_path / "data")
    path = next((tmp_path / "data").rglob("*.parquet"))
    data = bytearray(path.read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]
    else:  # footer intact, pages and metadata overwritten
        data[100 : len(data) // 2] = b"\x5a" * (len(data) // 2 - 100)
    path.write_bytes(bytes(data))
    with pytest.raises(BenchmarkDataError, match=str(path.name)) as err:
        run.main(["--model", str(defocus_model_dir), "--benchmark", "pope", *_cli_args(fx["kwargs"]),
                  "--max-new-tokens", "2", "--output", str(tmp_path / "out"), "--quiet"])
    assert str(path) in str(err.value)


@pytest.mark.parametrize("option, value", [("--limit", "-1"), ("--limit", "-9660"), ("--limit", "0"),
                                           ("--max-new-tokens", "0"), ("--batch-size", "0")])
def test_counts_below_one_are_refused_naming_the_option(option, value, two_models, tmp_path, capsys):
    a, _ = two_models
    with pytest.raises(SystemExit) as stop:  # the last occurrence of an option wins, as on any command line
        run.main(["--model", str(a), *EASY, "--output", str(tmp_path / "out"), option, value])
    assert stop.value.code == 2
    assert f"argument {option}: {int(value)} must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before the model was loaded or a question asked


@pytest.mark.parametrize("option, value", [("limit", -1), ("limit", 0), ("max_new_tokens", 0), ("batch_size", 0),
                                           ("limit", 2.5)])
def test_run_benchmark_refuses_counts_below_one(option, value):
    from defocus_mllm.evaluation import run_benchmark

    with pytest.raises(ValueError, match=rf"{option}={value!r} must be a whole number of at least 1"):
        run_benchmark(None, None, "easy-vqa", **{option: value})
