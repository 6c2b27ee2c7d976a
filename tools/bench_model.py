#!/usr/bin/env python
"""Training-step time and peak memory of backbones side by side (Dense vs SMoE / X-MoE / MH-MoE at equal FLOPs).

Each model runs in its own subprocess so that peak memory (CPU: max RSS growth; CUDA: max allocated) is its own.
A step is forward on an image+text batch, loss = mean square of the features + MoE aux loss, backward, AdamW.

    python tools/bench_model.py                                   # tiny set + base set, CPU
    python tools/bench_model.py --models tiny_dense tiny_mhmoe --steps 10 --json out.json
    python tools/bench_model.py --device cuda --set base          # on a GPU
    python tools/bench_model.py --set base_pair --precision fp32 bf16-mixed bf16-true   # precisions side by side

Prints a table and writes JSON (`--json`). The target: MH-MoE throughput >= 0.8x the dense step.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from mmoe.files import atomic_write_json

SETS = {
    # (models, batch, image size, text length): the base set uses a short sequence (5x5 patches + 16 text tokens)
    "tiny": (["tiny_dense", "tiny_smoe", "tiny_xmoe", "tiny_mhmoe"], 8, 64, 32),
    "base": (["base_dense", "base_smoe", "base_mhmoe"], 4, 80, 16),
    "base_pair": (["base_dense", "base_mhmoe"], 4, 80, 16),
}


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


PRECISIONS = ("fp32", "bf16-mixed", "bf16-true", "bf16-master")


def _prepare(
    name: str, batch: int, img: int, text_len: int, device: str, threads: int, precision: str, fused: bool = False
) -> tuple:
    """Build one model, its AdamW and a batch; returns ``(step, finish)``.

    ``step()`` runs one training step and returns its (forward+backward, optimizer) seconds; ``finish(fwd_bwd,
    opt_times, peak_mem)`` turns the timings into a result row.

    `precision` as Lightning names it: "fp32"; "bf16-mixed" (fp32 weights and AdamW, autocast to bf16: the
    matmuls run in bf16, their inputs cast every step); "bf16-true" (weights, activations and AdamW state
    in bf16, no casts and no fp32 master copy); "bf16-master" (weights and activations in bf16 as bf16-true,
    AdamW on fp32 master copies: per step one cast of every gradient up and of every weight down, instead of
    autocast's casts at every use). ``fused`` takes torch's one-kernel AdamW (the recipes' ``optim.fused``).
    """
    import contextlib

    from mmoe.model import create_model

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    dev = torch.device(device)
    rss0 = _rss_mib()
    model = create_model(name, img_size=img).to(dev).train()
    if precision in ("bf16-true", "bf16-master"):
        model = model.to(torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    live = [p for p in model.parameters() if p.requires_grad]
    master = [p.detach().float().clone().requires_grad_(True) for p in live] if precision == "bf16-master" else None
    opt = torch.optim.AdamW(
        master if master is not None else model.parameters(), lr=1e-4, fused=True if fused else None
    )
    g = torch.Generator().manual_seed(0)
    image = torch.randn(batch, 3, img, img, generator=g).to(dev)
    if precision in ("bf16-true", "bf16-master"):
        image = image.to(torch.bfloat16)

    def autocast() -> contextlib.AbstractContextManager:
        if precision == "bf16-mixed":
            return torch.autocast(dev.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    text = torch.randint(0, 49408, (batch, text_len), generator=g).to(dev)
    pad = torch.zeros(batch, text_len, dtype=torch.bool)
    pad[: batch // 2, text_len * 3 // 4 :] = True
    pad = pad.to(dev)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def step() -> tuple[float, float]:
        t0 = time.perf_counter()
        with autocast():
            out = model(image=image, text=text, text_padding_mask=pad)
            loss = out.features.float().square().mean() + out.aux_loss.float()
        loss.backward()
        sync()
        t1 = time.perf_counter()
        if master is not None:
            for m, p in zip(master, live):
                m.grad = p.grad.float() if p.grad is not None else None
                p.grad = None
        opt.step()
        opt.zero_grad(set_to_none=True)
        if master is not None:
            with torch.no_grad():
                torch._foreach_copy_(live, master)
        sync()
        return t1 - t0, time.perf_counter() - t1

    def finish(fwd_bwd: list[float], opt_times: list[float], peak_mem: float | None) -> dict:
        times = [a + b for a, b in zip(fwd_bwd, opt_times)]

        def med(values: list[float]) -> float:
            return sorted(values)[len(values) // 2]

        median = med(times)
        seq = 1 + (img // model.config.patch_size) ** 2 + text_len
        cfg = model.config
        return {
            "model": name,
            "precision": precision,
            "fused_adamw": fused,
            "device": str(dev),
            "threads": torch.get_num_threads(),
            "params_m": params / 1e6,
            "batch": batch,
            "seq_len": seq,
            "step_s_median": median,
            "step_s_min": min(times),
            "step_spread": max(times) / min(times) - 1.0,
            "fwd_bwd_s_median": med(fwd_bwd),
            "optimizer_s_median": med(opt_times),
            "tokens_per_s": batch * seq / median,
            "tokens_per_s_best": batch * seq / min(times),
            "peak_mem_mib": peak_mem,
            "peak_mem_kind": "cuda max allocated" if dev.type == "cuda" else "max RSS growth",
            "moe": None
            if cfg.moe is None
            else f"E={cfg.moe.num_experts} h={cfg.moe.num_heads} k={cfg.moe.top_k} "
            f"F={cfg.moe.expert_hidden} {cfg.moe.router}",
        }

    def peak() -> float:
        return (torch.cuda.max_memory_allocated() / 2**20) if dev.type == "cuda" else _rss_mib() - rss0

    finish.peak = peak  # type: ignore[attr-defined]
    return step, finish


def worker(
    specs: list[tuple[str, str]],
    batch: int,
    img: int,
    text_len: int,
    steps: int,
    warmup: int,
    device: str,
    threads: int,
    *,
    read_peak: bool = False,
    fused: bool = False,
) -> list[dict]:
    """Time `steps` training steps of each ``(model, precision)`` spec after `warmup` steps, one step each in turn.

    With one spec (the default mode, a fresh process per model) ``read_peak`` reports that model's peak memory.
    With several (``--interleave``) the load's drifts stay out of the ratios, but peak memory is not read (one
    process holds every model), so run without ``--interleave`` for the memory column.
    """
    built = [_prepare(n, batch, img, text_len, device, threads, prec, fused) for n, prec in specs]
    for step, _ in built:
        for _ in range(warmup):
            step()
    if read_peak and device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    timings: list[tuple[list[float], list[float]]] = [([], []) for _ in built]
    for _ in range(steps):
        for (step, _), (fb, op) in zip(built, timings):
            a, b = step()
            fb.append(a)
            op.append(b)
    return [finish(fb, op, finish.peak() if read_peak else None) for (_, finish), (fb, op) in zip(built, timings)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--set", nargs="+", default=["tiny", "base"], choices=sorted(SETS), help="model sets to run")
    p.add_argument("--models", nargs="+", help="explicit model names (use with --batch/--img/--text-len)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--img", type=int, default=64)
    p.add_argument("--text-len", type=int, default=32)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", nargs="+", default=["fp32"], choices=PRECISIONS, help="one run per precision")
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads per worker (0 = torch default; 1 is steadier when busy)"
    )
    p.add_argument(
        "--interleave",
        action="store_true",
        help="all models x precisions of a set in one process, one step each in turn (steadier ratios on a busy "
        "machine; no peak memory)",
    )
    p.add_argument(
        "--fused-adamw", action="store_true", help="torch's one-kernel AdamW (what a recipe's optim.fused selects)"
    )
    p.add_argument("--json", help="write the results here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker and args.interleave:
        specs = [tuple(spec.split("@")) for spec in args.worker.split(",")]
        steps = (args.batch, args.img, args.text_len, args.steps, args.warmup, args.device, args.threads)
        res = worker(specs, *steps, fused=args.fused_adamw)
        print("RESULT " + json.dumps(res))
        return 0
    if args.worker:
        spec = [(args.worker, args.precision[0])]
        steps = (args.batch, args.img, args.text_len, args.steps, args.warmup, args.device, args.threads)
        res = worker(spec, *steps, read_peak=True, fused=args.fused_adamw)[0]
        print("RESULT " + json.dumps(res))
        return 0

    plan = [(args.models, args.batch, args.img, args.text_len)] if args.models else [SETS[s] for s in args.set]
    results = []
    jobs = [(m, b, i, t, prec) for m_list, b, i, t in plan for prec in args.precision for m in m_list]

    def run(worker_arg: str, batch: int, img: int, text_len: int, prec: str) -> list[dict] | None:
        cmd = [sys.executable, __file__, "--worker", worker_arg, "--batch", str(batch), "--img", str(img),
               "--text-len", str(text_len), "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--device", args.device, "--threads", str(args.threads), "--precision", prec]  # fmt: skip
        if args.interleave:
            cmd.append("--interleave")
        if args.fused_adamw:
            cmd.append("--fused-adamw")
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not line:
            print(f"{worker_arg}: worker failed (rc {proc.returncode}):\n{proc.stderr[-2000:]}", file=sys.stderr)
            return None
        res = json.loads(line[-1][len("RESULT ") :])
        return res if isinstance(res, list) else [res]

    raw: list[dict] = []
    if args.interleave:
        for models, batch, img, text_len in plan:
            spec = ",".join(f"{m}@{prec}" for prec in args.precision for m in models)
            got = run(spec, batch, img, text_len, args.precision[0])
            if got is None:
                return 1
            raw += got
    else:
        for name, batch, img, text_len, prec in jobs:
            got = run(name, batch, img, text_len, prec)
            if got is None:
                return 1
            raw += got
            print(f"done {name} ({prec})", file=sys.stderr, flush=True)
    results: list[dict] = []
    for res in raw:
        dense = next(
            (
                r
                for r in results
                if r["model"].endswith("_dense")
                and r["seq_len"] == res["seq_len"]
                and r["precision"] == res["precision"]
            ),
            None,
        )
        res["throughput_vs_dense"] = res["tokens_per_s"] / dense["tokens_per_s"] if dense else None
        res["best_vs_dense"] = res["tokens_per_s_best"] / dense["tokens_per_s_best"] if dense else None
        res["fwd_bwd_vs_dense"] = dense["fwd_bwd_s_median"] / res["fwd_bwd_s_median"] if dense else None
        fp32 = next((r for r in results if r["model"] == res["model"] and r["precision"] == "fp32"), None)
        res["best_vs_fp32"] = res["tokens_per_s_best"] / fp32["tokens_per_s_best"] if fp32 else None
        results.append(res)

    print(
        "| model | precision | MoE | params (M) | batch x seq | step (s) | min step (s, spread) | fwd+bwd (s) "
        "| AdamW (s) | tokens/s | throughput vs dense (median step / fwd+bwd) | vs dense (min step) "
        "| vs fp32 (min step) | peak mem (MiB) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")

    def x(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}x"

    for r in results:
        ratio = "-"
        if r["throughput_vs_dense"] is not None:
            ratio = f"{r['throughput_vs_dense']:.2f}x / {r['fwd_bwd_vs_dense']:.2f}x"
        print(
            f"| {r['model']} | {r['precision']} | {r['moe'] or 'dense'} | {r['params_m']:.1f} | "
            f"{r['batch']} x {r['seq_len']} | {r['step_s_median']:.3f} | "
            f"{r['step_s_min']:.3f} (+{100 * r['step_spread']:.0f}%) | {r['fwd_bwd_s_median']:.3f} | "
            f"{r['optimizer_s_median']:.3f} | "
            f"{r['tokens_per_s']:.0f} | {ratio} | {x(r['best_vs_dense'])} | {x(r['best_vs_fp32'])} | "
            f"{'-' if r['peak_mem_mib'] is None else format(r['peak_mem_mib'], '.0f')} |"
        )
    print(f"device {results[0]['device']}, threads {results[0]['threads']}, peak mem = {results[0]['peak_mem_kind']}")
    if args.json:
        atomic_write_json(args.json, results, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
