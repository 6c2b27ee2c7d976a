"""Ports of the official evaluators (leaf package: imports nothing else from mmoe).

``mmoe.metrics.vqa`` (VQA accuracy, SPEC.md 7) and ``mmoe.metrics.nlvr2`` (accuracy and consistency)
are re-exported here; other evaluators live in their own modules and are imported from there.
"""

from mmoe.metrics.nlvr2 import evaluate_nlvr2
from mmoe.metrics.vqa import evaluate_vqa, normalize_answer

__all__ = ["evaluate_vqa", "normalize_answer", "evaluate_nlvr2"]
