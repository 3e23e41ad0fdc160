"""A run killed while answering leaves `predictions.rank<k>.jsonl`; the next run over the same folder must read it and
ask only the questions it does not answer (a fast stand-in for the end-to-end resume test)."""

import json

import pytest
import torch

from defocus_mllm.evaluation import run_benchmark
from helpers import build_tiny_llava

QUESTIONS, BATCH = 12, 4


class _Killed(Exception):
    pass


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model, processor = build_tiny_llava()
    return model.eval(), processor


def _count_questions(model, asked: list, kill_after: int | None = None):
    """Wrap `model.generate`: record how many questions each call asks; raise after `kill_after` calls."""
    real = type(model).generate.__get__(model)

    def generate(**inputs):
        if kill_after is not None and len(asked) == kill_after:
            raise _Killed
        asked.append(inputs["input_ids"].shape[0])
        return real(**inputs)

    model.generate = generate


def test_a_rerun_asks_only_what_the_rank_files_of_an_interrupted_run_do_not_answer(tiny, tmp_path):
    model, processor = tiny
    kwargs = dict(limit=QUESTIONS, batch_size=BATCH, max_new_tokens=3, show_progress=False)
    straight = run_benchmark(model, processor, "easy-vqa", output_dir=tmp_path / "straight", **kwargs)

    out = tmp_path / "resumed"
    asked: list[int] = []
    _count_questions(model, asked, kill_after=1)
    try:
        with pytest.raises(_Killed):
            run_benchmark(model, processor, "easy-vqa", output_dir=out, **kwargs)
        assert asked == [BATCH]  # one batch answered and flushed before the "kill"
        assert not (out / "predictions.jsonl").exists() and list(out.glob("predictions.rank*.jsonl"))
        asked.clear()
        _count_questions(model, asked)
        resumed = run_benchmark(model, processor, "easy-vqa", output_dir=out, **kwargs)
    finally:
        del model.generate
    assert sum(asked) == QUESTIONS - BATCH  # the 4 answers in the rank file were reused, not asked again
    assert resumed["metrics"] == straight["metrics"]
    read = lambda path: [json.loads(line)["answer"] for line in path.read_text().splitlines()]  # noqa: E731
    assert read(out / "predictions.jsonl") == read(tmp_path / "straight" / "predictions.jsonl")
