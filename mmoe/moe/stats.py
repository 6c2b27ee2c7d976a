"""Routing statistics from :class:`~mmoe.moe.layer.RoutingRecord` s ([MH1] sec. 4 / Fig. 1).

- expert load: share of the kept (routed) assignments each expert receives;
- activation ratio: share of experts whose load is at least a threshold ([MH1] Fig. 1a: SMoE 8.33%
  vs MH-MoE 90.71% of 32 experts activated);
- sub-token diversity: distinct experts among one token's h sub-tokens' first choices (1..h), which
  gives the per-patch maps of [MH1] Fig. 1b / Fig. 8;
- majority expert: the expert most of a token's sub-tokens chose (ties: larger summed gate, then lower id),
  the colour of a patch in the majority maps;
- dropped share: dropped assignments over all assignments of real sub-tokens (capacity mode).

Padding never counts: records already exclude it from ``counts`` and mark it with id -1.

These are the only implementations: the training logs (``mmoe.train``), the validation pictures and the
``mmoe-viz`` reports (``mmoe.viz.records`` wraps them for numpy arrays) all call them, so they agree.

:class:`RoutingTally` reduces each record to the counts and sums these need as it arrives, so a whole
evaluation set is summarized in O(experts) memory instead of keeping every record (ids and gates of every
sub-token) until the end.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from mmoe.moe.layer import RoutingRecord

__all__ = [
    "DEFAULT_ACTIVATION_THRESHOLD",
    "expert_load",
    "activation_ratio",
    "activated_experts",
    "distinct_experts",
    "majority_expert",
    "token_diversity",
    "dropped_share",
    "summarize",
    "log_metrics",
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


def activated_experts(counts: Tensor, threshold: float = DEFAULT_ACTIVATION_THRESHOLD) -> list[int]:
    """Ids of the experts :func:`activation_ratio` counts as activated (load share >= ``threshold``, not idle)."""
    share = expert_load(counts)
    return [int(e) for e in torch.nonzero((share >= threshold) & (share > 0)).flatten()]


def distinct_experts(first: Tensor) -> Tensor:
    """(..., h) first choices -> (...) int64 number of distinct experts among the real sub-tokens.

    The sub-token assignment diversity of [MH1] (1..h for top-1 routing); a padding sub-token (-1) does not
    count, so an all-padding token gets 0.
    """
    first = torch.as_tensor(first)
    srt, _ = torch.sort(first.reshape(-1, first.shape[-1]).to(torch.int64), dim=-1)
    new = torch.ones_like(srt, dtype=torch.bool)
    new[:, 1:] = srt[:, 1:] != srt[:, :-1]
    return (new & (srt >= 0)).sum(-1).reshape(first.shape[:-1])


def majority_expert(first: Tensor, gates: Tensor | None = None) -> Tensor:
    """(..., h) first choices -> (...) int64 expert most of a token's sub-tokens chose.

    Ties go to the tied expert with the larger summed gate (when ``gates``, of the same shape, is given),
    then to the lower expert id; gate sums are taken in float64. A token whose sub-tokens are all padding
    (-1) gets -1.
    """
    first = torch.as_tensor(first)
    ids_Nh = first.reshape(-1, first.shape[-1]).to(torch.int64)
    valid_Nh = ids_Nh >= 0
    num_experts = int(ids_Nh.max()) + 1 if bool(valid_Nh.any()) else 1
    slot_Nh = ids_Nh.clamp(min=0)
    votes_NE = torch.zeros(ids_Nh.shape[0], num_experts, dtype=torch.int64, device=ids_Nh.device)
    votes_NE.scatter_add_(1, slot_Nh, valid_Nh.to(torch.int64))
    w_Nh = torch.ones_like(ids_Nh, dtype=torch.float64) if gates is None else torch.as_tensor(gates)
    w_Nh = torch.where(valid_Nh, w_Nh.reshape(ids_Nh.shape).to(torch.float64), 0.0)
    mass_NE = torch.zeros(votes_NE.shape, dtype=torch.float64, device=ids_Nh.device).scatter_add_(1, slot_Nh, w_Nh)
    # lexicographic: most votes, then most gate mass, then the lowest id (argmax returns the first maximum)
    top_NE = votes_NE == votes_NE.max(dim=1, keepdim=True).values
    mass_NE = torch.where(top_NE, mass_NE, float("-inf"))
    best_NE = top_NE & (mass_NE == mass_NE.max(dim=1, keepdim=True).values)
    out_N = torch.where(valid_Nh.any(dim=1), best_NE.to(torch.uint8).argmax(dim=1), -1)
    return out_N.reshape(first.shape[:-1])


def token_diversity(record: RoutingRecord) -> Tensor:
    """(B, L) int64: distinct experts among each token's h sub-tokens (first choices); 0 for padding."""
    return distinct_experts(record.expert_ids[:, 0].reshape(-1, record.num_heads)).reshape(record.token_shape)


def dropped_share(record: RoutingRecord) -> float:
    """Dropped assignments over all assignments of real sub-tokens (0.0 in dropless mode)."""
    dropped = float(record.dropped)
    total = float(record.counts.sum()) + dropped
    return dropped / total if total > 0 else 0.0


def summarize(records: Iterable[RoutingRecord], *, threshold: float = DEFAULT_ACTIVATION_THRESHOLD) -> dict[str, Any]:
    """Pool several records of one layer (e.g. the batches of an evaluation set) into its metrics.

    The one-call form of :class:`RoutingTally` (the same totals, the same numbers): see
    :meth:`RoutingTally.metrics` for the keys.
    """
    tally = RoutingTally()
    for record in records:
        tally.add(record)
    if not tally.records:
        raise ValueError("summarize: got no RoutingRecord; expected at least one")
    return tally.metrics(threshold=threshold)


def log_metrics(metrics_by_layer: Mapping[str, Mapping[str, Any]], *, per_expert: bool = False) -> dict[str, float]:
    """Per-layer metrics (of :func:`summarize` or :meth:`RoutingTally.metrics`) as flat log keys.

    ``{layer}/activation_ratio``, ``{layer}/load_max``, ``{layer}/diversity`` and ``{layer}/dropped_share``, plus
    the load share of every expert (``{layer}/load/e{i}``) with ``per_expert``: the names the training logs use.
    """
    out: dict[str, float] = {}
    for layer, m in metrics_by_layer.items():
        out[f"{layer}/activation_ratio"] = float(m["activation_ratio"])
        out[f"{layer}/load_max"] = float(m["load_max"])
        if per_expert:
            out.update({f"{layer}/load/e{e}": float(v) for e, v in enumerate(m["load"])})
        out[f"{layer}/diversity"] = float(m["diversity"])
        out[f"{layer}/dropped_share"] = float(m["dropped_share"])
    return out


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

    def metrics(self, *, threshold: float = DEFAULT_ACTIVATION_THRESHOLD) -> dict[str, Any]:
        """``activation_ratio``, ``load`` (share per expert), ``load_max``, ``load_min``, ``diversity`` (mean over
        real tokens), ``dropped_share``, ``num_tokens`` (real tokens) and ``num_experts``."""
        if self.counts is None:
            raise ValueError("RoutingTally.metrics: no record was added")
        counts = self.counts.cpu()
        load = expert_load(counts)
        dropped, assigned = int(self.dropped), int(counts.sum()) + int(self.dropped)
        return {
            "activation_ratio": activation_ratio(counts, threshold),
            "load": load.tolist(),
            "load_max": float(load.max()),
            "load_min": float(load.min()),
            "diversity": int(self.diversity_sum) / max(1, int(self.diversity_tokens)),
            "dropped_share": dropped / assigned if assigned > 0 else 0.0,
            "num_tokens": float(int(self.diversity_tokens)),
            "num_experts": float(counts.numel()),
        }
