"""Image-text retrieval recall at K (R@1/5/10 both ways), as reported on COCO (5k) and Flickr30k (1k) ([B3] sec. 3.1).

Inputs: ``scores`` (I, T), the similarity of every image to every text, and ``text_to_image`` (T,), the index of
the image each text describes (COCO has about 5 captions per image, so several texts share an image).

- Text retrieval (image -> text, ``i2t``): a query image hits at k when any of its captions is among the k texts
  it scores highest.
- Image retrieval (text -> image, ``t2i``): a query text hits at k when its image is among the k images it scores
  highest.

Ties count against the model: a query's rank is the number of *wrong* items that score at least as high as its
best correct item, and it hits at k when that rank is below k. A model that gives every pair the same score is
therefore at 0%, not 100% (an ``argsort`` that happens to put the right item first would reward it). Images
without any text have no correct item and are left out of the image -> text queries.

The scores are read in blocks of rows (image -> text) and of columns (text -> image), so the 5k x 25k COCO
matrix is ranked in well under a gigabyte besides the matrix itself.

Command line: ``python -m mmoe.metrics.retrieval --scores FILE`` scores a ``.pt`` (``torch.load(...,
weights_only=True)``) or ``.npz`` holding ``scores`` (I, T) and ``text_to_image`` (T,), the file that
``mmoe test`` with the retrieval task writes, and prints the metrics as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["recall_at_k", "retrieval_ranks", "load_scores", "main"]

#: Elements of one block of the score matrix that are compared at a time (int64 counts and bool masks of this
#: size, a few hundred MB at most).
DEFAULT_BLOCK_ELEMENTS = 1 << 24


def _as_tensors(scores: Any, text_to_image: Any) -> tuple[torch.Tensor, torch.Tensor]:
    s = torch.as_tensor(np.asarray(scores) if not isinstance(scores, torch.Tensor) else scores)
    t2i = torch.as_tensor(np.asarray(text_to_image) if not isinstance(text_to_image, torch.Tensor) else text_to_image)
    if s.dim() != 2:
        raise ValueError(f"recall_at_k: scores must be (num_images, num_texts), got shape {tuple(s.shape)}")
    if not (s.is_floating_point() or s.dtype in (torch.int32, torch.int64, torch.int16, torch.int8, torch.uint8)):
        raise ValueError(f"recall_at_k: scores must be real numbers, got dtype {s.dtype}")
    num_images, num_texts = s.shape
    if t2i.dim() != 1 or t2i.numel() != num_texts:
        raise ValueError(
            f"recall_at_k: text_to_image must be ({num_texts},) (one image index per text, the columns of scores), "
            f"got shape {tuple(t2i.shape)}"
        )
    if t2i.is_floating_point() or t2i.dtype == torch.bool:
        raise ValueError(f"recall_at_k: text_to_image must hold integer image indices, got dtype {t2i.dtype}")
    t2i = t2i.to(device=s.device, dtype=torch.long)
    if num_texts and (int(t2i.min()) < 0 or int(t2i.max()) >= num_images):
        raise ValueError(
            f"recall_at_k: text_to_image holds indices in [{int(t2i.min())}, {int(t2i.max())}], expected "
            f"[0, {num_images - 1}] (rows of scores)"
        )
    if s.is_floating_point() and bool(torch.isnan(s).any()):
        raise ValueError("recall_at_k: scores contain NaN; a NaN cannot be ranked")
    return s, t2i


def retrieval_ranks(
    scores: Any, text_to_image: Any, *, block_elements: int = DEFAULT_BLOCK_ELEMENTS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-query ranks (0 = the best correct item beats every wrong one; ties count against the model).

    Returns ``(i2t (I,), t2i (T,))`` int64; an image without any text has rank -1 (no correct item).
    """
    s, t2i = _as_tensors(scores, text_to_image)
    num_images, num_texts = s.shape
    i2t = torch.full((num_images,), -1, dtype=torch.long, device=s.device)
    t2i_rank = torch.zeros(num_texts, dtype=torch.long, device=s.device)
    if num_images == 0 or num_texts == 0:
        return i2t, t2i_rank
    low = float("-inf") if s.is_floating_point() else int(torch.iinfo(s.dtype).min)
    has_text = torch.zeros(num_images, dtype=torch.bool, device=s.device)
    has_text[t2i] = True
    rows = max(1, block_elements // num_texts)
    for start in range(0, num_images, rows):
        block_RT = s[start : start + rows]
        image_R = torch.arange(start, start + block_RT.shape[0], device=s.device)
        correct_RT = t2i[None, :] == image_R[:, None]
        best_R = block_RT.masked_fill(~correct_RT, low).amax(dim=1)
        # wrong texts scoring >= the best correct one: the rank of this image's first hit
        i2t[start : start + rows] = ((block_RT >= best_R[:, None]) & ~correct_RT).sum(dim=1)
    i2t[~has_text] = -1
    cols = max(1, block_elements // num_images)
    for start in range(0, num_texts, cols):
        block_IC = s[:, start : start + cols]
        own_C = t2i[start : start + cols]
        correct_C = block_IC.gather(0, own_C[None, :])[0]
        # images scoring >= the text's own image, minus the own image itself
        t2i_rank[start : start + cols] = (block_IC >= correct_C[None, :]).sum(dim=0) - 1
    return i2t, t2i_rank


def recall_at_k(
    scores: Any,
    text_to_image: Any,
    ks: Sequence[int] = (1, 5, 10),
    *,
    block_elements: int = DEFAULT_BLOCK_ELEMENTS,
) -> dict[str, float]:
    """Recall at each k in percent: ``{"i2t_r1", ..., "t2i_r1", ..., "rsum"}`` (see the module docstring).

    Args:
        scores: (num_images, num_texts) similarities (a tensor or an array; any real dtype).
        text_to_image: (num_texts,) the image index (row of ``scores``) of each text.
        ks: the cut-offs; ``rsum`` is the sum of all the recalls returned ([B3] sec. 3.1 reports R@1/5/10 both ways).
        block_elements: score elements compared at a time (memory bound of the ranking).
    """
    ks = [int(k) for k in ks]
    if not ks or any(k < 1 for k in ks):
        raise ValueError(f"recall_at_k: ks must be positive integers, got {list(ks)}")
    i2t, t2i = retrieval_ranks(scores, text_to_image, block_elements=block_elements)
    queries = i2t[i2t >= 0]
    if queries.numel() == 0 or t2i.numel() == 0:
        raise ValueError(
            f"recall_at_k: nothing to rank ({i2t.numel()} images, {t2i.numel()} texts); need at least one of each"
        )
    out: dict[str, float] = {}
    for k in ks:
        out[f"i2t_r{k}"] = 100.0 * float((queries < k).double().mean())
    for k in ks:
        out[f"t2i_r{k}"] = 100.0 * float((t2i < k).double().mean())
    out["rsum"] = sum(out.values())
    return out


def load_scores(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scores, text_to_image)`` from a ``.pt`` (a dict, read with ``weights_only=True``) or ``.npz`` file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such scores file")
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            data: dict[str, Any] = {k: z[k] for k in z.files}
    else:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable file is refused with its name
            raise ValueError(f"{path}: not a torch file of tensors ({type(e).__name__}: {e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a dict with 'scores' and 'text_to_image', got {type(data).__name__}")
    missing = [k for k in ("scores", "text_to_image") if k not in data]
    if missing:
        raise ValueError(f"{path}: lacks {missing}; expected 'scores' (I, T) and 'text_to_image' (T,)")
    return torch.as_tensor(data["scores"]), torch.as_tensor(data["text_to_image"])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmoe.metrics.retrieval", description=__doc__.splitlines()[0])
    parser.add_argument("--scores", required=True, help=".pt or .npz with 'scores' (I, T) and 'text_to_image' (T,)")
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 5, 10], help="the recall cut-offs (default 1 5 10)")
    args = parser.parse_args(argv)
    try:
        scores, t2i = load_scores(args.scores)
        out: dict[str, Any] = recall_at_k(scores, t2i, ks=args.ks)
    except (FileNotFoundError, ValueError) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    out = {"num_images": int(scores.shape[0]), "num_texts": int(scores.shape[1]), **out}
    json.dump(out, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
