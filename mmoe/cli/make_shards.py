"""``mmoe-shards``: write webdataset shards for pretraining (thin CLI over ``mmoe.data.shard_writer``).

Sources (one per call; the stream kind decides what a sample needs):

    # (a) COCO caption annotations + image folder -> image-text pairs (all captions of an image in key.json)
    mmoe-shards coco --ann coco/annotations/captions_train2014.json \\
        --images coco/train2014 --out shards/pair --prefix coco-train

    # (b) JSONL/TSV of image path + caption (CC3M / img2dataset style) -> pairs (key.jpg + key.txt)
    mmoe-shards list --file cc3m/train.tsv --image-root cc3m --out shards/pair --prefix cc3m

    # (c) image folder -> images only (masked image modeling)
    mmoe-shards images --folder imagenet/train --out shards/image --prefix in1k

    # (d) text files -> text only (one document per line or per paragraph)
    mmoe-shards text --files wiki/*.txt --unit paragraph --out shards/text --prefix wiki

Every sample is validated (image decodes completely, caption/text non-empty); what was skipped and why
is printed per source file and written to ``OUT/PREFIX-skipped.json``. Shards are written under a
temporary name and renamed when complete; ``OUT/sizes.json`` maps each shard to its sample count.
"""

from __future__ import annotations

import argparse

from mmoe.cli import entry_point
from mmoe.cli.progress import ToolProgress, add_progress_flag
from mmoe.data.shard_writer import (
    SkipReport,
    iter_coco_captions,
    iter_image_folder,
    iter_pair_list,
    iter_text_files,
    write_shards,
)


def run(argv: list[str] | None = None) -> SkipReport:
    """Parse ``argv``, write the shards and return the skip report (what `main` prints a summary of)."""
    p = argparse.ArgumentParser(
        prog="mmoe-shards", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="source", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", required=True, help="output folder of the shards (and sizes.json)")
    common.add_argument("--prefix", default="train", help="shard name prefix: PREFIX-000000.tar")
    common.add_argument("--maxcount", type=int, default=1000, help="samples per shard")
    common.add_argument("--maxsize", type=float, default=1e9, help="bytes per shard (soft limit)")
    common.add_argument("--max-side", type=int, default=None, help="shrink larger images to this longer side (JPEG)")
    common.add_argument("--start-index", type=int, default=0, help="number of the first shard")
    add_progress_flag(common)

    a = sub.add_parser("coco", parents=[common], help="COCO caption JSON + image folder -> pairs")
    a.add_argument("--ann", required=True)
    a.add_argument("--images", required=True)
    b = sub.add_parser("list", parents=[common], help="JSONL/TSV/CSV of image path + caption -> pairs")
    b.add_argument("--file", required=True)
    b.add_argument("--image-root", default=None, help="folder relative image paths start from (default: the file's)")
    b.add_argument("--image-column", default=None)
    b.add_argument("--caption-column", default=None)
    c = sub.add_parser("images", parents=[common], help="image folder -> images only (or pairs with --sidecar)")
    c.add_argument("--folder", required=True)
    c.add_argument("--sidecar", action="store_true", help="pair a.jpg with a.txt (img2dataset 'files' output)")
    d = sub.add_parser("text", parents=[common], help="plain text files -> text only")
    d.add_argument("--files", nargs="+", required=True)
    d.add_argument("--unit", choices=("line", "paragraph"), default="line")
    args = p.parse_args(argv)

    if args.source == "coco":
        samples, kind = iter_coco_captions(args.ann, args.images), "pair"
    elif args.source == "list":
        samples = iter_pair_list(
            args.file, args.image_root, image_column=args.image_column, caption_column=args.caption_column
        )
        kind = "pair"
    elif args.source == "images":
        samples, kind = (
            iter_image_folder(args.folder, sidecar_captions=args.sidecar),
            "pair" if args.sidecar else "image",
        )
    else:
        samples, kind = iter_text_files(args.files, unit=args.unit), "text"
    with ToolProgress.from_args("mmoe-shards", args) as progress:
        report = write_shards(
            progress.track(samples, f"{kind} samples read"),
            args.out,
            kind=kind,  # type: ignore[arg-type]
            prefix=args.prefix,
            maxcount=args.maxcount,
            maxsize=args.maxsize,
            max_side=args.max_side,
            start_index=args.start_index,
        )
    print(report.summary())
    progress.summary(f"{report.written} {kind} samples written to {args.out}, {report.num_skipped} skipped")
    return report


main = entry_point(run, "mmoe-shards")


if __name__ == "__main__":
    raise SystemExit(main())
