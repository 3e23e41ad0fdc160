"""Native CPU kernels: a C++ library (``cpu_scan.cpp``) compiled on first use and called through ctypes.

It holds the selective scan (registered here as the ``"cpu"`` backend of `selective_scan`), the fused Mamba mixer
core (``cpu_mixer.py``) and the causal conv + SiLU (``causal_conv.py``); all three load it through `load_library`.

Nothing is compiled at install or import time. The first CPU scan call compiles the kernel with the system C++
compiler (``$CXX``, else ``c++``/``g++``; a few seconds) into the torch extensions directory
(``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``) under a name keyed by the source, the flags and
the torch version, so later processes just load it. If the kernel is disabled (``DEFOCUS_DISABLE_CPU_KERNEL=1``),
or cannot be compiled or loaded, one warning is logged and the caller falls back to the PyTorch scan.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Optional

import torch

from .selective_scan import register_selective_scan_backend

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("cpu_scan.cpp")
_ABI_VERSION = 5  # must match defocus_scan_abi_version() in cpu_scan.cpp
_DISABLE_ENV = "DEFOCUS_DISABLE_CPU_KERNEL"

_LANES = 8  # the kernel's vector width in states

_lock = threading.Lock()
_lib: Optional[ctypes.CDLL] = None
_failure: Optional[str] = None  # why the kernel is unavailable, once that is known


def _arch_flags() -> list[str]:
    """SIMD flags from what torch detected on this CPU (not -march=native: the build cache may be shared by
    machines of different CPUs, so the flags are part of the cache key)."""
    if sys.platform != "linux" or os.uname().machine not in ("x86_64", "AMD64"):
        return []
    capability = torch.backends.cpu.get_cpu_capability()
    if capability.startswith("AVX512"):
        return ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512dq", "-mavx512bw", "-mavx512vl"]
    if capability == "AVX2":
        return ["-mavx2", "-mfma", "-mf16c"]
    return []


def _compile_flags() -> list[str]:
    # -fopenmp: ATen's parallel_for is OpenMP inline code; the library then links libgomp.so.1, which resolves to
    # the copy torch has already loaded, so the kernel shares torch's thread pool. -fno-math-errno lets GCC
    # vectorise floor() in the exp; no -ffast-math (it would flush denormals process-wide when linked).
    abi = int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", 1))
    return ["-O3", "-std=c++17", "-fPIC", "-shared", "-fopenmp", "-fno-math-errno", "-DNDEBUG",
            f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *_arch_flags()]


def _build_dir() -> Path:
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if not root:
        from torch.utils.cpp_extension import get_default_build_root

        root = get_default_build_root()
    return Path(root) / "defocus_cpu_scan"


def library_path() -> Path:
    """Where the compiled kernel for this source, these flags and this torch version is cached."""
    key = hashlib.sha256()
    key.update(_SOURCE.read_bytes())
    key.update(" ".join(_compile_flags()).encode())
    key.update(f"{torch.__version__}|{sys.platform}|{os.uname().machine}".encode())
    return _build_dir() / f"defocus_cpu_scan_{key.hexdigest()[:16]}.so"


def _find_compiler() -> str:
    chosen = os.environ.get("CXX")
    if chosen:  # an explicit choice is honoured, not second-guessed with another compiler
        if shutil.which(chosen):
            return shutil.which(chosen)
        raise RuntimeError(f"no C++ compiler found: $CXX={chosen} does not exist")
    for name in ("c++", "g++", "clang++"):
        if shutil.which(name):
            return shutil.which(name)
    raise RuntimeError("no C++ compiler found ($CXX, c++, g++ or clang++ on PATH)")


def _compile(target: Path) -> None:
    """Compile into a temporary file next to `target`, then rename: concurrent builders never see a partial file."""
    import torch.utils.cpp_extension as cpp

    compiler = _find_compiler()
    target.parent.mkdir(parents=True, exist_ok=True)
    lib_dirs = cpp.library_paths()
    cmd = [compiler, *_compile_flags(), *(f"-I{p}" for p in cpp.include_paths()), str(_SOURCE),
           *(f"-L{p}" for p in lib_dirs), *(f"-Wl,-rpath,{p}" for p in lib_dirs), "-lc10", "-ltorch_cpu"]
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        logger.info("defocus_mllm: compiling the native CPU kernels into %s", target)
        proc = subprocess.run([*cmd, "-o", tmp], capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise RuntimeError(f"{Path(compiler).name} failed: {' | '.join(tail)}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    if lib.defocus_scan_abi_version() != _ABI_VERSION:
        raise RuntimeError(f"{path} has an unexpected ABI version")
    ptr, i64, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
    signatures = {
        "defocus_scan_forward": [ptr] * 6 + [i64] * 5 + [ptr] * 4,
        "defocus_scan_backward": [ptr] * 11 + [i64] * 5 + [ptr] * 3,
        "defocus_mixer_rotate": [ptr] * 5 + [i64] * 5 + [f32, ptr, ptr, i64],
        "defocus_mixer_rotate_backward": [ptr] * 5 + [i64] * 5 + [f32] + [ptr] * 5 + [i64],
        "defocus_mixer_forward": [ptr] * 14 + [f32, i64],
        "defocus_mixer_backward": [ptr] * 21 + [f32, i64],
        "defocus_conv_forward": [ptr] * 6 + [i64],
        "defocus_conv_backward": [ptr] * 9 + [i64],
    }
    for name, argtypes in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, ctypes.c_int
    return lib


def load_library() -> Optional[ctypes.CDLL]:
    """The compiled kernel, building it on the first call; None (and one logged warning) where it cannot run."""
    global _lib, _failure
    if _lib is not None or _failure is not None:
        return _lib
    with _lock:
        if _lib is not None or _failure is not None:
            return _lib
        try:
            if os.environ.get(_DISABLE_ENV, "").strip().lower() not in ("", "0", "false", "no"):
                raise RuntimeError(f"disabled by {_DISABLE_ENV}")
            path = library_path()
            if not path.exists():
                _compile(path)
            _lib = _load(path)
        except Exception as exc:  # any build or load problem means: use the PyTorch scan
            _failure = str(exc) or type(exc).__name__
            logger.warning("defocus_mllm: native CPU kernels (scan, Mamba mixer, causal conv) unavailable (%s); "
                           "using the PyTorch ops instead", _failure)
    return _lib


def is_available() -> bool:
    """True when the kernel is (or can be) built and loaded here; the first call may compile it."""
    return load_library() is not None


def _reset() -> None:
    """Forget the loaded kernel / the failure, so that the next call tries again (tests)."""
    global _lib, _failure
    with _lock:
        _lib, _failure = None, None


def _ptr(t: Optional[torch.Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


def _check(rc: int, name: str) -> None:
    if rc != 0:
        raise RuntimeError(f"{name} in {_SOURCE.name} failed (code {rc}: 1 = an error such as out of memory inside "
                           "the kernel, 2 = an invalid shape)")


def padded_state(state: Optional[torch.Tensor], n_pad: int) -> Optional[torch.Tensor]:
    """A `[B, D, N]` state as the kernels take it: fp32, contiguous, zero-padded to `n_pad` states."""
    if state is None:
        return None
    state = state.detach().to(torch.float32)
    pad = n_pad - state.shape[-1]
    return (torch.nn.functional.pad(state, (0, pad)) if pad else state).contiguous()


def _states_prepared(A, B, C):
    """fp32 A `[D, Np]` and time-major B, C `[B, L, Np]`, contiguous, the states padded with zeros to Np, a multiple
    of the kernel's 8 lanes (A = B = C = 0 there: those states stay 0 and add nothing to y)."""
    n = A.shape[1]
    pad = -n % _LANES
    if pad:
        A = torch.nn.functional.pad(A.to(torch.float32), (0, pad))
        B = torch.nn.functional.pad(B.to(torch.float32), (0, 0, 0, pad))
        C = torch.nn.functional.pad(C.to(torch.float32), (0, 0, 0, pad))
    f32 = lambda t: t.to(torch.float32).contiguous()  # noqa: E731
    # B, C usually arrive as [B, N, L] views of [B, L, N] projections; the transpose back is then free
    return f32(A), f32(B.transpose(1, 2)), f32(C.transpose(1, 2))


def _forward(lib: ctypes.CDLL, u, delta, A32, Bt, Ct, s0=None, final=None) -> torch.Tensor:
    """y `[B, D, L]` fp32 from prepared states. u and delta are read in place when fp32 with equal strides (any
    layout, e.g. a channels-last `[B, L, D]` tensor seen through `.transpose(1, 2)`); y then gets u's memory
    order, so a channels-last caller gets a channels-last y and needs no transposed copies."""
    u32, d32 = u.to(torch.float32), delta.to(torch.float32)
    if u32.stride() != d32.stride():
        u32, d32 = u32.contiguous(), d32.contiguous()
    batch, dim, length = u32.shape
    if u32.stride(1) < u32.stride(2):  # channels-last input: channels-last output
        y = torch.empty(batch, length, dim, dtype=torch.float32).transpose(1, 2)
    else:
        y = torch.empty(batch, dim, length, dtype=torch.float32)
    in_strides = (ctypes.c_int64 * 3)(*u32.stride())
    out_strides = (ctypes.c_int64 * 3)(*y.stride())
    rc = lib.defocus_scan_forward(_ptr(u32), _ptr(d32), _ptr(A32), _ptr(Bt), _ptr(Ct), _ptr(y), batch, dim,
                                  length, A32.shape[1], torch.get_num_threads(), in_strides, out_strides, _ptr(s0),
                                  _ptr(final))
    _check(rc, "defocus_scan_forward")
    return y


class _SelectiveScanCPU(torch.autograd.Function):
    """Kernel forward; the backward recomputes the states of each (b, d) row inside the kernel, so only the inputs
    are saved (no `[L, B, D, N]` tensor in either pass). Returns `(y, final_state)`; the initial state and the final
    state take part in autograd like the other inputs and outputs."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, initial_state):  # noqa: D102 - shapes in `selective_scan`
        ctx.set_materialize_grads(False)
        lib = load_library()
        states = _states_prepared(A, B, C)
        batch, dim, _ = u.shape
        n_pad = states[0].shape[1]
        s0 = padded_state(initial_state, n_pad)
        final = torch.empty(batch, dim, n_pad, dtype=torch.float32)
        y = _forward(lib, u, delta, *states, s0, final)
        # the backward kernel reads contiguous [B, D, L] u and delta
        ctx.save_for_backward(u.to(torch.float32).contiguous(), delta.to(torch.float32).contiguous(), *states, s0)
        ctx.input_dtypes = (u.dtype, delta.dtype, A.dtype, B.dtype, C.dtype,
                            None if initial_state is None else initial_state.dtype)
        ctx.n_state = A.shape[1]
        return y.to(u.dtype), final[:, :, : A.shape[1]]

    @staticmethod
    def backward(ctx, grad_y, grad_final):
        lib = load_library()
        u32, d32, A32, Bt, Ct, s0 = ctx.saved_tensors
        batch, dim, length = u32.shape
        n, dt = ctx.n_state, ctx.input_dtypes
        gy = torch.zeros_like(u32) if grad_y is None else grad_y.to(torch.float32).contiguous()
        gfin = padded_state(grad_final, A32.shape[1])
        gu, gd = torch.empty_like(u32), torch.empty_like(u32)
        gA, gB, gC = torch.empty_like(A32), torch.empty_like(Bt), torch.empty_like(Ct)
        gs0 = torch.empty(batch, dim, A32.shape[1]) if dt[5] is not None else None
        rc = lib.defocus_scan_backward(_ptr(u32), _ptr(d32), _ptr(A32), _ptr(Bt), _ptr(Ct), _ptr(gy), _ptr(gu),
                                       _ptr(gd), _ptr(gA), _ptr(gB), _ptr(gC), batch, dim, length, A32.shape[1],
                                       torch.get_num_threads(), _ptr(s0), _ptr(gfin), _ptr(gs0))
        _check(rc, "defocus_scan_backward")
        # drop the padded states; grad B / C as [B, N, L] views of the kernel's time-major buffers
        return (gu.to(dt[0]), gd.to(dt[1]), gA[:, :n].to(dt[2]), gB[:, :, :n].transpose(1, 2).to(dt[3]),
                gC[:, :, :n].transpose(1, 2).to(dt[4]), None if gs0 is None else gs0[:, :, :n].to(dt[5]))


def selective_scan_cpu(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                       initial_state: Optional[torch.Tensor] = None, return_final_state: bool = False):
    """Native CPU selective scan (fp32 accumulation; output in `u`'s dtype, gradients in each input's dtype).

    `initial_state` `[B, D, N]` is the state before the first step (zeros when None); `return_final_state` also
    returns the state after the last one, `[B, D, N]` fp32. Without gradients (no input requires grad, or under
    `no_grad` / `inference_mode`) this is one kernel call that keeps only the running states, `O(B·D·N)`.
    """
    tensors = (u, delta, A, B, C) + (() if initial_state is None else (initial_state,))
    if any(t.device.type != "cpu" for t in tensors):
        raise ValueError("selective_scan backend 'cpu' needs CPU tensors")
    lib = load_library()
    if lib is None:
        raise RuntimeError(f"the native CPU selective-scan kernel is unavailable: {_failure}")
    if u.numel() == 0 or A.shape[1] == 0:
        from .selective_scan import selective_scan_torch  # degenerate shapes: nothing worth a kernel call

        return selective_scan_torch(u, delta, A, B, C, initial_state=initial_state,
                                    return_final_state=return_final_state)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        y, final = _SelectiveScanCPU.apply(u, delta, A, B, C, initial_state)
    else:
        states = _states_prepared(A, B, C)
        n_pad = states[0].shape[1]
        final = torch.empty(u.shape[0], u.shape[1], n_pad) if return_final_state else None
        y = _forward(lib, u, delta, *states, padded_state(initial_state, n_pad), final).to(u.dtype)
        final = None if final is None else final[:, :, : A.shape[1]]
    return (y, final) if return_final_state else y


# the "cpu" backend of `selective_scan`; `is_available` compiles the kernel on first use (seconds, cached), never at
# import. Registered from here (selective_scan.py knows nothing of this module), as triton_scan.py registers its own.
register_selective_scan_backend("cpu", selective_scan_cpu, is_available, carries_state=True)
