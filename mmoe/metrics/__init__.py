"""Ports of the official evaluators (leaf package: from mmoe it imports only its own modules and `mmoe.files`).

``mmoe.metrics.vqa`` (VQA accuracy, [VQAv2]), ``mmoe.metrics.nlvr2`` (accuracy and consistency) and the
other evaluators live in their own modules; ``evaluate_vqa``, ``normalize_answer`` and ``evaluate_nlvr2`` are
also reachable from here, imported lazily so that ``python -m mmoe.metrics.vqa`` runs its module only once.
"""

from __future__ import annotations

import argparse
import importlib
from typing import Any

__all__ = ["evaluate_vqa", "normalize_answer", "evaluate_nlvr2", "add_scored_input"]

_LAZY = {
    "evaluate_vqa": "mmoe.metrics.vqa",
    "normalize_answer": "mmoe.metrics.vqa",
    "evaluate_nlvr2": "mmoe.metrics.nlvr2",
}


def add_scored_input(
    parser: argparse.ArgumentParser, *, results: str, baseline: str, flag: str = "--results", metavar: str = ""
) -> None:
    """What an evaluator command scores, exactly one of: a results file (``flag``) or the baseline built from a
    training file (``--baseline-from``); the evaluators' own scripts offer the same choice."""
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument(flag, help=results)
    what.add_argument("--baseline-from", metavar=metavar or "TRAIN_ANNOTATIONS", help=baseline)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mmoe.metrics' has no attribute {name!r}")
