"""Stacked expert FFNs with grouped compute over an expert-sorted token buffer.

Dimension legend: A assignments (rows of the sorted buffer), C expert input width (= d/h),
F expert hidden width, E experts, S sub-tokens, K top-k.

Experts are FFNs ``C -> F -> C`` ([MH1] sec. 3): GELU with two matrices (the
torchscale/official MH-MoE expert, with biases) or SwiGLU with three ([MH2], no biases).
Weights are stacked ``(E, ...)`` so that all experts run as one grouped matmul:

- ``torch._grouped_mm`` (2-D x 3-D with ``offs``) where the dtype and strides allow it
  (float32/bfloat16 on CPU, bfloat16 on CUDA sm90+; rows and widths 16-byte aligned);
- otherwise one matmul per expert segment of the sorted buffer (one host sync for the counts);
  this also serves float64, which ``_grouped_mm`` rejects.

``forward_per_expert`` is the classic masked per-expert loop, independent of the sorted plan; it
is the slow reference of the tests and the "per-expert loop" baseline of ``tools/bench_moe.py``.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from mmoe.moe.dispatch import DispatchPlan
from mmoe.moe.fused import GeluApprox, fused_gelu_ffn

__all__ = ["GroupedExperts", "grouped_mm_supported"]

ExpertImpl = Literal["auto", "fused", "grouped_mm", "segments"]

# CUDA compute capabilities on which ``torch._grouped_mm`` is trusted: Hopper (9.x). On 10.x (Blackwell) its
# weight gradient of an expert that receives no row is not reliably zero, and a wrong gradient of an empty
# expert is silent; the layer takes the per-segment path there until that is fixed upstream.
_GROUPED_MM_CUDA_CAPABILITY = ((9, 0), (10, 0))  # [min, max)


def grouped_mm_supported(dtype: torch.dtype, device: torch.device, widths: tuple[int, ...]) -> bool:
    """Whether ``torch._grouped_mm`` can run these operands (dtype, device, 16-byte aligned rows).

    On CUDA only compute capability 9.x qualifies (see ``_GROUPED_MM_CUDA_CAPABILITY``).
    """
    if not hasattr(torch, "_grouped_mm"):
        return False
    itemsize = torch.empty((), dtype=dtype).element_size()
    if any((w * itemsize) % 16 for w in widths):
        return False
    if device.type == "cpu":
        return dtype in (torch.float32, torch.bfloat16)
    if device.type == "cuda":
        lo, hi = _GROUPED_MM_CUDA_CAPABILITY
        return dtype == torch.bfloat16 and lo <= torch.cuda.get_device_capability(device) < hi
    return False


class _ScaleGrad(torch.autograd.Function):
    """Identity forwards; multiplies the gradient by ``scale`` backwards."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.scale, None


class GroupedExperts(nn.Module):
    """E expert FFNs with stacked weights ``w1 (E, C, F)``, ``w2 (E, F, C)`` (+ ``w3`` for SwiGLU).

    Args:
        num_experts: E.
        dim: C, the sub-token width d/h.
        hidden: F, the expert hidden width.
        activation: ``"gelu"`` (two matrices) or ``"swiglu"`` (three; ``silu(x w1) * (x w3) w2``).
        bias: biases on the expert matrices (default: True for GELU as in torchscale's FFN experts,
            False for SwiGLU).
        inner_norm: a LayerNorm over F inside each expert (BEiT-3/Magneto sub-LN,
            ``fc2(LN(act(fc1 x)))``), needed to upcycle the dense Sub-LN FFN of BEiT-3 checkpoints.
        impl: ``"fused"`` (:func:`mmoe.moe.fused.fused_gelu_ffn`: one autograd node over cache-sized row
            blocks, only the pre-activation kept; GELU without ``inner_norm``), ``"grouped_mm"``,
            ``"segments"`` (one autograd-composed FFN per expert segment), or ``"auto"``: ``fused`` on CPU
            where it applies (measured faster and leaner than ``grouped_mm``, docs/results/moe_cpu.md),
            else ``grouped_mm`` when supported, else ``segments``.
        checkpoint_rows: > 0 recomputes in backward what the forward would keep. On the ``fused`` path the
            pre-activation is recomputed block by block (any value > 0; activation memory of the inputs
            only, one more GEMM); on the others the experts run under activation checkpointing in chunks of
            this many sorted rows (per expert segment on ``segments``), one more expert forward.
        gelu_approximate: ``"none"`` (erf GELU, torchscale's and BEiT-3's) or ``"tanh"`` (the approximation
            several MoE codebases use); GELU experts only.
    """

    def __init__(
        self,
        num_experts: int,
        dim: int,
        hidden: int,
        *,
        activation: Literal["gelu", "swiglu"] = "gelu",
        bias: bool | None = None,
        inner_norm: bool = False,
        norm_eps: float = 1e-5,
        impl: ExpertImpl = "auto",
        checkpoint_rows: int = 0,
        gelu_approximate: GeluApprox = "none",
    ) -> None:
        super().__init__()
        if activation not in ("gelu", "swiglu"):
            raise ValueError(f"GroupedExperts: activation={activation!r}; expected 'gelu' or 'swiglu'")
        if impl not in ("auto", "fused", "grouped_mm", "segments"):
            raise ValueError(f"GroupedExperts: impl={impl!r}; expected 'auto', 'fused', 'grouped_mm' or 'segments'")
        if impl == "fused" and (activation != "gelu" or inner_norm):
            raise ValueError(
                f"GroupedExperts: impl='fused' runs GELU experts without inner_norm; got activation={activation!r}, "
                f"inner_norm={inner_norm}"
            )
        if gelu_approximate not in ("none", "tanh"):
            raise ValueError(f"GroupedExperts: gelu_approximate={gelu_approximate!r}; expected 'none' or 'tanh'")
        if num_experts < 1 or dim < 1 or hidden < 1:
            raise ValueError(
                f"GroupedExperts: num_experts={num_experts}, dim={dim}, hidden={hidden}; expected all >= 1"
            )
        self.num_experts = num_experts
        self.dim = dim
        self.hidden = hidden
        self.activation = activation
        self.impl = impl
        self.norm_eps = norm_eps
        self.checkpoint_rows = checkpoint_rows
        self.gelu_approximate = gelu_approximate
        # Rows per block of the fused path (docs/results/moe_cpu.md, d 768, F 1536, 8192 tokens): 2048 rows ran
        # 1.15x faster than 512 with 2 threads (equal with 1), but raised the step's peak resident memory from
        # 873 to 1151 MB (603 to 1116 MB with recompute), losing the memory the fused path exists to save; 512 it is.
        self.fused_chunk = 512
        # Multiplies the expert weights' gradients (expert parallelism: 1/world to match DDP's mean).
        self.grad_scale = 1.0
        use_bias = (activation == "gelu") if bias is None else bias
        E, C, Fh = num_experts, dim, hidden
        self.w1 = nn.Parameter(torch.empty(E, C, Fh))
        self.w2 = nn.Parameter(torch.empty(E, Fh, C))
        self.w3 = nn.Parameter(torch.empty(E, C, Fh)) if activation == "swiglu" else None
        self.b1 = nn.Parameter(torch.empty(E, Fh)) if use_bias else None
        self.b2 = nn.Parameter(torch.empty(E, C)) if use_bias else None
        self.b3 = nn.Parameter(torch.empty(E, Fh)) if use_bias and activation == "swiglu" else None
        self.norm_weight = nn.Parameter(torch.empty(E, Fh)) if inner_norm else None
        self.norm_bias = nn.Parameter(torch.empty(E, Fh)) if inner_norm else None
        self.reset_parameters()

    @property
    def has_bias(self) -> bool:
        return self.b1 is not None

    @property
    def inner_norm(self) -> bool:
        return self.norm_weight is not None

    def reset_parameters(self) -> None:
        # trunc-normal(0.02) as every Linear of BEiT-3 ([B3] released code); biases and sub-LN at identity.
        for w in (self.w1, self.w2, self.w3):
            if w is not None:
                nn.init.trunc_normal_(w, std=0.02)
        for b in (self.b1, self.b2, self.b3, self.norm_bias):
            if b is not None:
                nn.init.zeros_(b)
        if self.norm_weight is not None:
            nn.init.ones_(self.norm_weight)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, dim={self.dim}, hidden={self.hidden}, activation={self.activation}, "
            f"bias={self.has_bias}, inner_norm={self.inner_norm}, impl={self.impl}"
            + (f", gelu_approximate={self.gelu_approximate}" if self.gelu_approximate != "none" else "")
        )

    # ------------------------------------------------------------------ helpers
    def use_fused(self, x: Tensor) -> bool:
        """Whether the fused block path runs: asked for, or ``auto`` on CPU for plain GELU experts."""
        if self.impl == "fused":
            return True
        return self.impl == "auto" and x.device.type == "cpu" and self.activation == "gelu" and not self.inner_norm

    def use_grouped_mm(self, x: Tensor) -> bool:
        if self.impl in ("segments", "fused"):
            return False
        ok = grouped_mm_supported(x.dtype, x.device, (self.dim, self.hidden))
        if self.impl == "grouped_mm" and not ok:
            raise RuntimeError(
                f"GroupedExperts(impl='grouped_mm'): torch._grouped_mm cannot run dtype={x.dtype} on {x.device} "
                f"with dim={self.dim}, hidden={self.hidden} (needs float32/bfloat16, 16-byte aligned widths)"
            )
        return ok

    def _act(self, h1: Tensor, h3: Tensor | None) -> Tensor:
        if self.activation == "gelu":
            return F.gelu(h1, approximate=self.gelu_approximate)
        return F.silu(h1) * h3

    # ------------------------------------------------------------------ fast paths
    def forward(self, x_AC: Tensor, plan: DispatchPlan) -> Tensor:
        """Expert outputs for the expert-sorted buffer ``x_AC``; rows past the kept ones are zero.

        With ``checkpoint_rows > 0`` and autograd on, the buffer runs in chunks of that many rows under
        activation checkpointing: the (A, F) hidden activations, h times larger than a dense FFN's at
        equal FLOPs (each token's h sub-tokens each reach k experts of width F), are then never all
        alive at once. It costs one more forward of the experts.
        """
        if self.use_fused(x_AC):
            dtype = x_AC.dtype
            b1 = self._param(self.b1, dtype) if self.b1 is not None else None
            b2 = self._param(self.b2, dtype) if self.b2 is not None else None
            return fused_gelu_ffn(
                x_AC,
                (self._param(self.w1, dtype), b1, self._param(self.w2, dtype), b2),
                plan.counts_E.tolist(),  # the one host sync of this path
                chunk=self.fused_chunk,
                approximate=self.gelu_approximate,
                recompute=self.checkpoint_rows > 0,
            )
        if self.use_grouped_mm(x_AC):
            offs = plan.offsets_E
            A = x_AC.shape[0]
            chunk = self.checkpoint_rows
            if chunk <= 0 or not torch.is_grad_enabled() or A <= chunk:
                return self._grouped_rows(x_AC, plan.expert_index_A, offs, 0, plan.has_tail)
            outs = []
            for a in range(0, A, chunk):
                b = min(A, a + chunk)
                offs_c = (offs.to(torch.int64) - a).clamp(0, b - a).to(torch.int32)
                outs.append(
                    checkpoint(
                        self._grouped_rows,
                        x_AC[a:b],
                        plan.expert_index_A[a:b],
                        offs_c,
                        a,
                        True,  # a chunk may end before its last row is computed
                        use_reentrant=False,
                    )
                )
            return torch.cat(outs, 0)
        return self._forward_segments(x_AC, plan)

    def _param(self, p: Tensor, dtype: torch.dtype) -> Tensor:
        """A parameter in the compute dtype; with ``grad_scale != 1`` its gradient is scaled (expert parallel)."""
        if self.grad_scale != 1.0:
            p = _ScaleGrad.apply(p, self.grad_scale)
        return p.to(dtype)

    def _fold_bias(self, w: Tensor, b: Tensor | None, dtype: torch.dtype, pad: int) -> Tensor:
        """``[w; b; 0...]`` (E, C + pad, F): the bias rides in the matmul on a ones column of the input."""
        w = self._param(w, dtype)
        if b is None:
            return w
        b = self._param(b, dtype)
        return torch.cat([w, b[:, None, :], w.new_zeros(w.shape[0], pad - 1, w.shape[2])], dim=1)

    def _grouped_rows(self, x_AC: Tensor, expert_A: Tensor, offs: Tensor, row0: int, has_tail: bool) -> Tensor:
        """The grouped FFN over rows whose experts are sorted, ``offs`` being their segment ends."""
        dtype = x_AC.dtype
        A = x_AC.shape[0]
        if has_tail:
            # _grouped_mm leaves rows past offs[-1] uninitialised in its outputs and in the input
            # gradients; mask every operand and result of it with where (not a multiply: the garbage
            # may be NaN) so the sentinel tail is exactly zero forwards and backwards.
            row_ok_A1 = (torch.arange(A, device=x_AC.device) < offs[-1].to(torch.int64))[:, None]

            def gmm(a: Tensor, w: Tensor) -> Tensor:
                a = torch.where(row_ok_A1, a, torch.zeros_like(a))
                out = torch._grouped_mm(a, w, offs=offs)
                return torch.where(row_ok_A1, out, torch.zeros_like(out))

        else:

            def gmm(a: Tensor, w: Tensor) -> Tensor:
                return torch._grouped_mm(a, w, offs=offs)

        x_in = x_AC
        pad = 16 // x_AC.element_size()
        if self.b1 is not None:  # a ones column (padded to 16 bytes) carries b1/b3 through the matmul
            extra = x_AC.new_zeros(A, pad)
            extra[:, 0] = 1
            x_in = torch.cat([x_AC, extra], dim=1)
        h1 = gmm(x_in, self._fold_bias(self.w1, self.b1, dtype, pad))
        h3 = gmm(x_in, self._fold_bias(self.w3, self.b3, dtype, pad)) if self.w3 is not None else None
        h = self._act(h1, h3)
        idx_A = expert_A.clamp(max=self.num_experts - 1)
        if self.norm_weight is not None:
            h = F.layer_norm(h, (self.hidden,), eps=self.norm_eps)
            nw, nb = self._param(self.norm_weight, dtype), self._param(self.norm_bias, dtype)
            h = h * nw.index_select(0, idx_A) + nb.index_select(0, idx_A)
        y = gmm(h, self._param(self.w2, dtype))
        if self.b2 is not None:
            y = y + self._param(self.b2, dtype).index_select(0, idx_A)
            if has_tail:
                y = torch.where(row_ok_A1, y, torch.zeros_like(y))
        return y

    def expert_ffn(self, e: int, x_TC: Tensor) -> Tensor:
        """Expert ``e`` applied to rows ``x_TC`` (the plain two/three-matrix FFN)."""
        dtype = x_TC.dtype

        def p(t: Tensor) -> Tensor:
            return self._param(t[e], dtype)

        h1 = x_TC @ p(self.w1)
        if self.b1 is not None:
            h1 = h1 + p(self.b1)
        h3 = None
        if self.w3 is not None:
            h3 = x_TC @ p(self.w3)
            if self.b3 is not None:
                h3 = h3 + p(self.b3)
        h = self._act(h1, h3)
        if self.norm_weight is not None:
            h = F.layer_norm(h, (self.hidden,), p(self.norm_weight), p(self.norm_bias), self.norm_eps)
        y = h @ p(self.w2)
        if self.b2 is not None:
            y = y + p(self.b2)
        return y

    def _forward_segments(self, x_AC: Tensor, plan: DispatchPlan) -> Tensor:
        """One matmul chain per expert segment of the sorted buffer.

        An expert whose segment is empty still runs, on its zero rows: no FLOPs, but its weights stay in the
        autograd graph and get a zero gradient. Otherwise a step in which no assignment is kept (all padding)
        would leave the expert tensors without a gradient, which plain DDP refuses as unused parameters.
        """
        counts = plan.counts_E.tolist()  # the one host sync of this path
        n_kept = sum(counts)
        ckpt = self.checkpoint_rows > 0 and torch.is_grad_enabled()
        outs = [
            checkpoint(self.expert_ffn, e, seg, use_reentrant=False)
            if ckpt and seg.shape[0]
            else self.expert_ffn(e, seg)
            for e, seg in enumerate(torch.split(x_AC[:n_kept], counts))
        ]
        tail = x_AC.shape[0] - n_kept
        if tail:
            outs.append(x_AC.new_zeros(tail, self.dim))
        return torch.cat(outs, 0)

    # ------------------------------------------------------------------ slow reference
    def forward_per_expert(self, x_SC: Tensor, expert_ids_SK: Tensor, gates_SK: Tensor, kept_SK: Tensor) -> Tensor:
        """Masked per-expert loop (reference/baseline): ``sum_k gate * expert(x)`` over kept choices.

        Experts without a token run on zero rows, so their weights stay in the graph (see ``_forward_segments``).
        """
        out_SC = torch.zeros_like(x_SC)
        for e in range(self.num_experts):
            s_idx, k_idx = torch.nonzero((expert_ids_SK == e) & kept_SK, as_tuple=True)
            y = self.expert_ffn(e, x_SC[s_idx]) * gates_SK[s_idx, k_idx, None].to(x_SC.dtype)
            out_SC = out_SC.index_add(0, s_idx, y)
        return out_SC
