"""The Triton kernels compile for a Hopper GPU (sm_90) without one: Triton's compiler runs ahead of time to a cubin.

The interpreter tests (test_triton_scan.py, test_triton_mixer.py) execute the kernels' Python with NumPy, which
accepts code the real compiler rejects (Python control flow on tensors, layouts, types of loop-carried values). This
compiles every kernel variant the package launches (the plain scan and the fused mixer, with and without the
backward's checkpoints, state in and out; the conv) through the whole pipeline, ptxas included, so such errors fail
here rather than on the first GPU run.
"""

from __future__ import annotations

import importlib.util
import inspect

import pytest

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed (the `dev` extra installs it)", allow_module_level=True)

from defocus_mllm.ops import triton_conv, triton_scan  # noqa: E402

LOW = ("x_ptr", "z_ptr", "dt_ptr", "B_ptr", "C_ptr", "out_ptr", "dx_ptr", "dz_ptr", "ddt_ptr", "gout_ptr")
MIXER = dict(SOFTPLUS=True, ROTATE=True, GATE=True, GROUP=64)
PLAIN = dict(SOFTPLUS=False, ROTATE=False, GATE=False, GROUP=0)
TILE = dict(BLOCK_D=64, N_PAD=16, CKPT=16)
VARIANTS = {
    "mixer_fwd_train": ("_ssm_fwd_kernel", dict(TILE, HAS_S0=True, STORE_FINAL=True, STORE_CKPT=True, **MIXER)),
    "mixer_fwd_inference": ("_ssm_fwd_kernel", dict(TILE, HAS_S0=False, STORE_FINAL=False, STORE_CKPT=False,
                                                    **MIXER)),
    "mixer_bwd": ("_ssm_bwd_kernel", dict(TILE, HAS_GFINAL=True, STORE_DS0=True, **MIXER)),
    "scan_fwd": ("_ssm_fwd_kernel", dict(TILE, HAS_S0=False, STORE_FINAL=True, STORE_CKPT=True, **PLAIN)),
    "scan_bwd": ("_ssm_bwd_kernel", dict(TILE, HAS_GFINAL=False, STORE_DS0=False, **PLAIN)),
    "conv_fwd": ("_conv_fwd_kernel", dict(HAS_BIAS=True, K=4, BLOCK_L=16, BLOCK_D=64)),
    "conv_bwd": ("_conv_bwd_kernel", dict(HAS_BIAS=False, K=4, BLOCK_L=16, BLOCK_D=64)),
}


def arg_type(name: str) -> str:
    if name.endswith("_ptr"):
        return "*bf16" if name in LOW or name == "g_ptr" else "*fp32"
    return "fp32" if name in ("rope_scale", "inv_dsf") else "i32"


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_kernel_compiles_for_sm90(variant):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    assert not triton_scan._interpreted(), "kernels were built for the interpreter: TRITON_INTERPRET leaked here"
    name, constexprs = VARIANTS[variant]
    kernel = getattr(triton_scan if name.startswith("_ssm") else triton_conv, name)
    params = list(inspect.signature(kernel.fn).parameters)
    assert set(constexprs) <= set(params), f"{name} has no parameter(s) {set(constexprs) - set(params)}"
    signature = {p: "constexpr" if p in constexprs else arg_type(p) for p in params}
    source = ASTSource(kernel, signature, constexprs={(params.index(k),): v for k, v in constexprs.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    assert len(compiled.asm["cubin"]) > 1000 and f".entry {name}" in compiled.asm["ptx"]
