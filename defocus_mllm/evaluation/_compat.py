"""The evaluation's old module paths (``tasks``, ``metrics``, ``generation``) keep every name they held: a name that
moved is looked up, on first use, in the modules it moved to."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def moved_names(module: str, targets: tuple[str, ...], renamed: Mapping[str, str] | None = None
                ) -> Callable[[str], Any]:
    """A module ``__getattr__`` (PEP 562) for ``module`` that finds a name in ``targets`` (modules relative to this
    package), under its new name where ``renamed`` gives one. Each target's own namespace is read (not its
    ``__getattr__``), so two old modules can never send a lookup back and forth."""
    renamed = dict(renamed or {})

    def __getattr__(name: str) -> Any:
        wanted = renamed.get(name, name)
        for target in targets:
            namespace = vars(importlib.import_module(target, __package__))
            if wanted in namespace:
                return namespace[wanted]
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__
