"""Routing statistics from :class:`~mmoe.moe.layer.RoutingRecord` s ([MH1] sec. 4 / Fig. 1; SPEC.md 4).

- expert load: share of the kept (routed) assignments each expert receives;
- activation ratio: share of experts whose load is at least a threshold ([MH1] Fig. 1a: SMoE 8.33%
  vs MH-MoE 90.71% of 32 experts activated);
- sub-token diversity: distinct experts among one token's h sub-tokens' first choices (1..h), which
  gives the per-patch maps of [MH1] Fig. 1b / Fig. 8;
- dropped share: dropped assignments over all assignments of real sub-tokens (capacity mode).

Padding never counts: records already exclude it from ``counts`` and mark it with id -1.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from mmoe.moe.layer import RoutingRecord

__all__ = [
    "DEFAULT_ACTIVATION_THRESHOLD",
    "expert_load",
    "activation_ratio",
    "token_diversity",
    "dropped_share",
    "summarize",
]

DEFAULT_ACTIVATION_THRESHOLD = 0.01
"""Default absolute load share (1% of the routed assignments) above which an expert is 'activated'."""


def expert_load(counts: Tensor) -> Tensor:
    """(E,) counts -> (E,) float share of routed assignments (sums to 1; zeros if nothing was routed)."""
    c = torch.as_tensor(counts).to(torch.float64)
    total = c.sum()
    return c / total if total > 0 else torch.zeros_like(c)


def activation_ratio(counts: Tensor, threshold: float = DEFAULT_ACTIVATION_THRESHOLD) -> float:
    """Share of experts whose load share is at least ``threshold``; an idle expert never counts."""
    if threshold < 0:
        raise ValueError(f"activation_ratio: threshold={threshold}; expected >= 0 (a share of the routed load)")
    share = expert_load(counts)
    if share.numel() == 0:
        return 0.0
    return float(((share >= threshold) & (share > 0)).to(torch.float64).mean())


def token_diversity(record: RoutingRecord) -> Tensor:
    """(B, L) int64: distinct experts among each token's h sub-tokens (first choices); 0 for padding."""
    h = record.num_heads
    first_Nh = record.expert_ids[:, 0].reshape(-1, h)
    srt, _ = torch.sort(first_Nh, dim=1)
    distinct_N = 1 + (srt[:, 1:] != srt[:, :-1]).sum(dim=1)
    distinct_N = torch.where(first_Nh[:, 0] >= 0, distinct_N, torch.zeros_like(distinct_N))
    return distinct_N.reshape(record.token_shape)


def dropped_share(record: RoutingRecord) -> float:
    """Dropped assignments over all assignments of real sub-tokens (0.0 in dropless mode)."""
    dropped = float(record.dropped)
    total = float(record.counts.sum()) + dropped
    return dropped / total if total > 0 else 0.0


def summarize(records: Iterable[RoutingRecord], *, threshold: float = DEFAULT_ACTIVATION_THRESHOLD) -> dict[str, float]:
    """Pool several records of one layer (e.g. the batches of an evaluation set) into scalar metrics.

    Returns ``activation_ratio``, ``load_max`` and ``load_min`` (shares), ``diversity`` (mean over real
    tokens), ``dropped_share``, ``num_tokens`` (real tokens) and ``num_experts``.
    """
    records = list(records)
    if not records:
        raise ValueError("summarize: got no RoutingRecord; expected at least one")
    num_experts = records[0].num_experts
    counts = torch.zeros(num_experts, dtype=torch.int64)
    div_sum, n_tok, dropped, assigned = 0.0, 0, 0.0, 0.0
    for r in records:
        if r.num_experts != num_experts:
            raise ValueError(f"summarize: records mix {num_experts} and {r.num_experts} experts; expected one layer")
        counts += r.counts.detach().cpu().to(torch.int64)
        div = token_diversity(r).cpu()
        real = div > 0
        div_sum += float(div[real].sum())
        n_tok += int(real.sum())
        dropped += float(r.dropped)
        assigned += float(r.counts.sum()) + float(r.dropped)
    load = expert_load(counts)
    return {
        "activation_ratio": activation_ratio(counts, threshold),
        "load_max": float(load.max()),
        "load_min": float(load.min()),
        "diversity": div_sum / max(1, n_tok),
        "dropped_share": dropped / assigned if assigned > 0 else 0.0,
        "num_tokens": float(n_tok),
        "num_experts": float(num_experts),
    }
