"""Visual codebook: discrete image targets for masked image modeling, as a file format and its k-means.

BEiT-3 predicts discrete visual tokens for masked patches ([B3] sec. 2.2: BEiT v2 VQ-KD codes), which needs an
outside tokenizer. The self-contained stand-in here is a k-means codebook over per-patch normalized pixels:
``kmeans`` builds the centroids (``mmoe-codebook`` reads the patches from image shards), ``save_codebook`` /
``load_codebook`` are the file format, and ``assign_codes`` turns the normalized patches of a batch into
codes, so ``MaskedPretraining(image_target="codebook")`` trains masked image modeling as classification over
codes and reports image perplexity next to text perplexity ([MH1] Table 4's masked multimodal perplexity).

File: ``{"format": "mmoe-visual-codebook", "centroids": (K, C) float32, "patch_size": int, "meta": {...}}``,
written atomically and read with ``torch.load(weights_only=True)``.

Dimension legend: B batch, P patches per image, C values per patch (= patch_size^2 * channels), K codes,
M or N patch vectors.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from einops import rearrange

from mmoe.files import atomic_torch_save

__all__ = [
    "CODEBOOK_FORMAT",
    "assign_codes",
    "kmeans",
    "load_codebook",
    "NORM_PIX_EPS",
    "normalize_patches",
    "patchify",
    "save_codebook",
]

CODEBOOK_FORMAT = "mmoe-visual-codebook"


def patchify(image_B3HW: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, P, patch_size^2 * C), patches in row-major grid order (the backbone's token order)."""
    if image_B3HW.ndim != 4 or image_B3HW.shape[-1] % patch_size or image_B3HW.shape[-2] % patch_size:
        raise ValueError(
            f"patchify: expected (B, C, H, W) with H, W divisible by patch_size={patch_size}, "
            f"got {tuple(image_B3HW.shape)}"
        )
    return rearrange(image_B3HW, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=patch_size, p2=patch_size)


NORM_PIX_EPS = 1e-6  # MAE's variance floor of ``norm_pix_loss``


def normalize_patches(patches_BPC: torch.Tensor, eps: float = NORM_PIX_EPS) -> torch.Tensor:
    """Per-patch zero mean, unit variance (MAE's ``norm_pix_loss``): targets ignore a patch's brightness/contrast."""
    x = patches_BPC.float()
    mean = x.mean(dim=-1, keepdim=True)
    var = x.var(dim=-1, keepdim=True, unbiased=False)
    return (x - mean) / (var + eps).sqrt()


def save_codebook(path: str | os.PathLike[str], centroids_KC: torch.Tensor, *, patch_size: int, **meta: Any) -> None:
    """Write a codebook file atomically: ``{"format", "centroids" (K, C) float32, "patch_size", "meta"}``."""
    payload = {
        "format": CODEBOOK_FORMAT,
        "centroids": centroids_KC.detach().float().cpu().contiguous(),
        "patch_size": int(patch_size),
        "meta": {str(k): v for k, v in meta.items()},
    }
    atomic_torch_save(payload, path)


def load_codebook(path: str | os.PathLike[str], *, patch_size: int | None = None) -> torch.Tensor:
    """Read a codebook written by :func:`save_codebook`; returns the (K, C) centroids."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"codebook file {path} does not exist (build one with mmoe-codebook --out {path})")
    data = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(data, dict) or data.get("format") != CODEBOOK_FORMAT:
        raise ValueError(f"codebook file {path}: expected a dict with format={CODEBOOK_FORMAT!r}")
    centroids = data["centroids"]
    if not isinstance(centroids, torch.Tensor) or centroids.ndim != 2:
        raise ValueError(f"codebook file {path}: 'centroids' must be a (K, C) tensor")
    if patch_size is not None and int(data.get("patch_size", -1)) != patch_size:
        raise ValueError(
            f"codebook file {path}: built for patch_size={data.get('patch_size')}, the backbone uses {patch_size}"
        )
    return centroids.float()


def assign_codes(patches_MC: torch.Tensor, centroids_KC: torch.Tensor) -> torch.Tensor:
    """Nearest centroid (squared L2) of each normalized patch; (M, C) -> (M,) int64."""
    x = patches_MC.float()
    c = centroids_KC.to(x.device, torch.float32)
    dist_MK = (x * x).sum(-1, keepdim=True) - 2.0 * x @ c.t() + (c * c).sum(-1)[None, :]
    return dist_MK.argmin(dim=-1)


def kmeans(
    x_NC: torch.Tensor,
    k: int,
    *,
    iters: int = 20,
    seed: int = 0,
    chunk: int = 65536,
    progress: Callable[[int], object] | None = None,
) -> tuple[torch.Tensor, float]:
    """Lloyd's k-means with k-means++ seeding; returns (centroids (k, C), mean squared distance to the centroid).

    Deterministic for a given ``seed``; empty clusters are re-seeded on random points. Raises ``ValueError``
    when there are fewer vectors than codes. `progress`, when given, is called with 1 after each Lloyd iteration
    (a command's progress bar).
    """
    n = x_NC.shape[0]
    if n < k:
        raise ValueError(f"kmeans: {n} patches is fewer than {k} codes; read more images")
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
        if progress is not None:
            progress(1)
    return centroids, inertia
