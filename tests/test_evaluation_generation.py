"""Pieces of the generation loop that need no model: tokenizer padding."""

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from defocus_mllm.evaluation.generation import _LeftPadding


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
