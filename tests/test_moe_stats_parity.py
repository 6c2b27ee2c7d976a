"""Routing statistics and the [MH2] FLOPs/params parity calculator."""

from __future__ import annotations

import pytest
import torch

from mmoe.moe import MHMoE, RoutingRecord
from mmoe.moe import stats as S
from mmoe.moe.parity import main as parity_main
from mmoe.moe.parity import match_mhmoe, mh2_table, moe_cost


def _record(first_BLh: list, num_experts: int = 4, dropped: int = 0) -> RoutingRecord:
    ids = torch.tensor(first_BLh)  # (B, L, h), -1 = padding
    B, L, h = ids.shape
    ids_S1 = ids.reshape(-1, 1)
    valid = ids_S1 >= 0
    counts = torch.bincount(ids_S1[valid], minlength=num_experts)
    return RoutingRecord(
        expert_ids=ids_S1,
        gates=valid.float(),
        kept=valid,
        counts=counts,
        dropped=torch.tensor(dropped),
        num_tokens=B * L,
        num_heads=h,
        num_experts=num_experts,
        top_k=1,
        token_shape=(B, L),
    )


def test_token_diversity_counts_distinct_first_choices() -> None:
    rec = _record([[[0, 0, 0], [0, 1, 2], [3, 3, 1]], [[2, 2, 2], [-1, -1, -1], [-1, -1, -1]]])
    assert S.token_diversity(rec).tolist() == [[1, 3, 2], [1, 0, 0]]


def test_load_activation_and_dropped_share() -> None:
    counts = torch.tensor([90, 9, 1, 0])
    torch.testing.assert_close(S.expert_load(counts), torch.tensor([0.9, 0.09, 0.01, 0.0], dtype=torch.float64))
    assert S.activation_ratio(counts, 0.01) == 0.75
    assert S.activation_ratio(counts, 0.05) == 0.5
    assert S.activation_ratio(counts, 0.0) == 0.75  # idle experts never count
    assert S.activation_ratio(torch.zeros(4, dtype=torch.long)) == 0.0
    rec = _record([[[0, 1], [2, 3]]], dropped=4)
    assert S.dropped_share(rec) == 0.5
    with pytest.raises(ValueError, match="threshold"):
        S.activation_ratio(counts, -1.0)


def test_summarize_pools_records_and_ignores_padding() -> None:
    a = _record([[[0, 0], [1, 2]]])
    b = _record([[[3, 3], [-1, -1]]])
    s = S.summarize([a, b])
    assert s["activation_ratio"] == 1.0 and s["num_tokens"] == 3.0
    assert s["diversity"] == pytest.approx((1 + 2 + 1) / 3)
    assert s["load_max"] == pytest.approx(2 / 6) and s["dropped_share"] == 0.0
    with pytest.raises(ValueError, match="RoutingRecord"):
        S.summarize([])


def test_stats_on_a_real_layer_record() -> None:
    torch.manual_seed(0)
    layer = MHMoE(16, 4, top_k=2, num_heads=4, capacity_factor=0.5)
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[0, 3:] = True
    rec = layer(torch.randn(2, 5, 16), pad).routing
    div = S.token_diversity(rec)
    assert div.shape == (2, 5) and torch.all(div[0, 3:] == 0) and torch.all((div[~pad] >= 1) & (div[~pad] <= 4))
    assert 0.0 < S.dropped_share(rec) < 1.0
    assert S.summarize([rec])["num_tokens"] == 8.0


@pytest.mark.parametrize("h, F, k, E", [(2, 768, 2, 40), (3, 512, 3, 96)])
def test_mh2_table(h: int, F: int, k: int, E: int) -> None:
    res = {r.mhmoe.num_heads: r for r in mh2_table()}[h]
    assert (res.mhmoe.expert_hidden, res.mhmoe.top_k, res.mhmoe.num_experts) == (F, k, E)
    assert res.flops_ratio == 1.0
    assert abs(res.params_ratio - 1.0) < 0.035
    assert res.baseline.flops_per_token == 3 * 768 * 2048


def test_cost_counts_match_a_built_layer() -> None:
    c = moe_cost(32, 6, 2, 24, num_heads=4, activation="gelu", head_layers=1, merge_layers=1)
    layer = MHMoE(32, 6, top_k=2, num_heads=4, expert_hidden=24, activation="gelu")
    assert c.params_exact == sum(p.numel() for p in layer.parameters())
    c2 = moe_cost(32, 6, 2, 24, num_heads=4, activation="swiglu", head_layers=1, merge_layers=1)
    layer2 = MHMoE(32, 6, top_k=2, num_heads=4, expert_hidden=24, activation="swiglu")
    assert c2.params_exact == sum(p.numel() for p in layer2.parameters())


def test_match_errors() -> None:
    with pytest.raises(ValueError, match="num_heads"):
        match_mhmoe(768, 2048, 8, 5)
    with pytest.raises(ValueError, match="head/merge"):
        match_mhmoe(768, 256, 8, 2, head_layers=3, merge_layers=3)


def test_parity_cli_prints_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert parity_main([]) == 0
    out = capsys.readouterr().out
    assert "MH-MoE h=2" in out and "MH-MoE h=3" in out and "9,437,184" in out
    rows = {line.split()[1]: line.split()[3:6] for line in out.splitlines() if line.startswith("MH-MoE h=")}
    assert rows == {"h=2": ["768", "2", "40"], "h=3": ["512", "3", "96"]}


def test_training_memory_estimates_scale_with_experts_and_ep() -> None:
    from mmoe.moe.parity import training_memory

    a = training_memory(768, 12, 32, ep_size=1)
    b = training_memory(768, 12, 32, ep_size=8)
    # 6 MoE layers x 32 experts x 2 matrices x (768/4) x 1536.
    assert a.params_experts == 6 * 32 * 2 * 192 * 1536
    assert a.state_gb_per_rank - b.state_gb_per_rank == pytest.approx(a.params_experts * 7 / 8 * 16 / 1024**3)
    assert a.act_gb_ckpt < a.act_gb_per_rank
    with pytest.raises(ValueError, match="ep_size"):
        training_memory(768, 12, 32, ep_size=3)
