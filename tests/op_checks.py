"""Measures for checking an op: its relative error, the largest tensor it creates, and its output with and without
autograd state."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12)).item()


class _LargestOutput(TorchDispatchMode):
    """Records the largest tensor any ATen op creates while active."""

    def __init__(self):
        super().__init__()
        self.largest = (None, 0)
        self.calls = []  # (op name, numel) of outputs in new memory (views and no-op casts left out)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in list(args) + list((kwargs or {}).values())
                  if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                if t.untyped_storage().data_ptr() not in inputs:
                    self.calls.append((str(func), t.numel()))
                if t.numel() > self.largest[1]:
                    self.largest = (f"{func}: {tuple(t.shape)}", t.numel())
        return out


def max_tensor_numel(fn, calls=None):
    """`(description, numel)` of the largest tensor created by the ops `fn` runs; `calls` (a list) receives
    `(op, numel)` for each output in new memory."""
    with _LargestOutput() as mode:
        fn()
    if calls is not None:
        calls.extend(mode.calls)
    return mode.largest


def outputs_with_and_without_grad(fn, inputs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`fn(*inputs)` three ways: on copies that require grad, under `inference_mode`, and under `no_grad` on copies
    that require grad (the paths that keep no autograd state)."""
    with_grad = fn(*[t.clone().requires_grad_() for t in inputs])
    with torch.inference_mode():
        y_inference = fn(*inputs)
    with torch.no_grad():
        y_no_grad = fn(*[t.clone().requires_grad_() for t in inputs])
    return with_grad, y_inference, y_no_grad
