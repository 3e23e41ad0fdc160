"""Selective scan as Triton kernels (forward and backward), registered as the `"triton"` backend.

Same recurrence and dtype contract as `selective_scan_torch`, per batch b, channel d and state n::

    s_t = exp(delta_t * A) * s_{t-1} + delta_t * B_t * u_t        (s_0 = 0)
    y_t = sum_n C_t * s_t

Layout of the work: one program per (block of `BLOCK_D` channels, batch). It walks the sequence in chunks of `CHUNK`
steps; inside a chunk the recurrence is a parallel `tl.associative_scan` over a `[BLOCK_D, N_PAD, CHUNK]` register
tile (coalesced loads along L), and the `[BLOCK_D, N_PAD]` state is carried from chunk to chunk in registers. The
forward pass keeps only the state at each chunk boundary (`[B, D, L / CHUNK, N]`, fp32) for the backward pass, which
walks the chunks in reverse, recomputes the chunk's states from the saved boundary state and runs the adjoint
recurrence as a reverse associative scan. No `[L, B, D, N]` tensor is ever written to global memory.

Triton needs a CUDA device, or `TRITON_INTERPRET=1` in the environment *before this module is imported* to run
CPU tensors through Triton's (slow, NumPy-based) interpreter, which is how the tests check the kernels on CPU.
"""

# no `from __future__ import annotations` here: the kernels' `tl.constexpr` annotations must stay real objects
# for older triton releases, which do not parse string annotations
import contextlib
from typing import Optional

import torch

from .selective_scan import register_selective_scan_backend, selective_scan_torch

try:  # triton is optional (the `cuda` and `dev` extras); anything going wrong on import means "not available"
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001 - ImportError, or a broken install
    triton = None

# Register-tile budget (BLOCK_D * N_PAD * CHUNK elements) per program and the chunk's share of it. Measured on an
# H100 (docs/kernels.md, "The Triton scan on an H100"): at N=16 chunk 32 with 2 channels per program and 4 warps was
# the fastest forward + backward of the sweep at B=8/L=197, B=64/L=197 and B=4/L=4097, 1.4-1.7x the earlier
# chunk 64 / 2-4 channels / 4-8 warps; every larger chunk or channel block of the sweep was slower.
_TILE = 1024
_CHUNK_TILE = 512  # CHUNK * N_PAD


def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def _interpreted() -> bool:
    """Whether the kernels were built for Triton's CPU interpreter (decided when this module was imported)."""
    return triton is not None and type(_scan_fwd_kernel).__name__ == "InterpretedFunction"


def triton_scan_available() -> bool:
    """Triton imports, and either a CUDA device exists or the kernels run in Triton's interpreter."""
    return triton is not None and (torch.cuda.is_available() or _interpreted())


if triton is not None:

    @triton.jit
    def _ssm_combine(a_left, s_left, a_right, s_right):
        # composition of two affine steps s -> a*s + x, the earlier one (in scan order) on the left
        return a_left * a_right, s_left * a_right + s_right

    @triton.jit
    def _chunk_states(u_ptr, delta_ptr, B_ptr, C_ptr, A, state, ud_off, bc_off, t, m_dt, m_nt):
        """One chunk's inputs (fp32) and its states `s [BLOCK_D, N_PAD, CHUNK]` from the state before it; the
        backward calls this too, so that it recomputes exactly the forward's states."""
        u = tl.load(u_ptr + ud_off + t[None, :], mask=m_dt, other=0.0).to(tl.float32)
        dl = tl.load(delta_ptr + ud_off + t[None, :], mask=m_dt, other=0.0).to(tl.float32)
        Bt = tl.load(B_ptr + bc_off + t[None, :], mask=m_nt, other=0.0).to(tl.float32)
        Ct = tl.load(C_ptr + bc_off + t[None, :], mask=m_nt, other=0.0).to(tl.float32)
        # steps past L have delta = 0, i.e. identity updates, so the chunk's last column is the carried state
        decay = tl.exp(dl[:, None, :] * A[:, :, None])
        x = (dl * u)[:, None, :] * Bt[None, :, :]
        acc_a, acc_x = tl.associative_scan((decay, x), axis=2, combine_fn=_ssm_combine)
        return u, dl, Bt, Ct, x, acc_x + acc_a * state[:, :, None]

    @triton.jit
    def _scan_fwd_kernel(u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, y_ptr, state_ptr, D, L, N, n_chunks,
                         STORE_STATES: tl.constexpr, BLOCK_D: tl.constexpr, N_PAD: tl.constexpr,
                         CHUNK: tl.constexpr):
        pid_d = tl.program_id(0)
        pid_b = tl.program_id(1).to(tl.int64)
        d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        n = tl.arange(0, N_PAD)
        tt = tl.arange(0, CHUNK)
        mask_d = d < D
        mask_n = n < N
        mask_dn = mask_d[:, None] & mask_n[None, :]
        # padded channels / states load A = 0, B = C = 0: their decay is 1 and their state stays exactly 0
        A = tl.load(A_ptr + d[:, None] * N + n[None, :], mask=mask_dn, other=0.0).to(tl.float32)
        ud_off = pid_b * D * L + d[:, None] * L
        bc_off = pid_b * N * L + n[:, None] * L
        st_off = (pid_b * D + d[:, None]) * n_chunks * N + n[None, :]
        is_last = (tt == CHUNK - 1)[None, None, :]
        state = tl.zeros([BLOCK_D, N_PAD], dtype=tl.float32)
        for k in range(n_chunks):
            t = k * CHUNK + tt
            mask_t = t < L
            m_dt = mask_d[:, None] & mask_t[None, :]
            m_nt = mask_n[:, None] & mask_t[None, :]
            _, _, _, Ct, _, s = _chunk_states(u_ptr, delta_ptr, B_ptr, C_ptr, A, state, ud_off, bc_off, t, m_dt, m_nt)
            y = tl.sum(s * Ct[None, :, :], axis=1)
            tl.store(y_ptr + ud_off + t[None, :], y.to(y_ptr.dtype.element_ty), mask=m_dt)
            state = tl.sum(tl.where(is_last, s, 0.0), axis=2)
            if STORE_STATES:
                tl.store(state_ptr + st_off + k * N, state, mask=mask_dn)

    @triton.jit
    def _scan_bwd_kernel(u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, gy_ptr, state_ptr, du_ptr, ddelta_ptr, dA_ptr,
                         dB_ptr, dC_ptr, D, L, N, n_chunks, BLOCK_D: tl.constexpr, N_PAD: tl.constexpr,
                         CHUNK: tl.constexpr):
        pid_d = tl.program_id(0)
        pid_b = tl.program_id(1).to(tl.int64)
        d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        n = tl.arange(0, N_PAD)
        tt = tl.arange(0, CHUNK)
        mask_d = d < D
        mask_n = n < N
        mask_dn = mask_d[:, None] & mask_n[None, :]
        A = tl.load(A_ptr + d[:, None] * N + n[None, :], mask=mask_dn, other=0.0).to(tl.float32)
        ud_off = pid_b * D * L + d[:, None] * L
        bc_off = pid_b * N * L + n[:, None] * L
        st_off = (pid_b * D + d[:, None]) * n_chunks * N + n[None, :]
        is_first = (tt == 0)[None, None, :]
        g_next = tl.zeros([BLOCK_D, N_PAD], dtype=tl.float32)  # dLoss/ds at the first step of the next chunk
        dA = tl.zeros([BLOCK_D, N_PAD], dtype=tl.float32)
        for i in range(n_chunks):
            k = n_chunks - 1 - i
            t = k * CHUNK + tt
            mask_t = t < L
            m_dt = mask_d[:, None] & mask_t[None, :]
            m_nt = mask_n[:, None] & mask_t[None, :]
            # recompute this chunk's states from the state saved at the end of the previous chunk
            s0 = tl.load(state_ptr + st_off + tl.maximum(k - 1, 0) * N, mask=mask_dn, other=0.0)
            s0 = tl.where(k > 0, s0, 0.0)
            u, dl, Bt, Ct, x, s = _chunk_states(u_ptr, delta_ptr, B_ptr, C_ptr, A, s0, ud_off, bc_off, t, m_dt, m_nt)
            # the adjoint recurrence g_t = C_t gy_t + exp(delta_{t+1} A) g_{t+1} needs the next step's delta
            m_next = mask_d[:, None] & (t + 1 < L)[None, :]
            dl_next = tl.load(delta_ptr + ud_off + t[None, :] + 1, mask=m_next, other=0.0).to(tl.float32)
            gy = tl.load(gy_ptr + ud_off + t[None, :], mask=m_dt, other=0.0).to(tl.float32)
            # adjoint: the same affine recurrence run backwards in time
            decay_next = tl.exp(dl_next[:, None, :] * A[:, :, None])
            c = Ct[None, :, :] * gy[:, None, :]
            acc_a, acc_g = tl.associative_scan((decay_next, c), axis=2, combine_fn=_ssm_combine, reverse=True)
            g = acc_g + acc_a * g_next[:, :, None]
            g_next = tl.sum(tl.where(is_first, g, 0.0), axis=2)
            gB = tl.sum(g * Bt[None, :, :], axis=1)
            tl.store(du_ptr + ud_off + t[None, :], (gB * dl).to(du_ptr.dtype.element_ty), mask=m_dt)
            # exp(delta_t A) * s_{t-1} = s_t - x_t: avoids keeping s_{t-1} (and dividing by a decay that may be 0)
            g_prev = g * (s - x)
            dd = gB * u + tl.sum(g_prev * A[:, :, None], axis=1)
            tl.store(ddelta_ptr + ud_off + t[None, :], dd.to(ddelta_ptr.dtype.element_ty), mask=m_dt)
            dA += tl.sum(g_prev * dl[:, None, :], axis=2)
            # dB, dC are shared by all channels: reduce the block in registers, then one atomic add per element
            dB = tl.sum(g * (dl * u)[:, None, :], axis=0)
            dC = tl.sum(s * gy[:, None, :], axis=0)
            tl.atomic_add(dB_ptr + bc_off + t[None, :], dB, mask=m_nt, sem="relaxed")
            tl.atomic_add(dC_ptr + bc_off + t[None, :], dC, mask=m_nt, sem="relaxed")
        # one partial dA per batch element (summed over B on the host): deterministic, no atomics
        tl.store(dA_ptr + (pid_b * D + d[:, None]) * N + n[None, :], dA, mask=mask_dn)


def _launch_config(dim: int, length: int, n_state: int, chunk: Optional[int], block_d: Optional[int]
                   ) -> tuple[int, int, int]:
    n_pad = _next_pow2(n_state)
    if chunk is None:
        chunk = min(_next_pow2(length), max(16, _CHUNK_TILE // n_pad))
    if block_d is None:
        block_d = min(_next_pow2(dim), max(1, _TILE // (n_pad * chunk)))
    if chunk & (chunk - 1) or block_d & (block_d - 1):
        raise ValueError(f"selective_scan_triton: chunk ({chunk}) and block_d ({block_d}) must be powers of two")
    return n_pad, chunk, block_d


class _SelectiveScanTriton(torch.autograd.Function):
    """Autograd wrapper around the two kernels; see the module docstring for the algorithm."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, chunk, block_d, num_warps):  # noqa: D102 - shapes in `selective_scan`
        u, delta, A, B, C = (t.contiguous() for t in (u, delta, A, B, C))
        batch, dim, length = u.shape
        n_state = A.shape[1]
        n_pad, chunk, block_d = _launch_config(dim, length, n_state, chunk, block_d)
        num_warps = num_warps or 4
        n_chunks = triton.cdiv(length, chunk)
        store_states = any(ctx.needs_input_grad[:5])
        states = u.new_empty((batch, dim, n_chunks, n_state) if store_states else (1,), dtype=torch.float32)
        y = torch.empty_like(u)
        grid = (triton.cdiv(dim, block_d), batch)
        with torch.cuda.device(u.device) if u.is_cuda else contextlib.nullcontext():
            _scan_fwd_kernel[grid](u, delta, A, B, C, y, states, dim, length, n_state, n_chunks,
                                   STORE_STATES=store_states, BLOCK_D=block_d, N_PAD=n_pad, CHUNK=chunk,
                                   num_warps=num_warps)
        if store_states:
            ctx.save_for_backward(u, delta, A, B, C, states)
            ctx.config = (n_pad, chunk, block_d, num_warps)  # the backward runs the same program layout
        return y

    @staticmethod
    def backward(ctx, grad_y):
        u, delta, A, B, C, states = ctx.saved_tensors
        n_pad, chunk, block_d, num_warps = ctx.config
        batch, dim, length = u.shape
        n_state = A.shape[1]
        n_chunks = states.shape[2]
        grad_y = grad_y.contiguous()
        du, ddelta = torch.empty_like(u), torch.empty_like(delta)
        dA = u.new_empty(batch, dim, n_state, dtype=torch.float32)
        dB = u.new_zeros(batch, n_state, length, dtype=torch.float32)
        dC = u.new_zeros(batch, n_state, length, dtype=torch.float32)
        grid = (triton.cdiv(dim, block_d), batch)
        with torch.cuda.device(u.device) if u.is_cuda else contextlib.nullcontext():
            _scan_bwd_kernel[grid](u, delta, A, B, C, grad_y, states, du, ddelta, dA, dB, dC, dim, length, n_state,
                                   n_chunks, BLOCK_D=block_d, N_PAD=n_pad, CHUNK=chunk, num_warps=num_warps)
        return du, ddelta, dA.sum(0).to(A.dtype), dB.to(B.dtype), dC.to(C.dtype), None, None, None


def selective_scan_triton(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                          *, chunk: Optional[int] = None, block_d: Optional[int] = None,
                          num_warps: Optional[int] = None) -> torch.Tensor:
    """Selective scan with the Triton kernels (fp32 state and accumulation, differentiable).

    Args:
        u, delta: `[B, D, L]`; A: `[D, N]`; B, C: `[B, N, L]` (fp32, bf16 or fp16; float64 goes to the PyTorch path).
        chunk: time steps per associative scan (power of two); block_d: channels per program (power of two);
            num_warps: warps per program. `None` picks defaults from `N` and `L`; these exist for tuning on a GPU.

    Returns:
        `y: [B, D, L]` in `u`'s dtype; gradients come back in each input's dtype.
    """
    if triton is None:
        raise RuntimeError("selective_scan_triton: triton is not installed (pip install triton)")
    if u.dtype == torch.float64:
        # float64 (gradcheck) needs float64 accumulation, which the kernels do not do
        return selective_scan_torch(u, delta, A, B, C)
    if not u.is_cuda and not _interpreted():
        raise RuntimeError("selective_scan_triton: CPU tensors need TRITON_INTERPRET=1 set before defocus_mllm is "
                           "imported (Triton's interpreter); use the 'torch' backend otherwise")
    if u.shape[-1] == 0:
        return u.new_zeros(u.shape)
    return _SelectiveScanTriton.apply(u, delta, A, B, C, chunk, block_d, num_warps)


register_selective_scan_backend("triton", selective_scan_triton, triton_scan_available)

