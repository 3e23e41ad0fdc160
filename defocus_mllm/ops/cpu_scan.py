"""Native CPU selective scan: a C++ kernel (``cpu_scan.cpp``) compiled on first use and called through ctypes.

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

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("cpu_scan.cpp")
_ABI_VERSION = 3  # must match defocus_scan_abi_version() in cpu_scan.cpp
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
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
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
        logger.info("defocus_mllm: compiling the CPU selective-scan kernel into %s", target)
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
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.defocus_scan_forward.argtypes = [ptr] * 6 + [i64] * 5 + [ptr] * 2
    lib.defocus_scan_backward.argtypes = [ptr] * 11 + [i64] * 5
    lib.defocus_scan_forward.restype = lib.defocus_scan_backward.restype = ctypes.c_int
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
            logger.warning("defocus_mllm: native CPU selective-scan kernel unavailable (%s); using the PyTorch "
                           "scan instead", _failure)
    return _lib


def is_available() -> bool:
    """True when the kernel is (or can be) built and loaded here; the first call may compile it."""
    return load_library() is not None


def _reset() -> None:
    """Forget the loaded kernel / the failure, so that the next call tries again (tests)."""
    global _lib, _failure
    with _lock:
        _lib, _failure = None, None


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


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


def _forward(lib: ctypes.CDLL, u, delta, A32, Bt, Ct) -> torch.Tensor:
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
                                  length, A32.shape[1], torch.get_num_threads(), in_strides, out_strides)
    if rc != 0:
        raise RuntimeError(f"defocus_scan_forward failed (code {rc})")
    return y


class _SelectiveScanCPU(torch.autograd.Function):
    """Kernel forward; the backward recomputes the states of each (b, d) row inside the kernel, so only the inputs
    are saved (no `[L, B, D, N]` tensor in either pass)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C):  # noqa: D102 - shapes in `selective_scan`
        lib = load_library()
        states = _states_prepared(A, B, C)
        y = _forward(lib, u, delta, *states)
        # the backward kernel reads contiguous [B, D, L] u and delta
        ctx.save_for_backward(u.to(torch.float32).contiguous(), delta.to(torch.float32).contiguous(), *states)
        ctx.input_dtypes = (u.dtype, delta.dtype, A.dtype, B.dtype, C.dtype)
        ctx.n_state = A.shape[1]
        return y.to(u.dtype)

    @staticmethod
    def backward(ctx, grad_y):
        lib = load_library()
        u32, d32, A32, Bt, Ct = ctx.saved_tensors
        batch, dim, length = u32.shape
        gy = grad_y.to(torch.float32).contiguous()
        gu, gd = torch.empty_like(u32), torch.empty_like(u32)
        gA, gB, gC = torch.empty_like(A32), torch.empty_like(Bt), torch.empty_like(Ct)
        rc = lib.defocus_scan_backward(_ptr(u32), _ptr(d32), _ptr(A32), _ptr(Bt), _ptr(Ct), _ptr(gy), _ptr(gu),
                                       _ptr(gd), _ptr(gA), _ptr(gB), _ptr(gC), batch, dim, length, A32.shape[1],
                                       torch.get_num_threads())
        if rc != 0:
            raise RuntimeError(f"defocus_scan_backward failed (code {rc})")
        n, dt = ctx.n_state, ctx.input_dtypes
        # drop the padded states; grad B / C as [B, N, L] views of the kernel's time-major buffers
        return (gu.to(dt[0]), gd.to(dt[1]), gA[:, :n].to(dt[2]), gB[:, :, :n].transpose(1, 2).to(dt[3]),
                gC[:, :, :n].transpose(1, 2).to(dt[4]))


def selective_scan_cpu(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                       C: torch.Tensor) -> torch.Tensor:
    """Native CPU selective scan (fp32 accumulation; output in `u`'s dtype, gradients in each input's dtype).

    Without gradients (no input requires grad, or under `no_grad` / `inference_mode`) this is one kernel call that
    keeps only the running states, `O(B·D·N)`.
    """
    if any(t.device.type != "cpu" for t in (u, delta, A, B, C)):
        raise ValueError("selective_scan backend 'cpu' needs CPU tensors")
    lib = load_library()
    if lib is None:
        raise RuntimeError(f"the native CPU selective-scan kernel is unavailable: {_failure}")
    if u.numel() == 0 or A.shape[1] == 0:
        from .selective_scan import selective_scan_torch  # degenerate shapes: nothing worth a kernel call

        return selective_scan_torch(u, delta, A, B, C)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (u, delta, A, B, C)):
        return _SelectiveScanCPU.apply(u, delta, A, B, C)
    return _forward(lib, u, delta, *_states_prepared(A, B, C)).to(u.dtype)
