"""Triton's CPU interpreter for the kernel tests: a test module run as a script in a fresh interpreter."""

from __future__ import annotations

import importlib.util
import json
import os
import sys


def triton_interpreter_results(script: str, timeout: int) -> dict:
    """Run the test module `script` as a script in a fresh interpreter with `TRITON_INTERPRET=1` (Triton picks its CPU
    interpreter when imported) and the default backends, and return the JSON of its last output line; skipped
    without triton."""
    import subprocess

    import pytest

    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (the `dev` extra installs it)")
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop("DEFOCUS_MIXER_BACKEND", None)
    env.pop("DEFOCUS_SCAN_BACKEND", None)
    proc = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"interpreter run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])
