"""defocus_mllm/files.py: a truncated weights or data file is named by the reader that meets it (the vision tower's
and the projector's loaders, the training data loaders). The converter's case: tests/test_convert.py."""

import pytest
from safetensors.torch import save_file

from defocus_mllm import DefocusVisionConfig, DefocusVisionModel
from helpers import truncate_file as _truncate


def test_a_truncated_model_directory_is_named_when_loaded(tmp_path):
    from defocus_mllm.llava import load_vision_tower
    from defocus_mllm.training.llava_setup import load_projector
    from helpers import build_tiny_llava

    DefocusVisionModel(DefocusVisionConfig.from_preset("mamba-tiny", num_hidden_layers=1)).save_pretrained(
        tmp_path / "tower")
    _truncate(tmp_path / "tower" / "model.safetensors")
    with pytest.raises(ValueError, match=r"tower/model\.safetensors.*truncated"):
        load_vision_tower(tmp_path / "tower")
    model, _ = build_tiny_llava()
    projector = model.model.multi_modal_projector.state_dict()
    save_file({k: v.contiguous() for k, v in projector.items()}, str(tmp_path / "projector.safetensors"))
    _truncate(tmp_path / "projector.safetensors")
    with pytest.raises(ValueError, match=r"projector\.safetensors.*truncated"):
        load_projector(model, tmp_path / "projector.safetensors")


def test_a_truncated_parquet_file_is_named_by_the_training_loaders(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from defocus_mllm.data.conversations import load_hf_dataset
    from defocus_mllm.training import EncoderDataArguments
    from defocus_mllm.training.encoder_setup import build_classification_datasets

    (tmp_path / "chat").mkdir()
    rows = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]] * 50
    pq.write_table(pa.table({"messages": rows}), tmp_path / "chat" / "train.parquet")
    _truncate(tmp_path / "chat" / "train.parquet")
    with pytest.raises(ValueError, match=r"chat/train\.parquet"):
        load_hf_dataset(tmp_path / "chat")
    (tmp_path / "images").mkdir()
    pq.write_table(pa.table({"image": [{"bytes": b"x" * 100, "path": None}] * 50, "label": [0] * 50}),
                   tmp_path / "images" / "train.parquet")
    _truncate(tmp_path / "images" / "train.parquet")
    with pytest.raises(ValueError, match=r"images/train\.parquet"):
        build_classification_datasets(EncoderDataArguments(dataset_name=str(tmp_path / "images")), None, None)
