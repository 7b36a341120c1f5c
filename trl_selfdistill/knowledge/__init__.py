"""What a model knows and what it forgets: fact data, the answer format, SliCK probing, splits, forgetting metrics."""

from pathlib import Path

from .callback import ForgettingCallback
from .drift import DriftMeter
from .facts import builtin_facts, is_correct, load_facts, normalize_answer
from .formats import AnswerFormat
from .generation import GenerateFn, Generator
from .metrics import evaluate_knowledge, forgetting_summary, score
from .probe import SLICK_CATEGORIES, ProbeConfig, probe, slick_category
from .splits import KnowledgeSplits, build_splits, check_disjoint
from .synthetic import synthetic_facts

EXACT_MATCH_METRIC_PATH = str(Path(__file__).with_name("exact_match_alias.py"))

__all__ = [
    "EXACT_MATCH_METRIC_PATH",
    "SLICK_CATEGORIES",
    "AnswerFormat",
    "DriftMeter",
    "ForgettingCallback",
    "GenerateFn",
    "Generator",
    "KnowledgeSplits",
    "ProbeConfig",
    "build_splits",
    "builtin_facts",
    "check_disjoint",
    "evaluate_knowledge",
    "forgetting_summary",
    "is_correct",
    "load_facts",
    "normalize_answer",
    "probe",
    "score",
    "slick_category",
    "synthetic_facts",
]
