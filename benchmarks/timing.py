"""Timing and peak memory for the benchmark scripts: one place for warm-up, CUDA synchronisation and repeats.

    from timing import PeakMemory, interleaved_rounds, mean_time, time_call

The scripts import this module as they import each other: a script's own folder (`benchmarks/`) is first on
`sys.path` when it runs. Every timer synchronises CUDA before starting and before stopping the clock, since kernel
launches return before the kernels finish.
"""

from __future__ import annotations

import ctypes
import time
from typing import Callable, Hashable, Mapping, Optional, TypeVar

import torch

Key = TypeVar("Key", bound=Hashable)


def synchronize(device: str | torch.device) -> None:
    """Wait for the queued kernels of `device` (a no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_call(fn: Callable[[], object], device: str | torch.device = "cpu") -> float:
    """Seconds of one call of `fn`, the device synchronised on both sides."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def mean_time(fn: Callable[[], object], repeats: int = 5, device: str | torch.device = "cuda",
              warmup: int = 1) -> float:
    """Mean seconds per call of `fn` over `repeats` back-to-back calls, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / repeats


def adaptive_mean_time(fn: Callable[[], object], device: str | torch.device, warmup: int, min_iters: int,
                       max_iters: int, target_s: float) -> tuple[float, int]:
    """`(mean seconds per call, calls)` of `fn` after `warmup` calls: one timed call sizes the run so that the
    timed calls last about `target_s`, within `[min_iters, max_iters]`."""
    for _ in range(warmup):
        fn()
    once = time_call(fn, device)
    iters = max(min_iters, min(max_iters, int(target_s / max(once, 1e-6))))
    return mean_time(fn, iters, device, warmup=0), iters


def interleaved_rounds(calls: Mapping[Key, Callable[[], object]], repeats: int,
                       device: str | torch.device = "cpu") -> tuple[dict[Key, float], dict[Key, list[float]]]:
    """`(first, times)`: every call timed once as a warm-up round (`first`: compilation, allocator growth), then
    `repeats` timed rounds, all calls one after the other in each round.

    Interleaving spreads the disturbance of other work on a shared machine over every variant alike; the best of
    the rounds (`min(times[name])`) is then the least disturbed estimate and the ratios between variants are fair.
    """
    first = {name: time_call(fn, device) for name, fn in calls.items()}
    times: dict[Key, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            times[name].append(time_call(fn, device))
    return first, times


def encoder_step(model: torch.nn.Module, pixels: torch.Tensor, mode: str,
                 **forward_kwargs: object) -> Callable[[], None]:
    """The call timed for an encoder: its forward under `inference_mode` ("inference"), or forward + backward of the
    output's mean in train mode ("train"); sets the model's mode."""
    model.train(mode == "train")

    def infer() -> None:
        with torch.inference_mode():
            model(pixel_values=pixels, **forward_kwargs)

    def train() -> None:
        model.zero_grad(set_to_none=True)
        model(pixel_values=pixels, **forward_kwargs).last_hidden_state.float().mean().backward()

    return infer if mode == "inference" else train


class PeakMemory:
    """Peak memory (MiB) that one call adds: CUDA allocator peak, or the CPU resident-set high-water mark.

    On CPU this needs Linux (`/proc/self/clear_refs` resets the mark); `available` is False elsewhere. Before each
    call glibc's `malloc_trim(0)` hands the free memory of malloc's heaps back to the OS, so the call's peak is not
    hidden by memory an earlier call left in malloc's free lists.
    """

    def __init__(self, device: str) -> None:
        self.device = device
        self.available = device == "cuda" or self._reset_mark()
        self._trim = None
        if device != "cuda":
            try:
                self._trim = ctypes.CDLL(None).malloc_trim
            except (OSError, AttributeError):  # not glibc
                pass

    @staticmethod
    def _reset_mark() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    @staticmethod
    def _status_kib(key: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
        raise KeyError(key)

    def measure(self, fn: Callable[[], object]) -> Optional[float]:
        """MiB that `fn()` adds at its peak over what was allocated before it (None where it cannot be read)."""
        if not self.available:
            fn()
            return None
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = self._before = torch.cuda.memory_allocated()
            fn()
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - before) / 2**20
        if self._trim is not None:
            self._trim(0)
        self._reset_mark()
        before = self._before = self._status_kib("VmRSS")
        fn()
        return (self._status_kib("VmHWM") - before) / 1024

    def so_far(self) -> Optional[float]:
        """Inside the call `measure` runs: the MiB it has added at its peak until now (e.g. after the first part of a
        stream, to compare with the whole stream's peak)."""
        if not self.available:
            return None
        if self.device == "cuda":
            return (torch.cuda.max_memory_allocated() - self._before) / 2**20
        return (self._status_kib("VmHWM") - self._before) / 1024
