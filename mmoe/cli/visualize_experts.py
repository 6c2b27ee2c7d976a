"""``mmoe-viz``: draw which experts image patches and words go to, per MoE layer ([MH1] Fig. 1, 5, 8).

Examples:
    # a freshly initialized tiny MH-MoE on one image and a caption
    mmoe-viz --model tiny_mhmoe --image datasets/samples/coco/000000000139.jpg \
        --text "a living room with a tv" --out runs/viz
    # a trained checkpoint on a folder of images, compared with an SMoE checkpoint
    mmoe-viz --checkpoint runs/mhmoe/last.ckpt --compare runs/smoe/last.ckpt \
        --image datasets/samples/coco --out runs/viz_compare
    # the images (and captions) of a webdataset shard
    mmoe-viz --checkpoint model.pt --image shards/pair/val-000000.tar --limit 8 --out runs/viz

`--checkpoint` takes one of our Lightning checkpoints, an mmoe model file, or a registered model
name / model YAML (freshly initialized with --seed). Writes per model: experts.json, load_heatmap.png,
activation.png, images/*/{layer}_experts.png and _diversity.png, text/routing.md and text/*.png; with
--compare, both models' folders plus compare/ with side-by-side figures. Runs on CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mmoe.cli.progress import ToolProgress, add_progress_flag
from mmoe.viz.capture import ModelRouting, collect_routing, resolve_model
from mmoe.viz.html import write_html
from mmoe.viz.inputs import load_inputs
from mmoe.viz.report import DEFAULT_THRESHOLD, write_comparison, write_report


def visualize(
    checkpoint: str,
    *,
    out: str | Path,
    image: str | Path | None = None,
    text: str | None = None,
    compare: str | None = None,
    labels: Sequence[str] | None = None,
    limit: int | None = 16,
    batch_size: int = 8,
    threshold: float = DEFAULT_THRESHOLD,
    seed: int = 0,
    layers: Sequence[str] | None = None,
    html: bool = False,
    progress: ToolProgress | None = None,
) -> dict[str, Any]:
    """The whole job of `mmoe-viz` as one call: read the inputs, run each model, write the reports.

    `checkpoint` (and `compare`) is one of our Lightning checkpoints, an mmoe model file, or a
    registered model name / YAML for a freshly initialized model. With `compare`, each model writes
    to `out/<label>/` and the side-by-side figures go to `out/compare/`; otherwise everything goes to
    `out/`. With `html`, `out/index.html` is the interactive viewer of every model side by side
    (`mmoe.viz.html`). Returns {"reports": [experts.json per model], "compare": compare.json or None,
    "html": the page's path or None}. `progress` draws bars per model (forward passes, figures).
    """
    specs = [checkpoint] + ([compare] if compare else [])
    if labels is not None and len(labels) != len(specs):
        raise ValueError(f"visualize: labels needs {len(specs)} names (one per model), got {list(labels)}")
    progress = progress or ToolProgress("mmoe-viz", enabled=False)
    inputs = load_inputs(image, text=text, limit=limit)
    out = Path(out)
    results: list[ModelRouting] = []
    reports = []
    for n, spec in enumerate(specs):
        model, label = resolve_model(spec, seed=seed)
        if labels is not None:
            label = labels[n]
        elif n == 1 and label == results[0].label:
            label = f"{label}_2"
        advance = progress.task(f"{label}: routing", total=len(inputs))
        result = collect_routing(model, inputs, label=label, source=spec, batch_size=batch_size, progress=advance)
        if not result.accumulator.layers:
            raise ValueError(f"visualize: {spec}: the model has no MoE layers (a dense model); nothing to draw")
        with progress.step(f"{label}: figures"):
            reports.append(write_report(result, out / label if compare else out, threshold=threshold, layers=layers))
        results.append(result)
    summary = None
    if compare:
        with progress.step("side-by-side figures"):
            summary = write_comparison(results, out / "compare", threshold=threshold, layers=layers)
    page = None
    if html:
        files = ["experts.json", *reports[0]["files"]] if not compare else []
        if compare:
            for r in reports:
                files += [f"{r['model']['label']}/{f}" for f in ["experts.json", *r["files"]]]
            files += [f"compare/{f}" for f in ["compare.json", *summary["files"]]]
        with progress.step("routing viewer"):
            page = write_html(results, out, threshold=threshold, files=files)
    return {"reports": reports, "compare": summary, "html": page}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mmoe-viz", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="Lightning checkpoint, mmoe model file, or registered model name / YAML")
    src.add_argument(
        "--model", help="registered model name or YAML: a freshly initialized model (same as --checkpoint)"
    )
    p.add_argument("--compare", help="a second checkpoint / model name drawn side by side on the same inputs")
    p.add_argument("--labels", nargs="+", help="display labels for the model (and the --compare model)")
    p.add_argument(
        "--image", help="an image file, a folder of images, or a webdataset shard (.tar, pipe:CMD, http(s) URL)"
    )
    p.add_argument("--text", help="text paired with every image (or alone, without --image)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--limit", type=int, default=16, help="at most this many images from a folder or shard (0 = all)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument(
        "--threshold",
        type=float,
        default=DEFAULT_THRESHOLD,
        help="activation threshold: an expert is active when its share of a layer's routed sub-tokens is at least this",
    )
    p.add_argument("--layers", nargs="+", help="draw per-image maps only for these MoE layers (e.g. layer1 layer7)")
    p.add_argument(
        "--html", action="store_true", help="also write OUT/index.html, the interactive routing viewer (self-contained)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed for freshly initialized models")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    add_progress_flag(p)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``mmoe-viz`` console script; 0 on success, 1 for unreadable inputs, 2 for no input."""
    args = build_parser().parse_args(argv)
    if args.image is None and args.text is None:
        print("mmoe-viz: give --image and/or --text", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        with ToolProgress.from_args("mmoe-viz", args) as progress:
            done = visualize(
                args.checkpoint or args.model,
                out=args.out,
                image=args.image,
                text=args.text,
                compare=args.compare,
                labels=args.labels,
                limit=args.limit or None,
                batch_size=args.batch_size,
                threshold=args.threshold,
                seed=args.seed,
                layers=args.layers,
                html=args.html,
                progress=progress,
            )
    except (FileNotFoundError, ValueError) as exc:
        print(f"mmoe-viz: {exc}", file=sys.stderr)
        return 1
    for report in done["reports"]:
        ratios = {k: round(v["activation_ratio"], 4) for k, v in report["layers"].items()}
        label, n = report["model"]["label"], len(report["inputs"])
        print(f"{label}: {n} input(s), {len(report['files'])} files; activation ratio per layer: {json.dumps(ratios)}")
    if done["compare"] is not None:
        print(f"comparison: {len(done['compare']['files'])} figures in {Path(args.out) / 'compare'}")
    if done["html"] is not None:
        print(f"routing viewer: {done['html']}")
    print(f"written to {args.out}")
    files = sum(len(r["files"]) for r in done["reports"]) + (len(done["compare"]["files"]) if done["compare"] else 0)
    n = len(done["reports"][0]["inputs"])
    progress.summary(f"{len(done['reports'])} model(s) on {n} input(s), {files} figures in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
