"""End to end: every benchmark name through eval/run.py's main() on the fixture datasets of
`evaluation_fixtures.make_fixture`, with a tiny De-focus LLaVA saved to disk (no hub access). The
model is untrained: the tests check files, counts, resuming, process splitting and metric plumbing,
not accuracy."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from defocus_mllm.evaluation import BenchmarkDataError, generate_answers, get_benchmark, run_benchmark
from evaluation_fixtures import FIXTURES, make_fixture
from evaluation_helpers import benchmark_cli_args as _cli_args, eval_run_script, read_jsonl as _lines
from evaluation_helpers import record_asked_questions
from helpers import accelerate_launch_command

REPO = Path(__file__).resolve().parents[1]
RUN_PY = REPO / "eval" / "run.py"


run = eval_run_script()


@pytest.fixture(scope="module")
def model_and_processor(model_dir):
    return run.load_model(str(model_dir), "float32")


# ------------------------------------------------------------------ the generation loop


def test_generate_answers_is_batch_invariant_and_writes_lines(model_and_processor, tmp_path, monkeypatch):
    from defocus_mllm.evaluation.sources import PathImage
    from defocus_mllm.llava import model_parts

    model, processor = model_and_processor
    samples = get_benchmark("easy-vqa").load(limit=7)
    out = tmp_path / "preds.jsonl"
    side = processor.tokenizer.padding_side
    opened, encoded = [], []
    real_open = PathImage._open
    monkeypatch.setattr(PathImage, "_open", lambda self: opened.append(self) or real_open(self))
    tower = model_parts(model)["vision_tower"][0]
    hook = tower.register_forward_pre_hook(lambda module, args: encoded.append(len(args[0])))
    try:
        batched = generate_answers(model, processor, samples, batch_size=3, max_new_tokens=4, output_file=out,
                                   show_progress=False)
    finally:
        hook.remove()
    # the questions about one image in a batch share one read and one encoding of it (easy-VQA lists them together)
    distinct_per_batch = [len({s.image for s in samples[i:i + 3]}) for i in range(0, 7, 3)]
    assert len(opened) == sum(distinct_per_batch) < 7
    assert encoded == distinct_per_batch
    single = generate_answers(model, processor, samples, batch_size=1, max_new_tokens=4, show_progress=False)
    # prompts of different lengths share a batch: left padding must not change any answer
    assert batched == single
    assert len(set(batched.values())) > 1, "the test model should answer questions differently"
    lines = _lines(out)
    assert [r["question_id"] for r in lines] == list(range(7))
    assert all(r["prompt"] == s.prompt and r["answer"] == batched[s.question_id] for r, s in zip(lines, samples))
    assert processor.tokenizer.padding_side == side  # restored
    assert not model.training


# ------------------------------------------------------------------ every benchmark, both layouts

CASES = sorted(FIXTURES) + [("easy-vqa", "package")]


@pytest.mark.parametrize("name,layout", CASES)
def test_eval_run_end_to_end(name, layout, model_dir, tmp_path):
    fx = make_fixture(name, layout, tmp_path / "data")
    out = tmp_path / "out"
    limit = ["--limit", "5"] if name == "easy-vqa" else []
    assert run.main(["--model", str(model_dir), "--benchmark", name, *_cli_args(fx["kwargs"]), *limit,
                     "--batch-size", "4", "--max-new-tokens", "3", "--output", str(out), "--quiet"]) == 0

    bench = get_benchmark(name)
    samples = bench.load(**fx["kwargs"], limit=5 if name == "easy-vqa" else None)
    preds = _lines(out / "predictions.jsonl")
    assert [p["question_id"] for p in preds] == [s.question_id for s in samples]
    assert all(isinstance(p["answer"], str) and p["prompt"] == s.prompt for p, s in zip(preds, samples))
    assert not list(out.glob("predictions.rank*.jsonl"))

    report = json.loads((out / "metrics.json").read_text())
    assert report["benchmark"] == name and report["num_questions"] == len(samples)
    assert report["model"] == model_dir.name and report["split"]
    assert list(report["headline"]) == [t or bench.title for _, t in bench.headline]
    scored = fx["scored"]
    for value in report["headline"].values():
        assert (isinstance(value, float) and value >= 0) if scored else value is None
    # the metrics are those of the answers written to predictions.jsonl
    assert report["metrics"] == json.loads(json.dumps(bench.score(samples, {p["question_id"]: p["answer"] for p in preds})))

    rows = (out / "results.md").read_text().splitlines()
    assert rows[0].startswith("| model | benchmark | split | questions |") and rows[2].startswith(f"| {model_dir.name} | {name} |")
    # the per-type breakdowns of metrics.json (easy-VQA per question kind, ...) are in results.md too
    for key, values in report["metrics"].items():
        if key.startswith("per_") and all(isinstance(v, (int, float)) for v in values.values()):
            assert f"| {key[4:].replace('_', ' ')} | accuracy |" in rows
    if name == "easy-vqa":
        assert "| kind | accuracy |" in rows

    if fx.get("submission"):
        sub = json.loads((out / "submission.json").read_text())
        assert len(sub) == fx["submission"]
        key = "image" if name == "vizwiz" else "question_id"
        assert all(set(e) == {key, "answer"} for e in sub)
    else:
        assert not (out / "submission.json").exists()


# ------------------------------------------------------------------ resuming


def test_interrupted_run_resumes_without_reanswering(model_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    args = ["--model", str(model_dir), "--benchmark", "easy-vqa", "--batch-size", "2", "--max-new-tokens", "3",
            "--output", str(out), "--quiet"]
    run.main(args + ["--limit", "6"])
    full = _lines(out / "predictions.jsonl")

    # simulate an interruption: three answers flushed by process 0, a fourth cut mid-line, nothing merged
    (out / "predictions.jsonl").unlink()
    (out / "metrics.json").unlink()
    kept = [dict(r, answer=f"KEPT{r['question_id']}") for r in full[:3]]
    (out / "predictions.rank0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept) + json.dumps(full[3])[:25])

    asked = record_asked_questions(monkeypatch)
    run.main(args + ["--limit", "8"])
    assert asked == [3, 4, 5, 6, 7]
    preds = _lines(out / "predictions.jsonl")
    assert [p["question_id"] for p in preds] == list(range(8))
    assert [p["answer"] for p in preds[:3]] == ["KEPT0", "KEPT1", "KEPT2"]
    assert [p["answer"] for p in preds[3:6]] == [r["answer"] for r in full[3:6]]  # greedy: same answers again
    assert not list(out.glob("predictions.rank*.jsonl"))
    assert json.loads((out / "metrics.json").read_text())["num_questions"] == 8

    # nothing left to answer: no generation at all; a smaller --limit keeps the other answers
    asked.clear()
    run.main(args + ["--limit", "4"])
    assert asked == []
    preds = _lines(out / "predictions.jsonl")
    assert len(preds) == 8 and json.loads((out / "metrics.json").read_text())["num_questions"] == 4


def test_resume_refuses_answers_to_a_different_prompt(model_dir, tmp_path):
    out = tmp_path / "out"
    args = ["--model", str(model_dir), "--benchmark", "easy-vqa", "--limit", "2", "--max-new-tokens", "2",
            "--output", str(out), "--quiet"]
    run.main(args)
    preds = _lines(out / "predictions.jsonl")
    preds[0]["prompt"] = "old prompt"
    (out / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in preds))
    with pytest.raises(ValueError, match="different prompt"):
        run.main(args)


# ------------------------------------------------------------------ library call == CLI, summary, errors


def test_run_benchmark_reports_what_the_cli_reports(model_and_processor, model_dir, tmp_path, capsys):
    model, processor = model_and_processor
    report = run_benchmark(model, processor, "easy-vqa", limit=6, batch_size=3, max_new_tokens=3, show_progress=False)
    run.main(["--model", str(model_dir), "--benchmark", "easy-vqa", "--limit", "6", "--batch-size", "3",
              "--max-new-tokens", "3", "--output", str(tmp_path / "cli"), "--quiet"])
    cli = json.loads((tmp_path / "cli" / "metrics.json").read_text())
    assert cli["metrics"] == report["metrics"] and cli["headline"] == report["headline"]

    fx = make_fixture("gqa", "llava", tmp_path / "data")
    run.main(["--model", str(model_dir), "--benchmark", "gqa", *_cli_args(fx["kwargs"]), "--max-new-tokens", "2",
              "--output", str(tmp_path / "gqa"), "--quiet"])
    capsys.readouterr()
    assert run.main(["--summary", str(tmp_path / "cli"), str(tmp_path / "gqa")]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0] == "| model | GQA | easy-VQA |"
    assert table[2].startswith(f"| {model_dir.name} | ")


def test_cli_errors(model_dir, tmp_path):
    with pytest.raises(BenchmarkDataError, match="needs --data"):
        run.main(["--model", str(model_dir), "--benchmark", "pope", "--output", str(tmp_path / "o"), "--quiet"])
    with pytest.raises(SystemExit):
        run.main(["--benchmark", "pope"])
    with pytest.raises(SystemExit):
        run.main(["--model", str(model_dir), "--benchmark", "imagenet"])


# ------------------------------------------------------------------ accelerate launch, two processes


@pytest.mark.slow
def test_accelerate_launch_splits_questions_over_two_processes(model_dir, tmp_path):
    out = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    # without CUDA, --multi_gpu starts the processes and the library joins them into one gloo group
    cmd = [*accelerate_launch_command("--multi_gpu"), "--num_processes", "2",
           str(RUN_PY), "--model", str(model_dir), "--benchmark", "easy-vqa",
           "--limit", "7", "--batch-size", "2", "--max-new-tokens", "3", "--output", str(out), "--quiet"]
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert result.stdout.count("| easy-vqa |") == 1  # only the main process reports
    report = json.loads((out / "metrics.json").read_text())
    assert report["generation"]["num_processes"] == 2 and report["num_questions"] == 7
    preds = _lines(out / "predictions.jsonl")
    assert [p["question_id"] for p in preds] == list(range(7))  # padded duplicates dropped, order restored
    assert not list(out.glob("predictions.rank*.jsonl"))

    single = tmp_path / "one"
    run.main(["--model", str(model_dir), "--benchmark", "easy-vqa", "--limit", "7", "--batch-size", "1",
              "--max-new-tokens", "3", "--output", str(single), "--quiet"])
    assert [p["answer"] for p in preds] == [p["answer"] for p in _lines(single / "predictions.jsonl")]
