"""Does a precision train like fp32? Loss curves of one pretraining recipe under several precisions and seeds.

Why: a precision becomes a recipe's default only when it is both faster and trains the same. Speed is measured
by ``tools/bench_model.py --precision ...``; this runner checks the second half. It runs the real ``mmoe fit`` on
a shipped pretraining recipe (say ``pretrain/base_mhmoe``, BEiT-3 masked multimodal modeling, [B3] sec. 2.2)
for ``--steps`` steps per (precision, seed), on a synthetic world's shards at a size that fits a CPU, and
compares the curves: train loss averaged over windows of ``--window`` steps and the validation loss.

"Within noise" is judged against seeds, not against a tolerance picked here: two fp32 runs that differ only in
their seed (masks, data order, initialisation) set how far apart two equally good curves get. The verdict is
"match" when, at every window, the gap between the mean curve of a precision and the mean fp32 curve is no
larger than the largest gap between fp32 seeds over all windows, and the final validation losses differ by no
more than the fp32 seeds' own final gap; otherwise "differs", with the numbers.

Each run is a stage of the pretraining comparison's runner (``mmoe.cli.compare_pretraining.run_stages``):
finished runs are skipped when the command is started again, an interrupted run continues from its last
checkpoint, and ``--results`` keeps the finished curves in a file that outlives ``--out``::

    python -m mmoe.cli.compare_precision --recipe pretrain/base_mhmoe --world runs/world \\
        --precisions 32-true bf16-mixed --seeds 0 1 --steps 300 --table docs/results/precision_curves.md

(``python tools/compare_precision.py`` in a source checkout; the world: ``mmoe-synthetic --shards``.)
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from mmoe.cli.compare_pretraining import (
    Runner,
    Stage,
    add_runner_arguments,
    metric_points,
    read_run_metrics,
    run_with_tables,
)
from mmoe.files import atomic_write_text
from mmoe.resources import recipe_path

__all__ = ["window_means", "verdict", "main"]

SHARD_KEYS = {  # data.init_args key -> the shard folder and split of a world made by ``mmoe-synthetic --shards``
    "image_shards": "image/train",
    "text_shards": "text/train",
    "pair_shards": "pair/train",
    "val_image_shards": "image/val",
    "val_text_shards": "text/val",
    "val_pair_shards": "pair/val",
}


def window_means(curve: Sequence[tuple[int, float]], window: int, steps: int) -> list[float]:
    """Mean of ``curve``'s values over the steps ``[w * window, (w + 1) * window)`` for every full window.

    A window with no logged step (a run cut short) is NaN, which fails every comparison below.
    """
    out: list[float] = []
    for w in range(steps // window):
        vals = [v for s, v in curve if w * window <= s < (w + 1) * window]
        out.append(statistics.fmean(vals) if vals else float("nan"))
    return out


def _mean_curve(curves: Sequence[Sequence[float]]) -> list[float]:
    return [statistics.fmean(col) for col in zip(*curves)]


def verdict(
    windows: dict[str, list[list[float]]],
    final_val: dict[str, list[float]],
    reference: str,
    seeds: dict[str, list[int]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Per precision: its largest window gap to the reference's mean curve, against the reference's seed noise.

    ``windows[p]`` holds one window-mean curve per seed; ``final_val[p]`` one final validation loss per seed. The
    reference (fp32) needs at least two seeds: its seed-to-seed gaps are the noise a precision is measured against.
    With ``seeds`` (the seed of every curve) the result also has ``same_seed_gap``: the largest window gap between
    a precision's run and the reference run of the same seed (same data, masks and initial weights), which shows
    the numerics alone; it is reported, not judged.
    """
    ref = windows[reference]
    if len(ref) < 2:
        raise ValueError(f"compare_precision: the reference {reference!r} needs two or more seeds to measure noise")
    seed_gap = max(max(col) - min(col) for col in zip(*ref))
    ref_val = final_val[reference]
    val_noise = max(ref_val) - min(ref_val)
    ref_mean = _mean_curve(ref)
    out: dict[str, dict[str, Any]] = {}
    for prec, curves in windows.items():
        if prec == reference:
            continue
        gaps = [abs(a - b) for a, b in zip(_mean_curve(curves), ref_mean)]
        val_gap = abs(statistics.fmean(final_val[prec]) - statistics.fmean(ref_val))
        ok = all(g <= seed_gap for g in gaps) and val_gap <= val_noise
        same = None
        if seeds is not None:
            by_seed = dict(zip(seeds[reference], ref))
            pairs = [(c, by_seed[sd]) for c, sd in zip(curves, seeds[prec]) if sd in by_seed]
            same = max((abs(a - b) for c, r in pairs for a, b in zip(c, r)), default=None)
        out[prec] = {
            "same_seed_gap": same,
            "max_window_gap": max(gaps),
            "fp32_seed_gap": seed_gap,
            "final_val_gap": val_gap,
            "fp32_final_val_seed_gap": val_noise,
            "verdict": "match" if ok else "differs",
        }
    return out


class PrecisionRunner(Runner):
    """The stages: one ``mmoe fit`` per (precision, seed), same recipe, data and flags otherwise."""

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args)
        self.recipe = Path(recipe_path(args.recipe))
        if args.world is None:
            raise SystemExit("compare_precision: --world is required (a folder made by mmoe-synthetic --shards)")
        for sub in SHARD_KEYS.values():
            if not list((self.world / "shards").glob(f"{sub}-*.tar")):
                raise SystemExit(f"compare_precision: --world {self.world} has no shards/{sub}-*.tar")

    def flags(self, precision: str, seed: int) -> list[str]:
        a = self.args
        data = [f"--data.init_args.{k}=[{self.world}/shards/{v}-*.tar]" for k, v in SHARD_KEYS.items()]
        return data + [
            f"--trainer.precision={precision}",
            f"--seed_everything={seed}",
            f"--data.init_args.seed={seed}",
            f"--trainer.max_steps={a.steps}",
            "--trainer.log_every_n_steps=1",
            f"--trainer.val_check_interval={a.val_every}",
            f"--data.init_args.steps_per_epoch={a.steps}",
            f"--data.init_args.batch_size={a.batch_size}",
            f"--data.init_args.image_size={a.image_size}",
            f"--data.init_args.max_text_len={a.text_len}",
            f"--data.init_args.val_steps={a.val_steps}",
            "--data.init_args.num_workers=1",
            "--data.init_args.shuffle_buffer=200",
            f"--model.init_args.optim.lr={a.lr}",
            f"--model.init_args.optim.warmup_steps={a.warmup}",
            f"--checkpoint.every_n_train_steps={a.checkpoint_every}",
            "--trainer.accelerator=cpu",
        ]

    def run_stage(self, precision: str, seed: int) -> Stage:
        def run(folder: Path) -> dict[str, Any]:
            seconds = self._fit(folder, self.recipe, self.flags(precision, seed))
            rows = read_run_metrics(folder)
            # a step logged twice (a run resumed from a checkpoint older than its last log) keeps its latest value
            train = sorted(dict(metric_points(rows, "train/loss")).items())
            val = sorted(dict(metric_points(rows, "val/loss")).items())
            times = [float(r["train/step_time"]) for r in rows if r.get("train/step_time")]
            if not val:
                raise RuntimeError(f"compare_precision: {folder} logged no val/loss")
            return {
                "precision": precision,
                "seed": seed,
                "recipe": self.args.recipe,
                "steps": self.args.steps,
                "fit_seconds": round(seconds, 1),
                "step_time_median": statistics.median(times) if times else None,
                "train_loss": train,
                "val_loss": val,
            }

        return Stage(key=f"{precision}/s{seed}", run=run)

    def stages(self) -> list[Stage]:  # type: ignore[override]
        return [self.run_stage(p, s) for p in self.args.precisions for s in self.args.seeds]


def write_table(path: Path, results: dict[str, dict[str, Any]], args: argparse.Namespace, command: str) -> None:
    """The curves (window means per run), the final validation losses, the step times and the verdict."""
    runs = [results[k] for k in sorted(results) if results[k].get("recipe") == args.recipe]
    runs = [r for r in runs if r["precision"] in args.precisions and r["seed"] in args.seeds]
    n = args.steps // args.window
    heads = [f"{w * args.window}-{(w + 1) * args.window - 1}" for w in range(n)]
    lines = [
        f"# {args.title or f'Loss curves by precision: {args.recipe}'}",
        "",
        "```bash",
        command,
        "```",
        "",
        f"Recipe `{args.recipe}` as shipped except: {args.steps} steps, batch {args.batch_size} (split over the "
        "recipe's streams), "
        f"{args.image_size} px, text {args.text_len}, lr {args.lr} after {args.warmup} warm-up steps, "
        f"{args.threads} torch thread(s) per run; data: the synthetic world's shards. Train loss = mean of the "
        "logged per-step loss over each window of steps; val loss on the fixed validation batches.",
        "",
        "| precision | seed | " + " | ".join(f"train {h}" for h in heads) + " | final val loss | median step (s) |",
        "|---|---|" + "---|" * n + "---|---|",
    ]
    windows: dict[str, list[list[float]]] = {}
    final_val: dict[str, list[float]] = {}
    seeds: dict[str, list[int]] = {}
    for r in runs:
        seeds.setdefault(r["precision"], []).append(int(r["seed"]))
        wm = window_means([tuple(x) for x in r["train_loss"]], args.window, args.steps)
        windows.setdefault(r["precision"], []).append(wm)
        final_val.setdefault(r["precision"], []).append(float(r["val_loss"][-1][1]))
        st = r.get("step_time_median")
        lines.append(
            f"| {r['precision']} | {r['seed']} | "
            + " | ".join(f"{v:.4f}" for v in wm)
            + f" | {final_val[r['precision']][-1]:.4f} | {'-' if st is None else f'{st:.3f}'} |"
        )
    lines.append("")
    ref = args.precisions[0]
    if ref in windows and len(windows[ref]) >= 2 and len(windows) > 1:
        lines += [
            f"Against `{ref}` (its seeds set the noise):",
            "",
            "| precision | largest window gap to the reference mean | reference seed gap (largest window) "
            "| final val gap | reference seeds' final val gap | same-seed window gap (numerics alone) | verdict |",
            "|---|---|---|---|---|---|---|",
        ]
        for prec, v in verdict(windows, final_val, ref, seeds).items():
            same = "-" if v["same_seed_gap"] is None else f"{v['same_seed_gap']:.4f}"
            lines.append(
                f"| {prec} | {v['max_window_gap']:.4f} | {v['fp32_seed_gap']:.4f} | {v['final_val_gap']:.4f} | "
                f"{v['fp32_final_val_seed_gap']:.4f} | {same} | **{v['verdict']}** |"
            )
    else:
        lines.append(f"(No verdict yet: it needs two finished `{ref}` seeds and another precision.)")
    lines += ["", *args.note]
    atomic_write_text(path, "\n".join(lines).rstrip() + "\n")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m mmoe.cli.compare_precision",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--recipe", default="pretrain/base_mhmoe", help="a shipped pretraining recipe (mmoe-recipes)")
    p.add_argument("--world", default=None, help="a folder made by mmoe-synthetic --shards")
    p.add_argument("--out", default="runs/precision", help="one folder per run goes here")
    p.add_argument("--precisions", nargs="+", default=["32-true", "bf16-mixed"], help="the first is the reference")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--window", type=int, default=50, help="steps per train-loss window")
    p.add_argument("--val-every", type=int, default=100)
    p.add_argument("--val-steps", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--text-len", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--checkpoint-every", type=int, default=100)
    add_runner_arguments(p)
    args = p.parse_args(argv)
    if args.steps < args.window or args.window < 1:
        p.error(f"argument --window={args.window} must be in [1, --steps={args.steps}]")
    with open(recipe_path(args.recipe)) as fh:
        if (yaml.safe_load(fh).get("model") or {}).get("class_path", "").rsplit(".", 1)[-1] != "MaskedPretraining":
            p.error(f"argument --recipe={args.recipe} is not a pretraining recipe (MaskedPretraining)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run (or continue) the runs, then write the table; exit status 0 when every run finished."""
    args = parse_args(argv)
    runner = PrecisionRunner(args)
    command = shlex.join(["python", "tools/compare_precision.py", *(argv if argv is not None else sys.argv[1:])])
    run_with_tables(runner, runner.stages(), args, lambda path, results: write_table(path, results, args, command))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
