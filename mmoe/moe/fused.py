"""A fused GELU expert FFN over an expert-sorted buffer: one autograd node, cache-sized row blocks.

Dimension legend: A assignments (rows of the sorted buffer), C expert input width (= d/h),
F expert hidden width, E experts.

Why: at equal FLOPs an MH-MoE layer has h times the hidden activations of a dense FFN ([MH1] sec. 3:
each token's h sub-tokens each reach k experts of width F), so the ``(A, F)`` tensors dominate both
the time spent outside the GEMMs and the activation memory. Composed from autograd ops, an expert FFN
writes and reads ``x W1 + b1``, ``GELU(.)`` and their gradients as whole ``(A, F)`` buffers, and keeps
two of them alive until backward. Here, as in SonicMoE's design (Guo et al., 2025: store only what
the backward cannot cheaply recompute), the forward keeps only the pre-activation ``x W1 + b1`` (or
nothing of width F with ``recompute=True``), GELU is recomputed in backward, and every step runs on
blocks of at most ``chunk`` rows of one expert, so each ``(chunk, F)`` intermediate is produced and
consumed while it is still in the last-level cache, never as a whole ``(A, F)`` buffer. Biases ride in
``addmm`` (no ones column, no gathered bias rows) and the weight gradients are accumulated in place
into their ``(E, ...)`` buffers (``addmm_`` on a view, no per-expert copies and no final stack).

The row loop needs the per-expert counts on the host (one sync, free on CPU). An expert with no row
still gets its (zero) gradients, so every expert parameter stays in the autograd graph (plain DDP).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["fused_gelu_ffn", "GeluApprox"]

GeluApprox = Literal["none", "tanh"]


def _blocks(counts: list[int], chunk: int) -> list[tuple[int, int, int, bool]]:
    """``(expert, start, end, first_block_of_expert)`` over the kept rows, ``chunk`` rows at most."""
    out = []
    start = 0
    for e, c in enumerate(counts):
        for a in range(start, start + c, chunk):
            out.append((e, a, min(start + c, a + chunk), a == start))
        start += c
    return out


class _FusedGeluFFN(torch.autograd.Function):
    """``y[a] = GELU(x[a] W1[e] + b1[e]) W2[e] + b2[e]`` for the rows ``a`` of expert ``e``; tail rows 0."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        x_AC: Tensor,
        w1: Tensor,
        b1: Tensor | None,
        w2: Tensor,
        b2: Tensor | None,
        counts: list[int],
        options: tuple[int, str, bool, bool],
    ) -> Tensor:
        chunk, approximate, recompute, save = options  # block rows, GELU form, recompute, any input needs grad
        A = x_AC.shape[0]
        n = sum(counts)
        x_AC = x_AC.contiguous()
        y_AC = x_AC.new_empty(A, w2.shape[2])
        y_AC[n:].zero_()
        store = save and not recompute
        h_AF = x_AC.new_empty(n, w1.shape[2]) if store else None
        for e, a, b, _ in _blocks(counts, chunk):
            xb = x_AC[a:b]
            if b1 is not None:
                hb = torch.addmm(b1[e], xb, w1[e], out=h_AF[a:b]) if store else torch.addmm(b1[e], xb, w1[e])
            else:
                hb = torch.mm(xb, w1[e], out=h_AF[a:b]) if store else torch.mm(xb, w1[e])
            ab = F.gelu(hb, approximate=approximate)
            if b2 is not None:
                torch.addmm(b2[e], ab, w2[e], out=y_AC[a:b])
            else:
                torch.mm(ab, w2[e], out=y_AC[a:b])
        ctx.counts, ctx.chunk, ctx.approximate = counts, chunk, approximate
        ctx.has_b1, ctx.has_b2 = b1 is not None, b2 is not None
        ctx.save_for_backward(x_AC, w1, b1, w2, h_AF)
        return y_AC

    @staticmethod
    @once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, gy_AC: Tensor) -> tuple[Tensor | None, ...]:
        x_AC, w1, b1, w2, h_AF = ctx.saved_tensors
        need_x, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad[:5]
        gy_AC = gy_AC.contiguous()
        n = sum(ctx.counts)
        gx = None
        if need_x:
            gx = torch.empty_like(x_AC)
            gx[n:].zero_()
        # Every expert's first block writes its gradients with ``out=`` and later blocks accumulate in place;
        # only experts without rows are zero-filled (they still get a gradient: DDP needs every parameter).
        gw1 = torch.empty_like(w1) if need_w1 else None
        gw2 = torch.empty_like(w2) if need_w2 else None
        gb1 = w1.new_empty(w1.shape[0], w1.shape[2]) if need_b1 else None
        gb2 = w2.new_empty(w2.shape[0], w2.shape[2]) if need_b2 else None
        for e, c in enumerate(ctx.counts):
            if c == 0:
                for g in (gw1, gw2, gb1, gb2):
                    if g is not None:
                        g[e].zero_()
        ones = x_AC.new_ones(min(ctx.chunk, max(ctx.counts, default=0)))
        for e, a, b, first in _blocks(ctx.counts, ctx.chunk):
            xb, gyb, ones_b = x_AC[a:b], gy_AC[a:b], ones[: b - a]
            if h_AF is not None:
                hb = h_AF[a:b]
            elif b1 is not None:
                hb = torch.addmm(b1[e], xb, w1[e])
            else:
                hb = xb @ w1[e]
            if gw2 is not None:
                ab = F.gelu(hb, approximate=ctx.approximate)
                if first:
                    torch.mm(ab.t(), gyb, out=gw2[e])
                else:
                    gw2[e].addmm_(ab.t(), gyb)
                del ab
            if gb2 is not None:  # bias gradients as GEMVs with a ones vector: one pass, no temporary
                if first:
                    torch.mv(gyb.t(), ones_b, out=gb2[e])
                else:
                    gb2[e].addmv_(gyb.t(), ones_b)
            gh = torch.ops.aten.gelu_backward(gyb @ w2[e].t(), hb, approximate=ctx.approximate)
            if gw1 is not None:
                if first:
                    torch.mm(xb.t(), gh, out=gw1[e])
                else:
                    gw1[e].addmm_(xb.t(), gh)
            if gb1 is not None:
                if first:
                    torch.mv(gh.t(), ones_b, out=gb1[e])
                else:
                    gb1[e].addmv_(gh.t(), ones_b)
            if gx is not None:
                torch.mm(gh, w1[e].t(), out=gx[a:b])
        return gx, gw1, gb1, gw2, gb2, None, None


def fused_gelu_ffn(
    x_AC: Tensor,
    weights: tuple[Tensor, Tensor | None, Tensor, Tensor | None],
    counts: list[int],
    *,
    chunk: int = 512,
    approximate: GeluApprox = "none",
    recompute: bool = False,
) -> Tensor:
    """GELU expert FFN over sorted rows (``counts[e]`` rows of expert ``e``, then a zero tail).

    Args:
        x_AC: (A, C) expert-sorted inputs; rows past ``sum(counts)`` are not computed (output 0).
        weights: ``(w1, b1, w2, b2)`` of shapes ``(E, C, F)``, ``(E, F)`` or None, ``(E, F, C)``, ``(E, C)`` or None.
        counts: rows per expert, on the host.
        chunk: rows per block: each ``(chunk, F)`` intermediate lives only within its block (3 MiB at
            512 x 1536 fp32); larger blocks give the GEMMs more rows to split over threads but raise peak memory.
        approximate: ``"none"`` (erf GELU) or ``"tanh"``.
        recompute: keep no ``(A, F)`` tensor for backward; recompute ``x W1 + b1`` there (one more
            GEMM of the three forward-equivalent ones per block, activation memory of the inputs only).
    """
    w1, b1, w2, b2 = weights
    if chunk < 1:
        raise ValueError(f"fused_gelu_ffn: chunk={chunk}; expected >= 1")
    if approximate not in ("none", "tanh"):
        raise ValueError(f"fused_gelu_ffn: approximate={approximate!r}; expected 'none' or 'tanh'")
    if sum(counts) > x_AC.shape[0] or len(counts) != w1.shape[0]:
        raise ValueError(
            f"fused_gelu_ffn: counts sum to {sum(counts)} over {len(counts)} experts; x has {x_AC.shape[0]} rows "
            f"and w1 {w1.shape[0]} experts"
        )
    device_type = x_AC.device.type
    if torch.is_autocast_enabled(device_type):
        # Autocast's policy for matmuls (lower precision), applied once here; inside, no op is re-cast.
        low = torch.get_autocast_dtype(device_type)
        x_AC, w1, w2 = x_AC.to(low), w1.to(low), w2.to(low)
        b1 = b1.to(low) if b1 is not None else None
        b2 = b2.to(low) if b2 is not None else None
        with torch.autocast(device_type, enabled=False):
            return fused_gelu_ffn(
                x_AC, (w1, b1, w2, b2), counts, chunk=chunk, approximate=approximate, recompute=recompute
            )
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x_AC, w1, b1, w2, b2))
    return _FusedGeluFFN.apply(x_AC, w1, b1, w2, b2, counts, (chunk, approximate, recompute, save))
