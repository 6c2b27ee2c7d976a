"""tools/bench_moe.py: its baselines compute the same function as the layer (so timings compare like with like)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from mmoe.moe import MHMoE

_spec = importlib.util.spec_from_file_location("bench_moe", Path(__file__).parents[1] / "tools" / "bench_moe.py")
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
    table = bench.format_rows(rows)
    assert "| 2048 | 4 | 8 | 2 | 1536 | 100 | 200 | - | 10 | 0.50x | 10.00x | - | 300 | 200 | 1.50x |" in table
