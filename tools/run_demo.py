"""``make demo``: the project's main job on built-in data, on CPU, in minutes (README, Set-up).

Steps (each skipped with a note when its component is missing, each reused when its output is already there, so
running the demo twice is cheap and gives the same report):

1. the synthetic shapes world with webdataset shards (``mmoe.data.synthetic.make_world``);
2. shards of the real samples in ``datasets/samples`` (COCO val2017 photos + captions as pairs, ImageNet photos as
   images), mixed into the pretraining streams;
3. BEiT-3 masked multimodal pretraining of ``tiny_mhmoe`` (``configs/pretrain/tiny_mhmoe.yaml``) through the
   ``mmoe`` CLI for a few hundred steps;
4. VQA fine-tuning on the synthetic VQA split from that checkpoint (``configs/finetune/vqav2_synthetic.yaml``),
   and the same fine-tuning from scratch next to it (does the pretraining help?);
5. an expert-assignment picture (``mmoe-viz``, ``mmoe.cli.visualize_experts``);
6. ``OUT/report.md``: losses, perplexities, VQA score, expert activation ratio and diversity per MoE layer.

    python tools/run_demo.py --out runs/demo            # ~300 pretraining steps
    python tools/run_demo.py --out runs/demo_quick --quick   # a smoke run of every step
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from mmoe.cli.compare_pretraining import read_run_metrics
from mmoe.files import atomic_write_json, atomic_write_text

REPO = Path(__file__).resolve().parents[1]
PRETRAIN_RECIPE = REPO / "configs" / "pretrain" / "tiny_mhmoe.yaml"
VQA_RECIPE = REPO / "configs" / "finetune" / "vqav2_synthetic.yaml"
VIZ_TOOL = REPO / "tools" / "visualize_experts.py"
VOCAB_TOOL = REPO / "tools" / "build_vqa_vocab.py"
SAMPLES = REPO / "datasets" / "samples"


class Demo:
    def __init__(self, out: Path, *, quick: bool, steps: int, vqa_steps: int, seed: int) -> None:
        self.out = out
        self.quick = quick
        self.steps = steps
        self.vqa_steps = vqa_steps
        self.seed = seed
        self.notes: list[str] = []
        self.timings_file = out / "timings.json"  # seconds per step of the run that made each output
        self.timings: dict[str, float] = json.loads(self.timings_file.read_text()) if self.timings_file.exists() else {}
        self.env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        self.log_dir = out / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ helpers

    def _timed(self, name: str, t0: float) -> None:
        """Record a step's seconds and persist them, so a later invocation that reuses the output reports them."""
        self.timings[name] = time.perf_counter() - t0
        atomic_write_json(self.timings_file, self.timings, indent=None)

    def note(self, text: str) -> None:
        print(f"[demo] {text}", flush=True)
        self.notes.append(text)

    def run(self, name: str, cmd: list[str]) -> bool:
        """Run a step as a subprocess, its output in OUT/logs/NAME.log; False (with a note) when it fails."""
        log = self.log_dir / f"{name}.log"
        print(f"[demo] {name}: {' '.join(cmd)}", flush=True)
        t0 = time.perf_counter()
        with open(log, "w") as f:
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=self.env, cwd=REPO)
        self._timed(name, t0)
        if proc.returncode != 0:
            tail = log.read_text().strip().splitlines()[-3:]
            self.note(f"step `{name}` failed (exit {proc.returncode}; see {log}): {' | '.join(tail)}")
            return False
        return True

    # ------------------------------------------------------------------ 1. world
    def world(self) -> Path:
        world = self.out / "world"
        done = world / "DONE.json"
        if done.exists():
            self.note(f"synthetic world reused ({world})")
            return world
        from mmoe.data.synthetic import make_world

        t0 = time.perf_counter()
        n_train, n_val = (64, 16) if self.quick else (1000, 100)
        summary = make_world(
            world, num_train=n_train, num_val=n_val, image_size=64, seed=self.seed, shards=True, shard_maxcount=250
        )
        self._timed("world", t0)
        atomic_write_json(done, {"num_train": n_train, "num_val": n_val, "splits": summary.get("splits")}, indent=None)
        return world

    # ------------------------------------------------------------------ 2. real samples
    def sample_shards(self) -> dict[str, list[str]]:
        """Pairs from datasets/samples/coco and images from datasets/samples/imagenet, as extra shard patterns."""
        out = self.out / "samples_shards"
        from mmoe.data.shard_writer import iter_coco_captions, iter_image_folder, write_shards

        patterns: dict[str, list[str]] = {"pair": [], "image": []}
        ann = SAMPLES / "coco" / "annotations" / "captions_val2017.json"
        if ann.exists():
            if not list((out / "pair").glob("coco-samples-*.tar")):
                rep = write_shards(
                    iter_coco_captions(ann, SAMPLES / "coco" / "val2017"), out / "pair", kind="pair",
                    prefix="coco-samples", max_side=256,
                )  # fmt: skip
                self.note(f"real COCO sample pairs: {rep.written} written to {out / 'pair'}")
            patterns["pair"].append(str(out / "pair" / "coco-samples-*.tar"))
        else:
            self.note(f"no real COCO samples at {ann}; pretraining on the synthetic world only")
        folder = SAMPLES / "imagenet" / "val"
        if folder.is_dir():
            if not list((out / "image").glob("imagenet-samples-*.tar")):
                rep = write_shards(
                    iter_image_folder(folder), out / "image", kind="image", prefix="imagenet-samples", max_side=256
                )
                self.note(f"real ImageNet sample images: {rep.written} written to {out / 'image'}")
            patterns["image"].append(str(out / "image" / "imagenet-samples-*.tar"))
        return patterns

    # ------------------------------------------------------------------ 3. pretraining
    def pretrain(self, world: Path, extra: dict[str, list[str]]) -> Path | None:
        root = self.out / "pretrain"
        ckpt = root / "checkpoints" / "last.ckpt"
        if ckpt.exists() and _ckpt_step(ckpt) >= self.steps:
            self.note(f"pretraining reused ({ckpt}, {self.steps} steps)")
            return ckpt
        s = world / "shards"

        def pats(stream: str, split: str) -> str:
            found = [str(s / stream / f"{split}-*.tar")] + (extra.get(stream, []) if split == "train" else [])
            return "[" + ",".join(found) + "]"

        every = max(1, self.steps // 3)
        cmd = [
            sys.executable, "-m", "mmoe.train.cli", "fit", f"--config={PRETRAIN_RECIPE}",
            f"--trainer.default_root_dir={root}", f"--trainer.max_steps={self.steps}",
            f"--trainer.val_check_interval={every}", f"--checkpoint.every_n_train_steps={every}",
            f"--trainer.log_every_n_steps={5 if self.quick else 10}",
            f"--model.init_args.optim.warmup_steps={max(1, self.steps // 10)}",
            f"--data.init_args.image_shards={pats('image', 'train')}",
            f"--data.init_args.text_shards={pats('text', 'train')}",
            f"--data.init_args.pair_shards={pats('pair', 'train')}",
            f"--data.init_args.val_image_shards={pats('image', 'val')}",
            f"--data.init_args.val_text_shards={pats('text', 'val')}",
            f"--data.init_args.val_pair_shards={pats('pair', 'val')}",
            f"--data.init_args.steps_per_epoch={every}", f"--seed_everything={self.seed}",
        ]  # fmt: skip
        if self.quick:
            cmd += ["--data.init_args.batch_size=6", "--data.init_args.val_steps=1", "--data.init_args.num_workers=0"]
        if ckpt.exists():
            cmd.append("--ckpt_path=last")  # an interrupted demo continues where it stopped
        return ckpt if self.run("pretrain", cmd) and ckpt.exists() else None

    # ------------------------------------------------------------------ 4. VQA
    def vqa(self, world: Path, ckpt: Path | None, *, name: str = "vqa") -> Path | None:
        """Fine-tune VQA into OUT/name: from `ckpt`, or from scratch when it is None (the `vqa_scratch` twin:
        same recipe, steps and seed, so the report shows what the pretraining bought)."""
        if not VQA_RECIPE.exists():
            self.note(f"VQA fine-tuning skipped: {VQA_RECIPE.relative_to(REPO)} is not there yet")
            return None
        root = self.out / name
        if (root / "checkpoints" / "last.ckpt").exists() and (root / "DONE").exists():
            self.note(f"VQA fine-tuning reused ({name})")
            return root
        vqa = world / "vqa"
        vocab = vqa / "answer_vocab.json"
        if not vocab.exists():
            if not VOCAB_TOOL.exists():
                self.note("VQA fine-tuning skipped: tools/build_vqa_vocab.py is missing")
                return None
            ok = self.run(
                "vqa_vocab",
                [
                    sys.executable, str(VOCAB_TOOL), "--annotations",
                    str(vqa / "v2_mscoco_train2014_annotations.json"), "--out", str(vocab),
                    "--min-count", "1" if self.quick else "9",
                ],
            )  # fmt: skip
            if not ok:
                return None
        coco = world / "coco"
        train = {
            "questions": str(vqa / "v2_OpenEnded_mscoco_train2014_questions.json"),
            "annotations": str(vqa / "v2_mscoco_train2014_annotations.json"),
            "images": str(coco / "train2014"),
        }
        val = {
            "questions": str(vqa / "v2_OpenEnded_mscoco_val2014_questions.json"),
            "annotations": str(vqa / "v2_mscoco_val2014_annotations.json"),
            "images": str(coco / "val2014"),
        }
        stages = (("train", train), ("val", val), ("test", val))
        files = [f"--data.init_args.{stage}_{k}={v}" for stage, d in stages for k, v in d.items()]
        cmd = [
            sys.executable, "-m", "mmoe.train.cli", "fit", f"--config={VQA_RECIPE}",
            f"--trainer.default_root_dir={root}", f"--trainer.max_steps={self.vqa_steps}",
            f"--trainer.val_check_interval={self.vqa_steps}", f"--checkpoint.every_n_train_steps={self.vqa_steps}",
            f"--model.init_args.label_vocab={vocab}", f"--data.init_args.answer_vocab={vocab}",
            *files, f"--seed_everything={self.seed}",
        ]  # fmt: skip
        if ckpt is not None:
            cmd.append(f"--model.init_args.init_from={ckpt}")
        elif name == "vqa":
            self.note("VQA fine-tuned from scratch (no pretraining checkpoint)")
        if self.quick:
            cmd += ["--trainer.limit_val_batches=2", "--data.init_args.batch_size=8"]
        if not self.run(name, cmd):
            return None
        (root / "DONE").write_text("ok")
        return root

    # ------------------------------------------------------------------ 5. picture
    def picture(self, ckpt: Path | None) -> Path | None:
        if not VIZ_TOOL.exists():
            self.note("expert picture skipped: tools/visualize_experts.py is not there yet")
            return None
        if ckpt is None:
            self.note("expert picture skipped: no pretraining checkpoint")
            return None
        out = self.out / "experts"
        done = (out / "experts.json").exists() and (out / "index.html").exists()
        if done and (out / "experts.json").stat().st_mtime >= ckpt.stat().st_mtime:
            self.note("expert picture reused")
            return out
        # the real COCO pairs (each photo with its caption: the viewer shows the text routing too), else photos
        shards = sorted((self.out / "samples_shards" / "pair").glob("coco-samples-*.tar"))
        images = shards[0] if shards else SAMPLES / "coco" / "val2017"
        if not shards and not images.is_dir():
            images = self.out / "world" / "coco" / "val2014"
        cmd = [
            sys.executable, str(VIZ_TOOL), "--checkpoint", str(ckpt), "--image", str(images),
            "--limit", "2" if self.quick else "4", "--out", str(out), "--html", "--no-progress",
        ]  # fmt: skip
        return out if self.run("experts", cmd) else None

    # ------------------------------------------------------------------ 6. report
    def report(
        self, pre: Path | None, vqa: Path | None, pic: Path | None, total: float, scratch: Path | None = None
    ) -> Path:
        lines = ["# mmoe demo report", ""]
        lines.append(
            f"Command: `python tools/run_demo.py --out {self.out}"
            + (" --quick" if self.quick else "")
            + f"` (seed {self.seed}, {self.steps} pretraining steps). Time of the steps that made these outputs: "
            + f"{sum(self.timings.values()) / 60:.1f} min ("
            + ", ".join(f"{k} {v:.0f} s" for k, v in self.timings.items())
            + f"); this invocation took {total / 60:.1f} min (finished outputs are reused)."
        )
        lines += ["", "## Masked multimodal pretraining (tiny_mhmoe, BEiT-3 objectives, [B3] sec. 2.2)", ""]
        rows = read_run_metrics(self.out / "pretrain")
        if rows:
            first, last = _first_last(rows, "train/loss")
            lines.append("| metric | first logged | last logged |")
            lines.append("|---|---|---|")
            for key in ["train/loss", "train/loss_mlm_text", "train/loss_mlm_pair", "train/loss_mim_image",
                        "train/loss_mim_pair", "train/aux_loss"]:  # fmt: skip
                a, b = _first_last(rows, key)
                if a is not None:
                    lines.append(f"| `{key}` | {a:.4f} | {b:.4f} |")
            val = _last(rows, "val/loss")
            if val:
                lines += ["", f"Validation after {int(val['step']) + 1} steps:", ""]
                for key in ("val/loss", "val/ppl_mlm_text", "val/ppl_mlm_pair", "val/loss_mim_image"):
                    if val.get(key):
                        lines.append(f"- `{key}` = {float(val[key]):.4f}")
                layers = sorted({k.split("/")[2] for k in val if k.startswith("val/moe/") and val[k]})
                if layers:
                    lines += ["", "Expert routing on the validation set, per MoE layer ([MH1] Fig. 1 metrics):", ""]
                    lines.append("| layer | activation ratio | diversity (distinct experts per token) | max load |")
                    lines.append("|---|---|---|---|")
                    for layer in layers:
                        ratio, div, load = (
                            float(val.get(f"val/moe/{layer}/{m}") or "nan")
                            for m in ("activation_ratio", "diversity", "load_max")
                        )
                        lines.append(f"| {layer} | {ratio:.3f} | {div:.3f} | {load:.3f} |")
            if first is None:
                lines.append("(no training losses logged)")
        else:
            lines.append("Pretraining did not run; see the notes below.")
        lines += ["", "## VQA fine-tuning on the synthetic VQA split", ""]
        scores: dict[str, float] = {}
        for label, root in (
            ("from the pretraining above" if pre else "from scratch (no pretraining checkpoint)", vqa),
            ("from scratch (same recipe, steps and seed)", scratch),
        ):
            rows = read_run_metrics(root) if root else []
            val = _last(rows, "val/vqa_score") if rows else None
            if val:
                scores[label] = float(val["val/vqa_score"])
        if scores:
            lines.append(f"VQA score (official accuracy, val split) after {self.vqa_steps} fine-tuning steps:")
            lines += ["", "| start | VQA score |", "|---|---|"]
            lines += [f"| {label} | **{score:.2f}** |" for label, score in scores.items()]
        else:
            lines.append("Not run (see notes).")
        lines += ["", "## Expert assignment picture", ""]
        if pic:
            pngs = sorted(pic.glob("images/*/*_experts.png"))[-1:] + sorted(pic.glob("images/*/*_diversity.png"))[-1:]
            pngs += [p for p in (pic / "load_heatmap.png", pic / "activation.png") if p.exists()]
            for png in pngs:
                lines.append(f"![{png.name}]({png.relative_to(self.out)})")
            if not pngs:
                lines.append(f"(no PNG written under {pic})")
            if (pic / "index.html").exists():
                page = (pic / "index.html").relative_to(self.out)
                lines += ["", f"Interactive routing viewer (opens from disk in a browser): `{page}`"]
        else:
            lines.append("Not drawn (see notes).")
        if self.notes:
            lines += ["", "## Notes", ""] + [f"- {n}" for n in self.notes]
        path = self.out / "report.md"
        atomic_write_text(path, "\n".join(lines) + "\n")
        return path


def _ckpt_step(path: Path) -> int:
    import torch

    try:
        return int(torch.load(path, map_location="cpu", weights_only=True).get("global_step", 0))
    except Exception:  # a damaged checkpoint is redone
        return -1


def _first_last(rows: list[dict[str, str]], key: str) -> tuple[float | None, float | None]:
    vals = [float(r[key]) for r in rows if r.get(key)]
    vals = [v for v in vals if math.isfinite(v)]
    return (vals[0], vals[-1]) if vals else (None, None)


def _last(rows: list[dict[str, str]], key: str) -> dict[str, Any] | None:
    hits = [r for r in rows if r.get(key)]
    return hits[-1] if hits else None


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="output folder (reused when run again)")
    p.add_argument("--steps", type=int, default=None, help="pretraining steps (default 300; 6 with --quick)")
    p.add_argument("--vqa-steps", type=int, default=None, help="VQA fine-tuning steps (default 250; 4 with --quick)")
    p.add_argument("--quick", action="store_true", help="tiny world and a few steps: checks every step runs")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    steps = args.steps or (6 if args.quick else 300)
    vqa_steps = args.vqa_steps or (4 if args.quick else 250)
    demo = Demo(out, quick=args.quick, steps=steps, vqa_steps=vqa_steps, seed=args.seed)
    t0 = time.perf_counter()
    world = demo.world()
    extra = demo.sample_shards()
    ckpt = demo.pretrain(world, extra)
    vqa = demo.vqa(world, ckpt)
    scratch = demo.vqa(world, None, name="vqa_scratch") if ckpt is not None else None
    pic = demo.picture(ckpt)
    report = demo.report(ckpt, vqa, pic, time.perf_counter() - t0, scratch)
    print(f"[demo] report: {report}")
    return report


if __name__ == "__main__":
    main()
