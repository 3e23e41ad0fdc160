"""VQA evaluation: the benchmarks (one module each under ``benchmarks/``: loaders and official scoring rules), a
resumable batched answering loop, and reports.

Typical use (``eval/run.py`` is a thin command line over this)::

    from defocus_mllm.evaluation import load_model, run_benchmark
    model, processor = load_model("out/finetune")
    report = run_benchmark(model, processor, "pope", data="playground/data/eval/pope", output_dir="out/pope")
"""

from ._compat import moved_names
from .answer_processing import vqa_accuracy
from .benchmarks import BENCHMARKS, Benchmark, get_benchmark
from .distributed import is_main_process
from .fingerprints import model_fingerprint
from .generation import generate_answers
from .report import results_row, summarize_dirs, summary_table
from .runner import load_model, run_benchmark
from .sources import BenchmarkDataError

# every name this package exported before (the scoring rules, the parsers, the prompt strings, ...) stays importable
__getattr__ = moved_names(
    __name__, (".tasks", ".metrics", ".answer_processing", ".report", ".sources", ".predictions", ".generation"))

__all__ = [
    "BENCHMARKS",
    "Benchmark",
    "BenchmarkDataError",
    "generate_answers",
    "get_benchmark",
    "is_main_process",
    "load_model",
    "model_fingerprint",
    "results_row",
    "run_benchmark",
    "summarize_dirs",
    "summary_table",
    "vqa_accuracy",
]
