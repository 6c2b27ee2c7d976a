"""Benchmark the MH-MoE layer against a dense block of equal FLOPs and two classic MoE baselines.

Times forward+backward (issue 2, "Benchmark") side by side for:

- ``mhmoe``: :class:`mmoe.moe.MHMoE`, dropless sorted dispatch with grouped expert compute;
- ``dense``: the dense block with the same FLOPs: Linear(d, d), FFN d -> k*F -> d (GELU),
  Linear(d, d) (the two Linears only when h > 1, matching the head/merge layers);
- ``mhmoe_ckpt`` (opt-in): the layer with ``expert_checkpoint_rows=16384`` (experts recomputed in
  backward, in chunks), trading one more expert forward for memory;
- ``per_expert``: the same layer with the masked per-expert Python loop (HF Mixtral style);
- ``einsum``: a GShard/torchscale-style capacity dispatch (one-hot ``(S, E, C)`` combine tensor,
  ``einsum`` dispatch/combine, capacity factor 1, top-k with first choices first), over groups of
  ``--einsum-group`` sub-tokens. torchscale's ``MOELayer`` uses a single group per local batch; at
  8192 tokens and h = 4 its ``(S, E, C)`` tensors would take ~8.6 GB each, so we group.

Sizes (issue 2): d = 768, tokens in {2048, 8192}, h in {1, 2, 4}, E in {8, 32}, k in {1, 2}, k*F = 4d.
Every (size, method) runs in its own subprocess so its peak memory can be read from the kernel:
``peak_mb`` is the rise of the resident set high-water mark (VmHWM) over the resident set after
building the module and inputs, i.e. activations + gradients + workspaces of one forward+backward.

Usage::

    python tools/bench_moe.py --out docs/results/moe_cpu.json           # the full grid (CPU: ~30 min)
    python tools/bench_moe.py --quick                                   # a small grid (~1-2 min)
    python tools/bench_moe.py --device cuda --dtype bfloat16 --tokens 16384 32768
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

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from mmoe.moe import MHMoE  # noqa: E402

METHODS = ("mhmoe", "dense", "per_expert", "einsum", "mhmoe_ckpt")
DEFAULT_METHODS = ("mhmoe", "dense", "per_expert", "einsum")


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
        expert_impl="per_expert" if method == "per_expert" else "auto",
        expert_checkpoint_rows=16384 if method == "mhmoe_ckpt" else 0,
    )
    with torch.no_grad():  # a spread-out router, so every expert gets work (as after some training)
        for p in layer.router.parameters():
            p.normal_(0, 1.0 / math.sqrt(p.shape[-1]))
    layer = layer.to(device, dtype)
    if method == "einsum":
        return CapacityEinsumMoE(layer, cfg["einsum_group"])
    return layer


def run_worker(job: dict[str, Any]) -> dict[str, Any]:
    """Build one (size, method), measure peak memory of one step and the median step time."""
    torch.manual_seed(0)
    device = torch.device(job["device"])
    dtype = getattr(torch, job["dtype"])
    cfg = job["cfg"]
    model = build(job["method"], cfg, dtype, device)
    x = torch.randn(1, cfg["tokens"], cfg["dim"], device=device, dtype=dtype, requires_grad=True)
    g = torch.randn_like(x)
    cuda = device.type == "cuda"

    def step() -> None:
        out = model(x)
        y = out.output if hasattr(out, "output") else out
        loss = (y * g).sum()
        if hasattr(out, "aux_loss"):
            loss = loss + out.aux_loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        x.grad = None

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        base = _rss_mb("VmRSS")
    step()  # warm-up, also the memory measurement
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20 - base
    else:
        peak = _rss_mb("VmHWM") - base
    times = []
    for _ in range(job["iters"]):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times.sort()
    t = times[len(times) // 2]
    return {**job, "time_s": t, "tokens_per_s": cfg["tokens"] / t, "peak_mb": peak, "all_times_s": times}


# ---------------------------------------------------------------------------------------------- driver
def grid(a: argparse.Namespace) -> list[dict[str, Any]]:
    cfgs = []
    for n, h, E, k in itertools.product(a.tokens, a.heads, a.experts, a.top_k):
        cfgs.append(dict(dim=a.dim, tokens=n, heads=h, experts=E, top_k=k, einsum_group=a.einsum_group))
    return cfgs


def run_job(job: dict[str, Any], timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(job)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ})
    except subprocess.TimeoutExpired:
        return {**job, "error": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0:
        return {**job, "error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def format_rows(rows: list[dict[str, Any]]) -> str:
    """One line per size: throughput of each method, MH-MoE's ratios and peak memories."""
    by_cfg: dict[tuple, dict[str, dict[str, Any]]] = {}
    for r in rows:
        c = r["cfg"]
        by_cfg.setdefault((c["tokens"], c["heads"], c["experts"], c["top_k"]), {})[r["method"]] = r
    head = (
        "| tokens | h | E | k | F | MH-MoE tok/s | dense tok/s | per-expert tok/s | einsum tok/s | MoE/dense "
        "| MoE/einsum | MoE/per-expert | peak MB MoE | peak MB dense | mem MoE/dense | ckpt tok/s | ckpt MB |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]

    def tps(r: dict[str, Any] | None) -> str:
        if r is None:
            return "-"
        return "err" if "error" in r else f"{r['tokens_per_s']:,.0f}"

    def mb(r: dict[str, Any] | None) -> str:
        return "-" if r is None or "error" in r else f"{r['peak_mb']:.0f}"

    def ratio(a: dict[str, Any] | None, b: dict[str, Any] | None, key: str, inv: bool = False) -> str:
        if not a or not b or "error" in a or "error" in b or not b[key]:
            return "-"
        return f"{(b[key] / a[key]) if inv else (a[key] / b[key]):.2f}x"

    for (n, h, E, k), m in sorted(by_cfg.items()):
        moe, dense, pe, ein, ck = (m.get(x) for x in METHODS)
        lines.append(
            f"| {n} | {h} | {E} | {k} | {4 * 768 // k if not moe else 4 * moe['cfg']['dim'] // k} | {tps(moe)} "
            f"| {tps(dense)} | {tps(pe)} | {tps(ein)} | {ratio(moe, dense, 'tokens_per_s')} "
            f"| {ratio(moe, ein, 'tokens_per_s')} | {ratio(moe, pe, 'tokens_per_s')} "
            f"| {mb(moe)} | {mb(dense)} | {ratio(moe, dense, 'peak_mb')} | {tps(ck)} | {mb(ck)} |"
        )
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
    p.add_argument("--iters", type=int, default=3, help="timed iterations after one warm-up (median reported)")
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
    for cfg in grid(a):
        for method in a.methods:
            job = dict(method=method, cfg=cfg, device=a.device, dtype=a.dtype, iters=a.iters, threads=a.threads)
            r = run_job(job, a.timeout)
            rows.append(r)
            msg = r.get("error") or f"{r['tokens_per_s']:,.0f} tok/s, peak {r['peak_mb']:.0f} MB"
            print(f"  tokens={cfg['tokens']} h={cfg['heads']} E={cfg['experts']} k={cfg['top_k']} {method}: {msg}")
            sys.stdout.flush()
    print(format_rows(rows))
    print(f"total {time.time() - t_start:.0f} s")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = a.out.with_suffix(a.out.suffix + ".tmp")
        tmp.write_text(json.dumps({"argv": sys.argv, "torch": torch.__version__, "rows": rows}, indent=1))
        os.replace(tmp, a.out)
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
