"""Replaying a fixed-shape inference forward as one CUDA graph: launch overhead out of the way.

A De-focus Mamba forward is hundreds of small kernel launches per image batch (per block: the norm, four matmuls,
the conv, the fused mixer, the residual add); at small batches and resolutions the CPU cannot issue them as fast as
the GPU runs them. A CUDA graph records the launches once and replays them with one call, which removes the
per-launch CPU cost. It needs fixed shapes, fixed input / output buffers and no host synchronisation inside the
forward (the Triton and cuBLAS kernels of the encoder qualify).

    graph = CUDAGraphInference(lambda pixels: model(pixel_values=pixels).last_hidden_state, example_pixels)
    features = graph(pixels)  # copies `pixels` into the captured buffer, replays, returns the captured output

The returned tensors are the graph's own output buffers, overwritten by the next replay: clone what you keep.
"""

from __future__ import annotations

from typing import Any, Callable

import torch


class CUDAGraphInference:
    """Capture `fn(*example_args)` (tensors on one CUDA device) under `torch.inference_mode` and replay it.

    Args:
        fn: the forward to capture; it must not synchronise with the host (no `.item()`, no data-dependent shapes).
        *example_args: tensors with the shapes and dtypes of every later call.
        warmup: eager calls on a side stream before the capture (lazy initialisation, Triton compilation, cuBLAS
            workspaces happen there, not inside the graph).
    """

    def __init__(self, fn: Callable[..., Any], *example_args: torch.Tensor, warmup: int = 2) -> None:
        if not example_args:
            raise ValueError("CUDAGraphInference: pass at least one example input tensor")
        for i, arg in enumerate(example_args):
            if not isinstance(arg, torch.Tensor) or not arg.is_cuda:
                raise ValueError(f"CUDAGraphInference: example input {i} must be a CUDA tensor, got "
                                 f"{type(arg).__name__}{'' if not isinstance(arg, torch.Tensor) else ' on ' + str(arg.device)}")
        self.fn = fn
        self.static_inputs = [arg.detach().clone() for arg in example_args]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(warmup):
                fn(*self.static_inputs)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(self.graph):
            self.static_output = fn(*self.static_inputs)

    def __call__(self, *args: torch.Tensor) -> Any:
        if len(args) != len(self.static_inputs):
            raise ValueError(f"CUDAGraphInference: captured with {len(self.static_inputs)} inputs, called with "
                             f"{len(args)}")
        for i, (static, arg) in enumerate(zip(self.static_inputs, args)):
            if arg.shape != static.shape or arg.dtype != static.dtype:
                raise ValueError(f"CUDAGraphInference: input {i} is {tuple(arg.shape)} {arg.dtype}, the graph was "
                                 f"captured for {tuple(static.shape)} {static.dtype}")
            if arg.data_ptr() != static.data_ptr():
                static.copy_(arg)
        self.graph.replay()
        return self.static_output


__all__ = ["CUDAGraphInference"]
