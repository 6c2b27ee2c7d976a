"""``mmoe-codebook``: build a visual codebook: k-means over normalized patch pixels of a shard set (SPEC.md 6, issue 5).

BEiT-3 predicts discrete visual tokens (BEiT v2 VQ-KD codes) for masked patches; that tokenizer is an outside
checkpoint. This tool makes a self-contained stand-in: the k-means centroids of per-patch normalized pixels
(``mmoe.train.pretrain.normalize_patches``), so ``MaskedPretraining(image_target="codebook", codebook=...)`` trains
masked image modeling as classification over codes and reports image perplexity next to text perplexity.

Images go through the pretraining data module's evaluation transform (resize + center crop, the same
normalization), so the patches are those the model sees::

    mmoe-codebook --shards 'data/shapes/shards/image/train-*.tar' \\
        --image-size 64 --patch-size 8 --codes 256 --out data/shapes/codebook_256.pt
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from mmoe.train.datamodule import PretrainDataModule
from mmoe.train.pretrain import normalize_patches, patchify, save_codebook


def collect_patches(
    patterns: list[str], *, image_size: int, patch_size: int, max_images: int, batch_size: int, seed: int
) -> torch.Tensor:
    """Normalized patch vectors (N, patch_size^2 * 3) of up to ``max_images`` images read from ``patterns``."""
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
        if seen >= max_images:
            break
    if not chunks:
        raise SystemExit(f"mmoe-codebook: no images read from {patterns}")
    return torch.cat(chunks)


def kmeans(
    x_NC: torch.Tensor, k: int, *, iters: int = 20, seed: int = 0, chunk: int = 65536
) -> tuple[torch.Tensor, float]:
    """Lloyd's k-means with k-means++ seeding; returns (centroids (k, C), mean squared distance to the centroid)."""
    n = x_NC.shape[0]
    if n < k:
        raise SystemExit(f"mmoe-codebook: {n} patches is fewer than --codes {k}; read more images")
    g = torch.Generator().manual_seed(seed)
    x = x_NC.float()
    centroids = x[torch.randint(n, (1,), generator=g)]
    d2 = torch.cdist(x, centroids).pow(2).squeeze(1)
    for _ in range(1, k):  # k-means++: next centroid with probability proportional to squared distance
        idx = torch.multinomial(d2 / d2.sum(), 1, generator=g)
        centroids = torch.cat([centroids, x[idx]])
        d2 = torch.minimum(d2, (x - x[idx]).pow(2).sum(-1))
    inertia = float("nan")
    for _ in range(iters):
        assign = torch.cat([torch.cdist(x[i : i + chunk], centroids).argmin(-1) for i in range(0, n, chunk)])
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).float()
        empty = counts == 0
        centroids = torch.where(empty[:, None], centroids, sums / counts.clamp(min=1)[:, None])
        if empty.any():  # re-seed empty clusters on random points
            centroids[empty] = x[torch.randint(n, (int(empty.sum()),), generator=g)]
        inertia = float((x - centroids[assign]).pow(2).sum(-1).mean())
    return centroids, inertia


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
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    patches = collect_patches(
        args.shards,
        image_size=args.image_size,
        patch_size=args.patch_size,
        max_images=args.max_images,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    centroids, inertia = kmeans(patches, args.codes, iters=args.iters, seed=args.seed)
    meta = {
        "shards": list(args.shards),
        "image_size": args.image_size,
        "num_patches": int(patches.shape[0]),
        "iters": args.iters,
        "seed": args.seed,
        "mean_sq_distance": inertia,
    }
    save_codebook(Path(args.out), centroids, patch_size=args.patch_size, **meta)
    summary = {"out": args.out, "codes": args.codes, **meta, "seconds": round(time.perf_counter() - t0, 1)}
    print(json.dumps(summary, indent=1))
    return summary


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``mmoe-codebook`` console script; exit status 0 when the codebook is written."""
    run(argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
