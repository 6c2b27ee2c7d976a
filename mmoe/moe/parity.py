"""FLOPs/parameter parity calculator for SMoE vs MH-MoE ([MH2] arXiv 2411.16205 sec. 2).

Counts are multiply-adds (MACs) per token for one MoE layer, leading terms as in [MH2]:

- head + merge layers: ``(n_head + n_merge) * d^2`` (one Linear(d, d) each by default: ``2 d^2``);
- experts: ``m * d * F * k`` with ``m = 3`` matrices for SwiGLU, 2 for GELU. A token's h sub-tokens
  of width d/h each go to k experts: ``h * k * m * (d/h) * F = m * d * F * k``;
- router: ``d * E`` (h sub-tokens times ``(d/h) * E``), reported but not used for matching.

Parameters (leading terms): ``(n_head + n_merge) * d^2 + m * (d/h) * F * E``.

Matching a top-k0 SMoE of expert width F0 and E0 experts with an MH-MoE of h heads and top-k:
``F = (m * F0 * k0 - (n_head + n_merge) * d) / (m * k)`` equalises FLOPs, and
``E = (m * d * F0 * E0 - (n_head + n_merge) * d^2) / (m * (d/h) * F)`` equalises parameters, rounded to
a multiple of ``expert_multiple`` (8). This reproduces [MH2]'s d=768 table: h=2 -> F=768, top-2,
E=40; h=3 -> F=512, top-3, E=96 (FLOPs equal, parameters within about 3%).

CLI: ``python -m mmoe.moe.parity`` prints that table; see ``--help`` for other configurations.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass
from typing import Literal

__all__ = [
    "MoECost",
    "ParityResult",
    "MemoryEstimate",
    "moe_cost",
    "match_mhmoe",
    "mh2_table",
    "format_table",
    "training_memory",
    "format_memory_table",
    "main",
]

Activation = Literal["gelu", "swiglu"]


def _num_matrices(activation: str) -> int:
    if activation == "swiglu":
        return 3
    if activation == "gelu":
        return 2
    raise ValueError(f"parity: activation={activation!r}; expected 'gelu' or 'swiglu'")


@dataclass(frozen=True)
class MoECost:
    """Per-token MACs and parameters of one MoE layer (leading terms; ``*_exact`` adds biases and router)."""

    name: str
    dim: int
    num_heads: int
    top_k: int
    num_experts: int
    expert_hidden: int
    activation: str
    head_layers: int
    merge_layers: int
    flops_per_token: int  # multiply-adds, head/merge + experts
    params: int  # head/merge + expert matrices
    router_flops_per_token: int
    params_exact: int  # + biases, router weights

    def flops(self, num_tokens: int) -> int:
        """Multiply-adds of the layer for ``num_tokens`` tokens (leading terms)."""
        return self.flops_per_token * num_tokens


def moe_cost(
    dim: int,
    num_experts: int,
    top_k: int,
    expert_hidden: int,
    *,
    num_heads: int = 1,
    activation: Activation = "swiglu",
    head_layers: int = 0,
    merge_layers: int = 0,
    expert_bias: bool | None = None,
    name: str = "",
) -> MoECost:
    """Cost of one layer; h=1 with no head/merge layers is a plain SMoE (a dense FFN is E=1, k=1)."""
    if dim % num_heads:
        raise ValueError(f"parity: dim={dim} is not a multiple of num_heads={num_heads}")
    m = _num_matrices(activation)
    sub = dim // num_heads
    hm = head_layers + merge_layers
    flops = hm * dim * dim + m * dim * expert_hidden * top_k
    params = hm * dim * dim + m * sub * expert_hidden * num_experts
    bias = (activation == "gelu") if expert_bias is None else expert_bias
    exact = params + hm * dim + sub * num_experts
    if bias:
        exact += num_experts * ((m - 1) * expert_hidden + sub)
    return MoECost(
        name=name or f"h={num_heads} F={expert_hidden} top-{top_k} E={num_experts}",
        dim=dim,
        num_heads=num_heads,
        top_k=top_k,
        num_experts=num_experts,
        expert_hidden=expert_hidden,
        activation=activation,
        head_layers=head_layers,
        merge_layers=merge_layers,
        flops_per_token=flops,
        params=params,
        router_flops_per_token=dim * num_experts,
        params_exact=exact,
    )


@dataclass(frozen=True)
class ParityResult:
    """A baseline SMoE and the MH-MoE matched to it, with the ratios MH-MoE / baseline."""

    baseline: MoECost
    mhmoe: MoECost
    flops_ratio: float
    params_ratio: float
    expert_hidden_exact: float  # F before rounding
    num_experts_exact: float  # E before rounding


def match_mhmoe(
    dim: int,
    base_hidden: int,
    base_experts: int,
    num_heads: int,
    *,
    base_top_k: int = 1,
    top_k: int | None = None,
    activation: Activation = "swiglu",
    head_layers: int = 1,
    merge_layers: int = 1,
    expert_multiple: int = 8,
) -> ParityResult:
    """MH-MoE (h heads, top-k, default k = h as in [MH2]) matching an SMoE's FLOPs, then its parameters."""
    if num_heads < 1 or dim % num_heads:
        raise ValueError(f"parity: num_heads={num_heads} must divide dim={dim}")
    if expert_multiple < 1:
        raise ValueError(f"parity: expert_multiple={expert_multiple}; expected >= 1")
    k = num_heads if top_k is None else top_k
    if k < 1:
        raise ValueError(f"parity: top_k={k}; expected >= 1")
    m = _num_matrices(activation)
    hm = head_layers + merge_layers
    f_exact = (m * base_hidden * base_top_k - hm * dim) / (m * k)
    if f_exact < 1:
        raise ValueError(
            f"parity: head/merge layers alone cost more than the baseline SMoE (F would be {f_exact:.1f}); "
            "use fewer head/merge layers or a wider baseline"
        )
    F = max(1, round(f_exact))
    sub = dim // num_heads
    e_exact = (m * dim * base_hidden * base_experts - hm * dim * dim) / (m * sub * F)
    E = max(expert_multiple, expert_multiple * round(e_exact / expert_multiple))
    base = moe_cost(dim, base_experts, base_top_k, base_hidden, activation=activation, name="SMoE baseline")
    mh = moe_cost(
        dim,
        E,
        k,
        F,
        num_heads=num_heads,
        activation=activation,
        head_layers=head_layers,
        merge_layers=merge_layers,
        name=f"MH-MoE h={num_heads}",
    )
    return ParityResult(
        baseline=base,
        mhmoe=mh,
        flops_ratio=mh.flops_per_token / base.flops_per_token,
        params_ratio=mh.params / base.params,
        expert_hidden_exact=f_exact,
        num_experts_exact=e_exact,
    )


def mh2_table(dim: int = 768, base_hidden: int = 2048, base_experts: int = 8) -> list[ParityResult]:
    """[MH2] sec. 2 configurations: SwiGLU, top-1 SMoE baseline, MH-MoE with h = 2 and 3 (k = h)."""
    return [match_mhmoe(dim, base_hidden, base_experts, h) for h in (2, 3)]


def format_table(results: list[ParityResult]) -> str:
    """A plain-text table of the baseline and every matched MH-MoE, with FLOPs and parameters."""
    rows = [results[0].baseline] + [r.mhmoe for r in results] if results else []
    head = (
        f"{'config':<18} {'h':>2} {'F':>6} {'top-k':>5} {'E':>5} {'MACs/token':>12} {'FLOPs/token':>12} "
        f"{'params':>12} {'FLOPs x':>8} {'params x':>9}"
    )
    lines = [head, "-" * len(head)]
    base = rows[0] if rows else None
    for c in rows:
        assert base is not None
        lines.append(
            f"{c.name:<18} {c.num_heads:>2} {c.expert_hidden:>6} {c.top_k:>5} {c.num_experts:>5} "
            f"{c.flops_per_token:>12,} {2 * c.flops_per_token:>12,} {c.params:>12,} "
            f"{c.flops_per_token / base.flops_per_token:>8.3f} {c.params / base.params:>9.3f}"
        )
    return "\n".join(lines)


@dataclass(frozen=True)
class MemoryEstimate:
    """Training memory per rank of a Multiway MH-MoE backbone (estimates, docs/scaling.md)."""

    name: str
    num_experts: int
    ep_size: int
    params_dense: int  # replicated: embeddings, attention, dense FFNs, head/merge, routers
    params_experts: int  # all experts of all MoE layers
    state_gb_per_rank: float  # params + grads + AdamW moments, fp32 (16 bytes/param)
    act_gb_per_rank: float  # saved activations for backward, bf16, for ``tokens`` tokens per rank
    act_gb_ckpt: float  # the same with the experts recomputed in backward (expert_checkpoint_rows)


def training_memory(
    dim: int,
    depth: int,
    num_experts: int,
    *,
    name: str = "",
    num_heads: int = 4,
    top_k: int = 2,
    expert_hidden: int | None = None,
    moe_every: int = 2,
    vocab: int = 64010,
    ep_size: int = 1,
    tokens: int = 8192,
    bytes_per_param_state: int = 16,
    act_bytes: int = 2,
) -> MemoryEstimate:
    """Leading-term memory of training a BEiT-3-style Multiway MH-MoE on one rank (GELU experts).

    Parameters: per layer decoupled multiway attention ``2 * 4 d^2``; dense layers two FFNs
    ``2 * 2 * d * 4d``; MoE layers head + merge ``2 d^2`` and ``E * 2 * (d/h) * F`` expert weights
    (one shared pool); text embedding ``vocab * d``. State is fp32 params + grads + AdamW m, v.
    Activations saved for backward, per token and layer, in ``act_bytes``: attention block ~``12 d``
    (+ scores are recomputed by fused attention), dense FFN ``2 * 4d + d``, MoE layer
    ``2 * h * k * F + 3 d`` (the hidden activations of all h*k expert assignments, pre- and post-GELU);
    with expert checkpointing the MoE layer keeps ``h * k * d/h + 3 d``. Experts are divided by
    ``ep_size``; everything else is replicated.
    """
    F = expert_hidden if expert_hidden is not None else 4 * dim // top_k
    n_moe = depth // moe_every
    n_dense = depth - n_moe
    sub = dim // num_heads
    attn = depth * 8 * dim * dim
    dense_ffn = n_dense * 2 * 2 * dim * 4 * dim
    head_merge = n_moe * 2 * dim * dim
    router = n_moe * sub * num_experts
    experts = n_moe * num_experts * 2 * sub * F
    replicated = attn + dense_ffn + head_merge + router + vocab * dim
    if num_experts % ep_size:
        raise ValueError(f"training_memory: num_experts={num_experts} is not divisible by ep_size={ep_size}")
    per_rank = replicated + experts // ep_size
    act_attn_dense = depth * 12 * dim + n_dense * (2 * 4 * dim + dim)  # the same with or without expert ckpt
    act_tok = act_attn_dense + n_moe * (2 * num_heads * top_k * F + 3 * dim)
    act_tok_ckpt = act_attn_dense + n_moe * (top_k * dim + 3 * dim)
    gb = 1024**3
    return MemoryEstimate(
        name=name or f"d={dim} L={depth}",
        num_experts=num_experts,
        ep_size=ep_size,
        params_dense=replicated,
        params_experts=experts,
        state_gb_per_rank=per_rank * bytes_per_param_state / gb,
        act_gb_per_rank=act_tok * tokens * act_bytes / gb,
        act_gb_ckpt=act_tok_ckpt * tokens * act_bytes / gb,
    )


def format_memory_table(rows: list[MemoryEstimate], tokens: int) -> str:
    """Markdown table of :func:`training_memory` estimates."""
    lines = [
        f"| model | E | EP size | replicated params | expert params | state GB/rank | act GB/rank ({tokens} tok) "
        "| act GB/rank, expert ckpt |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.name} | {r.num_experts} | {r.ep_size} | {r.params_dense / 1e6:,.0f} M "
            f"| {r.params_experts / 1e6:,.0f} M | {r.state_gb_per_rank:.1f} | {r.act_gb_per_rank:.1f} "
            f"| {r.act_gb_ckpt:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m mmoe.moe.parity [--dim 768 --base-hidden 2048 --base-experts 8 --heads 2 3 ...]``."""
    p = argparse.ArgumentParser(prog="python -m mmoe.moe.parity", description=__doc__.split("\n\n")[0])
    p.add_argument("--dim", type=int, default=768, help="model width d")
    p.add_argument("--base-hidden", type=int, default=2048, help="baseline SMoE expert width F0")
    p.add_argument("--base-experts", type=int, default=8, help="baseline SMoE expert count E0")
    p.add_argument("--base-top-k", type=int, default=1, help="baseline top-k k0")
    p.add_argument("--heads", type=int, nargs="+", default=[2, 3], help="MH-MoE head counts h to match")
    p.add_argument("--top-k", type=int, default=None, help="MH-MoE top-k (default k = h, as in [MH2])")
    p.add_argument("--activation", choices=["swiglu", "gelu"], default="swiglu")
    p.add_argument("--head-layers", type=int, default=1)
    p.add_argument("--merge-layers", type=int, default=1)
    p.add_argument("--expert-multiple", type=int, default=8, help="round E to a multiple of this")
    p.add_argument("--tokens", type=int, default=0, help="also print total MACs for this many tokens")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument(
        "--memory", action="store_true", help="print training-memory estimates for base/large, 8/32/256 experts"
    )
    a = p.parse_args(argv)
    if a.memory:
        tokens = a.tokens or 8192
        rows = [
            training_memory(d, L, E, name=n, ep_size=ep, tokens=tokens)
            for n, d, L in (("base", 768, 12), ("large", 1024, 24))
            for E, ep in ((8, 1), (32, 1), (32, 8), (256, 8), (256, 32))
        ]
        print(format_memory_table(rows, tokens))
        return 0
    results = [
        match_mhmoe(
            a.dim,
            a.base_hidden,
            a.base_experts,
            h,
            base_top_k=a.base_top_k,
            top_k=a.top_k,
            activation=a.activation,
            head_layers=a.head_layers,
            merge_layers=a.merge_layers,
            expert_multiple=a.expert_multiple,
        )
        for h in a.heads
    ]
    if a.json:
        import json

        print(json.dumps([{**asdict(r)} for r in results], indent=2))
        return 0
    print(
        f"FLOPs/params parity ([MH2] sec. 2), d={a.dim}, {a.activation}, baseline top-{a.base_top_k} "
        f"F0={a.base_hidden} E0={a.base_experts}; MACs = multiply-adds (FLOPs = 2 x MACs), leading terms"
    )
    print(format_table(results))
    for r in results:
        print(
            f"  h={r.mhmoe.num_heads}: F exact {r.expert_hidden_exact:.2f}, E exact {r.num_experts_exact:.2f} "
            f"-> E={r.mhmoe.num_experts}; params incl. biases and router: {r.mhmoe.params_exact:,} "
            f"(baseline {r.baseline.params_exact:,})"
        )
    if a.tokens:
        for c in [results[0].baseline] + [r.mhmoe for r in results]:
            print(f"  {c.name}: {c.flops(a.tokens):,} MACs for {a.tokens} tokens")
    if any(not math.isclose(r.flops_ratio, 1.0) for r in results):
        print("  note: FLOPs differ from the baseline because F was rounded to an integer")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
