"""`BackendRegistry`: the one register / availability / override / dispatch pattern of the kernel-backed ops.

Each op (`selective_scan`, `mamba_mixer_core`, `causal_conv1d_silu`) keeps one registry: kernel modules register
their implementation under a name with an availability check (asked lazily: the native CPU kernel compiles on the
first question), an environment variable names a backend for every call, and otherwise the first available name
of the device's preference list runs, `"torch"` (the reference, registered by the op's own module) last.
"""

from __future__ import annotations

import os
from typing import Callable, Generic, Optional, TypeVar

import torch

Fn = TypeVar("Fn", bound=Callable)

FALLBACK = "torch"


def always_available() -> bool:
    """The availability of a backend that runs anywhere."""
    return True


class BackendRegistry(Generic[Fn]):
    """The backends of one op.

    Args:
        op: the op's name, the first word of every error message.
        env_var: the environment variable that names the backend of every call (e.g. `DEFOCUS_SCAN_BACKEND`).
        preference: per device type, the backends tried in order when none is named.
        unavailable_hint: appended to the error raised for a named backend that cannot run here.
    """

    def __init__(self, op: str, env_var: str, preference: dict[str, tuple[str, ...]],
                 unavailable_hint: str = "") -> None:
        self.op = op
        self.env_var = env_var
        self.preference = preference
        self.unavailable_hint = unavailable_hint
        self.fns: dict[str, Fn] = {}
        self.availability: dict[str, Callable[[], bool]] = {}
        self.carries_state: set[str] = set()

    def register(self, name: str, fn: Fn, is_available: Callable[[], bool] = always_available,
                 carries_state: bool = False) -> None:
        """Add (or replace) backend `name`; `carries_state`: it honours the op's stream-state arguments."""
        self.fns[name] = fn
        self.availability[name] = is_available
        if carries_state:
            self.carries_state.add(name)
        else:
            self.carries_state.discard(name)

    def is_available(self, name: str) -> bool:
        """Registered and able to run here."""
        return name in self.fns and self.availability[name]()

    def available(self) -> list[str]:
        """Registered backends that can run here, in registration order."""
        return [name for name in self.fns if self.availability[name]()]

    def forced(self) -> Optional[str]:
        """The backend named by the environment variable, if set."""
        return os.environ.get(self.env_var) or None

    def preferred(self, x: torch.Tensor, usable: Callable[[str], bool] = lambda name: True) -> str:
        """The first available (and `usable`) backend of `x`'s device type; float64 runs the reference (the kernels
        compute in fp32, the reference keeps float64 for gradcheck)."""
        if x.dtype == torch.float64:
            return FALLBACK
        for name in self.preference.get(x.device.type, ()):
            if usable(name) and self.is_available(name):
                return name
        return FALLBACK

    def default(self, x: torch.Tensor) -> str:
        """The backend of a call that names none: the environment variable's, else `preferred(x)`."""
        return self.forced() or self.preferred(x)

    def resolve(self, name: str) -> Fn:
        """The implementation of `name`, or a clear error: unknown (`ValueError`) or not runnable here
        (`RuntimeError`)."""
        if name not in self.fns:
            raise ValueError(f"{self.op}: unknown backend {name!r}; registered: {sorted(self.fns)}")
        if not self.availability[name]():
            raise RuntimeError(f"{self.op}: backend {name!r} is not available here (available: {self.available()})"
                               f"{self.unavailable_hint}")
        return self.fns[name]


__all__ = ["FALLBACK", "BackendRegistry", "always_available"]
