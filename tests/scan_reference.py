"""Float64 references of the selective scan and its random inputs (test_ops, test_cpu_scan, test_cpu_mixer,
test_triton_scan and test_mamba_mixer_op compare every backend with these)."""

from __future__ import annotations

import torch


def literal_scan(u, delta, A, B, C):
    """The recurrence as written, one batch, channel, state and step at a time (float64)."""
    batch, dim, length = u.shape
    n_state = A.shape[1]
    y = torch.zeros(batch, dim, length, dtype=torch.float64)
    for b in range(batch):
        for d in range(dim):
            for n in range(n_state):
                s = torch.zeros((), dtype=torch.float64)
                for t in range(length):
                    s = torch.exp(delta[b, d, t] * A[d, n]) * s + delta[b, d, t] * B[b, n, t] * u[b, d, t]
                    y[b, d, t] = y[b, d, t] + C[b, n, t] * s
    return y


def vector_reference(u, delta, A, B, C):
    """The same recurrence vectorised over (b, d, n) for long sequences (float64)."""
    s = torch.zeros(u.shape[0], u.shape[1], A.shape[1], dtype=torch.float64)
    ys = []
    for t in range(u.shape[-1]):
        s = torch.exp(delta[:, :, t, None] * A) * s + (delta[:, :, t] * u[:, :, t])[..., None] * B[:, None, :, t]
        ys.append((s * C[:, None, :, t]).sum(-1))
    return torch.stack(ys, -1)


def make_inputs(batch=2, dim=3, length=7, n_state=4, seed=0, delta_scale=1.0, a_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(batch, dim, length, generator=g),
        (torch.rand(batch, dim, length, generator=g) + 0.05) * delta_scale,
        -(torch.rand(dim, n_state, generator=g) + 0.1) * a_scale,
        torch.randn(batch, n_state, length, generator=g),
        torch.randn(batch, n_state, length, generator=g),
    ]
