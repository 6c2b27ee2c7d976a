"""Routers and losses, including agreement with torchscale's X-MoE gating on the same logits."""

from __future__ import annotations

import math

import pytest
import torch

from mmoe.moe.dispatch import plan_dispatch
from mmoe.moe.router import (
    LinearRouter,
    XMoERouter,
    losses_from_statistics,
    route_top_k,
    router_z_loss,
    routing_statistics,
)

routing_ref = pytest.importorskip("torchscale.component.xmoe.routing", reason="torchscale is a test-only reference")


def load_balance_loss(probs_SE: torch.Tensor, first_ids_S: torch.Tensor, valid_S: torch.Tensor | None = None):
    """The balance term as the layer computes it (its sums, then the loss), from the probabilities alone."""
    stats = routing_statistics(probs_SE, first_ids_S, torch.zeros_like(probs_SE), valid_S)
    return losses_from_statistics(stats, probs_SE.shape[-1])[0]


@pytest.fixture
def torchscale_histc(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchscale calls ``torch.histc`` on int64 indices (logging only), which current torch rejects."""
    orig = torch.histc
    monkeypatch.setattr(torch, "histc", lambda x, *a, **k: orig(x.float(), *a, **k))


def _ours_combine_SE(logits: torch.Tensor, top_k: int, capacity: int, renormalize: bool) -> tuple[torch.Tensor, ...]:
    routed = route_top_k(logits, top_k)
    plan = plan_dispatch(routed.expert_ids_SK, logits.shape[1], capacity=capacity)
    gates = torch.where(plan.kept_SK, routed.gates_SK, torch.zeros_like(routed.gates_SK))
    if renormalize:
        gates = gates / gates.sum(-1, keepdim=True).clamp(min=torch.finfo(gates.dtype).eps)
    combine_SE = torch.zeros_like(logits).scatter_add(1, routed.expert_ids_SK, gates)
    balance = load_balance_loss(routed.probs_SE, routed.expert_ids_SK[:, 0])
    return combine_SE, balance, plan


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_top1_matches_torchscale(seed: int, torchscale_histc: None) -> None:
    g = torch.Generator().manual_seed(seed)
    S, E = 64, 8
    logits = torch.randn(S, E, generator=g) * 2
    l_aux, combine_sec, dispatch_sec, _ = routing_ref.top1gating(logits, capacity_factor=1.0)
    capacity = int(1.0 * math.ceil(S / E))  # torchscale's top-1 training capacity
    combine_SE, balance, plan = _ours_combine_SE(logits, 1, capacity, renormalize=False)
    torch.testing.assert_close(balance, l_aux)
    torch.testing.assert_close(combine_SE, combine_sec.sum(-1))
    assert int(plan.dropped) == int(S - dispatch_sec.any(-1).any(-1).sum()) > 0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_top2_matches_torchscale(seed: int, torchscale_histc: None) -> None:
    g = torch.Generator().manual_seed(seed)
    S, E = 48, 6  # S divisible by E: torchscale's 2*ceil(S/E) equals our ceil(2*S/E)
    logits = torch.randn(S, E, generator=g) * 2
    l_aux, combine_sec, dispatch_sec, _ = routing_ref.top2gating(logits, second_expert_policy="all")
    combine_SE, balance, plan = _ours_combine_SE(logits, 2, math.ceil(2 * S / E), renormalize=True)
    torch.testing.assert_close(balance, l_aux)
    torch.testing.assert_close(combine_SE, combine_sec.sum(-1))
    assert torch.equal(combine_SE > 0, dispatch_sec.any(-1))


def test_top2_dropless_under_large_capacity(torchscale_histc: None) -> None:
    # torchscale's eval capacity (fraction of S) can be made large enough to keep everything.
    logits = torch.randn(30, 4, generator=torch.Generator().manual_seed(5))
    _, combine_sec, _, _ = routing_ref.top2gating(
        logits, second_expert_policy="all", eval_mode=True, moe_eval_capacity_token_fraction=1.0
    )
    combine_SE, _, plan = _ours_combine_SE(logits, 2, None, renormalize=True)  # type: ignore[arg-type]
    torch.testing.assert_close(combine_SE, combine_sec.sum(-1))
    assert int(plan.dropped) == 0


def test_xmoe_torchscale_form_reproduces_torchscale_logits() -> None:
    torch.manual_seed(0)
    gate = routing_ref.Top2Gate(24, 6, use_xmoe=True)
    ours = XMoERouter(24, 6, form="torchscale")
    with torch.no_grad():
        ours.proj.weight.copy_(gate.wg_reduction.weight)
        ours.expert_embed.copy_(gate.wg)
    x = torch.randn(10, 24)
    ref = gate._cosine(gate.wg_reduction(x), gate.wg)
    torch.testing.assert_close(ours(x), ref)


def test_xmoe_paper_form_is_scaled_cosine_with_learnable_temperature() -> None:
    torch.manual_seed(0)
    r = XMoERouter(24, 6, proj_dim=4, init_temperature=0.5)
    x = torch.randn(10, 24, requires_grad=True)
    logits = r(x)
    assert logits.abs().max() <= 1 / 0.5 + 1e-5  # |cos| <= 1, divided by tau
    z = torch.nn.functional.normalize(r.proj(x), dim=1)
    w = torch.nn.functional.normalize(r.expert_embed, dim=1)
    torch.testing.assert_close(logits, (z @ w.t()) / 0.5)
    logits.square().sum().backward()
    assert r.log_inv_temperature.grad is not None and r.log_inv_temperature.grad != 0
    assert r.temperature is not None and abs(float(r.temperature) - 0.5) < 1e-6


def test_router_runs_in_fp32_under_autocast() -> None:
    r = LinearRouter(16, 4)
    x = torch.randn(5, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = r(x.bfloat16())
    assert logits.dtype == torch.float32
    assert r(x.double()).dtype == torch.float64


def test_balance_loss_is_one_when_balanced_and_larger_when_collapsed() -> None:
    E = 4
    probs = torch.full((8, E), 1 / E)
    first = torch.arange(8) % E
    torch.testing.assert_close(load_balance_loss(probs, first), torch.tensor(1.0))
    collapsed = torch.zeros(8, E)
    collapsed[:, 0] = 1
    torch.testing.assert_close(load_balance_loss(collapsed, torch.zeros(8, dtype=torch.long)), torch.tensor(4.0))
    # Padding rows are ignored, whatever they contain.
    valid = torch.tensor([True] * 8 + [False] * 3)
    probs_p = torch.cat([probs, collapsed[:3]])
    first_p = torch.cat([first, torch.zeros(3, dtype=torch.long)])
    torch.testing.assert_close(load_balance_loss(probs_p, first_p, valid), torch.tensor(1.0))


def test_z_loss_value_and_padding() -> None:
    logits = torch.tensor([[0.0, 0.0], [1.0, 1.0], [50.0, 0.0]])
    expected = (math.log(2) ** 2 + (1 + math.log(2)) ** 2) / 2
    valid = torch.tensor([True, True, False])
    torch.testing.assert_close(router_z_loss(logits, valid), torch.tensor(expected))


def test_top_k_orders_by_probability_and_renormalizes() -> None:
    logits = torch.tensor([[0.0, 2.0, 1.0, -1.0]])
    raw = route_top_k(logits, 2)
    assert raw.expert_ids_SK.tolist() == [[1, 2]]
    p = torch.softmax(logits, -1)[0]
    torch.testing.assert_close(raw.gates_SK[0], p[[1, 2]])
    ren = route_top_k(logits, 2, renormalize=True)
    torch.testing.assert_close(ren.gates_SK.sum(), torch.tensor(1.0))


def test_router_errors_name_the_argument() -> None:
    with pytest.raises(ValueError, match="form"):
        XMoERouter(8, 2, form="cos")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="init_temperature"):
        XMoERouter(8, 2, init_temperature=0.0)
