"""COCO instances (boxes and masks) for detection fine-tuning, read from the official JSON.

COCO detection ([B3] sec. 3.2, [COCO]). The files are read by torchvision's ``CocoDetection`` and turned into
transforms-v2 targets by ``wrap_dataset_for_transforms_v2`` (``BoundingBoxes`` xyxy, ``Mask``), so flips,
scale jitter and crops move boxes and masks together. On top of that this module

- maps COCO's sparse category ids (1..90 with gaps) to contiguous labels ``1..C`` (0 is torchvision's
  background) and back (:class:`CategoryMap`); results are written with the original ids,
- drops crowd annotations from training targets (``iscrowd=1`` regions are "ignore" regions for COCOeval, not
  objects to learn; torchvision's detection references do the same) and degenerate boxes,
- optionally drops images without any usable object (training only, as torchvision's references do),
- yields the batch layout of docs/interfaces.md section 4: ``{"images": [(3, H, W)], "targets": [dict]}``
  with ``boxes`` (N, 4) xyxy float, ``labels`` (N,) int64 contiguous, ``masks`` (N, H, W) uint8 and
  ``image_id`` int.

Augmentation (:func:`detection_transforms`): horizontal flip, and for large-scale-jitter (ViTDet's LSJ, the
recipe of the plain-backbone detectors) a ``ScaleJitter`` to a square canvas followed by a random crop padded
to that canvas. Normalization is *not* done here: the detector normalizes with the backbone's mean/std.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.datasets import CocoDetection, wrap_dataset_for_transforms_v2
from torchvision.transforms import v2

__all__ = ["CategoryMap", "CocoInstances", "detection_transforms", "detection_collate"]


@dataclass(frozen=True)
class CategoryMap:
    """Contiguous label <-> original COCO category id (label 0 is the background).

    ``coco_ids[i]`` is the COCO id of contiguous label ``i + 1``; ``names`` follow the same order. Sorting by id
    gives the usual 80-class COCO order (person = 1, ..., toothbrush = 80).
    """

    coco_ids: tuple[int, ...]
    names: tuple[str, ...]

    @classmethod
    def from_categories(cls, categories: Sequence[Mapping[str, Any]]) -> CategoryMap:
        cats = sorted(categories, key=lambda c: int(c["id"]))
        ids = tuple(int(c["id"]) for c in cats)
        if len(set(ids)) != len(ids):
            raise ValueError(f"COCO categories: duplicate category ids in {list(ids)}")
        return cls(coco_ids=ids, names=tuple(str(c.get("name", c["id"])) for c in cats))

    @classmethod
    def from_file(cls, annotation_file: str | Path) -> CategoryMap:
        path = Path(annotation_file)
        if not path.is_file():
            raise FileNotFoundError(f"COCO annotation file {path} does not exist")
        with path.open() as f:
            data = json.load(f)
        if "categories" not in data:
            raise ValueError(f"COCO annotation file {path}: no 'categories' list")
        return cls.from_categories(data["categories"])

    @property
    def num_classes(self) -> int:
        """Object classes plus the background (what torchvision's ``num_classes`` means)."""
        return len(self.coco_ids) + 1

    @property
    def to_contiguous(self) -> dict[int, int]:
        return {cid: i + 1 for i, cid in enumerate(self.coco_ids)}

    @property
    def to_coco(self) -> list[int]:
        """Indexed by contiguous label; entry 0 (background) is 0."""
        return [0, *self.coco_ids]

    def contiguous(self, coco_ids: Tensor) -> Tensor:
        table = self.to_contiguous
        try:
            return torch.tensor([table[int(c)] for c in coco_ids.tolist()], dtype=torch.int64)
        except KeyError as err:
            raise KeyError(f"COCO category id {err.args[0]} is not among the annotation file's categories") from err


def detection_transforms(
    train: bool,
    *,
    hflip: float = 0.5,
    lsj_size: int | None = None,
    scale_range: Sequence[float] = (0.1, 2.0),
) -> v2.Compose:
    """transforms-v2 pipeline for (PIL image, target) -> (float image in [0, 1], target).

    ``train`` adds a horizontal flip and, with ``lsj_size``, large-scale jitter: resize so the image fits a
    ``lsj_size`` square times a factor in ``scale_range`` (``ScaleJitter``), random-crop/pad to the square.
    Boxes left empty by a crop are removed (``SanitizeBoundingBoxes``, which also drops their labels/masks).
    """
    ops: list[Any] = [v2.ToImage()]
    if train:
        if hflip > 0:
            ops.append(v2.RandomHorizontalFlip(p=hflip))
        if lsj_size is not None:
            lo, hi = (float(s) for s in scale_range)
            ops += [
                v2.ScaleJitter(target_size=(lsj_size, lsj_size), scale_range=(lo, hi), antialias=True),
                v2.RandomCrop(lsj_size, pad_if_needed=True, fill=0),
            ]
    ops += [v2.ToDtype(torch.float32, scale=True), v2.SanitizeBoundingBoxes(min_size=1.0)]
    return v2.Compose(ops)


class CocoInstances(Dataset):
    """COCO instances JSON + image folder -> (image (3, H, W) float in [0, 1], target dict).

    Args:
        image_dir: folder with the images named by ``images[].file_name`` (e.g. ``train2017/``).
        annotation_file: ``instances_{split}.json``.
        transforms: a transforms-v2 callable on (image, target); default :func:`detection_transforms` (eval).
        with_masks: decode ``segmentation`` (polygons / RLE) into ``masks``; off for Faster R-CNN.
        remove_empty: drop images with no non-crowd object (training; evaluation keeps every image).
        category_map: share one map between splits (default: from this file's categories).
    """

    def __init__(
        self,
        image_dir: str | Path,
        annotation_file: str | Path,
        *,
        transforms: Callable[..., Any] | None = None,
        with_masks: bool = True,
        remove_empty: bool = False,
        category_map: CategoryMap | None = None,
    ) -> None:
        image_dir, annotation_file = Path(image_dir), Path(annotation_file)
        if not annotation_file.is_file():
            raise FileNotFoundError(f"CocoInstances: annotation file {annotation_file} does not exist")
        if not image_dir.is_dir():
            raise FileNotFoundError(f"CocoInstances: image folder {image_dir} does not exist")
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its loading progress
            base = CocoDetection(str(image_dir), str(annotation_file))
        keys = {"image_id", "boxes", "labels", "iscrowd"} | ({"masks"} if with_masks else set())
        self.base = wrap_dataset_for_transforms_v2(base, target_keys=keys)
        self.coco = base.coco
        self.image_dir = image_dir
        self.annotation_file = annotation_file
        self.with_masks = with_masks
        self.transforms = transforms if transforms is not None else detection_transforms(train=False)
        self.category_map = category_map or CategoryMap.from_categories(self.coco.dataset["categories"])
        self.ids: list[int] = list(base.ids)
        self.indices = list(range(len(self.ids)))
        if remove_empty:
            self.indices = [i for i, img_id in enumerate(self.ids) if self._has_objects(img_id)]

    def _has_objects(self, image_id: int) -> bool:
        anns = self.coco.imgToAnns.get(image_id, [])
        return any(not a.get("iscrowd", 0) and a["bbox"][2] >= 1 and a["bbox"][3] >= 1 for a in anns)

    @property
    def image_ids(self) -> list[int]:
        return [self.ids[i] for i in self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Any]]:
        raw_index = self.indices[index]
        image, target = self.base[raw_index]
        image_id = int(self.ids[raw_index])
        width, height = image.size
        if "boxes" not in target:  # the wrapper returns only image_id for images without annotations
            target = {
                "boxes": tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=(height, width)),
                "labels": torch.zeros(0, dtype=torch.int64),
                "iscrowd": [],
            }
            if self.with_masks:
                target["masks"] = tv_tensors.Mask(torch.zeros(0, height, width, dtype=torch.uint8))
        keep = torch.tensor([not c for c in target["iscrowd"]], dtype=torch.bool)
        out: dict[str, Any] = {
            "boxes": tv_tensors.wrap(target["boxes"][keep], like=target["boxes"]),
            "labels": self.category_map.contiguous(target["labels"][keep]),
        }
        if self.with_masks:
            out["masks"] = tv_tensors.Mask(target["masks"][keep].to(torch.uint8))
        image, out = self.transforms(image, out)
        out = {
            "boxes": out["boxes"].as_subclass(Tensor).float(),
            "labels": out["labels"],
            **({"masks": out["masks"].as_subclass(Tensor)} if self.with_masks else {}),
            "image_id": image_id,
        }
        return image.as_subclass(Tensor), out


def detection_collate(batch: Sequence[tuple[Tensor, dict[str, Any]]]) -> dict[str, list[Any]]:
    """List of (image, target) -> ``{"images": [...], "targets": [...]}`` (docs/interfaces.md section 4)."""
    return {"images": [img for img, _ in batch], "targets": [tgt for _, tgt in batch]}
