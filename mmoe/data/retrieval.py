"""Image-text retrieval data: COCO / Flickr30k Karpathy splits or COCO caption files, training pairs, evaluation sets.

Sources, read unchanged (nothing is downloaded; layouts in ``datasets/coco/README.md`` and
``datasets/flickr30k/README.md``):

- the Karpathy split files ``dataset_coco.json`` (5000 test images, about 25,000 captions) and
  ``dataset_flickr30k.json`` (1000 test images, 5000 captions) ([Karpathy]; [B3] sec. 3.1 reports on them);
- an official COCO caption file (``captions_{split}2014.json``) together with an optional split list: a text file
  with one image id or file name per line (or a JSON list of them) that selects the images of the split.

Both go through :func:`mmoe.data.captions.load_caption_records`. Training reads one item per (image, caption)
pair (``mmoe.data.captions.CaptionDataset``); evaluation reads one item per image with all of its captions
(:class:`RetrievalEvalDataset`), so that every image and every caption is embedded exactly once and the scores
matrix (images x captions) covers the whole split.

Evaluation batches (docs/interfaces.md section 4): ``image`` (B,3,H,W), ``image_index`` (B,) the row of each image
in the split, ``text`` (T,L) + ``text_padding_mask`` (T,L) every caption of these images, ``text_index`` (T,) the
column of each caption in the split, ``text_image_index`` (T,) its image's row.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from mmoe.data.captions import CaptionRecord, load_caption_records, load_image

__all__ = ["load_retrieval_records", "read_image_list", "RetrievalEvalDataset", "RetrievalEvalCollate"]


def read_image_list(path: str | Path) -> set[str]:
    """The image ids / file names of a split list: a JSON list, or one entry per line (``#`` comments skipped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"read_image_list: {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            entries = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"read_image_list: {path} starts like a JSON list but is not valid JSON ({e})") from e
    else:
        entries = [ln.split("#", 1)[0].strip() for ln in text.splitlines()]
    out = {str(e).strip() for e in entries if str(e).strip()}
    if not out:
        raise ValueError(f"read_image_list: {path} lists no images")
    return out


def load_retrieval_records(
    annotations: str | Path, image_root: str | Path, split: str = "test", image_list: str | Path | None = None
) -> list[CaptionRecord]:
    """Records (image path, captions) of one split of a Karpathy file or a COCO caption file.

    ``split`` picks the Karpathy split (``"train"`` also takes ``restval``; ignored for a COCO caption file);
    ``image_list`` keeps only the images whose id or file name it lists.
    """
    records = load_caption_records(annotations, image_root, split)
    if image_list is not None:
        keep = read_image_list(image_list)
        records = [r for r in records if str(r.image_id) in keep or Path(r.path).name in keep]
        if not records:
            raise ValueError(f"load_retrieval_records: no image of {annotations} is listed in {image_list}")
    return records


class RetrievalEvalDataset(Dataset):
    """One item per image: ``{"image", "captions", "image_index", "text_index"}`` (evaluation of a whole split).

    ``text_index`` is the column of the image's first caption in the split's scores matrix (captions numbered
    image by image, in the records' order).
    """

    def __init__(self, records: Sequence[CaptionRecord], transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.records = list(records)
        self.transform = transform
        self.offsets: list[int] = []
        total = 0
        for r in self.records:
            self.offsets.append(total)
            total += len(r.captions)
        self.num_texts = total

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        r = self.records[idx]
        return {
            "image": self.transform(load_image(r.path)),
            "captions": list(r.captions),
            "image_index": idx,
            "text_index": self.offsets[idx],
        }

    def text_to_image(self) -> torch.Tensor:
        """(num_texts,) the image row of every caption column."""
        return torch.tensor([i for i, r in enumerate(self.records) for _ in r.captions], dtype=torch.long)


class RetrievalEvalCollate:
    """Items of :class:`RetrievalEvalDataset` -> an evaluation batch (module docstring)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        captions = [c for it in items for c in it["captions"]]
        batch: dict[str, Any] = {
            "image": torch.stack([it["image"] for it in items]),
            "image_index": torch.tensor([it["image_index"] for it in items], dtype=torch.long),
            "text_index": torch.tensor(
                [it["text_index"] + k for it in items for k in range(len(it["captions"]))], dtype=torch.long
            ),
            "text_image_index": torch.tensor(
                [it["image_index"] for it in items for _ in it["captions"]], dtype=torch.long
            ),
        }
        if captions:
            batch["text"], batch["text_padding_mask"] = self.tokenizer(captions)
        return batch
