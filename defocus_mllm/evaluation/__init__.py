"""VQA evaluation: official metrics, benchmark loaders and a resumable batched answering loop.

Typical use (``eval/run.py`` is a thin command line over this)::

    from defocus_mllm.evaluation import run_benchmark
    report = run_benchmark(model, processor, "pope", data="playground/data/eval/pope", output_dir="out/pope")
"""

from .answer_processing import evalai_answer, evalai_vqa_accuracy, normalize_answer, vqa_accuracy
from .generation import build_prompt, generate_answers, is_main_process, read_predictions, run_benchmark
from .metrics import (
    MME_COGNITION,
    MME_PERCEPTION,
    can_infer,
    can_infer_option,
    can_infer_text,
    circular_shift,
    easy_vqa_scores,
    extract_sqa_letter,
    gqa_accuracy,
    mmbench_circular_accuracy,
    mme_scores,
    normalize_gqa_answer,
    parse_yes_no_mme,
    parse_yes_no_pope,
    pope_metrics,
)
from .report import breakdown_tables, results_markdown, results_row, summarize_dirs, summary_table
from .sources import BenchmarkDataError, Sample, published_splits, select_split
from .tasks import (
    BENCHMARKS,
    EASY_VQA_INSTRUCTION,
    LETTER_ANSWER,
    SHORT_ANSWER,
    Benchmark,
    get_benchmark,
    with_instruction,
)

__all__ = [
    "BENCHMARKS",
    "EASY_VQA_INSTRUCTION",
    "LETTER_ANSWER",
    "MME_COGNITION",
    "MME_PERCEPTION",
    "SHORT_ANSWER",
    "Benchmark",
    "BenchmarkDataError",
    "Sample",
    "breakdown_tables",
    "build_prompt",
    "can_infer",
    "can_infer_option",
    "can_infer_text",
    "circular_shift",
    "easy_vqa_scores",
    "evalai_answer",
    "evalai_vqa_accuracy",
    "extract_sqa_letter",
    "generate_answers",
    "get_benchmark",
    "is_main_process",
    "gqa_accuracy",
    "mmbench_circular_accuracy",
    "mme_scores",
    "normalize_answer",
    "normalize_gqa_answer",
    "parse_yes_no_mme",
    "parse_yes_no_pope",
    "pope_metrics",
    "published_splits",
    "read_predictions",
    "results_markdown",
    "results_row",
    "run_benchmark",
    "select_split",
    "summarize_dirs",
    "summary_table",
    "vqa_accuracy",
    "with_instruction",
]
