"""Routing records -> per-patch assignments, diversity, load and activation ratio (mmoe.viz.records)."""

from __future__ import annotations

import numpy as np
import pytest
from test_viz_helpers import make_record

from mmoe.viz.records import (
    RoutingAccumulator,
    activation_ratio,
    diversity,
    load_share,
    majority_expert,
    parse_layer_key,
    patch_grid,
    record_to_tokens,
    split_routing,
)


def _known(b=2, grid=(2, 3), h=3, e=5, nt=4, k=1, seed=0):
    rng = np.random.default_rng(seed)
    nv = 1 + grid[0] * grid[1]
    ids = rng.integers(0, e, size=(b, nv + nt, h, k))
    ids[1, -1] = -1  # last text token of sequence 1 is padding
    return ids, nv, nt


def test_parse_layer_key():
    assert parse_layer_key("layer3") == ("layer3", "shared")
    assert parse_layer_key("layer3.vision") == ("layer3", "vision")
    assert parse_layer_key("layer11.text") == ("layer11", "text")


def test_row_order_is_token_major_then_head():
    # interfaces.md sec. 1: row i*h + j is sub-token j of token i, tokens flattened as b*L + l
    b, seq, h = 2, 3, 2
    rows = np.arange(b * seq * h).reshape(-1, 1)
    rec = make_record(rows.reshape(b, seq, h, 1) % 97, 97)
    tok = record_to_tokens(rec)
    assert tok.expert_ids[1, 2, 1, 0] == (1 * seq + 2) * h + 1
    assert tok.expert_ids[0, 1, 0, 0] == 2


def test_split_shared_pool_and_patch_grid():
    ids, nv, nt = _known()
    views = split_routing({"layer1": make_record(ids, 5)}, num_vision_tokens=nv, num_text_tokens=nt)
    (v,) = views
    assert v.pool == "shared" and v.layer == "layer1"
    np.testing.assert_array_equal(v.vision.expert_ids, ids[:, :nv])
    np.testing.assert_array_equal(v.text.expert_ids, ids[:, nv:])
    grid = patch_grid(v.vision, (2, 3))
    assert grid.shape == (2, 2, 3, 3)
    # patch (r, c) is vision token 1 + r*gw + c (CLS first, row-major patches)
    np.testing.assert_array_equal(grid[1, 1, 2], ids[1, 1 + 1 * 3 + 2, :, 0])
    assert v.counts.tolist() == np.bincount(ids[ids >= 0], minlength=5).tolist()
    assert (v.vision.counts() + v.text.counts()).tolist() == v.counts.tolist()


def test_split_per_modality_pools():
    ids, nv, nt = _known()
    routing = {"layer2.vision": make_record(ids[:, :nv], 5), "layer2.text": make_record(ids[:, nv:], 5)}
    vis, txt = split_routing(routing, num_vision_tokens=nv, num_text_tokens=nt)
    assert vis.pool == "vision" and vis.text is None
    assert txt.pool == "text" and txt.vision is None
    np.testing.assert_array_equal(txt.text.expert_ids, ids[:, nv:])
    # a per-modality record over the full sequence is sliced to its own modality
    (full,) = split_routing({"layer2.text": make_record(ids, 5)}, num_vision_tokens=nv, num_text_tokens=nt)
    np.testing.assert_array_equal(full.text.expert_ids, ids[:, nv:])
    assert full.vision is None


def test_split_rejects_wrong_length():
    ids, nv, nt = _known()
    with pytest.raises(ValueError, match=r"layer1.*expected"):
        split_routing({"layer1": make_record(ids, 5)}, num_vision_tokens=nv + 1, num_text_tokens=nt)


def test_majority_and_diversity():
    first = np.array([[3, 3, 1], [0, 1, 2], [2, 2, 2], [-1, -1, -1], [4, 1, -1]])
    assert diversity(first).tolist() == [2, 3, 1, 0, 2]
    gates = np.array([[0.1, 0.1, 0.9], [0.1, 0.2, 0.7], [1, 1, 1], [0, 0, 0], [0.2, 0.6, 0.0]])
    # votes win; ties go to gate mass, then to the lower id
    assert majority_expert(first, gates).tolist() == [3, 2, 2, -1, 1]
    assert majority_expert(first).tolist() == [3, 0, 2, -1, 1]


def test_majority_tie_rule_with_exact_gates():
    """The documented order: votes, then summed gate, then the lower id.

    Every gate is a power of two and every sum below is exact in float32 and float64, so the expected answer
    does not depend on rounding.
    """
    first = np.array(
        [
            [1, 1, 2, 3],  # two votes beat a larger single gate
            [3, 1, 3, 1],  # 2-2 on votes: expert 3 has 0.5 + 0.5 = 1.0 against 0.25 + 0.25
            [1, 3, 1, 3],  # the same with the ids swapped: the gate sum decides, not the id
            [5, 2, 5, 2],  # 2-2 on votes and 0.75-0.75 on gates: the lower id
            [0, 4, 6, 2],  # four distinct experts: the largest gate
            [0, 4, 6, 2],  # four distinct experts, all gates equal: the lowest id
            [-1, 7, -1, 7],  # padding sub-tokens do not vote
        ]
    )
    gates = np.array(
        [
            [0.125, 0.125, 1.0, 0.5],
            [0.5, 0.25, 0.5, 0.25],
            [0.25, 0.5, 0.25, 0.5],
            [0.25, 0.5, 0.5, 0.25],
            [0.25, 0.25, 0.5, 0.25],
            [0.25, 0.25, 0.25, 0.25],
            [1.0, 0.25, 1.0, 0.25],
        ]
    )
    want = [1, 3, 3, 2, 6, 0, 7]
    for dtype in (np.float32, np.float64):
        assert majority_expert(first, gates.astype(dtype)).tolist() == want
    # the (B, gh, gw, h) layout of patch grids gives the same answer per token
    assert majority_expert(first.reshape(7, 1, 1, 4), gates.reshape(7, 1, 1, 4))[:, 0, 0].tolist() == want


def test_load_and_activation_ratio():
    counts = np.array([90, 9, 1, 0])
    np.testing.assert_allclose(load_share(counts), [0.9, 0.09, 0.01, 0.0])
    assert activation_ratio(counts, 0.01) == 0.75
    assert activation_ratio(counts, 0.05) == 0.5
    assert activation_ratio(counts, 0.0) == 0.75  # an expert with no load is never active
    assert load_share(np.zeros(3)).tolist() == [0, 0, 0]


def test_accumulator_sums_batches():
    acc = RoutingAccumulator()
    total = np.zeros(5, dtype=np.int64)
    for seed in range(3):
        ids, nv, nt = _known(seed=seed)
        acc.add(split_routing({"layer1": make_record(ids, 5)}, num_vision_tokens=nv, num_text_tokens=nt), (2, 3))
        total += np.bincount(ids[ids >= 0], minlength=5)
    st = acc.to_json(0.01)["layer1"]
    assert st["counts"] == total.tolist()
    assert sum(st["counts_vision"]) + sum(st["counts_text"]) == int(total.sum())
    np.testing.assert_allclose(st["load"], total / total.sum())
    assert 1.0 <= st["mean_patch_diversity"] <= 3.0


def test_agrees_with_moe_stats_on_a_real_layer():
    """The numpy reductions here agree with mmoe.moe.stats on records of a real MH-MoE layer (with padding
    and capacity drops), so the pictures and the training logs show the same numbers."""
    import torch

    from mmoe.moe import MHMoE, stats

    torch.manual_seed(0)
    layer = MHMoE(16, 6, top_k=2, num_heads=4, expert_hidden=8, capacity_factor=0.5).eval()
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[1, 5:] = True
    with torch.no_grad():
        rec = layer(torch.randn(3, 7, 16), padding_mask=pad).routing
    tok = record_to_tokens(rec)
    np.testing.assert_array_equal(diversity(tok.first_choice()), stats.token_diversity(rec).numpy())
    np.testing.assert_array_equal(tok.counts(), rec.counts.numpy())
    for t in (0.0, 0.01, 0.2):
        assert activation_ratio(rec.counts.numpy(), t) == stats.activation_ratio(rec.counts, t)
    assert (tok.expert_ids[1, 5:] == -1).all()


def test_viz_is_a_leaf_without_lightning_or_pyplot():
    """docs/interfaces.md: mmoe.viz never imports Lightning; figures are made without pyplot's global state."""
    import subprocess
    import sys

    code = (
        "import sys, mmoe.viz; "
        "bad = [m for m in ('lightning', 'matplotlib.pyplot', 'webdataset') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
