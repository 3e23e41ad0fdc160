"""The benchmarks, one module each (its loaders and its scoring rule), and the registry that names them.

A new benchmark is one new module here with a `Benchmark` subclass, and one line in `BENCHMARKS` below.
"""

from __future__ import annotations

from .base import Benchmark, check_count
from .easy_vqa import EasyVQA
from .gqa import GQA
from .mmbench import MMBench
from .mme import MME
from .pope import POPE
from .scienceqa import ScienceQA
from .textvqa import TextVQA
from .vizwiz import VizWiz
from .vqav2 import VQAv2

# the registry: name -> class, in LLaVA-1.5's table order (easy-VQA, the offline benchmark, last)
BENCHMARKS: dict[str, type[Benchmark]] = {
    VQAv2.name: VQAv2,
    GQA.name: GQA,
    TextVQA.name: TextVQA,
    VizWiz.name: VizWiz,
    POPE.name: POPE,
    ScienceQA.name: ScienceQA,
    MME.name: MME,
    MMBench.name: MMBench,
    EasyVQA.name: EasyVQA,
}

_ALIASES = {"easyvqa": "easy-vqa", "sqa": "scienceqa", "science-qa": "scienceqa"}


def get_benchmark(name: str) -> Benchmark:
    """A fresh benchmark object by name (``vqav2``, ``gqa``, ``textvqa``, ``vizwiz``, ``pope``,
    ``scienceqa``, ``mme``, ``mmbench``, ``easy-vqa``)."""
    key = name.lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    if key not in BENCHMARKS:
        raise KeyError(f"unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}")
    return BENCHMARKS[key]()


__all__ = ["BENCHMARKS", "Benchmark", "EasyVQA", "GQA", "MME", "MMBench", "POPE", "ScienceQA", "TextVQA", "VQAv2",
           "VizWiz", "check_count", "get_benchmark"]
