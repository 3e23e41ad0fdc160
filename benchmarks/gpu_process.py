"""Running one part of the one-GPU run (docs/gpu.md) as a subprocess: its output streamed, time-stamped, into the
log; its whole process group killed at the timeout or when this script is terminated; the card's memory sampled.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from typing import Any, Optional

from gpu_plan import ROOT


class GpuMemoryPoller:
    """Samples `nvidia-smi`'s used memory of GPU 0 every half second (the whole card, context and cache included)."""

    def __init__(self) -> None:
        self.peak_mib: Optional[float] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def __enter__(self) -> "GpuMemoryPoller":
        if shutil.which("nvidia-smi"):
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                                      "-i", "0"], capture_output=True, text=True, timeout=5).stdout.strip()
                used = float(out.splitlines()[0])
                self.peak_mib = used if self.peak_mib is None else max(self.peak_mib, used)
            except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
                pass
            self._stop.wait(0.5)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=6)


RUNNING: list[subprocess.Popen] = []  # the part in flight, whose process group a SIGTERM to this script ends too


def run_streamed(cmd: list[str], timeout: float, env: dict[str, str], log) -> tuple[Any, list[tuple[float, str]]]:
    """Run `cmd` in its own process group, stream its output (time-stamped) into `log`, kill the whole group at
    `timeout`. Returns `(returncode or "timeout", [(time, line), ...])`."""
    lines: list[tuple[float, str]] = []
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT,
                            start_new_session=True, bufsize=1, errors="replace")
    RUNNING[:] = [proc]

    started = time.time()

    def reader() -> None:
        for line in proc.stdout:
            now = time.time()
            lines.append((now, line.rstrip("\n")))
            log.write(f"[{now - started:7.1f}s] {line}")
            log.flush()

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    try:
        rc: Any = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        rc = "timeout"
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=10)
                break
            except subprocess.TimeoutExpired:
                continue
    thread.join(timeout=10)
    RUNNING.clear()
    return rc, lines


def terminate_running(signum: int, frame: Any) -> None:
    """SIGTERM handler of the runner: kill the part in flight with its whole process group, then exit."""
    for proc in RUNNING:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    raise SystemExit(128 + signum)
