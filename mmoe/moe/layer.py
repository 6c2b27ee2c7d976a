"""The Multi-Head Mixture-of-Experts layer ([MH1] sec. 3, [MH2] sec. 2; docs/references.md).

Dimension legend: B batch, L sequence length, D model width, N tokens (= B*L), h MoE heads,
C sub-token width (= D/h), S sub-tokens (= N*h), E experts, K top-k, F expert width,
A assignments (= K*S).

    x_BLD -> head layer(s) -> split (N, D) -> (S, C) -> route top-K of E -> sorted dispatch
          -> grouped experts -> gated combine -> merge (S, C) -> (N, D) -> merge layer(s) -> y_BLD

Sub-token j of token i is row ``i*h + j`` (contiguous split). There is no residual inside the
layer (the official code and [MH2]; [MH1] Eq. 6 shows one): the block adds it. ``num_heads=1``
with ``head_layers=merge_layers=0`` is a plain sparse MoE, ``router="xmoe"`` makes it X-MoE, so
Dense/SMoE/X-MoE/MH-MoE comparisons run through this one code path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from mmoe.moe.dispatch import DispatchPlan, combine, gather_tokens, plan_dispatch
from mmoe.moe.experts import GroupedExperts
from mmoe.moe.router import build_router, losses_from_statistics, route_top_k, routing_statistics

__all__ = ["MHMoE", "MoEOutput", "RoutingRecord"]

ExpertImplName = Literal["auto", "fused", "grouped_mm", "segments", "per_expert"]


@dataclass
class RoutingRecord:
    """Routing of one MoE layer call (all tensors detached; docs/interfaces.md section 1).

    ``expert_ids``/``gates``/``kept`` are (S, K) with row ``i*h + j`` = sub-token j of token i
    (tokens flattened as ``b*L + l``). Padding rows have id -1, gate 0, kept False. ``gates`` holds
    the weight each assignment received in the combine (0 where not kept).
    """

    expert_ids: Tensor
    gates: Tensor
    kept: Tensor
    counts: Tensor
    dropped: Tensor
    num_tokens: int
    num_heads: int
    num_experts: int
    top_k: int
    token_shape: tuple[int, int]

    @property
    def valid(self) -> Tensor:
        """(S,) bool: True for sub-tokens of real (non-padding) tokens."""
        return self.expert_ids[:, 0] >= 0


@dataclass
class MoEOutput:
    """Output of :class:`MHMoE`: the tensor, the weighted aux loss, unweighted terms, the routing."""

    output: Tensor
    aux_loss: Tensor
    losses: dict[str, Tensor] = field(default_factory=dict)
    routing: RoutingRecord | None = None


def _linear_stack(dim: int, n: int) -> nn.Module:
    """``n`` Linear(D, D) layers with ReLU between them ([MH1] Table 7 ablation); n = 0 is identity."""
    if n == 0:
        return nn.Identity()
    mods: list[nn.Module] = []
    for i in range(n):
        if i:
            mods.append(nn.ReLU())
        mods.append(nn.Linear(dim, dim))
    return nn.Sequential(*mods)


class MHMoE(nn.Module):
    """Multi-Head MoE layer mapping (B, L, D) to (B, L, D) plus a routing record and aux losses.

    Args:
        dim: model width D.
        num_experts: E.
        top_k: K experts per sub-token.
        num_heads: h sub-tokens per token (``dim % num_heads == 0``).
        expert_hidden: F; default ``4 * dim // top_k`` so that K experts of width F cost one dense
            4D FFN per token (each token's h sub-tokens together cost one full-width token).
        router: ``"linear"`` or ``"xmoe"`` ([XM]; low-dim cosine, learnable temperature).
        activation: ``"gelu"`` (two matrices) or ``"swiglu"`` (three, [MH2]).
        capacity_factor: None = dropless (default). Else per-expert capacity
            ``C = ceil(K * S_valid / E * capacity_factor)``; first choices before second choices,
            overflow dropped and counted (paper reproduction, [GShard]).
        eval_capacity_fraction: in capacity mode and eval, use ``ceil(frac * S_valid)`` instead
            (torchscale's evaluation capacity is 0.25). None = same capacity as in training.
        head_layers / merge_layers: depth 0..3 of the head and merge MLPs (ReLU between;
            ``head_layers=1, merge_layers=0`` is [MH2]'s head-only ablation).
        renormalize_gates: divide the kept gates by their sum (torchscale top-2); default raw
            softmax probabilities as in the official MH-MoE code.
        aux_loss_weight: weight of the load-balance loss in ``aux_loss`` (0.01, [MH1] sec. 3.3).
        z_loss_weight: weight of the router z-loss (ST-MoE; ~1e-3 when used).
        xmoe_dim / xmoe_form / xmoe_temperature: X-MoE router projection width (16 as torchscale;
            [MH1] uses 16/h), ``"paper"`` (cosine / learnable tau) or ``"torchscale"`` form, initial tau.
        expert_bias: biases in the experts (default: GELU yes, SwiGLU no).
        expert_inner_norm: Sub-LN inside each expert (BEiT-3 FFN layout; for upcycling).
        split: ``"reshape"`` (contiguous, [MH1] sec. 3) or ``"conv1d"`` ([MH1] appendix variant: a
            Conv1d over the feature axis, kernel ``conv_kernel``, stride ``conv_stride``, output
            channels C, producing exactly h sub-tokens per token; defaults kernel = stride = C).
        balance_bias_rate: > 0 enables aux-loss-free balancing (DeepSeek-V3): a per-expert bias
            added to the scores only for the top-k choice, updated by :meth:`update_routing_bias`.
        expert_impl: ``"auto"``, ``"fused"``, ``"grouped_mm"``, ``"segments"`` (sorted dispatch; see
            :class:`GroupedExperts`) or ``"per_expert"`` (the slow masked loop; reference and baseline).
        expert_checkpoint_rows: > 0 recomputes in backward what the experts' forward would keep (the fused
            path: the pre-activation, block by block; the others: activation checkpointing in chunks of
            this many assignments). At equal FLOPs the expert hidden activations are h times a dense
            FFN's, so this is what brings peak memory near a dense block's.
        expert_gelu_approximate: ``"none"`` (erf GELU, default) or ``"tanh"`` for GELU experts.
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        *,
        top_k: int = 2,
        num_heads: int = 4,
        expert_hidden: int | None = None,
        router: Literal["linear", "xmoe"] = "linear",
        activation: Literal["gelu", "swiglu"] = "gelu",
        capacity_factor: float | None = None,
        eval_capacity_fraction: float | None = None,
        head_layers: int = 1,
        merge_layers: int = 1,
        renormalize_gates: bool = False,
        aux_loss_weight: float = 0.01,
        z_loss_weight: float = 0.0,
        xmoe_dim: int = 16,
        xmoe_form: Literal["paper", "torchscale"] = "paper",
        xmoe_temperature: float = 0.07,
        expert_bias: bool | None = None,
        expert_inner_norm: bool = False,
        split: Literal["reshape", "conv1d"] = "reshape",
        conv_kernel: int | None = None,
        conv_stride: int | None = None,
        balance_bias_rate: float = 0.0,
        expert_impl: ExpertImplName = "auto",
        expert_checkpoint_rows: int = 0,
        expert_gelu_approximate: Literal["none", "tanh"] = "none",
    ) -> None:
        # The constructor arguments, so a layer can be rebuilt in another form (mmoe.moe.parallel).
        init_kwargs = {k: v for k, v in locals().items() if k not in ("self", "__class__", "dim", "num_experts")}
        super().__init__()
        self.init_kwargs: dict[str, Any] = init_kwargs
        if dim < 1 or num_heads < 1 or dim % num_heads:
            raise ValueError(f"MHMoE: dim={dim} must be a positive multiple of num_heads={num_heads}")
        if num_experts < 1:
            raise ValueError(f"MHMoE: num_experts={num_experts}; expected >= 1")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"MHMoE: top_k={top_k}; expected 1 <= top_k <= num_experts={num_experts}")
        for name, n in (("head_layers", head_layers), ("merge_layers", merge_layers)):
            if not 0 <= n <= 3:
                raise ValueError(f"MHMoE: {name}={n}; expected 0..3")
        if capacity_factor is not None and capacity_factor <= 0:
            raise ValueError(f"MHMoE: capacity_factor={capacity_factor}; expected > 0 or None (dropless)")
        if eval_capacity_fraction is not None and not 0 < eval_capacity_fraction <= 1:
            raise ValueError(f"MHMoE: eval_capacity_fraction={eval_capacity_fraction}; expected in (0, 1] or None")
        if split not in ("reshape", "conv1d"):
            raise ValueError(f"MHMoE: split={split!r}; expected 'reshape' or 'conv1d'")
        if expert_impl not in ("auto", "fused", "grouped_mm", "segments", "per_expert"):
            raise ValueError(
                f"MHMoE: expert_impl={expert_impl!r}; expected 'auto', 'fused', 'grouped_mm', 'segments' or "
                "'per_expert'"
            )
        if balance_bias_rate < 0:
            raise ValueError(f"MHMoE: balance_bias_rate={balance_bias_rate}; expected >= 0")
        self.dim = dim
        self.num_experts = num_experts
        self.top_k = top_k
        self.num_heads = num_heads
        self.sub_dim = dim // num_heads
        self.expert_hidden = expert_hidden if expert_hidden is not None else max(1, 4 * dim // top_k)
        self.router_kind = router
        self.capacity_factor = capacity_factor
        self.eval_capacity_fraction = eval_capacity_fraction
        self.renormalize_gates = renormalize_gates
        self.aux_loss_weight = aux_loss_weight
        self.z_loss_weight = z_loss_weight
        self.split_mode = split
        self.balance_bias_rate = balance_bias_rate
        self.expert_impl = expert_impl

        self.head = _linear_stack(dim, head_layers)
        self.conv: nn.Conv1d | None = None
        if split == "conv1d":
            k = conv_kernel if conv_kernel is not None else self.sub_dim
            s = conv_stride if conv_stride is not None else self.sub_dim
            if k < 1 or s < 1:
                raise ValueError(f"MHMoE: conv_kernel={k}, conv_stride={s}; expected >= 1")
            # Padding P such that floor((D + 2P - k) / s) + 1 == h.
            need = (num_heads - 1) * s + k - dim
            pad = max(0, math.ceil(need / 2))
            if (dim + 2 * pad - k) // s + 1 != num_heads:
                raise ValueError(
                    f"MHMoE: conv1d split with kernel={k}, stride={s} over dim={dim} cannot give exactly "
                    f"num_heads={num_heads} sub-tokens; choose kernel/stride with (h-1)*stride + kernel ~ dim"
                )
            self.conv = nn.Conv1d(1, self.sub_dim, kernel_size=k, stride=s, padding=pad)
        self.router = build_router(
            router, self.sub_dim, num_experts, proj_dim=xmoe_dim, xmoe_form=xmoe_form, init_temperature=xmoe_temperature
        )
        if expert_checkpoint_rows < 0:
            raise ValueError(f"MHMoE: expert_checkpoint_rows={expert_checkpoint_rows}; expected >= 0 (0 = off)")
        self.experts = self._build_experts(
            num_experts,
            self.sub_dim,
            self.expert_hidden,
            activation=activation,
            bias=expert_bias,
            inner_norm=expert_inner_norm,
            impl="auto" if expert_impl == "per_expert" else expert_impl,
            checkpoint_rows=expert_checkpoint_rows,
            gelu_approximate=expert_gelu_approximate,
        )
        self.merge = _linear_stack(dim, merge_layers)
        if balance_bias_rate > 0:
            self.register_buffer("routing_bias", torch.zeros(num_experts))
        else:
            self.routing_bias = None
        self.reset_parameters()

    def _build_experts(self, num_experts: int, dim: int, hidden: int, **kwargs: Any) -> GroupedExperts:
        """The expert pool (all E experts here; one shard of them under expert parallelism)."""
        return GroupedExperts(num_experts, dim, hidden, **kwargs)

    # ------------------------------------------------------------------ init
    def reset_parameters(self) -> None:
        """Official MH-MoE init: head Xavier-uniform gain 1/sqrt(2), merge gain 1, biases 0; experts/router own init.

        A backbone that re-initialises every ``nn.Linear`` (BEiT-3's trunc-normal pass) should call
        this afterwards to restore the MH-MoE initialisation.
        """
        for mod, gain in ((self.head, 1.0 / math.sqrt(2.0)), (self.merge, 1.0)):
            for m in mod.modules():
                if isinstance(m, nn.Linear):
                    nn.init.xavier_uniform_(m.weight, gain=gain)
                    nn.init.zeros_(m.bias)
        if self.conv is not None:
            self.conv.reset_parameters()
        self.router.reset_parameters()
        self.experts.reset_parameters()
        if self.routing_bias is not None:
            self.routing_bias.zero_()

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_experts={self.num_experts}, top_k={self.top_k}, num_heads={self.num_heads}, "
            f"expert_hidden={self.expert_hidden}, router={self.router_kind}, capacity_factor={self.capacity_factor}"
        )

    # ------------------------------------------------------------------ pieces
    def split_tokens(self, x_ND: Tensor) -> Tensor:
        """(N, D) -> (S, C) with sub-token j of token i at row i*h + j."""
        N = x_ND.shape[0]
        if self.conv is None:
            return x_ND.reshape(N * self.num_heads, self.sub_dim)
        y_NCh = self.conv(x_ND.unsqueeze(1))  # (N, C, h): channels are the sub-token features
        return y_NCh.transpose(1, 2).reshape(N * self.num_heads, self.sub_dim)

    def capacity(self, num_valid: Tensor) -> Tensor | None:
        """Per-expert capacity for ``num_valid`` routed sub-tokens, or None when dropless."""
        if self.capacity_factor is None:
            return None
        n = num_valid.to(torch.float64)
        if not self.training and self.eval_capacity_fraction is not None:
            return torch.ceil(n * self.eval_capacity_fraction).to(torch.int64)
        return torch.ceil(n * self.top_k / self.num_experts * self.capacity_factor).to(torch.int64)

    @torch.no_grad()
    def update_routing_bias(self, counts_E: Tensor) -> None:
        """Aux-loss-free balancing step: raise the bias of under-loaded experts, lower over-loaded ones.

        Call once per optimizer step with the counts of that step (sum the records' ``counts``, and
        all-reduce them first under data parallelism so every rank applies the same update).
        """
        if self.routing_bias is None:
            raise RuntimeError("MHMoE.update_routing_bias: balance_bias_rate is 0; enable it in the constructor")
        c = counts_E.to(self.routing_bias.device, torch.float32)
        self.routing_bias.add_(self.balance_bias_rate * torch.sign(c.mean() - c))

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> MoEOutput:
        """Route (B, L, D) tokens through the experts; ``padding_mask`` (B, L) bool, True = pad."""
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"MHMoE.forward: x has shape {tuple(x.shape)}; expected (B, L, {self.dim})")
        B, L, D = x.shape
        N, h, K, E = B * L, self.num_heads, self.top_k, self.num_experts
        valid_N: Tensor | None = None
        if padding_mask is not None:
            if padding_mask.shape != (B, L) or padding_mask.dtype != torch.bool:
                raise ValueError(
                    f"MHMoE.forward: padding_mask has shape {tuple(padding_mask.shape)} dtype {padding_mask.dtype}; "
                    f"expected ({B}, {L}) torch.bool (True = pad)"
                )
            valid_N = ~padding_mask.reshape(N)

        x_SC = self.split_tokens(self.head(x.reshape(N, D)))
        valid_S = valid_N.repeat_interleave(h) if valid_N is not None else None

        logits_SE = self.router(x_SC)
        routed = route_top_k(logits_SE, K, selection_bias_E=self.routing_bias)
        stats = routing_statistics(routed.probs_SE, routed.expert_ids_SK[:, 0], logits_SE, valid_S)
        balance, z = losses_from_statistics(self._reduce_statistics(stats), E)

        S = x_SC.shape[0]
        num_valid = valid_S.sum() if valid_S is not None else torch.tensor(S, device=x.device)
        plan = plan_dispatch(routed.expert_ids_SK, E, valid_S=valid_S, capacity=self.capacity(num_valid))
        gates_SK = torch.where(plan.kept_SK, routed.gates_SK, torch.zeros_like(routed.gates_SK))
        if self.renormalize_gates:
            # Over the kept choices: torchscale top2gating renormalizes after capacity dropping.
            gates_SK = gates_SK / gates_SK.sum(-1, keepdim=True).clamp(min=torch.finfo(gates_SK.dtype).eps)

        y_SC = self._expert_forward(x_SC, routed.expert_ids_SK, gates_SK, plan)

        out_ND = self.merge(y_SC.reshape(N, D))
        if valid_N is not None:
            out_ND = torch.where(valid_N[:, None], out_ND, torch.zeros_like(out_ND))

        aux = self.aux_loss_weight * balance
        if self.z_loss_weight:
            aux = aux + self.z_loss_weight * z
        record = self._record(routed.expert_ids_SK, gates_SK, plan, valid_S, (B, L))
        return MoEOutput(
            output=out_ND.reshape(B, L, D), aux_loss=aux, losses={"balance": balance, "z": z}, routing=record
        )

    def _reduce_statistics(self, stats: Tensor) -> Tensor:
        """Hook for the routing-loss sums: identity here, an all-reduce under expert parallelism."""
        return stats

    def _expert_forward(self, x_SC: Tensor, ids_SK: Tensor, gates_SK: Tensor, plan: DispatchPlan) -> Tensor:
        """Gated sum of the chosen experts' outputs per sub-token, (S, C)."""
        if self.expert_impl == "per_expert":
            return self.experts.forward_per_expert(x_SC, ids_SK, gates_SK, plan.kept_SK)
        y_AC = self.experts(gather_tokens(x_SC, plan), plan)
        return combine(y_AC, gates_SK, plan)

    def _record(
        self, ids_SK: Tensor, gates_SK: Tensor, plan: DispatchPlan, valid_S: Tensor | None, shape: tuple[int, int]
    ) -> RoutingRecord:
        ids = ids_SK.detach()
        gates = gates_SK.detach().float()
        if valid_S is not None:
            ids = torch.where(valid_S[:, None], ids, torch.full_like(ids, -1))
            gates = torch.where(valid_S[:, None], gates, torch.zeros_like(gates))
        return RoutingRecord(
            expert_ids=ids,
            gates=gates,
            kept=plan.kept_SK.detach(),
            counts=plan.counts_E.detach(),
            dropped=plan.dropped.detach(),
            num_tokens=shape[0] * shape[1],
            num_heads=self.num_heads,
            num_experts=self.num_experts,
            top_k=self.top_k,
            token_shape=shape,
        )
