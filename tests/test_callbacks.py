"""Scheduled drop path (docs/method.md §4.2): the schedule and the callback that applies it each epoch."""

import pytest
import torch
from transformers import TrainerControl, TrainerState, TrainingArguments

from defocus_mllm import DefocusForImageClassification, DefocusVisionConfig
from defocus_mllm.training.callbacks import ScheduledDropPathCallback, scheduled_drop_path_rate


def test_schedule_is_linear_from_min_to_max():
    rates = [scheduled_drop_path_rate(e, 300, 0.1, 0.75) for e in range(300)]
    assert rates[0] == pytest.approx(0.1) and rates[-1] == pytest.approx(0.75)
    assert rates[150] == pytest.approx(0.1 + 0.65 * 150 / 299)
    assert all(b > a for a, b in zip(rates, rates[1:]))
    assert scheduled_drop_path_rate(0, 1, 0.1, 0.75) == 0.75  # a one-epoch run trains at the target rate


def test_callback_sets_per_layer_rates_and_logs_each_epoch(tmp_path):
    torch.manual_seed(0)
    model = DefocusForImageClassification(DefocusVisionConfig.from_preset("mamba-tiny"))  # depth 4
    args = TrainingArguments(output_dir=str(tmp_path), num_train_epochs=5, report_to="none")
    state, control = TrainerState(), TrainerControl()
    state.num_train_epochs = 5
    callback = ScheduledDropPathCallback(min_rate=0.1, max_rate=0.5)
    for epoch in range(5):
        state.epoch = float(epoch)
        callback.on_epoch_begin(args, state, control, model=model)
        expected = 0.1 + 0.4 * epoch / 4
        block_rates = [block.drop_path_rate for block in model.defocus.blocks]
        assert block_rates == pytest.approx([expected * i / 3 for i in range(4)])
    assert [e["epoch"] for e in state.log_history] == list(range(5))
    assert [e["drop_path_rate"] for e in state.log_history] == pytest.approx([0.1 + 0.1 * e for e in range(5)])
    # resumed mid-epoch 3: the rate of epoch 3
    state.epoch = 3.5
    callback.on_epoch_begin(args, state, control, model=model)
    assert callback.rate == pytest.approx(0.4)


def test_callback_rejects_bad_rates_and_models(tmp_path):
    with pytest.raises(ValueError, match="rates"):
        ScheduledDropPathCallback(0.1, 1.0)
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none")
    with pytest.raises(TypeError, match="set_drop_path_rate"):
        ScheduledDropPathCallback(0.0, 0.5).on_epoch_begin(args, TrainerState(), TrainerControl(),
                                                           model=torch.nn.Linear(2, 2))
