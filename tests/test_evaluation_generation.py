"""Pieces of the generation loop that need no model: prediction files and tokenizer padding."""

import json

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from defocus_mllm.evaluation import read_predictions
from defocus_mllm.evaluation.generation import _append_safe, _LeftPadding


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
    with _append_safe(path) as f:
        f.write('{"question_id": 3, "answer": "c"}\n')
    assert [json.loads(line)["question_id"] for line in path.read_text().splitlines()] == [1, 3]
    with _append_safe(tmp_path / "new.jsonl") as f:
        f.write("x\n")
    assert (tmp_path / "new.jsonl").read_text() == "x\n"


def test_left_padding_is_temporary_and_borrows_eos_as_pad():
    backend = Tokenizer(models.WordLevel({"<unk>": 0, "</s>": 1, "a": 2}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>")
    assert tok.pad_token is None and tok.padding_side == "right"
    with _LeftPadding(tok):
        assert tok.padding_side == "left" and tok.pad_token == "</s>"
        batch = tok(["a", "a a a"], padding=True)["input_ids"]
        assert batch[0] == [1, 1, 2]  # padded on the left
    assert tok.pad_token is None and tok.padding_side == "right"
