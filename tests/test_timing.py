"""benchmarks/timing.py, the one timer of the benchmark scripts: what it calls, in which order and how often."""

import time
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from helpers import load_script

timing = load_script(Path(__file__).resolve().parents[1] / "benchmarks" / "timing.py", "timing")


def _counter():
    calls = []
    return calls, lambda: calls.append(1)


def test_interleaved_rounds_warm_up_once_then_alternate():
    order = []
    calls = {name: (lambda name=name: order.append(name)) for name in ("a", "b", "c")}
    first, times = timing.interleaved_rounds(calls, repeats=3)
    assert order == ["a", "b", "c"] * 4  # one warm-up round, then three, each variant after the other
    assert set(first) == set(calls) and all(t >= 0 for t in first.values())
    assert {name: len(ts) for name, ts in times.items()} == {"a": 3, "b": 3, "c": 3}


def test_mean_time_runs_the_warm_up_then_the_repeats():
    calls, fn = _counter()
    seconds = timing.mean_time(lambda: (fn(), time.sleep(0.002)), repeats=4, device="cpu", warmup=2)
    assert len(calls) == 6 and seconds >= 0.002


def test_adaptive_mean_time_sizes_the_run_to_the_target_within_bounds():
    def sleeper():
        calls.append(1)
        time.sleep(0.005)

    for target_s, low, high in ((0.0, 3, 3), (10.0, 7, 7), (0.05, 3, 7)):
        calls = []
        seconds, iters = timing.adaptive_mean_time(sleeper, "cpu", warmup=2, min_iters=3, max_iters=7,
                                                   target_s=target_s)
        assert low <= iters <= high and seconds >= 0.005
        assert len(calls) == 2 + 1 + iters  # warm-up, the sizing call, the timed calls


class _Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, pixel_values, scale=1.0):
        return SimpleNamespace(last_hidden_state=self.proj(pixel_values) * scale)


def test_encoder_step_sets_the_mode_and_backpropagates_only_in_train():
    model, pixels = _Encoder(), torch.randn(2, 4)
    timing.encoder_step(model, pixels, "train", scale=2.0)()
    assert model.training and model.proj.weight.grad is not None and model.proj.weight.grad.abs().sum() > 0
    model.proj.weight.grad = None
    timing.encoder_step(model, pixels, "inference")()
    assert not model.training and model.proj.weight.grad is None


def test_peak_memory_sees_what_a_call_allocates_on_cpu():
    peak = timing.PeakMemory("cpu")
    mib = peak.measure(lambda: torch.ones(64 * 2**20 // 4).sum())  # 64 MiB, every page written
    if peak.available:  # Linux: the resident-set high-water mark
        assert mib >= 48
    else:
        assert mib is None
