"""The fused GELU expert FFN (mmoe.moe.fused) against the slow per-expert reference: outputs and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmoe.moe import MHMoE
from mmoe.moe.experts import GroupedExperts
from mmoe.moe.fused import fused_gelu_ffn

D = 32


def _reference(x, w1, b1, w2, b2, counts, approximate="none"):
    """Per-expert composed ops: the obvious loop, autograd through plain matmuls."""
    outs, start = [], 0
    for e, c in enumerate(counts):
        xe = x[start : start + c]
        h = xe @ w1[e] + (b1[e] if b1 is not None else 0)
        outs.append(F.gelu(h, approximate=approximate) @ w2[e] + (b2[e] if b2 is not None else 0))
        start += c
    outs.append(x.new_zeros(x.shape[0] - start, w2.shape[2]))
    return torch.cat(outs, 0)


def _operands(dtype, bias=True, counts=(5, 0, 9, 3), tail=4, C=8, Fh=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    E, A = len(counts), sum(counts) + tail

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=dtype) * scale).requires_grad_(True)

    x = r(A, C)
    w1, w2 = r(E, C, Fh, scale=0.3), r(E, Fh, C, scale=0.3)
    b1, b2 = (r(E, Fh, scale=0.1), r(E, C, scale=0.1)) if bias else (None, None)
    return x, w1, b1, w2, b2, list(counts)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("chunk", [1, 4, 512])
def test_fused_matches_reference_float64(bias: bool, recompute: bool, approximate: str, chunk: int) -> None:
    x, w1, b1, w2, b2, counts = _operands(torch.float64, bias=bias)
    ins = [t for t in (x, w1, b1, w2, b2) if t is not None]
    gy = torch.randn(x.shape[0], w2.shape[2], dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    ref = _reference(x, w1, b1, w2, b2, counts, approximate)
    g_ref = torch.autograd.grad(ref, ins, gy)
    out = fused_gelu_ffn(x, (w1, b1, w2, b2), counts, chunk=chunk, approximate=approximate, recompute=recompute)
    g_out = torch.autograd.grad(out, ins, gy)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-13)
    for a, b in zip(g_out, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12)
    assert float(out.detach()[sum(counts) :].abs().max()) == 0.0  # the tail is not computed
    gw1, gw2 = g_out[1], g_out[3 if bias else 2]
    assert float(gw1[1].abs().max()) == 0.0 and float(gw2[1].abs().max()) == 0.0  # expert 1 is empty


@pytest.mark.parametrize("recompute", [False, True])
def test_fused_gradcheck(recompute: bool) -> None:
    x, w1, b1, w2, b2, counts = _operands(torch.float64, counts=(3, 0, 2), tail=2, C=3, Fh=4)

    def f(x, w1, b1, w2, b2):
        return fused_gelu_ffn(x, (w1, b1, w2, b2), counts, chunk=2, recompute=recompute)

    assert torch.autograd.gradcheck(f, (x, w1, b1, w2, b2))


def test_fused_float32_and_no_grad() -> None:
    x, w1, b1, w2, b2, counts = _operands(torch.float32, C=16, Fh=48)
    ref = _reference(x, w1, b1, w2, b2, counts)
    with torch.no_grad():
        out = fused_gelu_ffn(x, (w1, b1, w2, b2), counts, chunk=3)
    assert not out.requires_grad
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_fused_bfloat16_autocast_follows_the_matmul_policy() -> None:
    x, w1, b1, w2, b2, counts = _operands(torch.float32, C=16, Fh=32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fused_gelu_ffn(x, (w1, b1, w2, b2), counts)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert w1.grad is not None and w1.grad.dtype == torch.float32
    ref = _reference(x, w1, b1, w2, b2, counts)
    torch.testing.assert_close(out.float(), ref, rtol=3e-2, atol=3e-2)


def test_fused_rejects_bad_arguments() -> None:
    x, w1, b1, w2, b2, counts = _operands(torch.float64)
    with pytest.raises(ValueError, match="chunk"):
        fused_gelu_ffn(x, (w1, b1, w2, b2), counts, chunk=0)
    with pytest.raises(ValueError, match="approximate"):
        fused_gelu_ffn(x, (w1, b1, w2, b2), counts, approximate="sigmoid")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="counts"):
        fused_gelu_ffn(x, (w1, b1, w2, b2), counts[:-1])
    with pytest.raises(ValueError, match="fused"):
        GroupedExperts(4, 8, 16, activation="swiglu", impl="fused")


def _layer_pair(dtype, **kw):
    torch.manual_seed(0)
    fast = MHMoE(D, 6, top_k=2, num_heads=4, expert_hidden=16, expert_impl="fused", **kw).to(dtype)
    slow = MHMoE(D, 6, top_k=2, num_heads=4, expert_hidden=16, expert_impl="per_expert", **kw).to(dtype)
    with torch.no_grad():
        fast.router.weight.normal_(0, 1.0)
    slow.load_state_dict(fast.state_dict())
    return fast, slow


def _step(layer, x, pad):
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    out = layer(x, pad)
    w = torch.linspace(-1, 1, out.output.numel(), dtype=x.dtype).view_as(out.output)
    ((out.output * w).sum() + 10 * out.aux_loss).backward()
    missing = [n for n, p in layer.named_parameters() if p.grad is None]
    assert not missing, missing
    return out.output, x.grad, {n: p.grad for n, p in layer.named_parameters()}


@pytest.mark.parametrize("kw", [{}, {"expert_checkpoint_rows": 7}, {"capacity_factor": 0.5}, {"expert_bias": False}])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_layer_matches_per_expert_with_gates_and_padding(kw: dict, dtype: torch.dtype) -> None:
    fast, slow = _layer_pair(dtype, **kw)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 7, D, generator=g, dtype=dtype)
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[1, 5:] = True
    o_f, gx_f, g_f = _step(fast, x, pad)
    o_s, gx_s, g_s = _step(slow, x, pad)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(o_f, o_s, **tol)
    torch.testing.assert_close(gx_f, gx_s, **tol)
    for n in g_s:
        torch.testing.assert_close(g_f[n], g_s[n], **tol, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("empty", ["one_expert", "all_padding"])
def test_fused_empty_experts_stay_in_the_graph(empty: str) -> None:
    torch.manual_seed(0)
    layer = MHMoE(D, 4, top_k=2, num_heads=4, expert_hidden=16, balance_bias_rate=1e-3, expert_impl="fused")
    x = torch.randn(2, 6, D)
    pad = None
    if empty == "one_expert":
        with torch.no_grad():
            layer.routing_bias[-1] = -10.0
    else:
        pad = torch.ones(2, 6, dtype=torch.bool)
    out = layer(x, padding_mask=pad)
    (out.output.square().sum() + out.aux_loss).backward()
    grads = {n: p.grad for n, p in layer.experts.named_parameters()}
    assert all(g is not None for g in grads.values())
    assert float(grads["w1"][-1].abs().max()) == 0.0 and float(grads["b1"][-1].abs().max()) == 0.0
    if empty == "all_padding":
        assert all(float(g.abs().max()) == 0.0 for g in grads.values())


def test_tanh_gelu_option_reaches_every_path() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 5, D, dtype=torch.float64)
    outs = {}
    for impl in ("fused", "segments", "per_expert"):
        torch.manual_seed(0)
        layer = MHMoE(D, 4, num_heads=4, expert_hidden=16, expert_impl=impl, expert_gelu_approximate="tanh")
        outs[impl] = layer.double()(x).output
    torch.manual_seed(0)
    erf = MHMoE(D, 4, num_heads=4, expert_hidden=16, expert_impl="fused").double()(x).output
    torch.testing.assert_close(outs["fused"], outs["per_expert"], rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(outs["segments"], outs["per_expert"], rtol=1e-12, atol=1e-13)
    assert not torch.equal(outs["fused"], erf)
    with pytest.raises(ValueError, match="gelu_approximate"):
        MHMoE(D, 4, expert_gelu_approximate="sigmoid")  # type: ignore[arg-type]


def test_auto_picks_fused_on_cpu_for_plain_gelu_only() -> None:
    x = torch.zeros(4, 8)
    assert GroupedExperts(4, 8, 16).use_fused(x)
    assert not GroupedExperts(4, 8, 16, activation="swiglu").use_fused(x)
    assert not GroupedExperts(4, 8, 16, inner_norm=True).use_fused(x)
    assert not GroupedExperts(4, 8, 16, impl="grouped_mm").use_fused(x)


@pytest.mark.parametrize("cap, ok", [((8, 0), False), ((9, 0), True), ((10, 0), False), ((12, 1), False)])
def test_grouped_mm_on_cuda_only_for_compute_capability_9(monkeypatch, cap: tuple[int, int], ok: bool) -> None:
    """Blackwell (10.x+) is refused until _grouped_mm's empty-expert weight gradient is reliable there."""
    from mmoe.moe import experts

    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("no torch._grouped_mm")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cap)
    assert experts.grouped_mm_supported(torch.bfloat16, torch.device("cuda", 0), (16, 32)) is ok
    assert not experts.grouped_mm_supported(torch.float32, torch.device("cuda", 0), (16, 32))


def test_layer_under_bf16_autocast_on_the_fused_path() -> None:
    torch.manual_seed(0)
    layer = MHMoE(D, 4, num_heads=4, expert_hidden=16)
    x = torch.randn(2, 5, D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    ref = layer(x).output
    torch.testing.assert_close(out.output.float(), ref, rtol=5e-2, atol=5e-2)
    out.output.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in layer.experts.parameters())
