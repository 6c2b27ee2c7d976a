"""Routing statistics from :class:`~mmoe.moe.layer.RoutingRecord` s ([MH1] sec. 4 / Fig. 1; SPEC.md 4).

- expert load: share of the kept (routed) assignments each expert receives;
- activation ratio: share of experts whose load is at least a threshold ([MH1] Fig. 1a: SMoE 8.33%
  vs MH-MoE 90.71% of 32 experts activated);
- sub-token diversity: distinct experts among one token's h sub-tokens' first choices (1..h), which
  gives the per-patch maps of [MH1] Fig. 1b / Fig. 8;
- dropped share: dropped assignments over all assignments of real sub-tokens (capacity mode).

Padding never counts: records already exclude it from ``counts`` and mark it with id -1.

:class:`RoutingTally` reduces each record to the counts and sums these need as it arrives, so a whole
evaluation set is summarized in O(experts) memory instead of keeping every record (ids and gates of every
sub-token) until the end.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

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
    "RoutingTally",
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


@dataclass
class RoutingTally:
    """Running totals of one layer's routing over many records (batches, streams): O(E) memory.

    All totals are integers (counts of assignments and tokens, summed distinct-expert counts), kept as int64
    tensors on the records' device: adding a record launches a few small reductions and no host sync, and the
    metrics read from the totals equal those of the records pooled at once, exactly. ``diversity_tokens``
    counts the tokens whose h sub-tokens are all real (padding tokens have every sub-token at -1).
    """

    counts: Tensor | None = None  # (E,) kept assignments per expert
    diversity_sum: Tensor | None = None  # () sum over real tokens of their distinct first choices
    diversity_tokens: Tensor | None = None  # () real tokens
    dropped: Tensor | None = None  # () assignments dropped by capacity
    records: int = field(default=0)

    @torch.no_grad()
    def add(self, record: RoutingRecord) -> None:
        """Fold one record into the totals (the record can be freed afterwards)."""
        counts = record.counts.detach().to(torch.int64)
        if self.counts is not None and self.counts.shape != counts.shape:
            raise ValueError(
                f"RoutingTally.add: a record of {counts.numel()} experts after {self.counts.numel()}; one layer only"
            )
        div_BL = token_diversity(record)
        first_Nh = record.expert_ids[:, 0].reshape(-1, record.num_heads)
        real = (first_Nh >= 0).all(dim=-1).reshape(div_BL.shape)
        parts = (
            counts,
            torch.where(real, div_BL, torch.zeros_like(div_BL)).sum().to(torch.int64),
            real.sum().to(torch.int64),
            record.dropped.detach().to(torch.int64).reshape(()),
        )
        if self.counts is None:
            self.counts, self.diversity_sum, self.diversity_tokens, self.dropped = (t.clone() for t in parts)
        else:
            device = self.counts.device
            self.counts += parts[0].to(device)
            self.diversity_sum += parts[1].to(device)
            self.diversity_tokens += parts[2].to(device)
            self.dropped += parts[3].to(device)
        self.records += 1

    def metrics(self, *, threshold: float = DEFAULT_ACTIVATION_THRESHOLD) -> dict[str, float | list[float]]:
        """``activation_ratio``, ``load`` (per expert), ``load_max``, ``diversity`` and ``dropped_share``."""
        if self.counts is None:
            raise ValueError("RoutingTally.metrics: no record was added")
        counts = self.counts.cpu()
        load = expert_load(counts)
        dropped, assigned = int(self.dropped), int(counts.sum()) + int(self.dropped)
        return {
            "activation_ratio": activation_ratio(counts, threshold),
            "load": load.tolist(),
            "load_max": float(load.max()),
            "diversity": int(self.diversity_sum) / max(1, int(self.diversity_tokens)),
            "dropped_share": dropped / assigned if assigned > 0 else 0.0,
        }
