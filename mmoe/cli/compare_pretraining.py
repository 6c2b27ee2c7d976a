"""Does pretraining transfer, and does MH-MoE help it? A resumable experiment runner on the shapes world.

[MH1] Table 1 / Fig. 1 and [MH2] Tables 1-5 compare Dense, SMoE, X-MoE and MH-MoE by upstream masked-modeling
perplexity and downstream scores. This runner does the same at a size that runs on 2 CPU cores, through the real
``mmoe`` CLI and the shipped recipes, and writes what comes out to a table (``docs/results/comparison.md``).

Stages (one folder each under ``--out``; a finished stage has its ``result.json`` and is skipped when the runner
is started again; an interrupted training stage continues from its last checkpoint; every finished stage's
result is also appended to ``OUT/results.jsonl``, which the table is made from):

- ``world``: the synthetic world (``mmoe-synthetic --variant``), its shards and its VQA answer vocabulary;
- ``prior``: the VQA question-type prior (the best blind answer per question type, from the train split);
- ``film/s{seed}``: the non-transformer yardstick (``mmoe.baselines.film_vqa``) for ``--film-minutes``;
- ``pretrain/{model}/s{seed}``: ``configs/pretrain/{model}.yaml`` with its own budget (or ``--pretrain-steps``);
- ``{task}/{model}/{init}/s{seed}``: the task's synthetic fine-tuning recipe with its own schedule, from scratch
  (``init=scratch``), from that pretraining (``init=pretrained``), or from scratch given the pretraining's
  minutes as well (``init=scratch_long``: the total-compute view); then ``mmoe test`` and the official metric.

Models are recipe names (``tiny_mhmoe``) or ``label=recipe:key=value,...`` with backbone overrides applied to
pretraining and fine-tuning alike (``mh_nohead=tiny_mhmoe:moe.head_layers=0``). Two stages run at once by default
(``--jobs``), each with ``OMP_NUM_THREADS=--threads``::

    python -m mmoe.cli.compare_pretraining --out runs/compare --variant alt --models tiny_mhmoe \\
        --seeds 0 --tasks vqa nlvr2 captioning --inits scratch pretrained --table docs/results/comparison.md

(``python tools/compare_pretraining.py`` in a source checkout.) ``read_run_metrics`` (every version's
``metrics.csv`` of a run, also used by the demo) and ``summarize_run`` are importable.
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
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mmoe.files import atomic_write_json, atomic_write_text
from mmoe.resources import recipe_path

__all__ = [
    "Stage",
    "Runner",
    "read_run_metrics",
    "metric_points",
    "summarize_run",
    "run_stages",
    "run_with_tables",
    "add_runner_arguments",
    "load_results",
    "write_table",
    "main",
]

TASK_RECIPES = {
    "vqa": "finetune/vqav2_synthetic",
    "nlvr2": "finetune/nlvr2_synthetic",
    "captioning": "finetune/coco_captioning_synthetic",
}
# The headline number of each task's ``mmoe test`` (docs/interfaces.md): VQA score, NLVR2 accuracy, CIDEr-D.
TASK_METRIC = {"vqa": "test/vqa_score", "nlvr2": "test/acc", "captioning": "test/CIDEr"}
WORLD_PREFIX = "data/shapes"  # the shipped synthetic recipes' data paths start with this


def read_run_metrics(root: Path) -> list[dict[str, str]]:
    """Rows of every version's metrics.csv under a run folder (the ``mmoe`` CLI's layout), oldest version first."""
    rows: list[dict[str, str]] = []
    for f in sorted(root.glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1])):
        with open(f) as fh:
            rows += list(csv.DictReader(fh))
    return rows


def metric_points(rows: list[dict[str, str]], key: str) -> list[tuple[int, float]]:
    """``(step, value)`` of every row of ``read_run_metrics`` that logged ``key``, in row order."""
    return [(int(r["step"]), float(r[key])) for r in rows if r.get(key) not in (None, "")]


def summarize_run(root: Path) -> dict[str, Any]:
    """Final validation metrics, routing averaged over MoE layers, median step time, and the validation curves
    (``curves``: key -> [(step, value)]) of one pretraining run folder."""
    rows = read_run_metrics(root)
    val = [r for r in rows if r.get("val/loss")]
    if not val:
        raise SystemExit(f"compare_pretraining: no validation row in {root}/version_*/metrics.csv")
    last = val[-1]
    out: dict[str, Any] = {"step": int(last["step"]) + 1}
    keys = ("loss_mlm_text", "loss_mlm_pair", "loss_mim_image", "loss_mim_pair", "ppl_mlm_text", "ppl_mlm_pair",
            "ppl_mim_image", "ppl_mim_pair", "grounding_gain")  # fmt: skip
    for key in keys:
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
    out["curves"] = {k: metric_points(rows, f"val/{k}") for k in ("ppl_mlm_text", "ppl_mlm_pair", "ppl_mim_image")}
    return out


# ------------------------------------------------------------------------------------------------ the runner


@dataclass
class Stage:
    """One unit of work: ``run(folder)`` returns its result dict; ``deps`` are keys of stages it needs."""

    key: str
    run: Callable[[Path], dict[str, Any]]
    deps: list[str] = field(default_factory=list)
    # The files later stages read from this stage's folder are there (a checkpoint, a world). A stage known
    # finished only from a records file (``run_stages(records=...)``) runs again when a stage that needs it is
    # still to run and this says False: a fresh machine has the committed numbers but not the checkpoints.
    present: Callable[[Path], bool] | None = None


def _folder(out: Path, key: str) -> Path:
    return out / key


def stage_result(out: Path, key: str, records: Path | None = None) -> dict[str, Any] | None:
    """The stored result of a finished stage (its ``result.json``, else its latest line in ``records``), None
    when it has not finished."""
    f = _folder(out, key) / "result.json"
    if f.is_file():
        return json.loads(f.read_text())
    return _read_jsonl(records).get(key) if records is not None else None


def _read_jsonl(path: Path) -> dict[str, dict[str, Any]]:
    """The latest line of every stage key in a results JSONL file (empty when the file is not there)."""
    results: dict[str, dict[str, Any]] = {}
    if path.is_file():
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    r = json.loads(line)
                except json.JSONDecodeError as e:
                    raise SystemExit(f"compare_pretraining: {path} line {n} is not JSON ({e})") from None
                results[r["key"]] = r
    return results


def run_stages(
    stages: Sequence[Stage],
    out: Path,
    *,
    jobs: int = 2,
    log: Callable[[str], None] = print,
    records: Path | None = None,
    on_done: Callable[[], None] | None = None,
) -> None:
    """Run the unfinished stages, at most ``jobs`` at once, each after its dependencies.

    A stage's result goes to ``FOLDER/result.json`` (atomically: a stage killed before writing it runs again)
    and is appended to ``OUT/results.jsonl`` and to ``records`` when given. ``records`` is a results file that
    outlives ``OUT`` (kept in version control, say): a stage with a line there counts as finished, so a long
    comparison spread over machines whose disks do not persist reruns only what no line records, plus the
    recorded stages whose files an unfinished stage still needs (``Stage.present``). A failing stage stops the
    stages that depend on it, not the others. ``on_done`` is called after every finished stage (the runner
    rewrites its tables there, so a run stopped at any point leaves them up to date).
    """
    by_key = {s.key: s for s in stages}
    recorded = _read_jsonl(records) if records is not None else {}
    for s in stages:
        for d in s.deps:
            if d not in by_key and stage_result(out, d) is None and d not in recorded:
                raise ValueError(f"compare_pretraining: stage {s.key!r} needs {d!r}, which is not scheduled")
    done = {s.key for s in stages if s.key in recorded or stage_result(out, s.key) is not None}
    changed = True
    while changed:  # a recorded stage whose files are gone runs again if an unfinished stage needs them
        changed = False
        for s in stages:
            if s.key in done:
                continue
            for d in s.deps:
                dep = by_key.get(d)
                if d in done and dep is not None and dep.present is not None and not dep.present(_folder(out, d)):
                    done.discard(d)
                    (_folder(out, d) / "result.json").unlink(missing_ok=True)
                    log(f"[compare] {d}: recorded, but {s.key} needs its files: running it again")
                    changed = True
    failed: set[str] = set()
    lock = threading.Lock()

    def work(stage: Stage) -> dict[str, Any]:
        folder = _folder(out, stage.key)
        folder.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        result = stage.run(folder)
        result.setdefault("seconds", round(time.perf_counter() - t0, 1))
        result["key"] = stage.key
        atomic_write_json(folder / "result.json", result, indent=1)
        with lock:
            for path in filter(None, [out / "results.jsonl", records]):
                with open(path, "a") as fh:
                    fh.write(json.dumps(result) + "\n")
        return result

    pending = [s for s in stages if s.key not in done]
    running: dict[Future[dict[str, Any]], Stage] = {}
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        while pending or running:
            for s in list(pending):
                if any(d in failed for d in s.deps):
                    pending.remove(s)
                    failed.add(s.key)
                    log(f"[compare] {s.key}: skipped, a stage it needs failed")
                elif len(running) < jobs and all(d in done for d in s.deps):
                    pending.remove(s)
                    log(f"[compare] {s.key}: started")
                    running[pool.submit(work, s)] = s
            if not running:
                if pending:
                    raise RuntimeError(f"compare_pretraining: stages wait on each other: {[s.key for s in pending]}")
                break
            finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for fut in finished:
                s = running.pop(fut)
                try:
                    r = fut.result()
                    done.add(s.key)
                    log(f"[compare] {s.key}: done in {r['seconds']} s")
                    if on_done is not None:
                        on_done()
                except Exception as e:  # noqa: BLE001 - report and go on with the independent stages
                    failed.add(s.key)
                    log(f"[compare] {s.key}: FAILED ({type(e).__name__}: {e})")
    if failed:
        raise SystemExit(f"compare_pretraining: {len(failed)} stage(s) failed or were skipped: {sorted(failed)}")


# ------------------------------------------------------------------------------------------------ commands


@dataclass(frozen=True)
class Model:
    """A model of the comparison: a label, the tiny recipe it starts from, backbone overrides."""

    label: str
    recipe: str
    overrides: dict[str, Any]

    @classmethod
    def parse(cls, text: str) -> Model:
        head, _, over = text.partition(":")
        label, _, recipe = head.rpartition("=")
        overrides: dict[str, Any] = {}
        for item in filter(None, over.split(",")):
            k, sep, v = item.partition("=")
            if not sep:
                raise SystemExit(f"compare_pretraining: --models {text!r}: override {item!r} is not key=value")
            overrides[k] = yaml.safe_load(v)
        return cls(label or recipe, recipe, overrides)

    def backbone_overrides(self, base: dict[str, Any] | None = None) -> dict[str, Any]:
        """Nested override dict (``moe.head_layers=0`` -> ``{"moe": {"head_layers": 0}}``) merged into ``base``."""
        out: dict[str, Any] = json.loads(json.dumps(base or {}))
        for k, v in self.overrides.items():
            node = out
            *parents, leaf = k.split(".")
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = v
        return out


def _recipe(name: str) -> tuple[Path, dict[str, Any]]:
    path = Path(recipe_path(name))
    return path, yaml.safe_load(path.read_text())


def world_overrides(recipe: dict[str, Any], world: Path, section: str = "data") -> list[str]:
    """``--data.init_args.K=V`` (and ``--model...``) flags that point a synthetic recipe's ``data/shapes`` paths
    at ``world`` (strings and lists of strings)."""
    flags: list[str] = []
    for sec in (section, "model"):
        args = (recipe.get(sec) or {}).get("init_args") or {}
        for k, v in args.items():
            if isinstance(v, str) and v.startswith(WORLD_PREFIX):
                flags.append(f"--{sec}.init_args.{k}={world}{v[len(WORLD_PREFIX) :]}")
            elif isinstance(v, list) and v and all(isinstance(x, str) and x.startswith(WORLD_PREFIX) for x in v):
                flags.append(f"--{sec}.init_args.{k}=[" + ",".join(f"{world}{x[len(WORLD_PREFIX) :]}" for x in v) + "]")
    return flags


class Runner:
    """Builds the stages of one comparison (their commands) from the parsed arguments."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out: Path = Path(args.out).resolve()
        self.world = Path(args.world).resolve() if args.world else self.out / "world"
        self.env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        self.records: Path | None = Path(args.results).resolve() if args.results else None

    def result(self, key: str) -> dict[str, Any]:
        """The result of a finished stage this one depends on."""
        r = stage_result(self.out, key, self.records)
        if r is None:
            raise RuntimeError(f"compare_pretraining: stage {key!r} has no result")
        return r

    def _cli(self, folder: Path, name: str, cmd: list[str]) -> None:
        with open(folder / f"{name}.log", "a") as log:
            log.write(f"$ {shlex.join(cmd)}\n")
            log.flush()
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env)
        if proc.returncode:
            tail = (folder / f"{name}.log").read_text().strip().splitlines()[-3:]
            raise RuntimeError(f"{name} exited {proc.returncode} ({folder / f'{name}.log'}): {' | '.join(tail)}")

    def _fit(self, folder: Path, config: Path, flags: list[str]) -> float:
        """``mmoe fit`` in ``folder`` (continuing from its last checkpoint when one is there); its seconds."""
        ckpt = folder / "checkpoints" / "last.ckpt"
        resume = [f"--ckpt_path={ckpt}"] if ckpt.exists() else []
        t0 = time.perf_counter()
        cmd = [
            sys.executable,
            "-m",
            "mmoe.train.cli",
            "fit",
            f"--config={config}",
            f"--trainer.default_root_dir={folder}",
        ]
        self._cli(folder, "fit", cmd + flags + resume)
        seconds = time.perf_counter() - t0
        prior = folder / "fit_seconds.json"  # an interrupted fit counts the time of every attempt
        total = seconds + (json.loads(prior.read_text())["seconds"] if prior.exists() and resume else 0.0)
        atomic_write_json(prior, {"seconds": total})
        return total

    # --------------------------------------------------------------------------------------- stages

    def world_stage(self, folder: Path) -> dict[str, Any]:
        from mmoe.data.synthetic import make_world

        a = self.args
        summary = make_world(self.world, num_train=a.num_train, num_val=a.num_val, seed=a.world_seed,
                             variant=a.variant, shards=True, shard_maxcount=500)  # fmt: skip
        vqa = self.world / "vqa"
        cmd = [sys.executable, "-m", "mmoe.cli.build_vqa_vocab", "--annotations",
               str(vqa / "v2_mscoco_train2014_annotations.json"), "--out", str(vqa / "answer_vocab.json"),
               "--min-count", "9"]  # fmt: skip
        self._cli(folder, "vocab", cmd)
        return {"world": self.world.name, "variant": a.variant, "splits": summary["splits"]}

    def prior_stage(self, folder: Path) -> dict[str, Any]:
        from mmoe.metrics.vqa import evaluate_vqa, load_vqa_json, prior_baseline

        vqa = self.world / "vqa"
        train = load_vqa_json(vqa / "v2_mscoco_train2014_annotations.json", "annotations")
        val = load_vqa_json(vqa / "v2_mscoco_val2014_annotations.json", "annotations")
        summary = evaluate_vqa(val, prior_baseline(train, val, by="question_type"))
        summary.pop("perQuestion")
        return {"vqa": summary}

    def film_stage(self, seed: int) -> Callable[[Path], dict[str, Any]]:
        def run(folder: Path) -> dict[str, Any]:
            cmd = [sys.executable, "-m", "mmoe.baselines.film_vqa", "--world", str(self.world), "--out", str(folder),
                   "--minutes", str(self.args.film_minutes), "--seed", str(seed)]  # fmt: skip
            self._cli(folder, "film", cmd)
            return {"vqa": json.loads((folder / "summary.json").read_text())}

        return run

    def pretrain_stage(self, model: Model, seed: int) -> Callable[[Path], dict[str, Any]]:
        def run(folder: Path) -> dict[str, Any]:
            config, recipe = _recipe(f"pretrain/{model.recipe}")
            flags = world_overrides(recipe, self.world) + [f"--seed_everything={seed}", f"--data.init_args.seed={seed}"]
            over = model.backbone_overrides(recipe["model"]["init_args"].get("backbone_overrides"))
            if over:
                flags.append(f"--model.init_args.backbone_overrides={json.dumps(over)}")
            if self.args.pretrain_steps:
                steps = self.args.pretrain_steps
                flags += [f"--trainer.max_steps={steps}", f"--trainer.val_check_interval={max(1, steps // 5)}"]
            flags.append(f"--checkpoint.every_n_train_steps={self.args.checkpoint_every}")
            seconds = self._fit(folder, config, flags)
            summary = summarize_run(folder)
            return {
                "pretrain": summary,
                "fit_seconds": round(seconds, 1),
                "checkpoint": str((folder / "checkpoints" / "last.ckpt").relative_to(self.out)),  # no machine path
            }

        return run

    def finetune_stage(self, task: str, model: Model, init: str, seed: int) -> Callable[[Path], dict[str, Any]]:
        def run(folder: Path) -> dict[str, Any]:
            config, recipe = _recipe(TASK_RECIPES[task])
            flags = world_overrides(recipe, self.world) + [
                f"--seed_everything={seed}",
                f"--model.init_args.backbone={model.recipe}",
            ]
            over = model.backbone_overrides(recipe["model"]["init_args"].get("backbone_overrides"))
            if over:
                flags.append(f"--model.init_args.backbone_overrides={json.dumps(over)}")
            steps = int(recipe["trainer"]["max_steps"])
            if init == "pretrained":
                pre = self.result(f"pretrain/{model.label}/s{seed}")
                flags.append(f"--model.init_args.init_from={self.out / pre['checkpoint']}")
            elif init == "scratch_long":  # the pretraining's minutes given to fine-tuning from scratch as well
                pre = self.result(f"pretrain/{model.label}/s{seed}")
                short = self.result(f"{task}/{model.label}/scratch/s{seed}")
                steps = round(steps * (1 + pre["fit_seconds"] / short["fit_seconds"]))
                flags += [f"--trainer.max_steps={steps}", f"--trainer.val_check_interval={steps}"]
            every = f"--checkpoint.every_n_train_steps={min(steps, self.args.checkpoint_every)}"
            seconds = self._fit(folder, config, [*flags, every])
            test = [sys.executable, "-m", "mmoe.train.cli", "test", f"--config={config}",
                    f"--trainer.default_root_dir={folder}", f"--ckpt_path={folder / 'checkpoints' / 'last.ckpt'}",
                    *(f for f in flags if not f.startswith("--model.init_args.init_from"))]  # fmt: skip
            self._cli(folder, "test", test)
            rows = [r for r in read_run_metrics(folder) if r.get(TASK_METRIC[task])]
            if not rows:
                raise RuntimeError(f"{folder}: no {TASK_METRIC[task]} in the test metrics")
            result: dict[str, Any] = {
                "task": task, "model": model.label, "init": init, "seed": seed, "steps": steps,
                "fit_seconds": round(seconds, 1),
                "test": {k: float(v) for k, v in rows[-1].items() if k.startswith("test/") and v},
            }  # fmt: skip
            if task == "vqa":
                result["vqa"] = self._vqa_official(folder)
            return result

        return run

    def _vqa_official(self, folder: Path) -> dict[str, Any]:
        from mmoe.metrics.vqa import evaluate_vqa, load_vqa_json

        found = sorted(folder.glob("**/vqa_results.json"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise RuntimeError(f"{folder}: mmoe test wrote no vqa_results.json")
        anns = load_vqa_json(self.world / "vqa" / "v2_mscoco_val2014_annotations.json", "annotations")
        summary = evaluate_vqa(anns, json.loads(found[-1].read_text()))
        summary.pop("perQuestion")
        return summary

    def stages(self) -> list[Stage]:
        a = self.args
        models = [Model.parse(m) for m in a.models]
        out = [Stage("world", self.world_stage, present=lambda _: (self.world / "vqa" / "answer_vocab.json").is_file())]
        if "vqa" in a.tasks:
            out.append(Stage("prior", self.prior_stage, ["world"]))
            if a.film_minutes > 0:
                out += [Stage(f"film/s{s}", self.film_stage(s), ["world"]) for s in a.seeds]
        for m in models:
            for s in a.seeds:
                pre = f"pretrain/{m.label}/s{s}"
                if a.pretrain or {"pretrained", "scratch_long"} & set(a.inits):
                    has_ckpt = lambda folder: (folder / "checkpoints" / "last.ckpt").is_file()  # noqa: E731
                    out.append(Stage(pre, self.pretrain_stage(m, s), ["world"], present=has_ckpt))
                # the stages that need the pretraining's checkpoint first: a run cut short loses fewer minutes
                for init in sorted(a.inits, key=lambda i: i == "scratch"):
                    for task in a.tasks:
                        deps = ["world"] + ([pre] if init != "scratch" else [])
                        if init == "scratch_long":
                            deps.append(f"{task}/{m.label}/scratch/s{s}")
                        out.append(Stage(f"{task}/{m.label}/{init}/s{s}", self.finetune_stage(task, m, init, s), deps))
        return out


# ------------------------------------------------------------------------------------------------ the table


def _mean_std(values: list[float], nd: int = 2) -> str:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return "n/a"
    if len(vals) == 1:
        return f"{vals[0]:.{nd}f}"
    return f"{statistics.fmean(vals):.{nd}f} ± {statistics.stdev(vals):.{nd}f}"


def load_results(out: Path, records: Path | None = None) -> dict[str, dict[str, Any]]:
    """The latest result of every stage in ``records`` and then ``OUT/results.jsonl`` (a stage rerun later
    wins)."""
    results = _read_jsonl(records) if records is not None else {}
    results.update(_read_jsonl(out / "results.jsonl"))
    return results


def write_table(path: Path, results: dict[str, dict[str, Any]], meta: dict[str, Any]) -> None:
    """Markdown tables (mean ± std over seeds) of whatever stages have finished."""
    lines = [
        f"# {meta.get('title', 'Pretraining comparison on the shapes world')}",
        "",
        f"Command: `{meta['command']}`",
        "",
    ]
    if meta.get("intro"):
        lines += [meta["intro"], ""]
    world = results.get("world")
    if world:
        lines += [f"World: variant `{world['variant']}`, {json.dumps(world['splits']['train'])} (train).", ""]
    # VQA by question type
    vqa_rows: list[tuple[str, dict[str, Any], str]] = []
    if "prior" in results:
        vqa_rows.append(("question-type prior (blind)", results["prior"]["vqa"], "0"))
    films = [r for k, r in results.items() if k.startswith("film/")]
    for r in films:
        vqa_rows.append((f"FiLM CNN+GRU ({r['key']})", r["vqa"], f"{r['vqa'].get('train_seconds', 0):.0f}"))
    for _, r in sorted(results.items()):
        if r.get("task") == "vqa" and "vqa" in r:
            vqa_rows.append(
                (f"{r['model']} {r['init']} s{r['seed']} ({r['steps']} steps)", r["vqa"], f"{r['fit_seconds']:.0f}")
            )
    if vqa_rows:
        qtypes = sorted({q for _, v, _ in vqa_rows for q in v["perQuestionType"]})
        lines += ["## VQA by question type (official metric, val split)", "",
                  "| run | fit s | overall | " + " | ".join(qtypes) + " |",
                  "|---|---|---|" + "---|" * len(qtypes)]  # fmt: skip
        for name, v, secs in vqa_rows:
            cells = " | ".join(f"{v['perQuestionType'].get(q, float('nan')):.1f}" for q in qtypes)
            lines.append(f"| {name} | {secs} | {v['overall']:.2f} | {cells} |")
        lines.append("")
    # downstream by model x init, mean ± std over seeds
    tasks = [t for t in TASK_METRIC if any(r.get("task") == t for r in results.values())]
    if tasks:
        groups: dict[tuple[str, str], dict[str, list[float]]] = {}
        seeds: dict[tuple[str, str], set[int]] = {}
        for r in results.values():
            if r.get("task") in tasks:
                g = (r["model"], r["init"])
                groups.setdefault(g, {}).setdefault(r["task"], []).append(
                    r["test"].get(TASK_METRIC[r["task"]], math.nan)
                )
                seeds.setdefault(g, set()).add(r["seed"])
        lines += ["## Downstream after the same fine-tune (mean ± std over seeds)", "",
                  "| model | start | seeds | " + " | ".join(f"{t} ({TASK_METRIC[t]})" for t in tasks) + " |",
                  "|---|---|---|" + "---|" * len(tasks)]  # fmt: skip
        for (model, init), per in sorted(groups.items()):
            cells = " | ".join(_mean_std(per.get(t, [])) for t in tasks)
            lines.append(f"| {model} | {init} | {len(seeds[(model, init)])} | {cells} |")
        lines.append("")
    pre = [r for k, r in results.items() if k.startswith("pretrain/")]
    if pre:
        by_model: dict[str, list[dict[str, Any]]] = {}
        for r in pre:
            by_model.setdefault(r["key"].split("/")[1], []).append(r)
        lines += ["## Upstream masked modeling (validation, last step; mean ± std over seeds)", "",
                  "| model | seeds | text ppl | pair-text ppl | image ppl | grounding gain | activation ratio "
                  "| max expert load | fit s |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for model, rs in sorted(by_model.items()):
            p = [r["pretrain"] for r in rs]
            lines.append(
                f"| {model} | {len(rs)} | {_mean_std([x['ppl_mlm_text'] for x in p])} "
                f"| {_mean_std([x['ppl_mlm_pair'] for x in p])} | {_mean_std([x['ppl_mim_image'] for x in p])} "
                f"| {_mean_std([x['grounding_gain'] for x in p])} | {_mean_std([x['activation_ratio'] for x in p], 3)} "
                f"| {_mean_std([x['load_max'] for x in p], 3)} | {_mean_std([r['fit_seconds'] for r in rs], 0)} |"
            )
        lines += ["", "Validation text perplexity curves (step: ppl):", ""]
        for _, rs in sorted(by_model.items()):
            for r in rs:
                curve = r["pretrain"]["curves"].get("ppl_mlm_text", [])
                lines.append(f"- {r['key']}: " + ", ".join(f"{s + 1}: {v:.1f}" for s, v in curve))
        lines.append("")
    if meta.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in meta["notes"]] + [""]
    atomic_write_text(path, "\n".join(lines))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m mmoe.cli.compare_pretraining",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default="runs/compare", help="one folder per stage goes here")
    p.add_argument("--world", default=None, help="the world folder (default OUT/world; made by the world stage)")
    p.add_argument("--variant", default="alt", help="mmoe-synthetic --variant of the world")
    p.add_argument("--num-train", type=int, default=3000)
    p.add_argument("--num-val", type=int, default=500)
    p.add_argument("--world-seed", type=int, default=0)
    p.add_argument("--models", nargs="+", default=["tiny_mhmoe"], help="recipe or label=recipe:key=value,...")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--tasks", nargs="*", default=["vqa"], choices=sorted(TASK_RECIPES))
    p.add_argument("--inits", nargs="*", default=["scratch"], choices=["scratch", "pretrained", "scratch_long"])
    p.add_argument("--pretrain", action="store_true", help="pretrain even when no fine-tune starts from it")
    p.add_argument("--pretrain-steps", type=int, default=None, help="default: the pretraining recipe's own")
    p.add_argument("--film-minutes", type=float, default=0.0, help="train the FiLM CNN baseline this long (0: no)")
    p.add_argument("--checkpoint-every", type=int, default=200, help="steps between resumable checkpoints")
    add_runner_arguments(p)
    return p.parse_args(argv)


def add_runner_arguments(p: argparse.ArgumentParser) -> None:
    """The options every experiment runner built on :func:`run_stages` shares (this one and compare_precision):
    parallelism, the records file that outlives ``--out``, and the table."""
    p.add_argument("--jobs", type=int, default=2, help="stages at once")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every stage")
    p.add_argument(
        "--results",
        default=None,
        help="a results JSONL that outlives OUT (e.g. kept in git): stages with a line there are not "
        "run again, unless a stage still to run needs their files; finished stages are appended",
    )
    p.add_argument("--table", default=None, help="write the markdown table here (also OUT/table.md)")
    p.add_argument("--title", default=None)
    p.add_argument("--note", action="append", default=[], help="a line under the table (repeatable)")


def run_with_tables(
    runner: Runner,
    stages: Sequence[Stage],
    args: argparse.Namespace,
    write: Callable[[Path, dict[str, dict[str, Any]]], None],
) -> None:
    """Run the unfinished ``stages`` and rewrite the tables (``OUT/table.md`` and ``--table``) after every finished
    stage and once at the end, also when a stage fails: a stopped run leaves its tables up to date."""
    runner.out.mkdir(parents=True, exist_ok=True)

    def tables() -> None:
        results = load_results(runner.out, runner.records)
        for target in filter(None, [runner.out / "table.md", Path(args.table) if args.table else None]):
            write(target, results)

    try:
        run_stages(stages, runner.out, jobs=args.jobs, records=runner.records, on_done=tables)
    finally:
        tables()


def main(argv: Sequence[str] | None = None) -> int:
    """Run (or continue) the comparison, then write its table; exit status 0 when every stage finished."""
    args = parse_args(argv)
    runner = Runner(args)
    given = list(argv if argv is not None else sys.argv[1:])
    meta = {"command": shlex.join(["python", "tools/compare_pretraining.py", *given]), "notes": args.note}
    if args.title:
        meta["title"] = args.title
    run_with_tables(runner, runner.stages(), args, lambda path, results: write_table(path, results, meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
