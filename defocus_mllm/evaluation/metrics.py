"""The per-benchmark scoring rules' old home. Each rule now sits with its benchmark in
:mod:`defocus_mllm.evaluation.benchmarks` (the VQA answer normalisation several share stays in
:mod:`~defocus_mllm.evaluation.answer_processing`); every name importable from here before still is."""

from __future__ import annotations

from ._compat import moved_names
from .answer_processing import normalize_answer, vqa_accuracy
from .benchmarks.easy_vqa import easy_vqa_scores
from .benchmarks.gqa import gqa_accuracy, normalize_gqa_answer
from .benchmarks.mmbench import (
    CIRCULAR_OFFSET,
    MMBENCH_REFUSALS,
    can_infer,
    can_infer_option,
    can_infer_text,
    circular_shift,
    mmbench_circular_accuracy,
)
from .benchmarks.mme import MME_COGNITION, MME_PERCEPTION, mme_scores, parse_yes_no_mme
from .benchmarks.pope import parse_yes_no_pope, pope_metrics
from .benchmarks.scienceqa import SQA_OPTIONS, extract_sqa_letter

__getattr__ = moved_names(__name__, (".benchmarks.scienceqa", ".benchmarks.mmbench"))

__all__ = ["CIRCULAR_OFFSET", "MMBENCH_REFUSALS", "MME_COGNITION", "MME_PERCEPTION", "SQA_OPTIONS", "can_infer",
           "can_infer_option", "can_infer_text", "circular_shift", "easy_vqa_scores", "extract_sqa_letter",
           "gqa_accuracy", "mme_scores", "mmbench_circular_accuracy", "normalize_answer", "normalize_gqa_answer",
           "parse_yes_no_mme", "parse_yes_no_pope", "pope_metrics", "vqa_accuracy"]
