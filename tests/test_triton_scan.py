"""The Triton selective scan (forward and every gradient) against a literal float64 recurrence.

The kernels run on CPU tensors through Triton's interpreter, which `triton.jit` selects only if `TRITON_INTERPRET=1`
is already set when a kernel is decorated, i.e. when `defocus_mllm.ops.triton_scan` is first imported. Inside one
pytest process any other test may have imported the package first (and the variable would leak into the tests that
follow), so the checks run in a child process started with the variable set: this file is also that child's script
(`python tests/test_triton_scan.py` prints the measured errors as JSON). The parent runs it once per session and
asserts case by case. It skips only when triton is not installed; a broken install or a failing kernel fails.
"""

from __future__ import annotations

import json

import pytest
import torch
from op_checks import rel_err
from scan_reference import make_inputs
from triton_helpers import triton_interpreter_results

# name: (batch, dim, length, n_state, dtype, launch options, A scale, with initial / final state)
CASES = {
    "fp32_odd": (2, 5, 7, 3, "float32", {}, 1.0, False),
    "fp32_single_step": (1, 3, 1, 16, "float32", {}, 1.0, False),
    "fp32_n33_padded": (1, 2, 9, 33, "float32", {}, 1.0, False),
    # several checkpointed chunks (the last one partial) and channel blocks (the last one partial), fast decays
    "fp32_chunked": (2, 3, 13, 5, "float32", {"checkpoint": 4, "block_d": 2}, 20.0, False),
    # a stream continued from a state, its final state part of the loss
    "fp32_state_in_out": (2, 3, 10, 4, "float32", {"checkpoint": 4}, 1.0, True),
    "bf16_chunked": (2, 4, 11, 4, "bfloat16", {"checkpoint": 4}, 1.0, False),
    "fp16": (1, 3, 6, 2, "float16", {}, 1.0, False),
}
TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2, "float16": 5e-3}
NAMES = ("y", "u", "delta", "A", "B", "C")


def make_low_precision_inputs(batch, dim, length, n_state, dtype, a_scale):
    """`test_ops.make_inputs`, with u, delta, B, C in `dtype` (A stays fp32, as in the mixers)."""
    inputs = make_inputs(batch, dim, length, n_state, a_scale=a_scale)
    return [t if i == 2 else t.to(getattr(torch, dtype)) for i, t in enumerate(inputs)]


def reference_with_state(u, delta, A, B, C, s0):
    """The per-step recurrence in float64 started from `s0`; returns `(y, final_state)`."""
    s, ys = s0, []
    for t in range(u.shape[-1]):
        s = torch.exp(delta[:, :, t, None] * A) * s + (delta[:, :, t] * u[:, :, t])[..., None] * B[:, None, :, t]
        ys.append((s * C[:, None, :, t]).sum(-1))
    return torch.stack(ys, -1), s


def run_cases() -> dict:
    """Child-process side: every case through the "triton" backend, errors vs the literal scan."""
    from defocus_mllm.ops import available_backends, selective_scan
    from defocus_mllm.ops.triton_scan import _interpreted, selective_scan_triton

    results = {"interpreted": _interpreted(), "available": "triton" in available_backends(), "cases": {}}
    for name, (batch, dim, length, n_state, dtype, options, a_scale, stateful) in CASES.items():
        inputs = make_low_precision_inputs(batch, dim, length, n_state, dtype, a_scale)
        if stateful:
            inputs.append(torch.randn(batch, dim, n_state, generator=torch.Generator().manual_seed(2)))
        ours = [t.clone().requires_grad_() for t in inputs]
        ref = [t.double().requires_grad_() for t in inputs]
        if options:
            scan = lambda *t: selective_scan_triton(*t[:5], initial_state=t[5] if stateful else None,  # noqa: E731
                                                    return_final_state=True, **options)
        else:
            scan = lambda *t: selective_scan(*t, backend="triton", return_final_state=True)  # noqa: E731
        y, final = scan(*ours)
        with torch.no_grad():  # the inference launch skips saving the checkpoints
            y_no_grad, _ = scan(*inputs)
        s0 = ref[5] if stateful else torch.zeros(batch, dim, n_state, dtype=torch.float64)
        y_ref, final_ref = reference_with_state(*ref[:5], s0)
        gen = torch.Generator().manual_seed(1)
        grad_out = torch.randn(y.shape, generator=gen).to(y.dtype)
        grad_final = torch.randn(final.shape, generator=gen) if stateful else torch.zeros(final.shape)
        torch.autograd.backward([y, final], [grad_out, grad_final])
        torch.autograd.backward([y_ref, final_ref], [grad_out.double(), grad_final.double()])
        names = NAMES + (("initial_state",) if stateful else ())
        errors = dict(zip(names, [rel_err(y, y_ref)] + [rel_err(a.grad, b.grad) for a, b in zip(ours, ref)]))
        errors["final_state"] = rel_err(final, final_ref)
        results["cases"][name] = {
            "errors": errors,
            "no_grad_matches": torch.equal(y_no_grad, y.detach()),
            "dtypes_ok": y.dtype == inputs[0].dtype and final.dtype == torch.float32
            and all(a.grad.dtype == a.dtype for a in ours),
            "shape_ok": y.shape == inputs[0].shape,
        }
    return results


@pytest.fixture(scope="module")
def child_results() -> dict:
    return triton_interpreter_results(__file__, timeout=600)


def test_backend_runs_in_the_interpreter(child_results):
    assert child_results["interpreted"], "kernels were not built for Triton's interpreter despite TRITON_INTERPRET=1"
    assert child_results["available"], "the 'triton' backend is not registered as available"


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_literal_recurrence(child_results, case):
    result = child_results["cases"][case]
    assert result["shape_ok"] and result["dtypes_ok"], "output / gradient shape or dtype differs from the inputs'"
    assert result["no_grad_matches"], "the forward under torch.no_grad differs from the differentiable one"
    tolerance = TOLERANCE[CASES[case][4]]
    bad = {name: err for name, err in result["errors"].items() if not err < tolerance}
    assert not bad, f"{case}: relative errors above {tolerance:g}: {bad}"


if __name__ == "__main__":
    print(json.dumps(run_cases()))
