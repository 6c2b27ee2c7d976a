"""Turn MoE routing records into per-patch and per-word expert assignments and load statistics.

The MH-MoE layer ([MH1] sec. 3) splits every token into h sub-tokens and routes each one
to its own top-k experts. A `RoutingRecord` (docs/interfaces.md sec. 1) stores that as flat
(S, K) arrays whose row ``i*h + j`` is sub-token j of token i, tokens flattened as ``b*L + l``. This
module reshapes those rows back to (B, L, h, K), splits the sequence into its vision part (CLS then
a grid of patches) and its text part, and reduces it to what the paper draws:

- the expert each patch's sub-tokens chose and the majority expert ([MH1] Fig. 1b / Fig. 8),
- the number of distinct experts a token's sub-tokens reach ([MH1] Fig. 8),
- the share of routed sub-tokens per expert and the activation ratio ([MH1] Fig. 1a / Fig. 5).

The reductions themselves (load, activation ratio, diversity, majority expert, dropped share) are those of
`mmoe.moe.stats`, the ones the training logs use; this module only reshapes and hands them numpy arrays, so
the pictures and the logs show the same numbers. It needs neither the model nor Lightning.
Dimension legend: B batch, L tokens, h MoE heads, K top-k, E experts, gh x gw patch grid.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from mmoe.moe import stats

Pool = Literal["shared", "vision", "text"]

_KEY_RE = re.compile(r"^(?P<base>.+?)(?:\.(?P<pool>vision|text))?$")
_RECORD_FIELDS = ("expert_ids", "gates", "kept", "counts", "num_heads", "num_experts", "top_k", "token_shape")


def _np(x: Any) -> np.ndarray:
    """Tensor or array to a numpy array on CPU (records are detached, but be lenient)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def parse_layer_key(key: str) -> tuple[str, Pool]:
    """Split a routing key into (layer name, pool): "layer3" -> ("layer3", "shared"),
    "layer3.vision" -> ("layer3", "vision") (per-modality expert pools, interfaces.md sec. 2)."""
    m = _KEY_RE.match(key)
    assert m is not None  # the pattern matches every non-empty string
    return m.group("base"), (m.group("pool") or "shared")  # type: ignore[return-value]


@dataclass(frozen=True)
class TokenRouting:
    """Routing of a run of tokens, reshaped per token and head.

    Attributes:
        expert_ids: (B, L, h, K) int64, -1 for padding sub-tokens.
        gates: (B, L, h, K) float32, 0 for padding.
        kept: (B, L, h, K) bool, False for padding and for assignments dropped by capacity.
        num_experts: E.
    """

    expert_ids: np.ndarray
    gates: np.ndarray
    kept: np.ndarray
    num_experts: int

    @property
    def num_heads(self) -> int:
        return int(self.expert_ids.shape[2])

    @property
    def top_k(self) -> int:
        return int(self.expert_ids.shape[3])

    @property
    def num_tokens(self) -> int:
        return int(self.expert_ids.shape[1])

    def first_choice(self) -> np.ndarray:
        """(B, L, h) expert of each sub-token's first choice (-1 for padding)."""
        return self.expert_ids[..., 0]

    def slice(self, start: int, stop: int) -> TokenRouting:
        """Tokens [start, stop) of every sequence."""
        return TokenRouting(
            self.expert_ids[:, start:stop],
            self.gates[:, start:stop],
            self.kept[:, start:stop],
            self.num_experts,
        )

    def counts(self) -> np.ndarray:
        """(E,) kept assignments per expert among these tokens (padding and drops excluded)."""
        ids = self.expert_ids[self.kept & (self.expert_ids >= 0)]
        return np.bincount(ids.reshape(-1), minlength=self.num_experts).astype(np.int64)


def record_to_tokens(record: Any, *, key: str = "record") -> TokenRouting:
    """Reshape a `RoutingRecord` (S, K) into per-token (B, L, h, K) arrays.

    Row ``i*h + j`` is sub-token j of token i and token i is ``b*L + l`` (interfaces.md sec. 1), so a
    plain C-order reshape to (B, L, h, K) puts every sub-token in its place.
    """
    missing = [f for f in _RECORD_FIELDS if not hasattr(record, f)]
    if missing:
        raise TypeError(f"routing record {key!r}: missing fields {missing}; expected a mmoe.moe.RoutingRecord")
    ids = _np(record.expert_ids).astype(np.int64)
    if ids.ndim == 1:
        ids = ids[:, None]
    gates = _np(record.gates).astype(np.float32).reshape(ids.shape)
    kept = _np(record.kept).astype(bool).reshape(ids.shape)
    b, seq = (int(v) for v in record.token_shape)
    h, k = int(record.num_heads), ids.shape[1]
    if ids.shape[0] != b * seq * h:
        raise ValueError(
            f"routing record {key!r}: expert_ids has {ids.shape[0]} rows, "
            f"expected B*L*h = {b}*{seq}*{h} = {b * seq * h}"
        )
    shape = (b, seq, h, k)
    return TokenRouting(ids.reshape(shape), gates.reshape(shape), kept.reshape(shape), int(record.num_experts))


@dataclass(frozen=True)
class LayerView:
    """One routing key of a forward pass, split into its vision and text tokens.

    Attributes:
        key: the routing key ("layer3", "layer3.vision", "layer3.text").
        layer: the layer name without the pool suffix.
        pool: "shared" (one expert pool for both modalities) or the modality of a per-modality pool.
        num_experts, num_heads, top_k: E, h, K of the layer.
        counts: (E,) kept assignments per expert over every token of the record (padding excluded).
        dropped: assignments dropped by capacity.
        vision: routing of the vision tokens [CLS, patches...] or None.
        text: routing of the text tokens or None.
        record: the `RoutingRecord` itself (for `mmoe.moe.stats.RoutingTally`).
    """

    key: str
    layer: str
    pool: Pool
    num_experts: int
    num_heads: int
    top_k: int
    counts: np.ndarray
    dropped: int
    vision: TokenRouting | None
    text: TokenRouting | None
    record: Any


def split_routing(routing: Mapping[str, Any], *, num_vision_tokens: int, num_text_tokens: int) -> list[LayerView]:
    """Split every record of `out.routing` into its vision and text tokens.

    A shared-pool record covers the whole sequence, vision tokens first (interfaces.md sec. 2). A
    per-modality record ("layerN.vision"/"layerN.text") covers either only its own modality's tokens
    or, if it was recorded over the full sequence, its own slice of it.
    """
    nv, nt = int(num_vision_tokens), int(num_text_tokens)
    views: list[LayerView] = []
    for key, record in routing.items():
        layer, pool = parse_layer_key(key)
        tokens = record_to_tokens(record, key=key)
        seq = tokens.num_tokens
        vision: TokenRouting | None = None
        text: TokenRouting | None = None
        if seq == nv + nt:
            if pool in ("shared", "vision") and nv:
                vision = tokens.slice(0, nv)
            if pool in ("shared", "text") and nt:
                text = tokens.slice(nv, nv + nt)
        elif pool == "vision" and seq == nv:
            vision = tokens
        elif pool == "text" and seq == nt:
            text = tokens
        else:
            raise ValueError(
                f"routing record {key!r}: {seq} tokens per sequence, expected {nv + nt} "
                f"(vision {nv} + text {nt})" + (f" or {nv if pool == 'vision' else nt}" if pool != "shared" else "")
            )
        views.append(
            LayerView(
                key=key,
                layer=layer,
                pool=pool,
                num_experts=int(record.num_experts),
                num_heads=int(record.num_heads),
                top_k=int(record.top_k),
                counts=_np(record.counts).astype(np.int64).reshape(-1),
                dropped=int(_np(getattr(record, "dropped", 0))),
                vision=vision,
                text=text,
                record=record,
            )
        )
    return views


def patch_routing(vision: TokenRouting, grid_size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(B, gh, gw, h, K) experts and gates of every patch sub-token's top-k choices (-1 / 0 for padding).

    The vision tokens are [CLS, patches...] (interfaces.md sec. 2); any prefix tokens before the
    gh*gw patches are dropped, patches are in row-major order as the patch embedding flattens them.
    """
    gh, gw = (int(v) for v in grid_size)
    prefix = vision.num_tokens - gh * gw
    if prefix < 0:
        raise ValueError(f"patch_routing: {vision.num_tokens} vision tokens cannot hold a {gh}x{gw} patch grid")
    shape = (vision.expert_ids.shape[0], gh, gw, vision.num_heads, vision.top_k)
    return vision.expert_ids[:, prefix:].reshape(shape), vision.gates[:, prefix:].reshape(shape)


def patch_grid(vision: TokenRouting, grid_size: tuple[int, int]) -> np.ndarray:
    """(B, gh, gw, h) first-choice expert of every patch sub-token (`patch_routing`'s first choices)."""
    return patch_routing(vision, grid_size)[0][..., 0]


def patch_gates(vision: TokenRouting, grid_size: tuple[int, int]) -> np.ndarray:
    """(B, gh, gw, h) gate of every patch sub-token's first choice."""
    return patch_routing(vision, grid_size)[1][..., 0]


def majority_expert(first: np.ndarray, gates: np.ndarray | None = None) -> np.ndarray:
    """(..., h) first choices -> (...) the expert most of a token's sub-tokens chose (-1 for padding).

    Ties go to the tied expert with the larger summed gate (when `gates` is given), then to the lower
    expert id (`mmoe.moe.stats.majority_expert`).
    """
    g = None if gates is None else torch.from_numpy(np.asarray(gates))
    return stats.majority_expert(torch.from_numpy(np.asarray(first)), g).numpy()


def diversity(first: np.ndarray) -> np.ndarray:
    """(..., h) first choices -> (...) number of distinct experts among a token's real sub-tokens.

    [MH1]'s sub-token assignment diversity (`mmoe.moe.stats.distinct_experts`): 1..h for top-1 routing,
    0 for an all-padding token.
    """
    return stats.distinct_experts(torch.from_numpy(np.asarray(first))).numpy()


def load_share(counts: np.ndarray) -> np.ndarray:
    """(E,) counts -> share of routed assignments per expert (`mmoe.moe.stats.expert_load`)."""
    return stats.expert_load(torch.as_tensor(np.asarray(counts))).numpy()


def activation_ratio(counts: np.ndarray, threshold: float) -> float:
    """Share of experts whose load share is at least `threshold` ([MH1] Fig. 1a; `mmoe.moe.stats`).

    `threshold` is an absolute share of the layer's routed assignments (e.g. 0.01 = 1 %); an expert
    with no assignments is never activated, even at threshold 0.
    """
    return stats.activation_ratio(torch.as_tensor(np.asarray(counts)), threshold)


@dataclass
class LayerStats:
    """Routing of one routing key accumulated over every input seen.

    `tally` holds the totals the training logs keep (`mmoe.moe.stats.RoutingTally`); the per-modality counts
    and the mean diversity over image patches (CLS excluded) are what the pictures add.
    """

    view: LayerView  # the key's first view without its arrays: key, layer, pool, E, h, K
    counts_vision: np.ndarray
    counts_text: np.ndarray
    tally: stats.RoutingTally = field(default_factory=stats.RoutingTally)
    diversity_sum: float = 0.0
    diversity_tokens: int = 0

    @property
    def counts(self) -> np.ndarray:
        """(E,) kept assignments per expert over everything added."""
        return self.tally.counts.cpu().numpy()

    @property
    def num_experts(self) -> int:
        return self.view.num_experts

    @property
    def num_heads(self) -> int:
        return self.view.num_heads

    def to_json(self, threshold: float) -> dict[str, Any]:
        v, m = self.view, self.tally.metrics(threshold=threshold)
        return {
            "key": v.key,
            "layer": v.layer,
            "pool": v.pool,
            "num_experts": v.num_experts,
            "num_heads": v.num_heads,
            "top_k": v.top_k,
            "counts": self.counts.tolist(),
            "counts_vision": self.counts_vision.tolist(),
            "counts_text": self.counts_text.tolist(),
            "load": m["load"],
            "activation_ratio": m["activation_ratio"],
            "activated_experts": stats.activated_experts(self.tally.counts.cpu(), threshold),
            "dropped": int(self.tally.dropped),
            "dropped_share": m["dropped_share"],
            "diversity": m["diversity"],
            "mean_patch_diversity": (self.diversity_sum / self.diversity_tokens) if self.diversity_tokens else None,
        }


@dataclass
class RoutingAccumulator:
    """Sums per-expert counts per routing key over batches, keeping the order keys first appeared.

    The load heat map and activation bars ([MH1] Fig. 1a, Fig. 5) are over all inputs given, so
    counts add up across batches; per-patch maps are kept per input by the caller.
    """

    layers: dict[str, LayerStats] = field(default_factory=dict)

    def add(self, views: Iterable[LayerView], grid_size: tuple[int, int] | None = None) -> None:
        for v in views:
            st = self.layers.get(v.key)
            if st is None:
                zeros = np.zeros(v.num_experts, dtype=np.int64)
                st = LayerStats(
                    dataclasses.replace(v, counts=zeros.copy(), vision=None, text=None, record=None),
                    zeros,
                    zeros.copy(),
                )
                self.layers[v.key] = st
            elif st.num_experts != v.num_experts:
                raise ValueError(
                    f"routing key {v.key!r}: {v.num_experts} experts, earlier batches had {st.num_experts}"
                )
            st.tally.add(v.record)
            if v.vision is not None:
                st.counts_vision += v.vision.counts()
                if grid_size is not None:
                    div = diversity(patch_grid(v.vision, grid_size))
                    st.diversity_sum += float(div.sum())
                    st.diversity_tokens += int(div.size)
            if v.text is not None:
                st.counts_text += v.text.counts()

    def load(self) -> dict[str, np.ndarray]:
        """Routing key -> (E,) load share over everything added."""
        return {k: load_share(s.counts) for k, s in self.layers.items()}

    def to_json(self, threshold: float) -> dict[str, Any]:
        return {k: s.to_json(threshold) for k, s in self.layers.items()}
