"""tools/bench_moe.py: its baselines compute the same function as the layer (so timings compare like with like)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from helpers import REPO

from mmoe.moe import MHMoE

_spec = importlib.util.spec_from_file_location("bench_moe", REPO / "tools" / "bench_moe.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)  # type: ignore[union-attr]


def test_capacity_einsum_baseline_equals_layer_in_capacity_mode() -> None:
    torch.manual_seed(0)
    layer = MHMoE(16, 4, top_k=2, num_heads=2, expert_hidden=8, capacity_factor=1.0)
    with torch.no_grad():
        layer.router.weight.normal_(0, 1.0)
    x = torch.randn(1, 12, 16)
    ein = bench.CapacityEinsumMoE(layer, group=24)  # one group = all 24 sub-tokens, like torchscale
    out = layer(x)
    assert int(out.routing.dropped) > 0  # the comparison covers dropping
    torch.testing.assert_close(ein(x), out.output, rtol=1e-5, atol=1e-6)


def test_dense_block_has_the_layer_flops() -> None:
    d, k, h = 32, 2, 4
    dense = bench.DenseBlock(d, k * (4 * d // k), head_merge=h > 1)
    macs = sum(m.in_features * m.out_features for m in dense.modules() if isinstance(m, torch.nn.Linear))
    # head + merge (2 d^2) + k experts of width F = 4d/k on h sub-tokens of width d/h: 2*d*F*k.
    assert macs == 2 * d * d + 2 * d * (4 * d // k) * k


def test_table_ratios() -> None:
    rows = [
        {"method": m, "cfg": dict(dim=768, tokens=2048, heads=4, experts=8, top_k=2), "tokens_per_s": t, "peak_mb": p}
        for m, t, p in (("mhmoe", 100.0, 300.0), ("dense", 200.0, 200.0), ("einsum", 10.0, 900.0))
    ]
    rows.append({"method": "torchscale", "cfg": rows[0]["cfg"], "skipped": "not installed"})
    table = bench.format_rows(rows)
    assert (
        "| MH-MoE tok/s | dense tok/s | torchscale tok/s | einsum tok/s | MoE/dense | MoE/torchscale | MoE/einsum |"
        in (table)
    )
    assert "| 2048 | 4 | 8 | 2 | 1536 | 100 (+0%) | 200 (+0%) | skipped | 10 (+0%) | 0.50x | - | 10.00x |" in table
    assert "| 2048 | 4 | 8 | 2 | 300 | 200 | - | 900 | 1.50x | - | 4.50x |" in table


def test_rounds_merge_to_the_minimum_and_spread() -> None:
    cfg = dict(dim=768, tokens=100, heads=4, experts=8, top_k=2)
    rows = [
        {"method": "mhmoe", "cfg": cfg, "all_times_s": [2.0, 3.0], "peak_mb": 10.0},
        {"method": "mhmoe", "cfg": cfg, "all_times_s": [1.0, 1.5], "peak_mb": 12.0},
    ]
    (m,) = bench.merge_rounds(rows)
    assert m["time_s"] == 1.0 and m["spread"] == 2.0 and m["tokens_per_s"] == 100.0 and m["rounds"] == 2
    assert m["peak_mb"] == 10.0


def test_oracle_is_the_layer_when_routing_is_balanced_and_gates_are_one() -> None:
    """The oracle computes the layer's expert FFNs on K copies of each sub-token, summed (gates 1)."""
    torch.manual_seed(0)
    layer = MHMoE(16, 4, top_k=2, num_heads=2, expert_hidden=8).double()
    x = torch.randn(1, 8, 16, dtype=torch.float64)  # S = 16 sub-tokens, K*S/E = 8 rows per expert
    got = bench.BalancedOracle(layer)(x)
    x_SC = layer.split_tokens(layer.head(x.reshape(8, 16)))
    rows = x_SC.unsqueeze(0).expand(2, 16, 8).reshape(4, 8, 8)
    y = torch.stack([layer.experts.expert_ffn(e, rows[e]) for e in range(4)]).reshape(2, 16, 8).sum(0)
    torch.testing.assert_close(got, layer.merge(y.reshape(8, 16)).reshape(1, 8, 16))


@pytest.mark.skipif(not bench.torchscale_available(), reason="torchscale is not installed")
def test_torchscale_baseline_runs_forward_and_backward() -> None:
    import torch.distributed as dist

    had_group = dist.is_initialized()
    torch.manual_seed(0)
    layer = MHMoE(16, 4, top_k=2, num_heads=2, expert_hidden=8)
    try:
        ts = bench.TorchscaleMHMoE(layer)  # needs a process group: makes a single-process one
        x = torch.randn(1, 12, 16, requires_grad=True)
        y, aux = ts(x)
        assert y.shape == x.shape and torch.isfinite(y).all()
        (y.square().sum() + aux).backward()
        assert x.grad is not None and torch.isfinite(x.grad).all()
    finally:
        if not had_group and dist.is_initialized():  # later tests make their own groups
            dist.destroy_process_group()
