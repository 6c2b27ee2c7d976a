"""Sort-based token dispatch: dropless by default, optional capacity with drop counting.

Dimension legend: S sub-tokens, K top-k, A = K*S assignments, E experts, C sub-token width.

Assignments are flattened choice-major (``a = k*S + s``): all first choices in token order, then all
second choices. A stable sort by expert id therefore lists, inside every expert's segment, first
choices before second choices and earlier tokens before later ones, which is exactly GShard's
capacity priority (torchscale ``top2gating``: ``locations2 += sum(mask1)``). Capacity then keeps
the first ``C`` rows of every segment.

Padding and dropped assignments get the sentinel expert id E, so they sort to the tail and are not
computed. No ``.tolist()`` here (compile-friendly); the per-segment expert fallback syncs once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["DispatchPlan", "plan_dispatch", "gather_tokens", "combine"]


def _histogram(key_A: Tensor, size: int) -> Tensor:
    """Counts of each value in ``[0, size)``; unlike ``bincount`` its shape is static (torch.compile)."""
    return torch.zeros(size, dtype=torch.int64, device=key_A.device).scatter_add_(0, key_A, torch.ones_like(key_A))


@dataclass
class DispatchPlan:
    """Where every assignment goes. Sorted order = expert-major, kept rows first, sentinel tail."""

    token_index_A: Tensor  # (A,) int64: sub-token row feeding each sorted slot
    expert_index_A: Tensor  # (A,) int64: expert of each sorted slot (E for not computed)
    inverse_A: Tensor  # (A,) int64: sorted slot of each flat assignment a = k*S + s
    counts_E: Tensor  # (E,) int64: kept assignments per expert
    offsets_E: Tensor  # (E,) int32: cumulative end of each expert's segment (torch._grouped_mm ``offs``)
    kept_SK: Tensor  # (S, K) bool: computed assignments (False for padding and capacity drops)
    dropped: Tensor  # () int64: assignments of valid sub-tokens dropped by capacity
    num_experts: int
    has_tail: bool = False  # whether some assignments may be uncomputed (padding or capacity given)


def plan_dispatch(
    expert_ids_SK: Tensor,
    num_experts: int,
    *,
    valid_S: Tensor | None = None,
    capacity: Tensor | int | None = None,
) -> DispatchPlan:
    """Sort assignments by expert; with ``capacity``, keep at most that many per expert.

    Args:
        expert_ids_SK: chosen experts, column k = k-th choice.
        num_experts: E.
        valid_S: True for real sub-tokens, False for padding (padding is never routed or counted).
        capacity: per-expert buffer size (a Python int or a 0-d tensor); None = dropless.
    """
    S, K = expert_ids_SK.shape
    device = expert_ids_SK.device
    ids_A = expert_ids_SK.t().reshape(-1)
    if valid_S is not None:
        key_A = torch.where(valid_S.repeat(K), ids_A, torch.full_like(ids_A, num_experts))
    else:
        key_A = ids_A
    arange_A = torch.arange(K * S, device=device)
    order_A = torch.argsort(key_A, stable=True)
    dropped = torch.zeros((), dtype=torch.int64, device=device)
    if capacity is not None:
        counts_all = _histogram(key_A, num_experts + 1)
        starts = torch.cumsum(counts_all, 0) - counts_all
        key_sorted = key_A[order_A]
        rank_sorted = arange_A - starts[key_sorted]
        keep_sorted = (rank_sorted < capacity) & (key_sorted < num_experts)
        drop_sorted = (key_sorted < num_experts) & ~keep_sorted
        dropped = drop_sorted.sum()
        keep_A = torch.zeros_like(keep_sorted).scatter(0, order_A, keep_sorted)
        key_A = torch.where(keep_A, key_A, torch.full_like(key_A, num_experts))
        order_A = torch.argsort(key_A, stable=True)
    counts_E = _histogram(key_A, num_experts + 1)[:num_experts]
    inverse_A = torch.empty_like(order_A).scatter_(0, order_A, arange_A)
    return DispatchPlan(
        token_index_A=order_A % S,
        expert_index_A=key_A[order_A],
        inverse_A=inverse_A,
        counts_E=counts_E,
        offsets_E=torch.cumsum(counts_E, 0).to(torch.int32),
        kept_SK=(key_A < num_experts).view(K, S).t(),
        dropped=dropped,
        num_experts=num_experts,
        has_tail=valid_S is not None or capacity is not None,
    )


class _Gather(torch.autograd.Function):
    """``x[token_index]`` whose backward is a gather too: the sorted order is a permutation of the K*S
    assignments, so the gradient of sub-token s is the sum of its K rows, found through ``inverse_A``.
    (Autograd's ``index_select`` backward is a scatter-add with an index expanded to (A, C).)"""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, x_SC: Tensor, token_index_A: Tensor, inverse_A: Tensor
    ) -> Tensor:
        ctx.save_for_backward(inverse_A)
        ctx.S = x_SC.shape[0]
        return x_SC.index_select(0, token_index_A)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, g_AC: Tensor) -> tuple[Tensor, None, None]:
        (inverse_A,) = ctx.saved_tensors
        S = ctx.S
        g_KSC = g_AC.index_select(0, inverse_A).view(-1, S, g_AC.shape[1])
        return g_KSC.sum(0) if g_KSC.shape[0] > 1 else g_KSC[0], None, None


class _Combine(torch.autograd.Function):
    """``out[s] = sum_k g[s, k] * y[inverse[k*S + s]]``; every direction of it is a gather.

    Backward gathers the output gradient once into sorted order, ``G = gout[token_index]`` (A, C), and
    derives both gradients from it: ``dy = G * g_sorted`` and ``dg_sorted = rowsum(G * y)``. Nothing
    of size (K, S, C) is saved; ``y`` is kept, which the expert function does not keep itself.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        y_AC: Tensor,
        g_SK: Tensor,
        token_index_A: Tensor,
        inverse_A: Tensor,
    ) -> Tensor:
        S, K = g_SK.shape
        y_KSC = y_AC.index_select(0, inverse_A).view(K, S, -1)
        g_KS1 = g_SK.t().unsqueeze(-1)
        out = y_KSC[0] * g_KS1[0]
        for k in range(1, K):
            out.addcmul_(y_KSC[k], g_KS1[k])
        ctx.save_for_backward(y_AC, g_SK, token_index_A, inverse_A)
        return out

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, gout_SC: Tensor
    ) -> tuple[Tensor | None, Tensor | None, None, None]:
        y_AC, g_SK, token_index_A, inverse_A = ctx.saved_tensors
        S, K = g_SK.shape
        G_AC = gout_SC.index_select(0, token_index_A)
        # sorted gates: g_sorted[inverse[a]] = g_flat[a] (a permutation, so a scatter without collisions)
        g_A = torch.empty_like(g_SK.t().reshape(-1)).scatter_(0, inverse_A, g_SK.t().reshape(-1))
        gy = G_AC * g_A[:, None] if ctx.needs_input_grad[0] else None
        gg = None
        if ctx.needs_input_grad[1]:
            dg_A = (G_AC * y_AC).sum(-1)
            gg = dg_A.index_select(0, inverse_A).view(K, S).t()
        return gy, gg, None, None


def gather_tokens(x_SC: Tensor, plan: DispatchPlan) -> Tensor:
    """Rows of ``x`` in sorted (expert-major) order, (A, C). A gather, and its backward is one as well."""
    return _Gather.apply(x_SC, plan.token_index_A, plan.inverse_A)


def combine(y_AC: Tensor, gates_SK: Tensor, plan: DispatchPlan) -> Tensor:
    """Weighted sum over the K choices, by gathering each assignment's output back (no scatter).

    ``y_AC`` is in sorted order with zero rows for the non-computed tail; gates of non-kept
    assignments are zeroed too, so dropped choices contribute nothing (and get no gate gradient).
    """
    g_SK = torch.where(plan.kept_SK, gates_SK, torch.zeros_like(gates_SK)).to(y_AC.dtype)
    return _Combine.apply(y_AC, g_SK, plan.token_index_A, plan.inverse_A)
