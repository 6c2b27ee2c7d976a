"""``mmoe-synthetic``: write the synthetic shapes world (docs/interfaces.md section 6) to a folder.

Example::

    mmoe-synthetic --out data/shapes --num-train 8000 --num-val 200 --shards
    mmoe-synthetic --out data/shapes_alt --variant alt --num-train 3000 --num-val 500

The same ``--seed`` gives byte-identical files. See ``mmoe.data.synthetic`` for what is written.
"""

from __future__ import annotations

import argparse
import json

from mmoe.cli import entry_point
from mmoe.cli.progress import ToolProgress, add_progress_flag
from mmoe.data.synthetic import WORLD_VARIANTS, make_world


def run(argv: list[str] | None = None) -> dict:
    """Parse ``argv``, write the world and return ``make_world``'s summary (what `main` prints)."""
    p = argparse.ArgumentParser(
        prog="mmoe-synthetic", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", required=True, help="output folder (created)")
    p.add_argument("--num-train", type=int, default=8000, help="train scenes (COCO/VQA), ImageFolder images, text docs")
    p.add_argument("--num-val", type=int, default=200, help="val scenes, images and docs")
    p.add_argument(
        "--nlvr2-sets",
        type=int,
        nargs=2,
        default=None,
        metavar=("TRAIN", "VAL"),
        help="NLVR2 sets of 4 image pairs per split (default: num/4)",
    )
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument(
        "--variant",
        choices=sorted(WORLD_VARIANTS),
        default="standard",
        help="which world: 'alt' and 'holdout' each have their own shape words, colours, sizes, 1-3 objects and "
        "VQA questions in their own wording (judge a recipe on a world it was not tuned on)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vqa-noise", type=float, default=0.05, help="probability an annotator gives another answer")
    p.add_argument("--shards", action="store_true", help="also write webdataset shards under OUT/shards")
    p.add_argument("--shard-maxcount", type=int, default=1000, help="samples per shard")
    add_progress_flag(p)
    args = p.parse_args(argv)
    names = ("num_train", "num_val", "image_size", "seed", "vqa_noise", "shards", "shard_maxcount", "variant")
    world = {k: getattr(args, k) for k in names}
    sets = tuple(args.nlvr2_sets) if args.nlvr2_sets else None
    with ToolProgress.from_args("mmoe-synthetic", args) as progress:
        summary = make_world(args.out, nlvr2_sets=sets, progress=progress.stages("shapes world"), **world)
    print(json.dumps(summary["splits"], indent=1))
    if "shards" in summary:
        print(json.dumps(summary["shards"], indent=1))
    scenes = sum(s.get("images", 0) for s in summary["splits"].values())
    shards = f", {sum(summary['shards'].values())} shard samples" if "shards" in summary else ""
    progress.summary(f"wrote {args.out}: {scenes} scenes in {len(summary['splits'])} splits{shards}")
    return summary


main = entry_point(run, "mmoe-synthetic")


if __name__ == "__main__":
    raise SystemExit(main())
