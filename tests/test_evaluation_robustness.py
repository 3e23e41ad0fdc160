"""Evaluation on bad inputs and over old output folders: resuming never reuses the answers of another model or of
other settings, and a corrupt image or parquet file is named (or, for images, skipped and counted on request).
Tiny models saved to disk, eval/run.py's main() in process (no hub access)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from defocus_mllm.evaluation import BenchmarkDataError, get_benchmark, model_fingerprint
from evaluation_fixtures import make_fixture
from evaluation_helpers import benchmark_cli_args as _cli_args, build_saved_tiny_llava as _build_tiny_llava
from evaluation_helpers import eval_run_script, read_jsonl as _lines, record_asked_questions
from helpers import build_tiny_llava

run = eval_run_script()

EASY = ["--benchmark", "easy-vqa", "--limit", "4", "--batch-size", "4", "--quiet"]


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    """Two different models saved in folders of the same name, `a/final` and `b/final`."""
    root = tmp_path_factory.mktemp("models")
    _build_tiny_llava(root / "a" / "final")
    model, processor = run.load_model(str(root / "a" / "final"), "float32")
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    model.save_pretrained(root / "b" / "final")
    processor.save_pretrained(root / "b" / "final")
    return root / "a" / "final", root / "b" / "final"


def _answers(out: Path) -> list[str]:
    return [r["answer"] for r in _lines(out / "predictions.jsonl")]


# ------------------------------------------------------------------ resuming is keyed on what makes the answers


def test_models_sharing_a_folder_name_get_their_own_default_output(two_models, tmp_path, monkeypatch):
    a, b = two_models
    alone = tmp_path / "b-alone"
    run.main(["--model", str(b), *EASY, "--output", str(alone)])
    monkeypatch.chdir(tmp_path)
    run.main(["--model", str(a), *EASY])
    run.main(["--model", str(b), *EASY])
    folders = sorted(p.parent for p in (tmp_path / "outputs" / "eval").glob("*/easy-vqa"))
    assert len(folders) == 2 and all(f.name.startswith("final-") for f in folders)
    fp_b = model_fingerprint(run.load_model(str(b), "float32")[0])[:10]
    out_b = tmp_path / "outputs" / "eval" / f"final-{fp_b}" / "easy-vqa"
    out_a = next(f for f in folders if f != out_b.parent) / "easy-vqa"
    assert _answers(out_a) != _answers(alone), "the two test models should answer differently"
    # b's answers are b's, not a's reused from a folder named after `final`
    assert _answers(out_b) == _answers(alone)
    assert json.loads((out_b / "run.json").read_text())["key"]["model"].startswith(fp_b)


def test_resume_refuses_another_model_or_other_settings(two_models, tmp_path):
    a, b = two_models
    out = tmp_path / "out"
    run.main(["--model", str(a), *EASY, "--output", str(out)])
    first = _answers(out)
    with pytest.raises(ValueError, match="weights or config differ"):
        run.main(["--model", str(b), *EASY, "--output", str(out)])
    with pytest.raises(ValueError, match="generation settings differ"):
        run.main(["--model", str(a), *EASY, "--max-new-tokens", "5", "--output", str(out)])
    with pytest.raises(ValueError, match="weights or config differ"):  # same weights, another dtype
        run.main(["--model", str(a), *EASY, "--dtype", "bfloat16", "--output", str(out)])
    assert _answers(out) == first  # nothing was touched

    # --overwrite starts afresh with b: its answers, its key
    run.main(["--model", str(b), *EASY, "--output", str(out), "--overwrite"])
    run.main(["--model", str(b), *EASY, "--output", str(tmp_path / "b")])
    assert _answers(out) == _answers(tmp_path / "b")
    assert json.loads((out / "run.json").read_text())["key"] == json.loads((tmp_path / "b" / "run.json").read_text())["key"]

    # the same model from a copied folder is the same model: resumed, nothing asked again
    copy = tmp_path / "copy" / "final"
    shutil.copytree(b, copy)
    run.main(["--model", str(copy), *EASY, "--limit", "6", "--output", str(out)])
    assert _answers(out)[:4] == _answers(tmp_path / "b")


def test_resume_refuses_a_folder_without_run_json(two_models, tmp_path):
    a, _ = two_models
    out = tmp_path / "old"
    run.main(["--model", str(a), *EASY, "--output", str(out)])
    (out / "run.json").unlink()  # as an older version left it
    with pytest.raises(ValueError, match="no run.json"):
        run.main(["--model", str(a), *EASY, "--output", str(out)])


def test_resume_refuses_answers_about_another_image(two_models, tmp_path):
    a, _ = two_models
    fx = make_fixture("pope", "llava", tmp_path / "data")
    out = tmp_path / "out"
    args = ["--model", str(a), "--benchmark", "pope", *_cli_args(fx["kwargs"]), "--max-new-tokens", "2",
            "--output", str(out), "--quiet"]
    run.main(args)
    image = sorted((tmp_path / "data").rglob("*.jpg"))[2]
    Image.new("RGB", (40, 40), (9, 9, 9)).save(image)  # same name, another picture
    with pytest.raises(ValueError, match="another image"):
        run.main(args)


# ------------------------------------------------------------------ bad inputs


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


# ------------------------------------------------------------------ issue 24: values read at the boundary


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


def test_resume_notices_an_edited_generation_config(two_models, tmp_path):
    model = tmp_path / "model" / "final"
    shutil.copytree(two_models[0], model)
    out = tmp_path / "out"
    run.main(["--model", str(model), *EASY, "--output", str(out)])
    first = _answers(out)
    config_file = model / "generation_config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    config_file.write_text(json.dumps({**config, "repetition_penalty": 1.7}))
    with pytest.raises(ValueError, match=r"generation settings differ \(max_new_tokens, or the model's "
                                         r"generation_config\.json\)"):
        run.main(["--model", str(model), *EASY, "--limit", "6", "--output", str(out)])
    assert _answers(out) == first  # nothing mixed in


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
