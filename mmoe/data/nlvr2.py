"""NLVR2 over the official JSONL and image pairs ([B3] sec. 3.1; [NLVR2]: Suhr et al. 2019).

Each JSONL line has ``identifier`` (``{split}-{set}-{pair}-{sentence}``), ``sentence`` and ``label``
(``"True"``/``"False"``). The two images of an example are the files ``{split}-{set}-{pair}-img0.*``
and ``...-img1.*`` somewhere under ``image_root`` (the official train images sit in numbered
sub-folders, dev/test1 are flat, so the root is indexed once by file stem).

Items: ``image``, ``image2`` (transformed), ``sentence`` (str), ``labels`` (int 0/1, 1 = True) and
``identifier`` (str). A missing or unreadable image is reported with the identifier and skipped
(``on_missing="skip"``, training) or raises an error naming it (``"error"``, evaluation).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from PIL import Image

from mmoe.data.vqa import AnnotatedDataset, load_image
from mmoe.files import is_image_file
from mmoe.metrics.nlvr2 import read_jsonl

__all__ = ["NLVR2Dataset", "pair_prefix", "index_images"]

log = logging.getLogger(__name__)


def pair_prefix(identifier: str) -> str:
    """``dev-850-0-1`` -> ``dev-850-0`` (the image pair's file stem without ``-img0``/``-img1``)."""
    parts = identifier.split("-")
    if len(parts) < 4:
        raise ValueError(f"NLVR2 identifier {identifier!r}: expected '{{split}}-{{set}}-{{pair}}-{{sentence}}'")
    return "-".join(parts[:-1])


def index_images(root: str | Path) -> dict[str, str]:
    """File stem -> path for every image under ``root`` (recursive; the first hit of a stem wins)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"NLVR2 image_root {root}: no such folder")
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            if is_image_file(name):
                out.setdefault(os.path.splitext(name)[0], os.path.join(dirpath, name))
    return out


class NLVR2Dataset(AnnotatedDataset):
    """Map-style NLVR2 dataset; items are dicts for ``NLVR2Collate`` (mmoe.train.data.nlvr2).

    Args:
        annotations: official JSONL file (``train.json``, ``dev.json``, ``test1.json``).
        image_root: folder holding the pair images (searched recursively).
        transform: PIL image -> tensor, applied to each image independently; None keeps PIL images.
        on_missing: ``"skip"`` (report, drop) or ``"error"``.
        with_labels: emit ``labels`` (set False for unlabelled test files).
    """

    item_name = "NLVR2 example"
    items_name = "examples"

    def __init__(
        self,
        annotations: str,
        image_root: str,
        *,
        transform: Callable[[Image.Image], Any] | None = None,
        on_missing: Literal["skip", "error"] = "skip",
        with_labels: bool = True,
    ) -> None:
        super().__init__(on_missing)
        self.annotations, self.image_root = annotations, image_root
        self.transform, self.with_labels = transform, with_labels
        images = index_images(image_root)
        for n, ex in enumerate(read_jsonl(annotations)):
            for key in ("identifier", "sentence") + (("label",) if with_labels else ()):
                if key not in ex:
                    raise ValueError(f"NLVR2 {annotations}: example {n} has no {key!r} key")
            ident = str(ex["identifier"])
            prefix = pair_prefix(ident)
            paths = [images.get(f"{prefix}-img0"), images.get(f"{prefix}-img1")]
            if None in paths:
                lacking = [f"{prefix}-img{i}.*" for i, p in enumerate(paths) if p is None]
                self._missing(ident, f"image(s) {', '.join(lacking)} not found under {image_root}")
                continue
            item: dict[str, Any] = {"identifier": ident, "sentence": str(ex["sentence"]), "paths": paths}
            if with_labels:
                label = str(ex["label"]).lower()
                if label not in ("true", "false"):
                    raise ValueError(f"NLVR2 {annotations}: example {ident} label {ex['label']!r}; expected True/False")
                item["labels"] = int(label == "true")
            self.items.append(item)
        self._report_skipped()

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        item = self.items[index]
        images = []
        for path in item["paths"]:
            try:
                im: Any = load_image(path)
            except (OSError, ValueError) as e:
                reason = f"image {path} unreadable ({type(e).__name__}: {e})"
                if self.on_missing == "error":
                    raise RuntimeError(f"NLVR2 example {item['identifier']}: {reason}") from e
                log.warning("NLVR2Dataset: example %s skipped: %s", item["identifier"], reason)
                return None
            images.append(self.transform(im) if self.transform is not None else im)
        out: dict[str, Any] = {
            "image": images[0],
            "image2": images[1],
            "sentence": item["sentence"],
            "identifier": item["identifier"],
        }
        if "labels" in item:
            out["labels"] = item["labels"]
        return out
