"""``mmoe-codebook``: build a visual codebook: k-means over normalized patch pixels of a shard set ([B3] sec. 2.2).

BEiT-3 predicts discrete visual tokens (BEiT v2 VQ-KD codes) for masked patches; that tokenizer is an outside
checkpoint. This command makes a self-contained stand-in: the k-means centroids of per-patch normalized pixels.
The format, the k-means and the code assignment are library code (``mmoe.data.codebook``); this file only reads
the patches and writes the file, which ``MaskedPretraining(image_target="codebook", codebook=...)`` reads to train
masked image modeling as classification over codes and report image perplexity next to text perplexity.

Images go through the pretraining data module's evaluation transform (resize + center crop, the same
normalization), so the patches are those the model sees::

    mmoe-codebook --shards 'data/shapes/shards/image/train-*.tar' \\
        --image-size 64 --patch-size 8 --codes 256 --out data/shapes/codebook_256.pt
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mmoe.cli import entry_point
from mmoe.cli.progress import ToolProgress, add_progress_flag
from mmoe.data import codebook
from mmoe.data.codebook import normalize_patches, patchify, save_codebook
from mmoe.train.data.pretraining import PretrainDataModule


def collect_patches(
    patterns: list[str],
    *,
    image_size: int,
    patch_size: int,
    max_images: int,
    batch_size: int,
    seed: int,
    progress: Callable[[int], object] | None = None,
) -> torch.Tensor:
    """Normalized patch vectors (N, patch_size^2 * 3) of up to ``max_images`` images read from ``patterns``.

    `progress` is called with the number of images each batch added.
    """
    batch_size = min(batch_size, max_images)  # never read (and cycle through) more images than asked for
    steps = max(1, math.ceil(max_images / batch_size))
    dm = PretrainDataModule(
        image_shards=patterns,
        val_image_shards=patterns,
        batch_size=batch_size,
        image_size=image_size,
        patch_size=patch_size,
        min_mask_patches=1,
        num_workers=0,
        seed=seed,
        val_steps=steps,
    )
    chunks: list[torch.Tensor] = []
    seen = 0
    for batch in dm.val_dataloader():
        images = batch["image"]["image"][: max_images - seen]
        chunks.append(normalize_patches(patchify(images, patch_size)).flatten(0, 1))
        seen += images.shape[0]
        if progress is not None:
            progress(images.shape[0])
        if seen >= max_images:
            break
    if not chunks:
        raise SystemExit(f"mmoe-codebook: no images read from {patterns}")
    return torch.cat(chunks)


def kmeans(x_NC: torch.Tensor, k: int, **kwargs: Any) -> tuple[torch.Tensor, float]:
    """:func:`mmoe.data.codebook.kmeans`; too few patches for ``--codes`` end the command with its message."""
    try:
        return codebook.kmeans(x_NC, k, **kwargs)
    except ValueError as err:
        raise SystemExit(f"mmoe-codebook: {err} (--codes {k})") from None


def run(argv: list[str] | None = None) -> dict:
    """Parse ``argv``, write the codebook and return the summary `main` prints."""
    p = argparse.ArgumentParser(
        prog="mmoe-codebook", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--shards", nargs="+", required=True, help="image (or pair) shard patterns (brace/glob)")
    p.add_argument("--out", required=True, help="codebook file to write (torch, read by MaskedPretraining)")
    p.add_argument("--codes", type=int, default=256, help="number of codes K")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--patch-size", type=int, default=8)
    p.add_argument("--max-images", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--iters", type=int, default=20, help="Lloyd iterations")
    p.add_argument("--seed", type=int, default=0)
    add_progress_flag(p)
    args = p.parse_args(argv)
    names = ("image_size", "patch_size", "max_images", "batch_size", "seed")
    with ToolProgress.from_args("mmoe-codebook", args) as progress:
        read = progress.task("images read", total=args.max_images)
        patches = collect_patches(args.shards, progress=read, **{k: getattr(args, k) for k in names})
        lloyd = progress.task(f"k-means, {args.codes} codes", total=args.iters)
        centroids, inertia = kmeans(patches, args.codes, iters=args.iters, seed=args.seed, progress=lloyd)
    meta = {
        "shards": list(args.shards),
        "image_size": args.image_size,
        "num_patches": int(patches.shape[0]),
        "iters": args.iters,
        "seed": args.seed,
        "mean_sq_distance": inertia,
    }
    save_codebook(Path(args.out), centroids, patch_size=args.patch_size, **meta)
    summary = {"out": args.out, "codes": args.codes, **meta, "seconds": round(progress.seconds, 1)}
    print(json.dumps(summary, indent=1))
    progress.summary(
        f"{args.codes} codes from {summary['num_patches']} patches written to {args.out}, "
        f"mean squared distance {inertia:.4f}"
    )
    return summary


main = entry_point(run, "mmoe-codebook")


if __name__ == "__main__":
    raise SystemExit(main())
