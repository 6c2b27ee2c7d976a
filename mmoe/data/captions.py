"""COCO captioning data: Karpathy split files, official caption annotations, masked-caption batches.

Two on-disk sources are read unchanged (nothing is downloaded):

* the Karpathy split file ``dataset_coco.json`` ({"images": [{"split", "filepath", "filename", "cocoid",
  "sentences": [{"raw", ...}]}]}); splits ``train`` + ``restval`` train, ``val`` / ``test`` hold 5000 images each
  ([Karpathy]; [B3] sec. 3.1 reports on this split). Image path = ``image_root / filepath / filename``.
  ``dataset_flickr30k.json`` has the same layout without ``filepath`` and ``cocoid`` (its id is ``imgid``).
* official COCO caption annotations ``captions_{split}2014.json`` ({"images": [{"id", "file_name"}],
  "annotations": [{"image_id", "caption"}]}); image path = ``image_root / file_name``.

Either gives :class:`CaptionRecord` lists; :func:`write_coco_references` turns any split into a COCO-format caption
file so that evaluation (``mmoe.metrics.captions``) always reads the official format.

Training batches follow BEiT-3's masked captioning ([B3] sec. 3.1; unilm ``beit3`` captioning): ``[BOS] caption
[EOS]`` with 60-70% of the tokens after BOS replaced by [MASK] (EOS may be masked, so the model learns to stop);
``text_labels`` holds the original ids at masked positions and -100 elsewhere. Batch keys are those of
docs/interfaces.md section 4 (``image``, ``text``, ``text_padding_mask``, ``text_labels``, ``image_id``).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from mmoe.files import IMAGE_EXTS, atomic_write_json, is_image_file

__all__ = [
    "CaptionRecord",
    "load_karpathy",
    "load_coco_captions",
    "load_caption_records",
    "write_coco_references",
    "references_of",
    "image_id_from_filename",
    "list_images",
    "load_image",
    "CaptionDataset",
    "ImageListDataset",
    "CaptionCollator",
    "mask_caption_tokens",
]

KARPATHY_SPLITS = ("train", "restval", "val", "test")


@dataclass(frozen=True)
class CaptionRecord:
    """One image with its reference captions."""

    image_id: int
    path: str
    captions: tuple[str, ...]


def _read_json(path: str | Path, what: str) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what}: {path} does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{what}: {path} is not valid JSON ({e})") from e


def load_karpathy(path: str | Path, image_root: str | Path, splits: Sequence[str]) -> list[CaptionRecord]:
    """Records of the Karpathy split file ``path`` whose ``split`` is in ``splits`` (e.g. ``("train", "restval")``)."""
    bad = [s for s in splits if s not in KARPATHY_SPLITS]
    if bad:
        raise ValueError(f"load_karpathy: unknown splits {bad}; expected a subset of {list(KARPATHY_SPLITS)}")
    data = _read_json(path, "load_karpathy")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"load_karpathy: {path} must be a dict with an 'images' list (dataset_coco.json format)")
    root = Path(image_root)
    out = []
    for i, img in enumerate(data["images"]):
        try:
            if img["split"] not in splits:
                continue
            caps = tuple(str(s["raw"]).strip() for s in img["sentences"])
            # COCO entries carry the COCO id; dataset_flickr30k.json has only the file's index ``imgid``
            image_id = int(img["cocoid"] if "cocoid" in img else img["imgid"])
            out.append(CaptionRecord(image_id, str(root / img.get("filepath", "") / img["filename"]), caps))
        except KeyError as e:
            raise ValueError(
                f"load_karpathy: {path} image entry {i} lacks key {e}; expected split, filepath (COCO), "
                "filename, cocoid (COCO) or imgid, sentences[].raw"
            ) from e
    return out


def load_coco_captions(path: str | Path, image_root: str | Path) -> list[CaptionRecord]:
    """Records of an official COCO caption file (``captions_{split}{year}.json``), images under ``image_root``."""
    data = _read_json(path, "load_coco_captions")
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise ValueError(f"load_coco_captions: {path} must have 'images' and 'annotations' (COCO caption format)")
    caps: dict[int, list[str]] = {}
    for ann in data["annotations"]:
        caps.setdefault(int(ann["image_id"]), []).append(str(ann["caption"]).strip())
    root = Path(image_root)
    return [
        CaptionRecord(int(img["id"]), str(root / img["file_name"]), tuple(caps.get(int(img["id"]), ())))
        for img in sorted(data["images"], key=lambda x: int(x["id"]))
    ]


def load_caption_records(path: str | Path, image_root: str | Path, split: str = "train") -> list[CaptionRecord]:
    """Detect the file format: Karpathy (``split`` selects; ``"train"`` also takes ``restval``) or COCO captions."""
    data = _read_json(path, "load_caption_records")
    if isinstance(data, dict) and "annotations" in data:
        return load_coco_captions(path, image_root)
    if (
        isinstance(data, dict)
        and isinstance(data.get("images"), list)
        and (not data["images"] or "sentences" in data["images"][0])
    ):
        splits = ("train", "restval") if split == "train" else (split,)
        return load_karpathy(path, image_root, splits)
    raise ValueError(f"load_caption_records: {path} is neither a COCO caption file nor a Karpathy split file")


def references_of(records: Sequence[CaptionRecord]) -> dict[int, list[str]]:
    """``{image_id: [captions]}`` for the metric (images without captions are left out)."""
    return {r.image_id: list(r.captions) for r in records if r.captions}


def write_coco_references(records: Sequence[CaptionRecord], path: str | Path) -> Path:
    """Write the records as a COCO caption file (the format the official evaluator reads), atomically."""
    images, anns = [], []
    for r in records:
        images.append({"id": r.image_id, "file_name": os.path.basename(r.path)})
        for c in r.captions:
            anns.append({"image_id": r.image_id, "id": len(anns) + 1, "caption": c})
    payload = {
        "info": {"description": "references written by mmoe.data.captions"},
        "licenses": [],
        "type": "captions",
        "images": images,
        "annotations": anns,
    }
    return atomic_write_json(path, payload, indent=None)


_DIGITS = re.compile(r"(\d+)(?!.*\d)")


def image_id_from_filename(name: str) -> int | None:
    """COCO image id from a file name (``COCO_val2014_000000391895.jpg`` or ``000000397133.jpg``), else None."""
    m = _DIGITS.search(Path(name).stem)
    return int(m.group(1)) if m else None


def list_images(path: str | Path) -> list[Path]:
    """One image file, or every image in a folder (sorted); raises when there is none."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"list_images: {path} is neither an image file nor a folder")
    files = sorted(p for p in path.iterdir() if is_image_file(p))
    if not files:
        raise FileNotFoundError(f"list_images: no images ({', '.join(IMAGE_EXTS)}) in {path}")
    return files


def load_image(path: str) -> Image.Image:
    """The RGB image at ``path``; an unreadable file raises an ``OSError`` naming it."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, ValueError) as e:
        raise OSError(f"caption dataset: image {path} failed to load ({e})") from e


class CaptionDataset(Dataset):
    """Map-style dataset over caption records.

    ``per_caption=True`` (training) has one item per (image, caption) pair; ``False`` (evaluation) one item per
    image carrying its first caption (used only for a validation loss; metrics use all references).
    Items: ``{"image": (3, H, W), "caption": str, "image_id": int}``.
    """

    def __init__(
        self, records: Sequence[CaptionRecord], transform: Callable[[Image.Image], torch.Tensor], *, per_caption: bool
    ) -> None:
        self.records = list(records)
        self.transform = transform
        if per_caption:
            self.index = [(i, j) for i, r in enumerate(self.records) for j in range(len(r.captions))]
        else:
            self.index = [(i, 0 if r.captions else -1) for i, r in enumerate(self.records)]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        i, j = self.index[idx]
        r = self.records[i]
        return {
            "image": self.transform(load_image(r.path)),
            "caption": r.captions[j] if j >= 0 else "",
            "image_id": r.image_id,
        }


class ImageListDataset(Dataset):
    """Images without captions (``mmoe predict`` on a folder or one file); ids parsed from names, else the index."""

    def __init__(self, files: Sequence[str | Path], transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.files = [str(f) for f in files]
        self.transform = transform
        ids = [image_id_from_filename(f) for f in self.files]
        if any(i is None for i in ids) or len(set(ids)) != len(ids):
            ids = list(range(len(self.files)))  # names carry no unique id: number them in sorted order
        self.image_ids = [int(i) for i in ids]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        return {
            "image": self.transform(load_image(self.files[idx])),
            "image_id": self.image_ids[idx],
            "file_name": os.path.basename(self.files[idx]),
        }


def mask_caption_tokens(
    ids: torch.Tensor,
    padding_mask: torch.Tensor,
    *,
    mask_id: int,
    ratio: tuple[float, float] = (0.6, 0.7),
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask a share drawn uniformly from ``ratio`` of each row's tokens after BOS (EOS included, pads excluded).

    Returns ``(masked ids, labels)``; labels are the original ids at masked positions and -100 elsewhere. At least
    one token per row is masked so that every caption contributes to the loss ([B3] captioning fine-tuning).
    """
    lo, hi = ratio
    if not 0.0 < lo <= hi <= 1.0:
        raise ValueError(f"mask_caption_tokens: ratio must satisfy 0 < low <= high <= 1, got {ratio}")
    b, length = ids.shape
    maskable = ~padding_mask.clone()
    maskable[:, 0] = False  # BOS is the query's anchor, never masked
    n_maskable = maskable.sum(1)
    share = lo + (hi - lo) * torch.rand(b, generator=generator)
    n_mask = (share * n_maskable).round().long().clamp(min=1).minimum(n_maskable)
    noise = torch.rand(b, length, generator=generator).masked_fill(~maskable, 2.0)
    rank = noise.argsort(1).argsort(1)
    chosen = rank < n_mask[:, None]
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    return ids.masked_fill(chosen, mask_id), labels


class CaptionCollator:
    """Stack items into a captioning batch (docs/interfaces.md section 4).

    With captions: tokenizes, masks (``ratio``) and adds ``text``, ``text_padding_mask``, ``text_labels``. With
    ``seed`` set the masks are the same every epoch (validation loss); otherwise they are fresh each call.
    Items without a ``caption`` key (prediction on image folders) give ``image``, ``image_id`` and ``file_name``.
    """

    def __init__(self, tokenizer: Any, *, ratio: tuple[float, float] = (0.6, 0.7), seed: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.seed = seed

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = {
            "image": torch.stack([it["image"] for it in items]),
            "image_id": torch.tensor([int(it["image_id"]) for it in items], dtype=torch.long),
        }
        if "file_name" in items[0]:
            batch["file_name"] = [it["file_name"] for it in items]
        if "caption" not in items[0]:
            return batch
        ids, pad = self.tokenizer([it["caption"] for it in items])
        gen = None
        if self.seed is not None:
            gen = torch.Generator().manual_seed(self.seed + int(batch["image_id"].sum()))
        text, labels = mask_caption_tokens(ids, pad, mask_id=self.tokenizer.mask_id, ratio=self.ratio, generator=gen)
        batch.update(text=text, text_padding_mask=pad, text_labels=labels)
        return batch
