"""Ports of the official evaluators (leaf package: imports nothing else from mmoe but its own modules).

``mmoe.metrics.vqa`` (VQA accuracy, [VQAv2]), ``mmoe.metrics.nlvr2`` (accuracy and consistency) and the
other evaluators live in their own modules; ``evaluate_vqa``, ``normalize_answer`` and ``evaluate_nlvr2`` are
also reachable from here, imported lazily so that ``python -m mmoe.metrics.vqa`` runs its module only once.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["evaluate_vqa", "normalize_answer", "evaluate_nlvr2"]

_LAZY = {
    "evaluate_vqa": "mmoe.metrics.vqa",
    "normalize_answer": "mmoe.metrics.vqa",
    "evaluate_nlvr2": "mmoe.metrics.nlvr2",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mmoe.metrics' has no attribute {name!r}")
