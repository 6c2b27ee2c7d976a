"""Expert parallelism for the MH-MoE layer over a torch.distributed process group (docs/scaling.md).

Dimension legend: S sub-tokens, K top-k, A = K*S assignments, C sub-token width, E experts,
P expert-parallel (EP) group size, El = E/P experts per rank, R rows received by a rank.

Each rank of the EP group holds El consecutive experts (rank r: experts ``r*El .. (r+1)*El - 1``);
the head/merge layers and the router are replicated and stay data parallel. One forward:

1. head, split and routing on the rank's own tokens, exactly as :class:`~mmoe.moe.layer.MHMoE`;
2. the expert-sorted buffer is exchanged with ``all_to_all_single``: the per-expert counts first
   (a fixed-size exchange), then the rows with those split sizes (the only host sync: split sizes
   must be Python ints);
3. the received rows are regrouped by local expert, run through the local grouped experts, and
   sent back by the reverse all-to-all; the gated combine and merge are local again.

Both exchanges are differentiable (``torch.distributed.nn.functional``), so backward sends the
gradients the opposite way. The aux-loss sums are all-reduced over the EP group, so loss values
equal the single-process layer's over all ranks' tokens.

**Gradients.** DDP averages the gradients of replicated parameters over its ranks. The expert
weights must not be averaged (each rank has different experts): :func:`ignore_expert_params_in_ddp`
lists them in ``module._ddp_params_and_buffers_to_ignore`` (read by torch DDP and by Lightning's
``DDPStrategy``, which wraps the LightningModule itself, so names are relative to it). Each expert
gradient already sums the contributions of every rank's tokens; it is multiplied by
``grad_scale = 1/world_size`` in backward so it matches DDP's mean of per-rank losses. When the
world is larger than the EP group (several EP groups, each holding a replica of every shard), call
:func:`allreduce_expert_grads` over the expert-data-parallel group after backward.

**Checkpoints.** ``state_dict()`` of an EP layer holds the FULL expert tensors (all-gathered; so it
is a collective: call it on every rank of the group, as Lightning's checkpointing does), with the
same keys and shapes as a single-process :class:`MHMoE`. ``load_state_dict`` accepts full tensors
(and slices out this rank's experts) or this rank's shard, so checkpoints move between world sizes.

Capacity mode, if enabled, is applied per rank over its local sub-tokens (GShard's groups = ranks).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from torch import Tensor, nn

from mmoe.moe.dispatch import DispatchPlan, combine, gather_tokens
from mmoe.moe.experts import GroupedExperts
from mmoe.moe.layer import MHMoE

__all__ = [
    "ExpertParallelMHMoE",
    "to_expert_parallel",
    "expert_parallel_param_names",
    "ignore_expert_params_in_ddp",
    "allreduce_expert_grads",
    "new_expert_parallel_groups",
]

_EP_ATTR = "_mmoe_expert_parallel"


def _differentiable(fn: Callable[..., Tensor], *args: Any, **kwargs: Any) -> Tensor:
    """Call a ``torch.distributed.nn.functional`` collective (autograd-aware) without its FutureWarning.

    torch suggests ``_functional_collectives`` instead, a private module whose autograd variants do not
    cover all_reduce; the public autograd collectives are still the supported way on gloo and nccl.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.distributed\.nn\.functional")
        return fn(*args, **kwargs)


class ExpertParallelMHMoE(MHMoE):
    """:class:`MHMoE` whose E experts are sharded over the ranks of ``group`` (E/P per rank).

    Args:
        dim, num_experts, **kwargs: as :class:`MHMoE` (``expert_impl="per_expert"`` is not supported).
        group: the expert-parallel process group (default: the whole world). Needs an initialised
            default process group; every rank of ``group`` must call forward together.
        grad_scale: multiplier of the expert gradients (default ``1 / world_size``, matching DDP's
            gradient mean over the whole world).
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        *,
        group: dist.ProcessGroup | None = None,
        grad_scale: float | None = None,
        **kwargs: Any,
    ) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("ExpertParallelMHMoE: torch.distributed is not initialised; call init_process_group")
        ep_size = dist.get_world_size(group)
        if num_experts % ep_size:
            raise ValueError(
                f"ExpertParallelMHMoE: num_experts={num_experts} is not divisible by the expert-parallel size "
                f"{ep_size}; expected a multiple"
            )
        if kwargs.get("expert_impl") == "per_expert":
            raise ValueError("ExpertParallelMHMoE: expert_impl='per_expert' is a single-process reference only")
        self.ep_group = group
        self.ep_size = ep_size
        self.ep_rank = dist.get_rank(group)
        self.num_local_experts = num_experts // ep_size
        super().__init__(dim, num_experts, **kwargs)
        self.experts.grad_scale = (1.0 / dist.get_world_size()) if grad_scale is None else grad_scale
        for p in self.experts.parameters():
            setattr(p, _EP_ATTR, True)
        # Runs after the children wrote their (local) entries: swap in the full expert tensors.
        self.register_state_dict_post_hook(_gather_expert_state)

    def _build_experts(self, num_experts: int, dim: int, hidden: int, **kwargs: Any) -> GroupedExperts:
        return GroupedExperts(num_experts // self.ep_size, dim, hidden, **kwargs)

    @property
    def local_expert_range(self) -> tuple[int, int]:
        """Global ids ``[start, stop)`` of the experts held by this rank."""
        start = self.ep_rank * self.num_local_experts
        return start, start + self.num_local_experts

    def extra_repr(self) -> str:
        return super().extra_repr() + f", ep_size={self.ep_size}, local_experts={self.local_expert_range}"

    # ------------------------------------------------------------------ forward pieces
    def _reduce_statistics(self, stats: Tensor) -> Tensor:
        if self.ep_size == 1:
            return stats
        return _differentiable(dist_nn.all_reduce, stats, op=dist.ReduceOp.SUM, group=self.ep_group)

    def _expert_forward(self, x_SC: Tensor, ids_SK: Tensor, gates_SK: Tensor, plan: DispatchPlan) -> Tensor:
        P, El = self.ep_size, self.num_local_experts
        x_AC = gather_tokens(x_SC, plan)
        A, C = x_AC.shape
        # 1) counts: send_EE[p*El + j] rows go to rank p's local expert j; receive the mirror image.
        send_counts = plan.counts_E.contiguous()
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.ep_group)
        send_PEl, recv_PEl = send_counts.view(P, El), recv_counts.view(P, El)
        # The only host syncs: all-to-all split sizes must be Python ints.
        in_sizes = send_PEl.sum(1).tolist()
        out_sizes = recv_PEl.sum(1).tolist()
        n_send, n_recv = sum(in_sizes), sum(out_sizes)
        # 2) rows out (kept rows come first in the plan's order, the sentinel tail is not sent).
        x_recv = _differentiable(
            dist_nn.all_to_all_single,
            x_AC.new_empty(n_recv, C),
            x_AC[:n_send].contiguous(),
            out_sizes,
            in_sizes,
            group=self.ep_group,
        )
        # 3) regroup by local expert: received rows are source-rank-major, then expert within a source.
        local_R = torch.repeat_interleave(torch.arange(El, device=x_AC.device).repeat(P), recv_PEl.reshape(-1))
        order_R = torch.argsort(local_R, stable=True)
        inverse_R = torch.empty_like(order_R).scatter_(0, order_R, torch.arange(n_recv, device=x_AC.device))
        counts_El = recv_PEl.sum(0)
        local_plan = DispatchPlan(
            token_index_A=order_R,
            expert_index_A=local_R.index_select(0, order_R),
            inverse_A=inverse_R,
            counts_E=counts_El,
            offsets_E=torch.cumsum(counts_El, 0).to(torch.int32),
            kept_SK=torch.ones(n_recv, 1, dtype=torch.bool, device=x_AC.device),
            dropped=torch.zeros((), dtype=torch.int64, device=x_AC.device),
            num_experts=El,
            has_tail=False,
        )
        y_local = self.experts(x_recv.index_select(0, order_R), local_plan)
        y_recv = y_local.index_select(0, inverse_R)
        # 4) rows back to their source ranks, in the order they were sent.
        y_back = _differentiable(
            dist_nn.all_to_all_single,
            y_recv.new_empty(n_send, C),
            y_recv.contiguous(),
            in_sizes,
            out_sizes,
            group=self.ep_group,
        )
        y_AC = torch.cat([y_back, y_back.new_zeros(A - n_send, C)], 0) if A > n_send else y_back
        return combine(y_AC, gates_SK, plan)

    # ------------------------------------------------------------------ checkpoints
    def _expert_keys(self, prefix: str) -> dict[str, nn.Parameter]:
        return {f"{prefix}experts.{n}": p for n, p in self.experts.named_parameters()}

    def _gather(self, shard: Tensor) -> Tensor:
        if self.ep_size == 1:
            return shard.clone()
        parts = [torch.empty_like(shard) for _ in range(self.ep_size)]
        dist.all_gather(parts, shard.contiguous(), group=self.ep_group)
        return torch.cat(parts, 0)

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # Full tensors (E, ...) are sliced to this rank's experts; shards (El, ...) load as they are.
        start, stop = self.local_expert_range
        for key, p in self._expert_keys(prefix).items():
            t = state_dict.get(key)
            if t is None or t.shape == p.shape:
                continue
            if t.shape[0] == self.num_experts and t.shape[1:] == p.shape[1:]:
                state_dict[key] = t[start:stop]
            else:
                error_msgs.append(
                    f"{key}: shape {tuple(t.shape)} is neither the full ({self.num_experts}, ...) nor this rank's "
                    f"shard {tuple(p.shape)}"
                )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


def _gather_expert_state(module: ExpertParallelMHMoE, state_dict: dict[str, Any], prefix: str, _meta: Any) -> None:
    """state_dict post-hook: full (all-gathered) expert tensors under the single-process keys (collective)."""
    for key, p in module._expert_keys(prefix).items():
        if key in state_dict:
            state_dict[key] = module._gather(p.detach())


def to_expert_parallel(module: nn.Module, group: dist.ProcessGroup | None = None) -> list[str]:
    """Swap every :class:`MHMoE` inside ``module`` for an :class:`ExpertParallelMHMoE` holding its shard.

    Build the model as usual (every rank the same full weights, e.g. same seed or a loaded
    checkpoint), then convert once the process group exists (Lightning: in ``setup``/``configure_model``,
    before DDP wraps the module). Device and dtype are kept; the experts' DDP-ignore list is set on
    ``module``. Returns the names of the converted layers.
    """
    if isinstance(module, MHMoE) and not isinstance(module, ExpertParallelMHMoE):
        raise ValueError("to_expert_parallel: pass a module that contains the MHMoE layer, not the layer itself")
    converted = []
    for name, child in list(module.named_modules()):
        if not isinstance(child, MHMoE) or isinstance(child, ExpertParallelMHMoE):
            continue
        ref = next(child.parameters())
        kwargs = {k: v for k, v in child.init_kwargs.items() if k != "expert_impl" or v != "per_expert"}
        ep = ExpertParallelMHMoE(child.dim, child.num_experts, group=group, **kwargs).to(ref.device, ref.dtype)
        ep.load_state_dict(child.state_dict())
        ep.train(child.training)
        parent_name, _, attr = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, attr, ep)
        converted.append(name)
    ignore_expert_params_in_ddp(module)
    return converted


def expert_parallel_param_names(module: nn.Module) -> list[str]:
    """Fully qualified names (relative to ``module``) of all expert-parallel parameters inside it."""
    return [n for n, p in module.named_parameters() if getattr(p, _EP_ATTR, False)]


def ignore_expert_params_in_ddp(module: nn.Module) -> list[str]:
    """Tell DDP (torch or Lightning's ``DDPStrategy``) not to all-reduce or broadcast expert shards.

    Call on the module that DDP will wrap (for Lightning: the LightningModule, e.g. in ``__init__``
    or ``setup``) after the EP layers are built. Returns the names it added.
    """
    names = expert_parallel_param_names(module)
    existing = list(getattr(module, "_ddp_params_and_buffers_to_ignore", []))
    merged = existing + [n for n in names if n not in existing]
    torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, merged)
    return names


def allreduce_expert_grads(module: nn.Module, group: dist.ProcessGroup | None) -> None:
    """Sum expert gradients over an expert-data-parallel group (ranks holding the same shard).

    Only needed when the world holds several EP groups; with the default ``grad_scale = 1/world``
    the sum equals DDP's mean semantics for the replicated parameters.
    """
    if group is None or dist.get_world_size(group) == 1:
        return
    for p in module.parameters():
        if getattr(p, _EP_ATTR, False) and p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM, group=group)


def new_expert_parallel_groups(ep_size: int) -> tuple[dist.ProcessGroup, dist.ProcessGroup | None]:
    """Split the world into EP groups of ``ep_size`` consecutive ranks, and the matching expert-DP groups.

    Returns this rank's (EP group, expert-data-parallel group or None when ``ep_size == world``).
    Every rank must call it (``new_group`` is collective). Consecutive ranks share a node, so the
    all-to-all stays on the fast intra-node links when ``ep_size`` <= GPUs per node.
    """
    world, rank = dist.get_world_size(), dist.get_rank()
    if ep_size < 1 or world % ep_size:
        raise ValueError(f"new_expert_parallel_groups: ep_size={ep_size} must divide the world size {world}")
    ep_group = dp_group = None
    for start in range(0, world, ep_size):
        g = dist.new_group(list(range(start, start + ep_size)))
        if start <= rank < start + ep_size:
            ep_group = g
    if ep_size < world:
        for offset in range(ep_size):
            g = dist.new_group(list(range(offset, world, ep_size)))
            if rank % ep_size == offset:
                dp_group = g
    assert ep_group is not None
    return ep_group, dp_group
