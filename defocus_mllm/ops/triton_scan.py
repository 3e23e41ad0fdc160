"""Selective scan as sequential-in-L Triton kernels (forward and backward), registered as the `"triton"` backend.

Same recurrence and dtype contract as `selective_scan_torch`, per batch b, channel d and state n::

    s_t = exp(delta_t * A) * s_{t-1} + delta_t * B_t * u_t        (s_0 = initial_state, zeros by default)
    y_t = sum_n C_t * s_t

Layout of the work: one program per (block of `BLOCK_D` channels, batch row). There are `B * D` independent
channels (98k for a Mamba-B batch of 64), enough parallelism without also scanning in parallel over `L`, so each
program keeps its `[BLOCK_D, N]` state in fp32 registers and walks the sequence one step at a time: per step it
reads `BLOCK_D` values of `u` and `delta`, the `N` values of `B_t` and `C_t` shared by the whole block, and writes
`BLOCK_D` values of `y`. Every input is read once and `y` written once, which is the memory-bandwidth bound.

Backward: the forward stores the state every `CKPT` steps (`[B, D, ceil(L / CKPT), N]` fp32; no `[L, B, D, N]`
tensor is ever written). The backward walks the checkpointed chunks in reverse; for each chunk it recomputes the
chunk's `CKPT` states from its checkpoint into a per-program scratch tile (`[CKPT, BLOCK_D, N]`, reused by every
chunk, so it stays in cache) and runs the adjoint recurrence backwards over them. `dB` and `dC`, shared by every
channel, are reduced over the block in registers and added atomically; `dA` is one partial per batch row, summed
on the host (deterministic).

The same two kernels also run the fused Mamba mixer (`triton_mixer.py`): `constexpr` switches add the `delta`
bias + softplus + scale, the rotation of `B` and `C`, and the epilogue (group RMS norm, `D` skip, SiLU gate).
Every tensor is addressed through its strides, so channels-last `[B, L, D]` views of the projections' outputs are
read in place; that layout is also the one where a time step's `BLOCK_D` channels are contiguous (coalesced).

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

# Register budget: the state tile is BLOCK_D * N_PAD fp32 values per program; at N = 16 and 4 warps (128 threads)
# 64 channels are 8 registers per thread for the state, 8 more for the decay / update of a step, which leaves room
# for the loads of the next step without spilling. The mixer's group norm needs whole groups in one program, so it
# picks BLOCK_D = group_norm_size (64 in every released configuration).
_STATE_TILE = 1024
# Steps per checkpoint: the backward's scratch tile is CKPT * BLOCK_D * N_PAD fp32 per program (64 KiB at 16 x 64 x
# 16), the checkpoints are L / CKPT states per channel.
_CKPT = 16


def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def _interpreted() -> bool:
    """Whether the kernels were built for Triton's CPU interpreter (decided when this module was imported)."""
    return triton is not None and type(_ssm_fwd_kernel).__name__ == "InterpretedFunction"


def triton_scan_available() -> bool:
    """Triton imports, and either a CUDA device exists or the kernels run in Triton's interpreter."""
    return triton is not None and (torch.cuda.is_available() or _interpreted())


if triton is not None:

    @triton.jit
    def _load_step(x_ptr, z_ptr, dt_ptr, B_ptr, C_ptr, x_off, z_off, dt_off, B_off, C_off, Bp_off, Cp_off, mask_d,
                   mask_n, ROTATE: tl.constexpr, GATE: tl.constexpr):
        """One time step's raw inputs in fp32: `u, dt, z [BLOCK_D]`, `B_t, C_t` and their pair partners `[N_PAD]`."""
        u = tl.load(x_ptr + x_off, mask=mask_d, other=0.0).to(tl.float32)
        dl = tl.load(dt_ptr + dt_off, mask=mask_d, other=0.0).to(tl.float32)
        zz = u
        if GATE:
            zz = tl.load(z_ptr + z_off, mask=mask_d, other=0.0).to(tl.float32)
        Bt = tl.load(B_ptr + B_off, mask=mask_n, other=0.0).to(tl.float32)
        Ct = tl.load(C_ptr + C_off, mask=mask_n, other=0.0).to(tl.float32)
        Bp = Bt
        Cp = Ct
        if ROTATE:
            # the pair partner k ^ 1 is read from memory (cached: the same line) rather than permuted in registers
            Bp = tl.load(B_ptr + Bp_off, mask=mask_n, other=0.0).to(tl.float32)
            Cp = tl.load(C_ptr + Cp_off, mask=mask_n, other=0.0).to(tl.float32)
        return u, dl, zz, Bt, Ct, Bp, Cp

    @triton.jit
    def _prep_step(dl, Bt, Ct, Bp, Cp, bias, freq, sign, pos, inv_dsf, SOFTPLUS: tl.constexpr,
                   ROTATE: tl.constexpr):
        """`delta` (and the softplus argument `v`) and the rotated `B_t, C_t` from a step's raw inputs."""
        v = dl
        if SOFTPLUS:
            v = dl + bias
            # softplus written so that exp never overflows; padded channels get delta > 0 but u = 0, A = 0
            dl = (tl.maximum(v, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(v)))) * inv_dsf
        if ROTATE:
            # theta[k] = (n / rope_scale_factor) * freq[k], one angle per element (the release's layout)
            theta = pos * freq
            cs = tl.cos(theta)
            sn = tl.sin(theta)
            Bt = Bt * cs + sign * Bp * sn
            Ct = Ct * cs + sign * Cp * sn
        return dl, v, Bt, Ct

    @triton.jit
    def _step_inputs(t, x_ptr, dt_ptr, B_ptr, C_ptr, x0, dt0, B0, C0, Bp0, Cp0, sxl, stl, sBl, sCl, mask_d, mask_n,
                     bias, freq, sign, pos0, rope_scale, inv_dsf, SOFTPLUS: tl.constexpr, ROTATE: tl.constexpr):
        """Time step `t`'s `u, delta, v, B_t, C_t` (rotated), fp32: the forward's values, recomputed exactly. `x0` ..
        `Cp0` are the offsets of step 0, `sxl` .. `sCl` the time strides."""
        pos = (pos0 + t).to(tl.float32) / rope_scale
        u, dl, _, Bt, Ct, Bp, Cp = _load_step(x_ptr, x_ptr, dt_ptr, B_ptr, C_ptr, x0 + t * sxl, x0 + t * sxl,
                                              dt0 + t * stl, B0 + t * sBl, C0 + t * sCl, Bp0 + t * sBl, Cp0 + t * sCl,
                                              mask_d, mask_n, ROTATE, False)
        dl, v, Bt, Ct = _prep_step(dl, Bt, Ct, Bp, Cp, bias, freq, sign, pos, inv_dsf, SOFTPLUS, ROTATE)
        return u, dl, v, Bt, Ct

    @triton.jit
    def _group_rms(y, BLOCK_D: tl.constexpr, GROUP: tl.constexpr):
        """`y * rsqrt(mean(y^2 over groups of GROUP channels) + 1e-6)`, and the per-channel rsqrt."""
        y2 = tl.reshape(y, (BLOCK_D // GROUP, GROUP))
        r = 1.0 / tl.sqrt(tl.sum(y2 * y2, axis=1) / GROUP + 1e-6)
        r_full = tl.reshape(tl.broadcast_to(r[:, None], (BLOCK_D // GROUP, GROUP)), (BLOCK_D,))
        return y * r_full, r_full

    @triton.jit
    def _channel_block(A_ptr, bias_ptr, freq_ptr, Dskip_ptr, D, N, BLOCK_D: tl.constexpr, N_PAD: tl.constexpr,
                       SOFTPLUS: tl.constexpr, ROTATE: tl.constexpr, GATE: tl.constexpr):
        """This program's `BLOCK_D` channels of one batch row (a `(D / BLOCK_D, B)` grid) and what stays fixed over
        the sequence: indices and masks, `A [BLOCK_D, N_PAD]`, the `delta` bias, `freq`, the rotation's pair sign
        and partner, the `D` skip and the offsets of a `[B, D, N]` state, all fp32.

        Padded channels / states load A = 0, B = C = 0: their decay is 1 and their state stays exactly 0.
        """
        pid_d = tl.program_id(0)
        pid_b = tl.program_id(1).to(tl.int64)
        d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        n = tl.arange(0, N_PAD)
        mask_d = d < D
        mask_n = n < N
        mask_dn = mask_d[:, None] & mask_n[None, :]
        A = tl.load(A_ptr + d[:, None] * N + n[None, :], mask=mask_dn, other=0.0).to(tl.float32)
        bias = tl.zeros([BLOCK_D], dtype=tl.float32)
        if SOFTPLUS:
            bias = tl.load(bias_ptr + d, mask=mask_d, other=0.0).to(tl.float32)
        freq = tl.zeros([N_PAD], dtype=tl.float32)
        if ROTATE:
            freq = tl.load(freq_ptr + n, mask=mask_n, other=0.0).to(tl.float32)
        sign = tl.where(n % 2 == 0, -1.0, 1.0)
        partner = n ^ 1
        Dv = tl.zeros([BLOCK_D], dtype=tl.float32)
        if GATE:
            Dv = tl.load(Dskip_ptr + d, mask=mask_d, other=0.0).to(tl.float32)
        st_off = (pid_b * D + d[:, None]) * N + n[None, :]
        return pid_d, pid_b, d, n, mask_d, mask_n, mask_dn, A, bias, freq, sign, partner, Dv, st_off

    @triton.jit
    def _ssm_fwd_kernel(x_ptr, z_ptr, dt_ptr, bias_ptr, A_ptr, B_ptr, C_ptr, Dskip_ptr, freq_ptr, s0_ptr, out_ptr,
                        final_ptr, ckpt_ptr,
                        sxb, sxl, sxd, szb, szl, szd, stb, stl, std, sBb, sBl, sBn, sCb, sCl, sCn, sob, sol, sod,
                        L, D, N, n_ckpt, pos0, rope_scale, inv_dsf,
                        BLOCK_D: tl.constexpr, N_PAD: tl.constexpr, CKPT: tl.constexpr, SOFTPLUS: tl.constexpr,
                        ROTATE: tl.constexpr, GATE: tl.constexpr, GROUP: tl.constexpr, HAS_S0: tl.constexpr,
                        STORE_FINAL: tl.constexpr, STORE_CKPT: tl.constexpr):
        pid_d, pid_b, d, n, mask_d, mask_n, mask_dn, A, bias, freq, sign, partner, Dv, st_off = _channel_block(
            A_ptr, bias_ptr, freq_ptr, Dskip_ptr, D, N, BLOCK_D, N_PAD, SOFTPLUS, ROTATE, GATE)
        if HAS_S0:
            state = tl.load(s0_ptr + st_off, mask=mask_dn, other=0.0).to(tl.float32)
        else:
            state = tl.zeros([BLOCK_D, N_PAD], dtype=tl.float32)
        ck_off = (pid_b * D + d[:, None]) * n_ckpt * N + n[None, :]
        # software pipelining by hand: step t + 1's loads are issued before step t's arithmetic, so that a
        # program always has a step's worth of loads in flight while the recurrence (which cannot start before its
        # inputs arrive) runs
        u_n, dl_n, z_n, B_n, C_n, Bp_n, Cp_n = _load_step(
            x_ptr, z_ptr, dt_ptr, B_ptr, C_ptr, pid_b * sxb + d * sxd, pid_b * szb + d * szd, pid_b * stb + d * std,
            pid_b * sBb + n * sBn, pid_b * sCb + n * sCn, pid_b * sBb + partner * sBn, pid_b * sCb + partner * sCn,
            mask_d, mask_n, ROTATE, GATE)
        for t in range(0, L):
            if STORE_CKPT:
                if t % CKPT == 0:  # the state before step t, every CKPT steps
                    tl.store(ckpt_ptr + ck_off + (t // CKPT) * N, state, mask=mask_dn)
            u, dl, zz, Bt, Ct, Bp, Cp = u_n, dl_n, z_n, B_n, C_n, Bp_n, Cp_n
            t1 = t + 1
            u_n, dl_n, z_n, B_n, C_n, Bp_n, Cp_n = _load_step(
                x_ptr, z_ptr, dt_ptr, B_ptr, C_ptr, pid_b * sxb + t1 * sxl + d * sxd, pid_b * szb + t1 * szl + d * szd,
                pid_b * stb + t1 * stl + d * std, pid_b * sBb + t1 * sBl + n * sBn, pid_b * sCb + t1 * sCl + n * sCn,
                pid_b * sBb + t1 * sBl + partner * sBn, pid_b * sCb + t1 * sCl + partner * sCn,
                mask_d & (d * 0 + t1 < L), mask_n & (n * 0 + t1 < L), ROTATE, GATE)
            pos = (pos0 + t).to(tl.float32) / rope_scale
            dl, v, Bt, Ct = _prep_step(dl, Bt, Ct, Bp, Cp, bias, freq, sign, pos, inv_dsf, SOFTPLUS, ROTATE)
            state = tl.exp(dl[:, None] * A) * state + (dl * u)[:, None] * Bt[None, :]
            y = tl.sum(state * Ct[None, :], axis=1)
            if GROUP > 0:
                y, _ = _group_rms(y, BLOCK_D, GROUP)
            if GATE:
                y = (y + u * Dv) * (zz * tl.sigmoid(zz))
            tl.store(out_ptr + pid_b * sob + t * sol + d * sod, y.to(out_ptr.dtype.element_ty), mask=mask_d)
        if STORE_FINAL:
            tl.store(final_ptr + st_off, state, mask=mask_dn)

    @triton.jit
    def _ssm_bwd_kernel(x_ptr, z_ptr, dt_ptr, bias_ptr, A_ptr, B_ptr, C_ptr, Dskip_ptr, freq_ptr, gout_ptr,
                        gfinal_ptr, ckpt_ptr, scratch_ptr, dx_ptr, dz_ptr, ddt_ptr, dA_ptr, dD_ptr, dbias_ptr,
                        dB_ptr, dC_ptr, ds0_ptr,
                        sxb, sxl, sxd, szb, szl, szd, stb, stl, std, sBb, sBl, sBn, sCb, sCl, sCn, sgb, sgl, sgd,
                        L, D, N, n_ckpt, pos0, rope_scale, inv_dsf,
                        BLOCK_D: tl.constexpr, N_PAD: tl.constexpr, CKPT: tl.constexpr, SOFTPLUS: tl.constexpr,
                        ROTATE: tl.constexpr, GATE: tl.constexpr, GROUP: tl.constexpr, HAS_GFINAL: tl.constexpr,
                        STORE_DS0: tl.constexpr):
        # gradient outputs dx, dz, ddt are channels-last [B, L, D] contiguous; dB, dC are [B, L, N] fp32 (the
        # gradients of the rotated B, C when ROTATE: the host turns them back, together with d freq)
        pid_d, pid_b, d, n, mask_d, mask_n, mask_dn, A, bias, freq, sign, partner, Dv, st_off = _channel_block(
            A_ptr, bias_ptr, freq_ptr, Dskip_ptr, D, N, BLOCK_D, N_PAD, SOFTPLUS, ROTATE, GATE)
        ck_off = (pid_b * D + d[:, None]) * n_ckpt * N + n[None, :]
        pid = pid_b * tl.num_programs(0) + pid_d
        sc_off = pid * CKPT * BLOCK_D * N_PAD + tl.arange(0, BLOCK_D)[:, None] * N_PAD + n[None, :]
        # the input offsets of step 0 (x, dt, B, C and the pair partners of B, C); step t adds t time strides
        x0, dt0, B0, C0 = pid_b * sxb + d * sxd, pid_b * stb + d * std, pid_b * sBb + n * sBn, pid_b * sCb + n * sCn
        Bp0, Cp0 = pid_b * sBb + partner * sBn, pid_b * sCb + partner * sCn
        # gc: dLoss/ds_t reaching step t from the future (through s_{t+1} or the returned final state)
        if HAS_GFINAL:
            gc = tl.load(gfinal_ptr + st_off, mask=mask_dn, other=0.0).to(tl.float32)
        else:
            gc = tl.zeros([BLOCK_D, N_PAD], dtype=tl.float32)
        dA = tl.zeros([BLOCK_D, N_PAD], dtype=tl.float32)
        dD = tl.zeros([BLOCK_D], dtype=tl.float32)
        dbias = tl.zeros([BLOCK_D], dtype=tl.float32)
        for i in range(n_ckpt):
            k = n_ckpt - 1 - i
            t0 = k * CKPT
            t1 = tl.minimum(t0 + CKPT, L)
            # recompute the chunk's states from its checkpoint into the scratch tile
            state = tl.load(ckpt_ptr + ck_off + k * N, mask=mask_dn, other=0.0)
            for t in range(t0, t1):
                u, dl, v, Bt, Ct = _step_inputs(t, x_ptr, dt_ptr, B_ptr, C_ptr, x0, dt0, B0, C0, Bp0, Cp0, sxl, stl,
                                                sBl, sCl, mask_d, mask_n, bias, freq, sign, pos0, rope_scale,
                                                inv_dsf, SOFTPLUS, ROTATE)
                state = tl.exp(dl[:, None] * A) * state + (dl * u)[:, None] * Bt[None, :]
                tl.store(scratch_ptr + sc_off + (t - t0) * BLOCK_D * N_PAD, state)
            for j in range(0, t1 - t0):
                t = t1 - 1 - j
                u, dl, v, Bt, Ct = _step_inputs(t, x_ptr, dt_ptr, B_ptr, C_ptr, x0, dt0, B0, C0, Bp0, Cp0, sxl, stl,
                                                sBl, sCl, mask_d, mask_n, bias, freq, sign, pos0, rope_scale,
                                                inv_dsf, SOFTPLUS, ROTATE)
                s = tl.load(scratch_ptr + sc_off + (t - t0) * BLOCK_D * N_PAD)
                g_off = pid_b * D * L + t * D + d  # the contiguous [B, L, D] gradient outputs
                dy = tl.load(gout_ptr + pid_b * sgb + t * sgl + d * sgd, mask=mask_d, other=0.0).to(tl.float32)
                du = tl.zeros([BLOCK_D], dtype=tl.float32)
                # the epilogue's adjoint needs the scan output y_t = sum_n C_t s_t (recomputed, never stored)
                yn = tl.sum(s * Ct[None, :], axis=1)
                r = yn
                if GROUP > 0:
                    yn, r = _group_rms(yn, BLOCK_D, GROUP)
                if GATE:
                    zz = tl.load(z_ptr + pid_b * szb + t * szl + d * szd, mask=mask_d, other=0.0).to(tl.float32)
                    sg = tl.sigmoid(zz)
                    pre = yn + u * Dv
                    tl.store(dz_ptr + g_off, (dy * pre * sg * (1.0 + zz * (1.0 - sg))).to(dz_ptr.dtype.element_ty),
                             mask=mask_d)
                    dy = dy * zz * sg  # d pre
                    dD += dy * u
                    du = dy * Dv
                if GROUP > 0:
                    # RMS norm without weight: dy = r * (dyn - yn * mean(dyn * yn)) over the group
                    prod = tl.reshape(dy * yn, (BLOCK_D // GROUP, GROUP))
                    m = tl.reshape(tl.broadcast_to((tl.sum(prod, axis=1) / GROUP)[:, None],
                                                   (BLOCK_D // GROUP, GROUP)), (BLOCK_D,))
                    dy = r * (dy - yn * m)
                g = gc + dy[:, None] * Ct[None, :]  # dLoss/ds_t
                # dB, dC are shared by all channels: reduce the block in registers, then one atomic add per element
                bc_off = pid_b * L * N + t * N + n
                tl.atomic_add(dC_ptr + bc_off, tl.sum(s * dy[:, None], axis=0), mask=mask_n, sem="relaxed")
                tl.atomic_add(dB_ptr + bc_off, tl.sum(g * (dl * u)[:, None], axis=0), mask=mask_n, sem="relaxed")
                gB = tl.sum(g * Bt[None, :], axis=1)
                tl.store(dx_ptr + g_off, (du + gB * dl).to(dx_ptr.dtype.element_ty), mask=mask_d)
                decay = tl.exp(dl[:, None] * A)
                # exp(delta_t A) * s_{t-1} = s_t - delta_t B_t u_t: no s_{t-1} kept, no division by a decay
                g_prev = g * (s - (dl * u)[:, None] * Bt[None, :])
                dd = gB * u + tl.sum(g_prev * A, axis=1)
                dA += g_prev * dl[:, None]
                if SOFTPLUS:
                    dd = dd * inv_dsf * tl.sigmoid(v)
                    dbias += tl.where(mask_d, dd, 0.0)
                tl.store(ddt_ptr + g_off, dd.to(ddt_ptr.dtype.element_ty), mask=mask_d)
                gc = g * decay
        # one partial per batch row (summed over B on the host): deterministic, no atomics
        tl.store(dA_ptr + st_off, dA, mask=mask_dn)
        if GATE:
            tl.store(dD_ptr + pid_b * D + d, dD, mask=mask_d)
        if SOFTPLUS:
            tl.store(dbias_ptr + pid_b * D + d, dbias, mask=mask_d)
        if STORE_DS0:
            tl.store(ds0_ptr + st_off, gc, mask=mask_dn)


def _blk(dim: int, n_pad: int, block_d: Optional[int], group: int) -> int:
    if block_d is None:
        block_d = group if group > 0 else min(_next_pow2(dim), max(1, _STATE_TILE // n_pad))
    if block_d & (block_d - 1):
        raise ValueError(f"triton scan: block_d ({block_d}) must be a power of two")
    if group > 0 and (block_d % group or dim % block_d):
        raise ValueError(f"triton scan: block_d ({block_d}) must be a multiple of group_norm_size ({group}) that "
                         f"divides D={dim}")
    return block_d


def _strides3(t: Optional[torch.Tensor], like: torch.Tensor) -> tuple[int, int, int]:
    return tuple(t.stride()) if t is not None else tuple(like.stride())


def ssm_forward(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, *,
                z: Optional[torch.Tensor] = None, dt_bias: Optional[torch.Tensor] = None,
                Dskip: Optional[torch.Tensor] = None, freq: Optional[torch.Tensor] = None,
                delta_scale_factor: float = 1.0, rope_scale_factor: float = 1.0, group_norm_size: int = 0,
                position_offset: int = 0, initial_state: Optional[torch.Tensor] = None, return_final_state: bool = False,
                store_checkpoints: bool = False, block_d: Optional[int] = None, checkpoint: Optional[int] = None,
                num_warps: Optional[int] = None, out_dtype: Optional[torch.dtype] = None) -> dict:
    """Launch the forward kernel on channels-last `[B, L, D]` views `x`, `dt` (`z`) and `[B, L, N]` views `B`, `C`.

    The optional arguments switch the mixer's fused steps on: `dt_bias` (softplus + scale), `freq` (rotation),
    `z` + `Dskip` (skip and gate), `group_norm_size` (group RMS norm). Returns a dict with `out` `[B, L, D]`
    (contiguous), `final` `[B, D, N]` fp32 or None, `ckpt` (the checkpoints, when asked) and the launch `config`.
    """
    batch, length, dim = x.shape
    n_state = A.shape[1]
    n_pad = _next_pow2(n_state)
    block_d = _blk(dim, n_pad, block_d, group_norm_size)
    ckpt_len = checkpoint or _CKPT
    num_warps = num_warps or 4
    n_ckpt = max(1, triton.cdiv(length, ckpt_len))
    A = A.float().contiguous()
    out = x.new_empty(batch, length, dim, dtype=out_dtype or x.dtype)
    final = x.new_empty(batch, dim, n_state, dtype=torch.float32) if return_final_state else out
    ckpt = (x.new_empty(batch, dim, n_ckpt, n_state, dtype=torch.float32) if store_checkpoints else out)
    s0 = initial_state.float().contiguous() if initial_state is not None else out
    grid = (triton.cdiv(dim, block_d), batch)
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        _ssm_fwd_kernel[grid](
            x, z if z is not None else x, dt, dt_bias if dt_bias is not None else A, A, B, C,
            Dskip if Dskip is not None else A, freq if freq is not None else A, s0, out, final, ckpt,
            *x.stride(), *_strides3(z, x), *dt.stride(), *B.stride(), *C.stride(), *out.stride(),
            length, dim, n_state, n_ckpt, position_offset, float(rope_scale_factor), 1.0 / float(delta_scale_factor),
            BLOCK_D=block_d, N_PAD=n_pad, CKPT=ckpt_len, SOFTPLUS=dt_bias is not None, ROTATE=freq is not None,
            GATE=z is not None, GROUP=group_norm_size, HAS_S0=initial_state is not None,
            STORE_FINAL=return_final_state, STORE_CKPT=store_checkpoints, num_warps=num_warps)
    return {"out": out, "final": final if return_final_state else None, "ckpt": ckpt if store_checkpoints else None,
            "config": (block_d, ckpt_len, num_warps, n_ckpt)}


def ssm_backward(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                 grad_out: torch.Tensor, ckpt: torch.Tensor, config: tuple, *, z: Optional[torch.Tensor] = None,
                 dt_bias: Optional[torch.Tensor] = None, Dskip: Optional[torch.Tensor] = None,
                 freq: Optional[torch.Tensor] = None, delta_scale_factor: float = 1.0, rope_scale_factor: float = 1.0,
                 group_norm_size: int = 0, position_offset: int = 0, grad_final: Optional[torch.Tensor] = None,
                 need_initial_grad: bool = False, grad_dtype: Optional[torch.dtype] = None) -> dict:
    """Launch the backward kernel (same program layout as the forward that stored `ckpt`).

    Returns a dict of gradients: `x`, `dt`, `z` `[B, L, D]` (contiguous, `grad_dtype` or the input's), `A`
    `[D, N]` fp32, `D`, `dt_bias` `[D]` fp32, `B`, `C` `[B, L, N]` fp32 (of the *rotated* B, C when `freq` is
    given) and `initial_state` `[B, D, N]` fp32 (or None).
    """
    block_d, ckpt_len, num_warps, n_ckpt = config
    batch, length, dim = x.shape
    n_state = A.shape[1]
    n_pad = _next_pow2(n_state)
    A = A.float().contiguous()
    n_blocks = triton.cdiv(dim, block_d)
    scratch = x.new_empty(batch * n_blocks * ckpt_len * block_d * n_pad, dtype=torch.float32)
    dx = x.new_empty(batch, length, dim, dtype=grad_dtype or x.dtype)
    ddt = x.new_empty(batch, length, dim, dtype=grad_dtype or dt.dtype)
    dz = x.new_empty(batch, length, dim, dtype=grad_dtype or z.dtype) if z is not None else dx
    dA = x.new_empty(batch, dim, n_state, dtype=torch.float32)
    dD = x.new_empty(batch, dim, dtype=torch.float32) if z is not None else dA
    dbias = x.new_empty(batch, dim, dtype=torch.float32) if dt_bias is not None else dA
    dB = x.new_zeros(batch, length, n_state, dtype=torch.float32)
    dC = x.new_zeros(batch, length, n_state, dtype=torch.float32)
    ds0 = x.new_empty(batch, dim, n_state, dtype=torch.float32) if need_initial_grad else dA
    gfinal = grad_final.float().contiguous() if grad_final is not None else dA
    grid = (n_blocks, batch)
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        _ssm_bwd_kernel[grid](
            x, z if z is not None else x, dt, dt_bias if dt_bias is not None else A, A, B, C,
            Dskip if Dskip is not None else A, freq if freq is not None else A, grad_out, gfinal, ckpt, scratch,
            dx, dz, ddt, dA, dD, dbias, dB, dC, ds0,
            *x.stride(), *_strides3(z, x), *dt.stride(), *B.stride(), *C.stride(), *grad_out.stride(),
            length, dim, n_state, n_ckpt, position_offset, float(rope_scale_factor), 1.0 / float(delta_scale_factor),
            BLOCK_D=block_d, N_PAD=n_pad, CKPT=ckpt_len, SOFTPLUS=dt_bias is not None, ROTATE=freq is not None,
            GATE=z is not None, GROUP=group_norm_size, HAS_GFINAL=grad_final is not None,
            STORE_DS0=need_initial_grad, num_warps=num_warps)
    return {"x": dx, "dt": ddt, "z": dz if z is not None else None, "A": dA.sum(0),
            "D": dD.sum(0) if z is not None else None, "dt_bias": dbias.sum(0) if dt_bias is not None else None,
            "B": dB, "C": dC, "initial_state": ds0 if need_initial_grad else None}


class _SelectiveScanTriton(torch.autograd.Function):
    """Autograd wrapper around the two kernels for the plain scan; see the module docstring for the algorithm."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, initial_state, block_d, checkpoint, num_warps):  # noqa: D102
        # channels-last views of the [B, D, L] / [B, N, L] arguments: no copy when the caller holds [B, L, D] memory
        x, dt, Bl, Cl = u.transpose(1, 2), delta.transpose(1, 2), B.transpose(1, 2), C.transpose(1, 2)
        needs_grad = any(ctx.needs_input_grad[:6])
        res = ssm_forward(x, dt, A, Bl, Cl, initial_state=initial_state, return_final_state=True,
                          store_checkpoints=needs_grad, block_d=block_d, checkpoint=checkpoint, num_warps=num_warps)
        if needs_grad:
            ctx.save_for_backward(u, delta, A, B, C, res["ckpt"])
            ctx.config = res["config"]
            ctx.dtypes = (u.dtype, delta.dtype, A.dtype, B.dtype, C.dtype,
                          None if initial_state is None else initial_state.dtype)
        return res["out"].transpose(1, 2), res["final"]

    @staticmethod
    def backward(ctx, grad_y, grad_final):
        u, delta, A, B, C, ckpt = ctx.saved_tensors
        g = ssm_backward(u.transpose(1, 2), delta.transpose(1, 2), A, B.transpose(1, 2), C.transpose(1, 2),
                         grad_y.transpose(1, 2), ckpt, ctx.config, grad_final=grad_final,
                         need_initial_grad=ctx.dtypes[5] is not None)
        ds0 = None if ctx.dtypes[5] is None else g["initial_state"].to(ctx.dtypes[5])
        return (g["x"].transpose(1, 2), g["dt"].transpose(1, 2), g["A"].to(ctx.dtypes[2]),
                g["B"].transpose(1, 2).to(ctx.dtypes[3]), g["C"].transpose(1, 2).to(ctx.dtypes[4]), ds0,
                None, None, None)


def selective_scan_triton(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                          initial_state: Optional[torch.Tensor] = None, return_final_state: bool = False, *,
                          block_d: Optional[int] = None, checkpoint: Optional[int] = None,
                          num_warps: Optional[int] = None):
    """Selective scan with the sequential Triton kernels (fp32 state and accumulation, differentiable).

    Args:
        u, delta: `[B, D, L]`; A: `[D, N]`; B, C: `[B, N, L]` (fp32, bf16 or fp16; float64 goes to the PyTorch path).
            Transposed views of channels-last `[B, L, ·]` memory are read in place (the fast layout).
        initial_state: `[B, D, N]` state before the first step; return_final_state: also return the last state.
        block_d: channels per program (power of two); checkpoint: steps between the backward's saved states;
            num_warps: warps per program. `None` picks the defaults; these exist for tuning on a GPU.

    Returns:
        `y: [B, D, L]` in `u`'s dtype (a transposed view of `[B, L, D]` memory), or `(y, final_state)`;
        gradients come back in each input's dtype.
    """
    if triton is None:
        raise RuntimeError("selective_scan_triton: triton is not installed (pip install triton)")
    if u.dtype == torch.float64:
        # float64 (gradcheck) needs float64 accumulation, which the kernels do not do
        return selective_scan_torch(u, delta, A, B, C, initial_state, return_final_state)
    if not u.is_cuda and not _interpreted():
        raise RuntimeError("selective_scan_triton: CPU tensors need TRITON_INTERPRET=1 set before defocus_mllm is "
                           "imported (Triton's interpreter); use the 'torch' backend otherwise")
    if u.shape[-1] == 0:
        y = u.new_zeros(u.shape)
        final = (initial_state.float().clone() if initial_state is not None
                 else u.new_zeros(u.shape[0], u.shape[1], A.shape[1], dtype=torch.float32))
        return (y, final) if return_final_state else y
    y, final = _SelectiveScanTriton.apply(u, delta, A, B, C, initial_state, block_d, checkpoint, num_warps)
    return (y, final) if return_final_state else y


register_selective_scan_backend("triton", selective_scan_triton, triton_scan_available, carries_state=True)
