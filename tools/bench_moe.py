"""Benchmark the MH-MoE layer against a dense block of equal FLOPs and two classic MoE baselines.

Times forward+backward side by side for:

- ``mhmoe``: :class:`mmoe.moe.MHMoE` at its defaults (dropless sorted dispatch; on CPU the fused
  expert FFN of :mod:`mmoe.moe.fused`);
- ``dense``: the dense block with the same FLOPs: Linear(d, d), FFN d -> k*F -> d (GELU),
  Linear(d, d) (the two Linears only when h > 1, matching the head/merge layers);
- ``oracle``: the same expert matmuls as one ``baddbmm`` + GELU + ``baddbmm`` over perfectly balanced,
  pre-sorted sub-tokens (the K copies of each sub-token laid out expert-major by a reshape: no router,
  no gather/scatter, no combine beyond summing the K copies), plus the head and merge Linears. It is
  plain BLAS on the layer's shapes and never uses the layer's own kernels;
- ``torchscale``: torchscale's ``MOELayer`` + ``Top2Gate``/``Top1Gate`` (one capacity group per
  batch, capacity 2S/E for top-2, one-hot dispatch/combine matmuls, a Python loop over expert FFNs)
  wrapped as MH-MoE with the layer's head, split and merge: the dispatch the official MH-MoE code runs.
  Skipped with a note where torchscale is not installed, and above ``--torchscale-max-tokens`` (its
  (S, E, 2S/E) tensors grow quadratically: ~8.6 GB each at 8192 tokens, h = 4, E = 32);
- ``mhmoe_ckpt`` (opt-in): the layer with ``expert_checkpoint_rows=16384`` (fused path: the
  pre-activation recomputed in backward; other paths: activation checkpointing in chunks);
- ``mhmoe_grouped`` / ``mhmoe_tanh`` (opt-in): the layer on its ``torch._grouped_mm`` path (the
  previous CPU default), or with tanh-approximate GELU experts;
- ``per_expert``: the same layer with the masked per-expert Python loop (HF Mixtral style);
- ``einsum``: a GShard/torchscale-style capacity dispatch (one-hot ``(S, E, C)`` combine tensor,
  ``einsum`` dispatch/combine, capacity factor 1, top-k with first choices first), over groups of
  ``--einsum-group`` sub-tokens. torchscale's ``MOELayer`` uses a single group per local batch; at
  8192 tokens and h = 4 its ``(S, E, C)`` tensors would take ~8.6 GB each, so we group.

Sizes (docs/results/moe_cpu.md): d = 768, tokens in {2048, 8192}, h in {1, 2, 4}, E in {8, 32}, k in {1, 2}, k*F = 4d.
Every (size, method) runs in its own subprocess so its peak memory can be read from the kernel:
``peak_mb`` is the rise of the resident set high-water mark (VmHWM) over the resident set after
building the module and inputs, i.e. activations + gradients + workspaces of one forward+backward.

Usage::

    python tools/bench_moe.py --out docs/results/moe_cpu.json           # the full grid (CPU: ~30 min)
    python tools/bench_moe.py --quick                                   # a small grid (~1-2 min)
    python tools/bench_moe.py --device cuda --dtype bfloat16 --tokens 16384 32768

Each (size, method) is timed ``--iters`` times after one warm-up, in ``--rounds`` rounds that cycle through
the methods (so slow drifts of the machine's load hit every method alike); the reported time is the
minimum over all timed steps, with the spread (max / min - 1) next to it. ``--interleave`` times all methods
of a size in one process, one step of each in turn (peak memory is still read one process per method): on a
shared machine that keeps the load's drifts out of the ratios. The default methods are mhmoe, dense, oracle,
torchscale and einsum.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmoe.files import atomic_write_json
from mmoe.moe import MHMoE

METHODS = (
    "mhmoe",
    "dense",
    "oracle",
    "torchscale",
    "per_expert",
    "einsum",
    "mhmoe_ckpt",
    "mhmoe_grouped",
    "mhmoe_tanh",
)
DEFAULT_METHODS = ("mhmoe", "dense", "oracle", "torchscale", "einsum")


# ---------------------------------------------------------------------------------------------- baselines
class DenseBlock(nn.Module):
    """Dense FFN with the MH-MoE layer's FLOPs: [Linear(d, d)], d -> k*F -> d, [Linear(d, d)]."""

    def __init__(self, dim: int, hidden: int, head_merge: bool) -> None:
        super().__init__()
        self.head = nn.Linear(dim, dim) if head_merge else nn.Identity()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.merge = nn.Linear(dim, dim) if head_merge else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.merge(self.fc2(F.gelu(self.fc1(self.head(x)))))


class CapacityEinsumMoE(nn.Module):
    """GShard-style MoE: one-hot capacity tensors and einsum dispatch/combine (the classic baseline).

    Uses the routing, experts and head/merge layers of an :class:`MHMoE` (same weights, same FLOPs
    in the experts when nothing overflows) and replaces its sorted dispatch by GShard's
    ``combine[s, e, c]`` tensors: ``dispatched = einsum("sec,sm->ecm")``, batched expert matmuls
    over ``(E, C, m)``, ``out = einsum("sec,ecm->sm")``. Capacity ``C = ceil(k * G / E)`` per group
    of ``G`` sub-tokens (capacity factor 1); first choices fill the buffers before second choices.
    """

    def __init__(self, layer: MHMoE, group: int) -> None:
        super().__init__()
        self.layer = layer
        self.group = group

    def _group(self, x_GC: Tensor) -> Tensor:
        lay, E, K = self.layer, self.layer.num_experts, self.layer.top_k
        G = x_GC.shape[0]
        cap = math.ceil(K * G / E)
        probs = torch.softmax(lay.router(x_GC), -1)
        gates, ids = probs.topk(K, dim=-1)
        combine = x_GC.new_zeros(G, E, cap)
        filled = torch.zeros(E, dtype=torch.long, device=x_GC.device)
        for k in range(K):  # GShard: locations of choice k start after all choices < k
            mask_GE = F.one_hot(ids[:, k], E)
            loc_GE = torch.cumsum(mask_GE, 0) - 1 + filled
            filled = filled + mask_GE.sum(0)
            keep_GE = mask_GE * (loc_GE < cap)
            loc_G = (loc_GE * keep_GE).sum(-1)
            onehot_GC = F.one_hot(loc_G, cap) * keep_GE.sum(-1, keepdim=True)
            combine = combine + (gates[:, k, None, None] * keep_GE[:, :, None] * onehot_GC[:, None, :]).to(x_GC.dtype)
        dispatch = (combine > 0).to(x_GC.dtype)
        x_ECm = torch.einsum("sec,sm->ecm", dispatch, x_GC)
        ex = lay.experts
        h = torch.baddbmm(ex.b1[:, None, :], x_ECm, ex.w1) if ex.b1 is not None else torch.bmm(x_ECm, ex.w1)
        h = F.gelu(h)
        y = torch.baddbmm(ex.b2[:, None, :], h, ex.w2) if ex.b2 is not None else torch.bmm(h, ex.w2)
        return torch.einsum("sec,ecm->sm", combine, y)

    def forward(self, x_BLD: Tensor) -> Tensor:
        lay = self.layer
        B, L, D = x_BLD.shape
        x_SC = lay.split_tokens(lay.head(x_BLD.reshape(B * L, D)))
        y_SC = torch.cat([self._group(g) for g in torch.split(x_SC, self.group)])
        return lay.merge(y_SC.reshape(B * L, D)).reshape(B, L, D)


class BalancedOracle(nn.Module):
    """The layer's expert math at its best case for BLAS: balanced, pre-sorted rows, one ``baddbmm`` each.

    Uses the head, merge and expert weights of an :class:`MHMoE`. The K copies of the S sub-tokens are laid
    out ``(E, K*S/E, C)`` by a reshape (what a perfectly balanced router sorted expert-major would give),
    run through ``baddbmm`` + GELU + ``baddbmm``, and the K outputs of each sub-token are summed. No router,
    no gather/scatter, no gates.
    """

    def __init__(self, layer: MHMoE) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x_BLD: Tensor) -> Tensor:
        lay, E, K = self.layer, self.layer.num_experts, self.layer.top_k
        B, L, D = x_BLD.shape
        x_SC = lay.split_tokens(lay.head(x_BLD.reshape(B * L, D)))
        S, C = x_SC.shape
        if (K * S) % E:
            raise ValueError(f"BalancedOracle: K*S = {K * S} assignments do not split evenly over E = {E}")
        x_EMC = x_SC.unsqueeze(0).expand(K, S, C).reshape(E, K * S // E, C)
        ex = lay.experts
        h = torch.baddbmm(ex.b1[:, None, :], x_EMC, ex.w1) if ex.b1 is not None else torch.bmm(x_EMC, ex.w1)
        y = torch.baddbmm(ex.b2[:, None, :], F.gelu(h), ex.w2) if ex.b2 is not None else torch.bmm(F.gelu(h), ex.w2)
        y_SC = y.reshape(K, S, C).sum(0)
        return lay.merge(y_SC.reshape(B * L, D)).reshape(B, L, D)


def torchscale_available() -> bool:
    try:
        import torchscale.component.xmoe.moe_layer  # noqa: F401
    except ImportError:
        return False
    return True


class _ExpertFFN(nn.Module):
    """One expert as torchscale's MOELayer calls it: rows ``(..., C) -> (..., C)``, GELU, biases."""

    def __init__(self, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(w1.shape[0], w1.shape[1], bias=b1 is not None)
        self.fc2 = nn.Linear(w2.shape[0], w2.shape[1], bias=b2 is not None)
        with torch.no_grad():
            self.fc1.weight.copy_(w1.t())
            self.fc2.weight.copy_(w2.t())
            if b1 is not None:
                self.fc1.bias.copy_(b1)
            if b2 is not None:
                self.fc2.bias.copy_(b2)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class TorchscaleMHMoE(nn.Module):
    """torchscale's ``MOELayer`` (GShard dispatch, one group per batch) inside the MH-MoE head/split/merge.

    The official MH-MoE code runs this dispatch. Its gate is torchscale's ``Top2Gate`` (``Top1Gate`` for
    k = 1) with its defaults (second expert by Gumbel sampling, capacity 2 * ceil(S/E)), the router weight and
    the experts copied from the :class:`MHMoE`. Needs a (single-process) ``torch.distributed`` group.
    """

    def __init__(self, layer: MHMoE) -> None:
        super().__init__()
        import torch.distributed as dist
        from torchscale.component.xmoe.moe_layer import MOELayer
        from torchscale.component.xmoe.routing import Top1Gate, Top2Gate

        if not dist.is_initialized():
            import tempfile

            fd, path = tempfile.mkstemp(prefix="bench_moe_pg_")
            os.close(fd)
            os.unlink(path)
            dist.init_process_group("gloo", init_method=f"file://{path}", rank=0, world_size=1)
        C, E = layer.sub_dim, layer.num_experts
        gate = Top2Gate(C, E) if layer.top_k == 2 else Top1Gate(C, E)
        if layer.top_k not in (1, 2):
            raise ValueError(f"TorchscaleMHMoE: torchscale gates are top-1/top-2; got top_k={layer.top_k}")
        with torch.no_grad():
            gate.wg.weight.copy_(layer.router.weight)
        ex = layer.experts
        experts = nn.ModuleList(
            _ExpertFFN(
                ex.w1[e].detach(),
                None if ex.b1 is None else ex.b1[e].detach(),
                ex.w2[e].detach(),
                None if ex.b2 is None else ex.b2[e].detach(),
            )
            for e in range(E)
        )
        args = argparse.Namespace(moe_expert_count=E, batch_size=1, batch_size_valid=1)
        self.moe = MOELayer(gate, experts, args)
        self.head, self.merge, self.layer = layer.head, layer.merge, layer
        self.sub_dim = C

    def forward(self, x_BLD: Tensor) -> tuple[Tensor, Tensor]:
        B, L, D = x_BLD.shape
        x_SC = self.layer.split_tokens(self.head(x_BLD.reshape(B * L, D)))
        histc = torch.histc
        # torchscale's gates log expert histograms with torch.histc on int64 ids, which CPU torch rejects;
        # the shim casts them to float (logging metadata only; the dispatch is untouched).
        torch.histc = lambda t, *a, **k: histc(t.float() if not t.is_floating_point() else t, *a, **k)  # type: ignore[assignment]
        try:
            y, l_aux = self.moe(x_SC.unsqueeze(0))
        finally:
            torch.histc = histc  # type: ignore[assignment]
        return self.merge(y.reshape(B * L, D)).reshape(B, L, D), l_aux


# ---------------------------------------------------------------------------------------------- worker
def _rss_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def build(method: str, cfg: dict[str, Any], dtype: torch.dtype, device: torch.device) -> nn.Module:
    d, h, E, k = cfg["dim"], cfg["heads"], cfg["experts"], cfg["top_k"]
    F_ = 4 * d // k
    if method == "dense":
        return DenseBlock(d, k * F_, head_merge=h > 1).to(device, dtype)
    layer = MHMoE(
        d,
        E,
        top_k=k,
        num_heads=h,
        expert_hidden=F_,
        head_layers=1 if h > 1 else 0,
        merge_layers=1 if h > 1 else 0,
        expert_impl={"per_expert": "per_expert", "mhmoe_grouped": "grouped_mm"}.get(method, "auto"),
        expert_checkpoint_rows=16384 if method == "mhmoe_ckpt" else 0,
        expert_gelu_approximate="tanh" if method == "mhmoe_tanh" else "none",
    )
    with torch.no_grad():  # a spread-out router, so every expert gets work (as after some training)
        for p in layer.router.parameters():
            p.normal_(0, 1.0 / math.sqrt(p.shape[-1]))
    layer = layer.to(device, dtype)
    if method == "einsum":
        return CapacityEinsumMoE(layer, cfg["einsum_group"])
    if method == "oracle":
        return BalancedOracle(layer)
    if method == "torchscale":
        return TorchscaleMHMoE(layer)
    return layer


def _make_step(model: nn.Module, x: Tensor, g: Tensor) -> Any:
    def step() -> None:
        out = model(x)
        aux = None
        if isinstance(out, tuple):  # torchscale: (output, l_aux)
            out, aux = out
        elif hasattr(out, "output"):
            out, aux = out.output, out.aux_loss
        loss = (out * g).sum()
        if aux is not None:
            loss = loss + 0.01 * aux
        loss.backward()
        model.zero_grad(set_to_none=True)
        x.grad = None

    return step


def _timed(step: Any, cuda: bool) -> float:
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    step()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def _result(job: dict[str, Any], times: list[float], peak: float | None) -> dict[str, Any]:
    times = sorted(times)
    out: dict[str, Any] = {**job, "peak_mb": peak, "all_times_s": times}
    if times:
        out.update(time_s=times[0], spread=times[-1] / times[0] - 1.0, tokens_per_s=job["cfg"]["tokens"] / times[0])
    return out


def run_worker(job: dict[str, Any]) -> dict[str, Any] | list[dict[str, Any]]:
    """One (size, method): peak memory of one step, then ``iters`` timed steps.

    With ``job["methods"]`` (interleaved mode) all those methods are built in this one process and timed in
    turn, one step each per cycle, so that the load of a shared machine hits them alike; no memory is read
    (the driver measures it in separate single-method processes with ``iters = 0``).
    """
    torch.manual_seed(0)
    device = torch.device(job["device"])
    dtype = getattr(torch, job["dtype"])
    cfg = job["cfg"]
    cuda = device.type == "cuda"
    x = torch.randn(1, cfg["tokens"], cfg["dim"], device=device, dtype=dtype, requires_grad=True)
    g = torch.randn_like(x)
    if job.get("methods"):
        steps = {}
        for m in job["methods"]:
            torch.manual_seed(0)
            steps[m] = _make_step(build(m, cfg, dtype, device), x, g)
            steps[m]()  # warm-up
        times: dict[str, list[float]] = {m: [] for m in steps}
        for _ in range(job["iters"]):
            for m, step in steps.items():
                times[m].append(_timed(step, cuda))
        base = {k: v for k, v in job.items() if k != "methods"}
        return [_result({**base, "method": m}, t, None) for m, t in times.items()]
    step = _make_step(build(job["method"], cfg, dtype, device), x, g)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_mb = torch.cuda.memory_allocated() / 2**20
    else:
        base_mb = _rss_mb("VmRSS")
    step()  # warm-up, also the memory measurement
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20 - base_mb
    else:
        peak = _rss_mb("VmHWM") - base_mb
    return _result(job, [_timed(step, cuda) for _ in range(job["iters"])], peak)


# ---------------------------------------------------------------------------------------------- driver
def grid(a: argparse.Namespace) -> list[dict[str, Any]]:
    cfgs = []
    for n, h, E, k in itertools.product(a.tokens, a.heads, a.experts, a.top_k):
        cfgs.append(dict(dim=a.dim, tokens=n, heads=h, experts=E, top_k=k, einsum_group=a.einsum_group))
    return cfgs


def run_job(job: dict[str, Any], timeout: float) -> Any:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(job)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ})
    except subprocess.TimeoutExpired:
        return {**job, "error": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0:
        return {**job, "error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


LABELS = {
    "mhmoe": "MH-MoE",
    "dense": "dense",
    "oracle": "oracle",
    "torchscale": "torchscale",
    "per_expert": "per-expert",
    "einsum": "einsum",
    "mhmoe_ckpt": "MH-MoE recompute",
    "mhmoe_grouped": "MH-MoE grouped_mm",
    "mhmoe_tanh": "MH-MoE tanh",
    "interleaved": "interleaved",
}


def merge_rounds(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (size, method): the fastest step over all rounds, the spread over all timed steps."""
    merged: dict[tuple, dict[str, Any]] = {}
    for r in rows:
        c = r["cfg"]
        key = (c["tokens"], c["heads"], c["experts"], c["top_k"], r["method"])
        if "error" in r or "skipped" in r:
            merged.setdefault(key, r)
            continue
        prev = merged.get(key)
        if prev is None or "error" in prev or "skipped" in prev:
            merged[key] = {**r, "rounds": 1}
            continue
        times = sorted(prev["all_times_s"] + r["all_times_s"])
        merged[key] = {
            **prev,
            "time_s": times[0],
            "spread": times[-1] / times[0] - 1.0,
            "tokens_per_s": c["tokens"] / times[0],
            "peak_mb": min((v for v in (prev["peak_mb"], r["peak_mb"]) if v is not None), default=None),
            "all_times_s": times,
            "rounds": prev["rounds"] + 1,
        }
    return list(merged.values())


def format_rows(rows: list[dict[str, Any]]) -> str:
    """Two tables: throughput of each method with MH-MoE's ratios to the others; peak memory and its ratio to dense."""
    by_cfg: dict[tuple, dict[str, dict[str, Any]]] = {}
    for r in rows:
        c = r["cfg"]
        by_cfg.setdefault((c["tokens"], c["heads"], c["experts"], c["top_k"], c["dim"]), {})[r["method"]] = r
    present = [m for m in METHODS if any(m in v for v in by_cfg.values())]
    others = [m for m in present if m != "mhmoe"]

    def ok(r: dict[str, Any] | None) -> bool:
        return r is not None and "error" not in r and "skipped" not in r

    def tps(r: dict[str, Any] | None) -> str:
        if r is None:
            return "-"
        if "skipped" in r:
            return "skipped"
        if "error" in r:
            return "err"
        return f"{r['tokens_per_s']:,.0f} (+{100 * r.get('spread', 0.0):.0f}%)"

    def ratio(a: dict[str, Any] | None, b: dict[str, Any] | None, key: str) -> str:
        if not ok(a) or not ok(b) or a.get(key) is None or not b.get(key):  # type: ignore[union-attr]
            return "-"
        return f"{a[key] / b[key]:.2f}x"  # type: ignore[index]

    head = "| tokens | h | E | k | F | " + " | ".join(f"{LABELS[m]} tok/s" for m in present)
    head += "".join(f" | MoE/{LABELS[m]}" for m in others) + " |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for (n, h, E, k, d), m in sorted(by_cfg.items()):
        moe = m.get("mhmoe")
        cells = [str(n), str(h), str(E), str(k), str(4 * d // k)] + [tps(m.get(x)) for x in present]
        cells += [ratio(moe, m.get(x), "tokens_per_s") for x in others]
        lines.append("| " + " | ".join(cells) + " |")
    mem_methods = [x for x in present if x != "dense"]
    head = "| tokens | h | E | k | " + " | ".join(f"{LABELS[x]} MB" for x in present)
    head += "".join(f" | {LABELS[x]}/dense" for x in mem_methods) + " |"
    lines += ["", "Peak memory of one step (MB) and its ratio to the dense block:", "", head]
    lines.append("|" + "---|" * (head.count("|") - 1))
    for (n, h, E, k, _), m in sorted(by_cfg.items()):
        cells = [str(n), str(h), str(E), str(k)]
        cells += [
            f"{m[x]['peak_mb']:.0f}" if ok(m.get(x)) and m[x].get("peak_mb") is not None else "-" for x in present
        ]
        cells += [ratio(m.get(x), m.get("dense"), "peak_mb") for x in mem_methods]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--quick", action="store_true", help="small grid: 2048 tokens, h in {1, 4}, E=8, k=2")
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192])
    p.add_argument("--heads", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--experts", type=int, nargs="+", default=[8, 32])
    p.add_argument("--top-k", type=int, nargs="+", default=[1, 2])
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=METHODS)
    p.add_argument("--iters", type=int, default=3, help="timed iterations after one warm-up (minimum reported)")
    p.add_argument("--rounds", type=int, default=1, help="cycles through all methods (minimum over all rounds)")
    p.add_argument(
        "--interleave",
        action="store_true",
        help="time all methods of a size in one process, one step each in turn (steadier ratios on a busy "
        "machine); peak memory is still read in one process per method",
    )
    p.add_argument(
        "--torchscale-max-tokens", type=int, default=4096, help="skip torchscale above this (its tensors are O(S^2))"
    )
    p.add_argument("--einsum-group", type=int, default=2048, help="sub-tokens per GShard group (einsum baseline)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=0, help="torch threads in each worker (0 = torch default)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per (size, method) job")
    p.add_argument("--out", type=Path, default=None, help="write all rows as JSON here")
    a = p.parse_args(argv)
    if a.worker:
        job = json.loads(a.worker)
        if job.get("threads"):
            torch.set_num_threads(job["threads"])
        print(json.dumps(run_worker(job)))
        return 0
    if a.quick:
        a.tokens, a.heads, a.experts, a.top_k, a.iters = [2048], [1, 4], [8], [2], 2
    rows = []
    t_start = time.time()
    print(
        f"bench_moe: torch {torch.__version__}, device {a.device}, dtype {a.dtype}, "
        f"threads {a.threads or torch.get_num_threads()}, d={a.dim}, k*F=4d, forward+backward",
        flush=True,
    )
    have_torchscale = torchscale_available()

    def skip_reason(method: str, cfg: dict[str, Any]) -> str | None:
        if method != "torchscale":
            return None
        if not have_torchscale:
            return "torchscale is not installed"
        if cfg["tokens"] > a.torchscale_max_tokens:
            return f"tokens > --torchscale-max-tokens {a.torchscale_max_tokens}"
        if cfg["top_k"] > 2:
            return "torchscale gates are top-1/top-2"
        return None

    def report(rnd: int, r: dict[str, Any]) -> None:
        c = r["cfg"]
        msg = r.get("error") or r.get("skipped")
        if msg is None:
            msg = f"{r['tokens_per_s']:,.0f} tok/s, {r['time_s'] * 1e3:.0f} ms" if r.get("time_s") else "timed apart"
            msg += f", peak {r['peak_mb']:.0f} MB" if r.get("peak_mb") is not None else ""
        print(f"  [{rnd + 1}/{a.rounds}] tokens={c['tokens']} h={c['heads']} E={c['experts']} k={c['top_k']} "
              f"{r['method']}: {msg}", flush=True)  # fmt: skip

    peaks: dict[tuple, float] = {}
    for rnd in range(a.rounds):
        for cfg in grid(a):
            job0 = dict(cfg=cfg, device=a.device, dtype=a.dtype, iters=a.iters, threads=a.threads)
            runnable = []
            for method in a.methods:
                why = skip_reason(method, cfg)
                if why:
                    rows.append({**job0, "method": method, "skipped": why})
                    report(rnd, rows[-1])
                else:
                    runnable.append(method)
            if not a.interleave:
                for method in runnable:
                    rows.append(run_job({**job0, "method": method}, a.timeout))
                    report(rnd, rows[-1])
                continue
            for method in runnable:  # memory: one process per method, one step, once
                key = (cfg["tokens"], cfg["heads"], cfg["experts"], cfg["top_k"], method)
                if key not in peaks:
                    r = run_job({**job0, "method": method, "iters": 0}, a.timeout)
                    peaks[key] = r.get("peak_mb", float("nan"))
            res = run_job({**job0, "method": "interleaved", "methods": runnable}, a.timeout * len(runnable))
            if isinstance(res, dict):  # the interleaved process failed: the error for every method
                res = [{**res, "method": m} for m in runnable]
            for r in res:
                key = (cfg["tokens"], cfg["heads"], cfg["experts"], cfg["top_k"], r["method"])
                r["peak_mb"] = peaks.get(key)
                rows.append(r)
                report(rnd, r)
    rows = merge_rounds(rows)
    for r in rows:
        if "skipped" in r and r["method"] == "torchscale":
            print(f"note: torchscale skipped at tokens={r['cfg']['tokens']}: {r['skipped']}")
    print(format_rows(rows))
    print(f"total {time.time() - t_start:.0f} s")
    if a.out:
        meta = {
            "argv": sys.argv,
            "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        }
        meta["loadavg_end"] = os.getloadavg()
        atomic_write_json(a.out, {**meta, "rows": rows}, indent=1)
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
