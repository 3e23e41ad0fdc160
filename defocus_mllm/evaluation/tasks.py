"""The benchmark definitions' old home. Each benchmark is now a module of :mod:`defocus_mllm.evaluation.benchmarks`
(its loaders and its scoring rule); every name importable from here before still is."""

from __future__ import annotations

from ._compat import moved_names
from .benchmarks import BENCHMARKS, Benchmark, check_count, get_benchmark
from .benchmarks.base import SHORT_ANSWER, answers_from, percent_by, with_instruction
from .benchmarks.easy_vqa import EASY_VQA_INSTRUCTION, EasyVQA
from .benchmarks.gqa import GQA
from .benchmarks.mmbench import LETTER_ANSWER, MMBench
from .benchmarks.mme import MME, mme_ground_truth
from .benchmarks.pope import POPE
from .benchmarks.scienceqa import ScienceQA
from .benchmarks.soft_vqa import SoftVQABenchmark
from .benchmarks.textvqa import TextVQA
from .benchmarks.vizwiz import UNANSWERABLE, VizWiz
from .benchmarks.vqav2 import VQAv2

__getattr__ = moved_names(
    __name__,
    (".benchmarks.base", ".benchmarks.vqav2", ".benchmarks.pope", ".benchmarks.scienceqa", ".benchmarks.mme",
     ".metrics", ".answer_processing", ".sources", "defocus_mllm.data.easy_vqa"),
    renamed={"_answers_from": "answers_from", "_percent_by": "percent_by", "_SoftVQA": "SoftVQABenchmark"},
)

__all__ = ["BENCHMARKS", "EASY_VQA_INSTRUCTION", "GQA", "LETTER_ANSWER", "MME", "POPE", "SHORT_ANSWER", "UNANSWERABLE",
           "Benchmark", "EasyVQA", "MMBench", "ScienceQA", "SoftVQABenchmark", "TextVQA", "VQAv2", "VizWiz",
           "answers_from", "check_count", "get_benchmark", "mme_ground_truth", "percent_by", "with_instruction"]
