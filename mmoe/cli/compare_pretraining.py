"""[MH1] Table 1 / Table 4 at a size that runs here: Dense vs SMoE vs X-MoE vs MH-MoE masked pretraining.

Runs the four tiny recipes (``configs/pretrain/tiny_{dense,smoe,xmoe,mhmoe}.yaml``) through the ``mmoe`` CLI with
the same seed, the same synthetic-world shards and the same step budget, with discrete image targets from one
k-means codebook (``mmoe-codebook``) so that image perplexity is reported next to text
perplexity. Then writes a markdown table (validation masked-text / masked-image loss and perplexity, expert
activation ratio, sub-token diversity, max expert load, step time) with the exact command and seeds::

    python -m mmoe.cli.compare_pretraining --out runs/compare --steps 200 --table docs/results/tiny_pretraining.md

(``python tools/compare_pretraining.py`` in a source checkout). The summary of one run folder
(`summarize_run`), the table (`write_table`) and `read_run_metrics` (every version's ``metrics.csv`` of a run,
also used by the demo) are importable.

Expected shape from the paper ([MH1] Fig. 1, Table 4): MH-MoE's activation ratio far above SMoE's, and its
masked-modeling perplexity at or below SMoE's and X-MoE's. Whatever is measured is written down.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from mmoe.files import atomic_write_json, atomic_write_text
from mmoe.resources import recipe_path

RECIPES = ["tiny_dense", "tiny_smoe", "tiny_xmoe", "tiny_mhmoe"]


def read_run_metrics(root: Path) -> list[dict[str, str]]:
    """Rows of every version's metrics.csv under a run folder (the ``mmoe`` CLI's layout), oldest version first."""
    rows: list[dict[str, str]] = []
    for f in sorted(root.glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1])):
        with open(f) as fh:
            rows += list(csv.DictReader(fh))
    return rows


def summarize_run(root: Path) -> dict[str, Any]:
    """Final validation metrics, routing averaged over MoE layers, median step time, of one run folder."""
    rows = read_run_metrics(root)
    val = [r for r in rows if r.get("val/loss")]
    if not val:
        raise SystemExit(f"compare_pretraining: no validation row in {root}/version_*/metrics.csv")
    last = val[-1]
    out: dict[str, Any] = {"step": int(last["step"]) + 1}
    for key in ("loss_mlm_text", "loss_mlm_pair", "loss_mim_image", "loss_mim_pair", "ppl_mlm_text", "ppl_mlm_pair",
                "ppl_mim_image", "ppl_mim_pair"):  # fmt: skip
        v = last.get(f"val/{key}")
        out[key] = float(v) if v else float("nan")
    for metric in ("activation_ratio", "diversity", "load_max", "dropped_share"):
        vals = [float(v) for k, v in last.items() if k.startswith("val/moe/") and k.endswith(f"/{metric}") and v]
        out[metric] = statistics.fmean(vals) if vals else float("nan")
        out[f"{metric}_per_layer"] = {
            k.split("/")[2]: round(float(v), 4)
            for k, v in last.items()
            if k.startswith("val/moe/") and k.endswith(f"/{metric}") and v
        }
    times = [float(r["train/step_time"]) for r in rows if r.get("train/step_time")]
    out["step_time"] = statistics.median(times) if times else float("nan")
    train = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    out["train_loss_last"] = train[-1] if train else float("nan")
    return out


def _fmt(v: float, nd: int = 3) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{nd}f}"


def write_table(path: Path, results: dict[str, dict[str, Any]], meta: dict[str, Any]) -> None:
    lines = [
        "# Tiny masked multimodal pretraining: Dense vs SMoE vs X-MoE vs MH-MoE",
        "",
        "The paper's comparison ([MH1] Fig. 1 and Table 4: BEiT-3 base, masked multimodal pretraining) at a size",
        "that runs on 2 CPU cores: the four `configs/pretrain/tiny_*.yaml` recipes (equal active FLOPs per token,",
        "see `configs/model/tiny_*.yaml`), same seed, same synthetic shapes-world shards, same step budget.",
        "Image targets are discrete codes of one k-means codebook over normalized patch pixels",
        f"({meta['codebook_codes']} codes, `mmoe-codebook`), so image perplexity is defined.",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"Seeds: training `seed_everything={meta['seed']}`, data `seed={meta['seed']}`, world `--seed {meta['seed']}`"
        f" ({meta['world']}); {meta['steps']} steps of batch {meta['batch_size']} (equal thirds image / text / pair);"
        f" validation on {meta['val_steps']} batches of the val split. Date {meta['date']}, "
        f"{meta['machine']}.",
        "",
        "| model | text MLM loss | text ppl | pair-text ppl | image MIM loss | image ppl | pair-image ppl "
        "| activation ratio | diversity | max expert load | step time (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {_fmt(r['loss_mlm_text'])} | {_fmt(r['ppl_mlm_text'], 1)} | {_fmt(r['ppl_mlm_pair'], 1)} "
            f"| {_fmt(r['loss_mim_image'])} | {_fmt(r['ppl_mim_image'], 1)} | {_fmt(r['ppl_mim_pair'], 1)} "
            f"| {_fmt(r['activation_ratio'])} | {_fmt(r['diversity'], 2)} | {_fmt(r['load_max'])} "
            f"| {_fmt(r['step_time'], 3)} |"
        )
    lines += [
        "",
        "Columns: validation losses/perplexities at the last step (perplexity = exp of the mean cross-entropy over",
        "all masked targets of the val batches); routing metrics over the same val batches, averaged over the MoE",
        "layers: activation ratio = share of experts receiving >= 1% of the routed sub-tokens (mmoe.moe.stats",
        "default), diversity = distinct experts among a token's h sub-tokens' first choices (1 for h = 1), max",
        "expert load = the largest expert's share; step time = median wall time of a training step (this machine is",
        "shared, so step times are noisy).",
        "",
        "Per-layer routing (val):",
        "",
    ]
    for name, r in results.items():
        if r["activation_ratio_per_layer"]:
            lines.append(
                f"- {name}: activation {json.dumps(r['activation_ratio_per_layer'])}, "
                f"diversity {json.dumps(r['diversity_per_layer'])}, max load {json.dumps(r['load_max_per_layer'])}"
            )
    if meta.get("budget_note"):
        lines += ["", meta["budget_note"]]
    if meta.get("observations"):
        lines += ["", "## What this shows", ""] + [f"- {o}" for o in meta["observations"]]
    atomic_write_text(path, "\n".join(lines) + "\n")


def observations(results: dict[str, dict[str, Any]]) -> list[str]:
    """Plain statements comparing the measured numbers with the paper's expected shape (no judgement added)."""
    obs: list[str] = []
    mh, sm, xm = results.get("tiny_mhmoe"), results.get("tiny_smoe"), results.get("tiny_xmoe")
    if mh and sm:
        obs.append(
            f"Activation ratio: MH-MoE {_fmt(mh['activation_ratio'])} vs SMoE {_fmt(sm['activation_ratio'])}"
            f" (paper: MH-MoE far above SMoE); max expert load MH-MoE {_fmt(mh['load_max'])} vs SMoE"
            f" {_fmt(sm['load_max'])} (uniform = {1 / 8:.3f} for 8 experts)."
        )
        for key, label in (("ppl_mlm_text", "text"), ("ppl_mim_image", "image")):
            moe = {n: r[key] for n, r in results.items() if n in ("tiny_smoe", "tiny_xmoe") and not math.isnan(r[key])}
            if not math.isnan(mh[key]) and moe:
                rel = "at or below" if mh[key] <= min(moe.values()) else "above"
                obs.append(
                    f"{label.capitalize()} perplexity: MH-MoE {_fmt(mh[key], 2)} is {rel} SMoE/X-MoE ("
                    + ", ".join(f"{n} {_fmt(v, 2)}" for n, v in moe.items())
                    + ")"
                    + (
                        f"; dense {_fmt(results['tiny_dense'][key], 2)}."
                        if "tiny_dense" in results and not math.isnan(results["tiny_dense"][key])
                        else "."
                    )
                )
    if xm and sm:
        obs.append(f"X-MoE vs SMoE text perplexity: {_fmt(xm['ppl_mlm_text'], 2)} vs {_fmt(sm['ppl_mlm_text'], 2)}.")
    obs.append(
        "One seed and a short CPU run on synthetic data: differences of a few percent are within what a"
        " different seed could change; this table checks the pipeline and the direction, not the paper's numbers."
    )
    return obs


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/compare", help="run folders, world and codebook go here")
    p.add_argument("--recipes", nargs="+", default=RECIPES)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=24)
    p.add_argument("--val-steps", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--codes", type=int, default=256, help="codebook size for discrete image targets")
    p.add_argument("--world", default=None, help="an existing synthetic world with shards (default: OUT/world)")
    p.add_argument("--num-train", type=int, default=1000, help="world size when the world is generated")
    p.add_argument("--table", default="docs/results/tiny_pretraining.md")
    p.add_argument("--threads", type=int, default=None, help="torch threads per run (OMP_NUM_THREADS)")
    p.add_argument("--note", default="", help="a sentence added under the table (e.g. why the budget is small)")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)

    world = Path(args.world).resolve() if args.world else out / "world"
    if not (world / "shards" / "pair").is_dir():
        from mmoe.data.synthetic import make_world

        make_world(world, num_train=args.num_train, num_val=100, image_size=64, seed=args.seed, shards=True,
                   shard_maxcount=250)  # fmt: skip
    s = world / "shards"
    codebook = out / f"codebook_{args.codes}.pt"
    if not codebook.exists():
        subprocess.run(
            [sys.executable, "-m", "mmoe.cli.build_visual_codebook", "--shards", str(s / "image/train-*.tar"),
             "--codes", str(args.codes), "--max-images", "500", "--seed", str(args.seed), "--out", str(codebook)],
            check=True, env=env,
        )  # fmt: skip
    results: dict[str, dict[str, Any]] = {}
    for name in args.recipes:
        root = out / name
        if not list(root.glob("version_*/metrics.csv")) or not (root / "DONE").exists():
            if root.exists():
                import shutil

                shutil.rmtree(root)
            cmd = [
                sys.executable, "-m", "mmoe.train.cli", "fit", f"--config={recipe_path(f'pretrain/{name}')}",
                f"--trainer.default_root_dir={root}", f"--trainer.max_steps={args.steps}",
                f"--trainer.val_check_interval={args.steps}", f"--checkpoint.every_n_train_steps={args.steps}",
                f"--seed_everything={args.seed}", "--model.init_args.image_target=codebook",
                f"--model.init_args.codebook={codebook}",
                *(f"--data.init_args.{pre}{kind}_shards=[{s}/{kind}/{split}-*.tar]"
                  for pre, split in (("", "train"), ("val_", "val")) for kind in ("image", "text", "pair")),
                f"--data.init_args.batch_size={args.batch_size}", f"--data.init_args.val_steps={args.val_steps}",
                f"--data.init_args.seed={args.seed}", f"--data.init_args.steps_per_epoch={args.steps}",
            ]  # fmt: skip
            print(f"[compare] {name}: {' '.join(cmd)}", flush=True)
            t0 = time.perf_counter()
            root.mkdir(parents=True, exist_ok=True)
            with open(out / f"{name}.log", "w") as log:
                subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, env=env)
            (root / "DONE").write_text(f"{time.perf_counter() - t0:.1f} s\n")
        results[name] = summarize_run(root)
        print(f"[compare] {name}: {json.dumps({k: v for k, v in results[name].items() if 'per_layer' not in k})}")
    given = list(argv if argv is not None else sys.argv[1:])
    if "--note" in given:  # the note does not change any number; keep the command copy-pasteable
        i = given.index("--note")
        del given[i : i + 2]
    command = shlex.join(["python", "tools/compare_pretraining.py", *given])
    meta = {
        "command": command.strip(),
        "seed": args.seed,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "val_steps": args.val_steps,
        "codebook_codes": args.codes,
        "world": f"{args.num_train} train scenes" if not args.world else f"world {args.world}",
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "machine": f"CPU, {os.cpu_count()} cores (shared)",
        "observations": observations(results),
        "budget_note": args.note,
    }
    atomic_write_json(out / "results.json", {"meta": meta, "results": results}, indent=1)
    write_table(Path(args.table), results, meta)
    print(f"[compare] table written to {args.table}")
    return results


if __name__ == "__main__":
    main()
