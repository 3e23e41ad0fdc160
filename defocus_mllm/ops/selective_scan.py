"""Selective scan (Mamba's S6 recurrence) with backend dispatch.

For every batch b, channel d and state n::

    s_t = exp(delta_t * A) * s_{t-1} + delta_t * B_t * u_t        (s_0 = 0)
    y_t = sum_n C_t * s_t

No `D` skip term, gate or `delta` bias inside the scan: the De-focus mixer applies those itself.
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch

from .registry import BackendRegistry, always_available

ScanFn = Callable[..., Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]]
ScanResult = Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]

# Backends tried in order for each device type when no backend is named; "torch" runs anywhere and ends each
# list. Backends registered by other modules (e.g. "triton") take part once registered.
_REGISTRY: BackendRegistry[ScanFn] = BackendRegistry(
    "selective_scan", "DEFOCUS_SCAN_BACKEND", {"cuda": ("cuda", "triton"), "cpu": ("cpu",)},
    unavailable_hint="; install the `cuda` extra on a CUDA machine")


def register_selective_scan_backend(name: str, fn: ScanFn, is_available: Callable[[], bool] = always_available,
                                    carries_state: bool = False) -> None:
    """Register a scan implementation, e.g. a native CPU kernel: `fn(u, delta, A, B, C) -> y`.

    A backend registered with `carries_state=True` is also called as `fn(u, delta, A, B, C, initial_state=s0,
    return_final_state=True)` and then returns `(y, final_state)`, the states `[B, D, N]` fp32 (streaming).
    """
    _REGISTRY.register(name, fn, is_available, carries_state)


def available_backends() -> list[str]:
    """Registered backends that can run here (asking about `"cpu"` compiles the CPU kernel if not cached)."""
    return _REGISTRY.available()


class _SelectiveScanTorch(torch.autograd.Function):
    """Sequential scan in fp32 with a hand-written reverse-time backward.

    A plain autograd loop records ~10 graph nodes per time step; doing the adjoint recurrence by hand keeps the
    same O(L) small-tensor work but skips autograd's bookkeeping. Only the states `s_t` are saved (the same
    `[L, B, D, N]` an autograd loop keeps); `exp(delta_t A)` is recomputed in the backward pass.
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, initial_state):  # noqa: D102 - shapes in `selective_scan`
        dtype = u.dtype
        # fp32 accumulation for fp32/bf16/fp16 inputs; float64 inputs (gradcheck) stay float64
        compute = torch.float64 if dtype == torch.float64 else torch.float32
        u32, delta32, A32, B32, C32 = (t.to(compute) for t in (u, delta, A, B, C))
        batch, dim, length = u32.shape
        n = A32.shape[1]
        s0 = u32.new_zeros(batch, dim, n) if initial_state is None else initial_state.to(compute)
        # time-major copies so that each step reads contiguous memory
        du_t = (delta32 * u32).permute(2, 0, 1).contiguous()  # [L, B, D]
        delta_t = delta32.permute(2, 0, 1).contiguous()  # [L, B, D]
        B_t = B32.permute(2, 0, 1).contiguous()  # [L, B, N]
        C_t = C32.permute(2, 0, 1).contiguous().unsqueeze(-1)  # [L, B, N, 1]
        states = u32.new_empty(length, batch, dim, n)
        ys = u32.new_empty(length, batch, dim)
        s = s0
        for t in range(length):
            decay = torch.exp(delta_t[t].unsqueeze(-1) * A32)  # [B, D, N]
            s = torch.addcmul(decay * s, du_t[t].unsqueeze(-1), B_t[t].unsqueeze(1))
            states[t] = s
            ys[t] = torch.bmm(s, C_t[t]).squeeze(-1)
        ctx.save_for_backward(u32, delta32, A32, B32, C32, states, s0)
        ctx.input_dtypes = (u.dtype, delta.dtype, A.dtype, B.dtype, C.dtype,
                            None if initial_state is None else initial_state.dtype)
        final = s.clone() if length else s0.clone()
        return ys.permute(1, 2, 0).to(dtype), final

    @staticmethod
    def backward(ctx, grad_y, grad_final):
        u, delta, A, B, C, states, s0 = ctx.saved_tensors
        length = u.shape[-1]
        gy_t = grad_y.to(u.dtype).permute(2, 0, 1).contiguous()  # [L, B, D]
        u_t = u.permute(2, 0, 1)
        delta_t = delta.permute(2, 0, 1)
        B_t = B.permute(2, 0, 1)
        C_t = C.permute(2, 0, 1)
        grad_u = torch.empty_like(gy_t)
        grad_delta = torch.empty_like(gy_t)
        grad_B = u.new_empty(length, *B_t.shape[1:])
        grad_C = u.new_empty(length, *C_t.shape[1:])
        grad_A = torch.zeros_like(A)
        # dLoss/ds_t flowing back from the future, starting with what reaches the returned final state
        g_s = torch.zeros_like(s0) if grad_final is None else grad_final.to(u.dtype).clone()
        for t in range(length - 1, -1, -1):
            gy = gy_t[t]
            g_s = torch.addcmul(g_s, gy.unsqueeze(-1), C_t[t].unsqueeze(1))  # [B, D, N]
            grad_C[t] = torch.bmm(gy.unsqueeze(1), states[t]).squeeze(1)
            dt = delta_t[t]
            decay = torch.exp(dt.unsqueeze(-1) * A)
            # through s_t = decay * s_{t-1} + delta_t u_t B_t
            g_b = torch.bmm(g_s, B_t[t].unsqueeze(-1)).squeeze(-1)  # sum_n g_s * B, [B, D]
            grad_u[t] = g_b * dt
            grad_B[t] = torch.bmm((dt * u_t[t]).unsqueeze(1), g_s).squeeze(1)
            g_decay = g_s * (states[t - 1] if t > 0 else s0) * decay  # d/d(delta A) of exp(delta A) * s_{t-1}
            grad_delta[t] = g_b * u_t[t] + (g_decay * A).sum(-1)
            grad_A += (g_decay * dt.unsqueeze(-1)).sum(0)
            g_s = g_s * decay
        to = lambda g, i: g.to(ctx.input_dtypes[i])  # noqa: E731
        grad_s0 = None if ctx.input_dtypes[5] is None else g_s.to(ctx.input_dtypes[5])
        return (
            to(grad_u.permute(1, 2, 0), 0),
            to(grad_delta.permute(1, 2, 0), 1),
            to(grad_A, 2),
            to(grad_B.permute(1, 2, 0), 3),
            to(grad_C.permute(1, 2, 0), 4),
            grad_s0,
        )


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


@torch.no_grad()
def _scan_torch_inference(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                          C: torch.Tensor, initial_state: Optional[torch.Tensor] = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward-only sequential scan: one running state `[B, D, N]` updated in place, no per-step state copies.

    Extra memory besides the output is `O(B·D·N)` (the state and one decay buffer) plus a `delta * u` product of
    the input's size; cost is linear in `L`. Returns `(y, final_state)`.
    """
    dtype = u.dtype
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    delta32, A32 = delta.to(compute), A.to(compute)
    B32, C32 = B.to(compute), C.to(compute)
    du = delta32 * u.to(compute)  # [B, D, L]
    batch, dim, length = u.shape
    if initial_state is None:
        s = u.new_zeros(batch, dim, A.shape[1], dtype=compute)
    else:
        s = initial_state.to(compute).clone()
    decay = torch.empty_like(s)
    ys = u.new_empty(length, batch, dim, 1, dtype=compute)  # time-major, so each step writes a contiguous block
    for t in range(length):
        torch.mul(delta32[:, :, t, None], A32, out=decay)
        s.mul_(decay.exp_()).addcmul_(du[:, :, t, None], B32[:, None, :, t])
        torch.bmm(s, C32[:, :, t, None], out=ys[t])
    return ys.squeeze(-1).permute(1, 2, 0).to(dtype), s


def selective_scan_torch(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                         C: torch.Tensor, initial_state: Optional[torch.Tensor] = None,
                         return_final_state: bool = False) -> ScanResult:
    """Pure-PyTorch selective scan (fp32 accumulation, differentiable, any device).

    With gradients it stores the states `[L, B, D, N]` for the backward pass; without (no input requires grad, or
    under `no_grad` / `inference_mode`) it keeps only the running state. `initial_state` and the final state take
    part in autograd like the other inputs and outputs.
    """
    tensors = (u, delta, A, B, C) + (() if initial_state is None else (initial_state,))
    if _needs_grad(*tensors):
        y, final = _SelectiveScanTorch.apply(u, delta, A, B, C, initial_state)
    else:
        y, final = _scan_torch_inference(u, delta, A, B, C, initial_state)
    return (y, final) if return_final_state else y


def _mamba_ssm_available() -> bool:
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn  # noqa: F401
    except Exception:  # ImportError, or the CUDA extension failing to load
        return False
    return torch.cuda.is_available()


def selective_scan_cuda(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                        C: torch.Tensor) -> torch.Tensor:
    """mamba-ssm's fused CUDA kernel (`selective_scan_fn`), without D, gate or delta bias. It takes no initial state;
    `selective_scan` continues a stream through it by linearity."""
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    return selective_scan_fn(u.contiguous(), delta.contiguous(), A.float().contiguous(), B.contiguous(),
                             C.contiguous(), None, None, None, delta_softplus=False)


register_selective_scan_backend("torch", selective_scan_torch, carries_state=True)
register_selective_scan_backend("cuda", selective_scan_cuda, _mamba_ssm_available)
# "cpu" (the native kernel) is registered by cpu_scan.py and "triton" by triton_scan.py, which the ops package imports

# Elements of one `[B, l, D, N]` block of `_state_terms` (1 MiB in fp32): large enough for few ops, small enough
# that its temporaries stay out of the peak of a chunk
_STATE_BLOCK_ELEMENTS = 1 << 18


def _state_terms(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                 initial_state: Optional[torch.Tensor], return_final_state: bool
                 ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """What a carried state changes in a scan computed from a zero state: `(y_extra [B, D, L], final [B, D, N])`.

    The recurrence is linear in its state: started from `S`, `s_t = P_t * S + s0_t` with `P_t = exp(A sum_{k<=t}
    delta_k)` and `s0` the zero-start scan. So `y_t = y0_t + sum_n C_t[n] P_t[:, n] S[:, n]`, and the final state is
    `P_L * S + sum_t exp(A sum_{k>t} delta_k) delta_t u_t B_t`. Both are `O(B D N L)` elementwise work, done on
    `[B, l, D, N]` blocks of time steps (a few large ops rather than many small ones), so any backend that computes
    the zero-start `y0` continues a stream.
    """
    compute = torch.float64 if u.dtype == torch.float64 else torch.float32
    # time-major [B, L, D] / [B, L, N] views (the mixer's channels-last memory): channels run contiguous below
    d = delta.transpose(1, 2).to(compute)
    B, C = B.transpose(1, 2).to(compute), C.transpose(1, 2).to(compute)
    A = A.to(compute)
    batch, length, dim = d.shape
    block = max(1, _STATE_BLOCK_ELEMENTS // max(1, batch * dim * A.shape[1]))
    y_extra = final = None
    if initial_state is not None:
        S = initial_state.to(compute)[:, None]  # [B, 1, D, N]
        steps = d.cumsum(1)  # sum_{k<=t} delta_k: [B, L, D]
        y_extra = torch.cat([(torch.exp(steps[:, t:t + block, :, None] * A) * S * C[:, t:t + block, None, :]).sum(-1)
                             for t in range(0, length, block)], dim=1).transpose(1, 2) if length else d.transpose(1, 2)
        final = torch.exp(steps[:, -1, :, None] * A) * S[:, 0] if length else S[:, 0]  # P_L * S: [B, D, N]
    if return_final_state:
        # sum_{k>t} delta_k from a reversed cumulative sum, not as the difference of two long sums
        suffix = d.flip(1).cumsum(1).flip(1)
        after = torch.cat([suffix[:, 1:], suffix.new_zeros(batch, 1, dim)], dim=1)
        du = d * u.transpose(1, 2).to(compute)
        fresh = sum((torch.exp(after[:, t:t + block, :, None] * A) * du[:, t:t + block, :, None]
                     * B[:, t:t + block, None, :]).sum(1) for t in range(0, length, block))
        fresh = fresh if isinstance(fresh, torch.Tensor) else d.new_zeros(batch, dim, A.shape[1])
        final = fresh if final is None else final + fresh
    return y_extra, final


def check_state_operands(op: str, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                         initial_state: Optional[torch.Tensor], batch: int, dim: int, length: int,
                         time_major: bool) -> None:
    """Raise a `ValueError` naming the operand of `op` whose shape is wrong: `A [D, N]`, `B` and `C` `[B, N, L]`
    (`[B, L, N]` when `time_major`), `initial_state [B, D, N]` when given."""
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"{op}: A must be [D={dim}, N], got {tuple(A.shape)}")
    n = A.shape[1]
    sizes = {"B": batch, "L": length, "N": n} if time_major else {"B": batch, "N": n, "L": length}
    expected = {"B": sizes, "C": sizes, "initial_state": {"B": batch, "D": dim, "N": n}}
    for name, t in (("B", B), ("C", C), ("initial_state", initial_state)):
        if t is not None and tuple(t.shape) != tuple(expected[name].values()):
            labels = ", ".join(f"{k}={v}" for k, v in expected[name].items())
            raise ValueError(f"{op}: {name} must be [{labels}], got {tuple(t.shape)}")


def selective_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   backend: Optional[str] = None, *, initial_state: Optional[torch.Tensor] = None,
                   return_final_state: bool = False) -> ScanResult:
    """Run the selective scan.

    Args:
        u, delta: `[B, D, L]` input and (already positive) time steps.
        A: `[D, N]` state matrix (negative reals).
        B, C: `[B, N, L]` input-dependent input / output projections.
        backend: `"torch"`, `"cpu"`, `"cuda"` or any registered name. `None` picks, for fp32/bf16/fp16 inputs,
            `"cpu"` (the native kernel, compiled on first use) for CPU tensors and `"cuda"` (mamba-ssm) or
            `"triton"` for CUDA tensors where available, else `"torch"`; float64 inputs use `"torch"`. The
            `DEFOCUS_SCAN_BACKEND` environment variable overrides.
        initial_state: `[B, D, N]` state before the first step (zeros when None): continues a scan that stopped
            at a chunk boundary.
        return_final_state: also return the state after the last step, `[B, D, N]` fp32 (float64 for float64).

    Returns:
        `y: [B, D, L]` in `u`'s dtype, or `(y, final_state)`. A backend registered with `carries_state=True` gets
        the state itself; for the others (mamba-ssm's kernel, the native CPU and Triton kernels until they take
        one) the zero-start scan is continued by linearity (`_state_terms`: `O(B D N L)` extra elementwise work).
    """
    if u.dim() != 3 or delta.shape != u.shape:
        raise ValueError(f"selective_scan: u and delta must be [B, D, L] of one shape, got {tuple(u.shape)} and "
                         f"{tuple(delta.shape)}")
    batch, dim, length = u.shape
    check_state_operands("selective_scan", A, B, C, initial_state, batch, dim, length, time_major=False)
    carrying = initial_state is not None or return_final_state
    name = backend or _REGISTRY.default(u)
    fn = _REGISTRY.resolve(name)
    if not carrying:
        return fn(u, delta, A, B, C)
    if name in _REGISTRY.carries_state:
        return fn(u, delta, A, B, C, initial_state=initial_state, return_final_state=return_final_state)
    # a backend without state support computes the zero-start scan; the state's part is added by linearity
    y = fn(u, delta, A, B, C)
    y_extra, final = _state_terms(u, delta, A, B, C, initial_state, return_final_state)
    if y_extra is not None:
        y = (y.to(y_extra.dtype) + y_extra).to(u.dtype)
    return (y, final) if return_final_state else y
