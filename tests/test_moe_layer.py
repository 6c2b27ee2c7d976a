"""MH-MoE layer: fast sorted dispatch vs the slow per-expert loop, capacity, padding, determinism."""

from __future__ import annotations

import math

import pytest
import torch

from mmoe.moe import MHMoE, MoEOutput, RoutingRecord
from mmoe.moe.dispatch import plan_dispatch
from mmoe.moe.experts import grouped_mm_supported

D = 32

CONFIGS = {
    "smoe_h1_k1": dict(num_experts=4, top_k=1, num_heads=1, head_layers=0, merge_layers=0, expert_hidden=24),
    "mhmoe_h4_k2": dict(num_experts=6, top_k=2, num_heads=4, expert_hidden=16),
    "xmoe_swiglu_h2_k2": dict(
        num_experts=5, top_k=2, num_heads=2, router="xmoe", activation="swiglu", expert_hidden=12
    ),
    "xmoe_torchscale_renorm": dict(
        num_experts=4, top_k=2, num_heads=2, router="xmoe", xmoe_form="torchscale", renormalize_gates=True
    ),
    "capacity_k2": dict(num_experts=4, top_k=2, num_heads=4, capacity_factor=0.5, expert_hidden=8),
    "deep_head_innernorm": dict(
        num_experts=3, top_k=3, num_heads=8, head_layers=3, merge_layers=2, expert_inner_norm=True
    ),
    "conv1d_split": dict(num_experts=4, top_k=2, num_heads=4, split="conv1d", conv_kernel=12, conv_stride=8),
}


def _pair(cfg: dict, impl: str, dtype: torch.dtype = torch.float64, seed: int = 0) -> tuple[MHMoE, MHMoE]:
    torch.manual_seed(seed)
    fast = MHMoE(D, **cfg, expert_impl=impl).to(dtype)
    slow = MHMoE(D, **cfg, expert_impl="per_expert").to(dtype)
    slow.load_state_dict(fast.state_dict())
    # Spread the routing: a near-uniform router makes every path trivially agree.
    with torch.no_grad():
        for p in fast.router.parameters():
            p.normal_(0, 1.0)
        slow.load_state_dict(fast.state_dict())
    return fast, slow


def _inputs(dtype: torch.dtype, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 7, D, generator=g, dtype=dtype)
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[1, 5:] = True
    pad[2, 2:] = True
    return x, pad


def _run(layer: MHMoE, x: torch.Tensor, pad: torch.Tensor | None) -> tuple[MoEOutput, torch.Tensor, dict]:
    layer.zero_grad()
    x = x.clone().requires_grad_(True)
    out = layer(x, pad)
    w = torch.linspace(-1, 1, out.output.numel(), dtype=x.dtype).view_as(out.output)
    loss = (out.output * w).sum() + 10 * out.aux_loss + out.losses["z"]
    loss.backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    return out, x.grad, grads


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("use_pad", [False, True])
def test_sorted_dispatch_matches_per_expert_reference_float64(name: str, use_pad: bool) -> None:
    fast, slow = _pair(CONFIGS[name], "segments")
    x, pad = _inputs(torch.float64)
    pad = pad if use_pad else None
    of, gxf, gf = _run(fast, x, pad)
    os_, gxs, gs = _run(slow, x, pad)
    torch.testing.assert_close(of.output, os_.output, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(of.aux_loss, os_.aux_loss, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(gxf, gxs, rtol=1e-10, atol=1e-12)
    assert gf.keys() == gs.keys()
    for n in gf:
        torch.testing.assert_close(gf[n], gs[n], rtol=1e-9, atol=1e-12, msg=lambda m, n=n: f"{n}: {m}")
    assert torch.equal(of.routing.expert_ids, os_.routing.expert_ids)
    # Every parameter that can receive a gradient gets one (experts/router/head/merge).
    assert any("experts.w1" in n for n in gf) and any(n.startswith("router.") for n in gf)
    assert of.output.abs().sum() > 0


@pytest.mark.skipif(not grouped_mm_supported(torch.float32, torch.device("cpu"), (8, 16)), reason="no _grouped_mm")
@pytest.mark.parametrize("name", ["mhmoe_h4_k2", "capacity_k2", "xmoe_swiglu_h2_k2", "deep_head_innernorm"])
def test_grouped_mm_matches_per_expert_float32(name: str) -> None:
    cfg = dict(CONFIGS[name])
    cfg["expert_hidden"] = 16  # 16-byte aligned widths for _grouped_mm
    fast, slow = _pair(cfg, "grouped_mm", dtype=torch.float32)
    x, pad = _inputs(torch.float32)
    of, gxf, gf = _run(fast, x, pad)
    os_, gxs, gs = _run(slow, x, pad)
    torch.testing.assert_close(of.output, os_.output, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gxf, gxs, rtol=1e-4, atol=1e-5)
    for n in gf:
        torch.testing.assert_close(gf[n], gs[n], rtol=1e-4, atol=1e-5, msg=lambda m, n=n: f"{n}: {m}")
    assert torch.isfinite(gxf).all()


def _expected_capacity_keep(ids_SK: torch.Tensor, valid_S: torch.Tensor, E: int, C: int) -> torch.Tensor:
    """GShard priority, written as the obvious loop: all first choices in token order, then seconds."""
    S, K = ids_SK.shape
    keep = torch.zeros(S, K, dtype=torch.bool)
    fill = [0] * E
    for k in range(K):
        for s in range(S):
            if not valid_S[s]:
                continue
            e = int(ids_SK[s, k])
            if fill[e] < C:
                fill[e] += 1
                keep[s, k] = True
    return keep


@pytest.mark.parametrize("cf", [0.25, 0.5, 1.0])
def test_capacity_drops_exactly_the_overflow(cf: float) -> None:
    cfg = dict(num_experts=4, top_k=2, num_heads=2, capacity_factor=cf, expert_hidden=8)
    layer, _ = _pair(cfg, "segments")
    x, pad = _inputs(torch.float64)
    rec = layer(x, pad).routing
    valid = rec.valid
    ids = torch.where(valid[:, None], rec.expert_ids, torch.zeros_like(rec.expert_ids))
    n_valid = int(valid.sum())
    C = math.ceil(2 * n_valid / 4 * cf)
    expected = _expected_capacity_keep(ids, valid, 4, C)
    assert torch.equal(rec.kept, expected)
    assert int(rec.dropped) == int((valid[:, None] & ~expected).sum()) > 0
    assert int(rec.counts.max()) <= C
    assert int(rec.counts.sum()) + int(rec.dropped) == 2 * n_valid
    assert torch.all(rec.gates[~rec.kept] == 0)


def test_dropless_drops_nothing() -> None:
    layer, _ = _pair(CONFIGS["mhmoe_h4_k2"], "auto", dtype=torch.float32)
    x, pad = _inputs(torch.float32)
    rec = layer(x, pad).routing
    n_valid = int((~pad).sum()) * 4
    assert int(rec.dropped) == 0
    assert int(rec.counts.sum()) == 2 * n_valid
    assert torch.equal(rec.kept, rec.valid[:, None].expand(-1, 2))
    # Padding rows are marked, not counted.
    assert int((rec.expert_ids == -1).all(1).sum()) == int(pad.sum()) * 4
    assert rec.counts.dtype == torch.int64 and rec.dropped.dim() == 0


@pytest.mark.parametrize("name", ["mhmoe_h4_k2", "capacity_k2", "xmoe_swiglu_h2_k2"])
def test_padding_changes_nothing_for_real_tokens(name: str) -> None:
    layer, _ = _pair(CONFIGS[name], "segments")
    layer.z_loss_weight = 1e-3
    x, pad = _inputs(torch.float64)
    out1 = layer(x, pad)
    x2 = x.clone()
    x2[pad] = 1e3 * torch.randn_like(x2[pad])  # garbage in padding
    out2 = layer(x2, pad)
    keep = ~pad
    torch.testing.assert_close(out1.output[keep], out2.output[keep], rtol=0, atol=0)
    assert torch.all(out1.output[pad] == 0)
    torch.testing.assert_close(out1.aux_loss, out2.aux_loss, rtol=0, atol=0)
    assert torch.equal(out1.routing.counts, out2.routing.counts)
    # Same as running only the real tokens, packed into one unpadded sequence.
    packed = layer(x[keep].unsqueeze(0))
    torch.testing.assert_close(packed.output[0], out1.output[keep], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(packed.aux_loss, out1.aux_loss, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(packed.losses["z"], out1.losses["z"], rtol=1e-12, atol=1e-14)
    assert torch.equal(packed.routing.counts, out1.routing.counts)


def test_determinism_bitwise() -> None:
    results = []
    for _ in range(2):
        torch.manual_seed(123)
        layer = MHMoE(D, 4, top_k=2, num_heads=4, expert_hidden=16)
        x = torch.randn(2, 9, D, requires_grad=True)
        out = layer(x)
        (out.output.square().sum() + out.aux_loss).backward()
        results.append((out.output.detach(), x.grad, layer.experts.w1.grad, layer.router.weight.grad))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_record_layout_and_shapes() -> None:
    torch.manual_seed(0)
    layer = MHMoE(D, 5, top_k=2, num_heads=4, expert_hidden=8)
    x = torch.randn(2, 3, D)
    out = layer(x)
    rec = out.routing
    assert isinstance(rec, RoutingRecord)
    assert out.output.shape == x.shape and out.aux_loss.dim() == 0
    assert rec.expert_ids.shape == (2 * 3 * 4, 2) and rec.gates.dtype == torch.float32
    assert rec.token_shape == (2, 3) and rec.num_tokens == 6 and rec.num_heads == 4
    assert rec.num_experts == 5 and rec.top_k == 2
    assert not rec.gates.requires_grad and not rec.expert_ids.requires_grad
    # Sub-token j of token i is row i*h + j: the router sees the head output's contiguous slice.
    sub = layer.head(x.reshape(6, D)).reshape(6, 4, D // 4)
    logits = layer.router(sub[1, 2][None])
    # One sub-token alone is a different matmul than the batch, so the logits may differ in the last bits: the
    # comparison of indices is decisive only because the top-3 logits are far apart (no float near-tie).
    top3 = logits[0].sort(descending=True).values[:3]
    assert float((top3[:-1] - top3[1:]).min()) > 1e-3
    assert torch.equal(logits.topk(2).indices[0], rec.expert_ids[1 * 4 + 2])
    # First choices first: gate of choice 0 >= gate of choice 1 (raw probabilities).
    assert torch.all(rec.gates[:, 0] >= rec.gates[:, 1])


def test_plain_smoe_has_no_head_or_merge_and_is_an_identity_split() -> None:
    layer = MHMoE(D, 4, top_k=1, num_heads=1, head_layers=0, merge_layers=0)
    names = [n for n, _ in layer.named_parameters()]
    assert not any(n.startswith(("head.", "merge.")) for n in names)
    x = torch.randn(1, 4, D)
    out = layer(x)
    # With one expert chosen, the output is exactly gate * expert(x).
    rec = out.routing
    for i in range(4):
        e = int(rec.expert_ids[i, 0])
        ref = rec.gates[i, 0] * layer.experts.expert_ffn(e, x[0, i][None])[0]
        torch.testing.assert_close(out.output[0, i], ref, rtol=1e-5, atol=1e-6)


def test_head_merge_depth_and_ablation_switches() -> None:
    def count(m: MHMoE, prefix: str) -> int:
        return sum(p.numel() for n, p in m.named_parameters() if n.startswith(prefix))

    full = MHMoE(D, 4, num_heads=4, head_layers=2, merge_layers=3)
    assert count(full, "head.") == 2 * (D * D + D) and count(full, "merge.") == 3 * (D * D + D)
    assert sum(isinstance(m, torch.nn.ReLU) for m in full.head.modules()) == 1
    head_only = MHMoE(D, 4, num_heads=4, head_layers=1, merge_layers=0)
    assert count(head_only, "head.") == D * D + D and count(head_only, "merge.") == 0
    # [MH1] official-code init: head Xavier gain 1/sqrt(2), merge gain 1, zero biases.
    bound_head = (1 / math.sqrt(2)) * math.sqrt(6 / (2 * D))
    assert full.head[0].weight.abs().max() <= bound_head + 1e-6
    assert full.merge[0].weight.abs().max() > bound_head  # gain 1 reaches further (w.h.p.)
    assert torch.all(full.head[0].bias == 0) and torch.all(full.merge[-1].bias == 0)


def test_conv1d_split_shapes_and_errors() -> None:
    layer = MHMoE(D, 4, num_heads=4, split="conv1d")  # kernel = stride = D/h
    assert layer.conv is not None and layer.conv.kernel_size == (8,)
    assert layer(torch.randn(2, 3, D)).output.shape == (2, 3, D)
    with pytest.raises(ValueError, match="conv1d"):
        MHMoE(D, 4, num_heads=4, split="conv1d", conv_kernel=3, conv_stride=2)


def test_renormalized_gates_sum_to_one() -> None:
    layer, _ = _pair(dict(num_experts=6, top_k=3, num_heads=2, renormalize_gates=True), "auto", torch.float32)
    rec = layer(torch.randn(2, 5, D)).routing
    torch.testing.assert_close(rec.gates.sum(-1), torch.ones(20))


def test_balance_bias_shifts_selection_not_gates() -> None:
    torch.manual_seed(0)
    layer = MHMoE(D, 4, top_k=1, num_heads=2, balance_bias_rate=0.5, expert_hidden=8)
    x = torch.randn(2, 8, D)
    before = layer(x).routing
    layer.update_routing_bias(torch.tensor([100, 0, 0, 0]))
    assert layer.routing_bias[0] < 0 and torch.all(layer.routing_bias[1:] > 0)
    after = layer(x).routing
    assert int(after.counts[0]) == 0 < int(before.counts.sum())
    # Gates are still the unbiased probabilities of the chosen experts.
    sub = layer.split_tokens(layer.head(x.reshape(-1, D)))
    probs = torch.softmax(layer.router(sub), -1)
    torch.testing.assert_close(after.gates[:, 0], probs.gather(1, after.expert_ids)[:, 0])
    with pytest.raises(RuntimeError, match="balance_bias_rate"):
        MHMoE(D, 4).update_routing_bias(torch.zeros(4))


def test_eval_capacity_fraction() -> None:
    layer = MHMoE(D, 4, top_k=1, num_heads=1, capacity_factor=2.0, eval_capacity_fraction=0.25)
    n = torch.tensor(40)
    assert int(layer.capacity(n)) == 20
    layer.eval()
    assert int(layer.capacity(n)) == 10
    assert MHMoE(D, 4).capacity(n) is None


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_heads=5), "num_heads"),
        (dict(top_k=9), "top_k"),
        (dict(head_layers=4), "head_layers"),
        (dict(router="foo"), "router"),
        (dict(activation="relu"), "activation"),
        (dict(capacity_factor=0.0), "capacity_factor"),
        (dict(expert_impl="fast"), "expert_impl"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MHMoE(D, 8, **kwargs)


def test_bad_inputs_are_reported() -> None:
    layer = MHMoE(D, 4)
    with pytest.raises(ValueError, match="expected"):
        layer(torch.randn(2, 3, D + 1))
    with pytest.raises(ValueError, match="padding_mask"):
        layer(torch.randn(2, 3, D), torch.zeros(2, 3))


def test_all_padding_is_finite() -> None:
    layer = MHMoE(D, 4, capacity_factor=1.0)
    x = torch.randn(1, 3, D, requires_grad=True)
    out = layer(x, torch.ones(1, 3, dtype=torch.bool))
    (out.output.sum() + out.aux_loss).backward()
    assert torch.all(out.output == 0) and torch.isfinite(out.aux_loss) and int(out.routing.counts.sum()) == 0
    assert torch.all(x.grad == 0)


def test_plan_is_expert_major_and_inverse_is_a_permutation() -> None:
    ids = torch.tensor([[2, 0], [0, 1], [2, 1], [1, 2]])
    plan = plan_dispatch(ids, 3)
    assert plan.counts_E.tolist() == [2, 3, 3]
    assert plan.offsets_E.tolist() == [2, 5, 8]
    assert plan.expert_index_A.tolist() == [0, 0, 1, 1, 1, 2, 2, 2]
    # Inside expert 2: first choices (tokens 0, 2) before the second choice of token 3.
    assert plan.token_index_A[5:].tolist() == [0, 2, 3]
    assert sorted(plan.inverse_A.tolist()) == list(range(8))


@pytest.mark.parametrize("impl, dtype", [("grouped_mm", torch.float32), ("segments", torch.float64)])
@pytest.mark.parametrize("cfg_name", ["mhmoe_h4_k2", "capacity_k2"])
def test_expert_checkpointing_changes_nothing(impl: str, dtype: torch.dtype, cfg_name: str) -> None:
    if impl == "grouped_mm" and not grouped_mm_supported(dtype, torch.device("cpu"), (8, 16)):
        pytest.skip("no _grouped_mm")
    cfg = dict(CONFIGS[cfg_name], expert_hidden=16)
    plain, ref = _pair(cfg, impl, dtype=dtype)
    torch.manual_seed(0)
    ckpt = MHMoE(D, **cfg, expert_impl=impl, expert_checkpoint_rows=7).to(dtype)  # chunks cut through segments
    ckpt.load_state_dict(plain.state_dict())
    x, pad = _inputs(dtype)
    op, gxp, gp = _run(plain, x, pad)
    oc, gxc, gc = _run(ckpt, x, pad)
    orf, _, gr = _run(ref, x, pad)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(oc.output, op.output, **tol)
    torch.testing.assert_close(oc.output, orf.output, **tol)
    torch.testing.assert_close(gxc, gxp, **tol)
    for n in gp:
        torch.testing.assert_close(gc[n], gp[n], **tol, msg=lambda m, n=n: f"{n}: {m}")
        torch.testing.assert_close(gc[n], gr[n], **tol, msg=lambda m, n=n: f"{n}: {m}")


def _expert_grads_after_backward(layer: MHMoE, x: torch.Tensor, pad: torch.Tensor | None) -> dict[str, torch.Tensor]:
    layer.zero_grad(set_to_none=True)
    out = layer(x, padding_mask=pad)
    (out.output.square().sum() + out.aux_loss).backward()
    missing = [n for n, p in layer.named_parameters() if p.grad is None]
    assert not missing, f"parameters outside the autograd graph (plain DDP would refuse them): {missing}"
    return {n: p.grad for n, p in layer.experts.named_parameters()}


@pytest.mark.parametrize(
    "impl, dtype", [("segments", torch.float64), ("grouped_mm", torch.float32), ("per_expert", torch.float64)]
)
def test_an_expert_left_empty_stays_in_the_graph(impl: str, dtype: torch.dtype) -> None:
    """A router forced to skip the last expert: every parameter still gets a gradient, the empty expert's is 0."""
    if impl == "grouped_mm" and not grouped_mm_supported(dtype, torch.device("cpu"), (8, 16)):
        pytest.skip("no _grouped_mm")
    torch.manual_seed(0)
    layer = MHMoE(D, 4, top_k=2, num_heads=4, expert_hidden=16, balance_bias_rate=1e-3, expert_impl=impl).to(dtype)
    with torch.no_grad():
        layer.routing_bias[-1] = -10.0  # probabilities are <= 1: expert 3 can never be in the top 2
    x = torch.randn(2, 6, D, dtype=dtype)
    assert int(layer(x).routing.counts[-1]) == 0 and int(layer(x).routing.counts[:-1].min()) > 0
    grads = _expert_grads_after_backward(layer, x, None)
    assert float(grads["w1"][-1].abs().max()) == 0.0 and float(grads["w2"][-1].abs().max()) == 0.0
    assert float(grads["w1"][0].abs().max()) > 0.0


@pytest.mark.parametrize(
    "impl, dtype", [("segments", torch.float64), ("grouped_mm", torch.float32), ("per_expert", torch.float64)]
)
def test_no_kept_assignment_keeps_experts_in_the_graph(impl: str, dtype: torch.dtype) -> None:
    """A batch that is all padding routes nothing; the stacked expert tensors must still get (zero) gradients.

    Before, the per-segment path skipped every empty segment, so such a step left ``w1``/``w2``/biases without
    a gradient: what plain DDP reports as "parameters that were not used in producing the loss".
    """
    if impl == "grouped_mm" and not grouped_mm_supported(dtype, torch.device("cpu"), (8, 16)):
        pytest.skip("no _grouped_mm")
    torch.manual_seed(0)
    layer = MHMoE(D, 4, top_k=2, num_heads=4, expert_hidden=16, expert_impl=impl).to(dtype)
    x = torch.randn(2, 6, D, dtype=dtype)
    pad = torch.ones(2, 6, dtype=torch.bool)
    assert int(layer(x, padding_mask=pad).routing.counts.sum()) == 0
    grads = _expert_grads_after_backward(layer, x, pad)
    assert all(float(g.abs().max()) == 0.0 for g in grads.values())
