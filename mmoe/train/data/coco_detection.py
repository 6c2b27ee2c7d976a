"""COCO detection data module: instances JSON through torchvision's ``CocoDetection`` + transforms v2.

For ``mmoe.train.detection.DetectionTask`` ([MH1]'s COCO box / mask AP); the datasets are ``mmoe.data.coco``'s,
batches ``{"images": [...], "targets": [...]}`` (docs/interfaces.md section 4).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from mmoe.data.coco import CategoryMap, CocoInstances, detection_collate, detection_transforms
from mmoe.train.data.base import TaskDataModule

__all__ = ["CocoDetectionDataModule"]


class CocoDetectionDataModule(TaskDataModule):
    """COCO instances (or the shapes world's) for ``DetectionTask``.

    Args:
        train_images, train_annotations, val_images, val_annotations: image folders and instances JSON files.
        with_masks: decode masks (Mask R-CNN); False for Faster R-CNN.
        hflip: horizontal-flip probability for training.
        lsj_size, scale_range: large-scale jitter to a square canvas (ViTDet: 1024, (0.1, 2.0)); None = off.
        max_val_images: evaluate on the first N validation images only (quick checks).
        seed: training order and per-sample augmentation seeds (exact mid-epoch resume, ``mmoe.data.resume``).
    """

    def __init__(
        self,
        *,
        train_images: str,
        train_annotations: str,
        val_images: str,
        val_annotations: str,
        batch_size: int = 2,
        eval_batch_size: int | None = None,
        num_workers: int = 4,
        with_masks: bool = True,
        hflip: float = 0.5,
        lsj_size: int | None = None,
        scale_range: Sequence[float] = (0.1, 2.0),
        max_val_images: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers, seed=seed)
        self.train_images, self.train_annotations = str(train_images), str(train_annotations)
        self.val_images, self.val_annotations = str(val_images), str(val_annotations)
        self.with_masks = with_masks
        self.hflip, self.lsj_size, self.scale_range = hflip, lsj_size, tuple(scale_range)
        self.max_val_images = max_val_images
        self._category_map: CategoryMap | None = None

    @property
    def category_map(self) -> CategoryMap:
        """Built from the training file (the label space the model learns); val must share its categories."""
        if self._category_map is None:
            self._category_map = CategoryMap.from_file(self.train_annotations)
        return self._category_map

    @property
    def num_classes(self) -> int:
        return self.category_map.num_classes

    def setup(self, stage: str | None = None) -> None:
        cmap = self.category_map
        val_map = CategoryMap.from_file(self.val_annotations)
        if val_map.coco_ids != cmap.coco_ids:
            raise ValueError(
                f"CocoDetectionDataModule: val_annotations {self.val_annotations} has categories {val_map.coco_ids}, "
                f"train_annotations has {cmap.coco_ids}; they must match"
            )
        if stage in (None, "fit") and "train" not in self.datasets:
            tf = detection_transforms(True, hflip=self.hflip, lsj_size=self.lsj_size, scale_range=self.scale_range)
            self.datasets["train"] = CocoInstances(
                self.train_images,
                self.train_annotations,
                transforms=tf,
                with_masks=self.with_masks,
                remove_empty=True,
                category_map=cmap,
            )
        if "val" not in self.datasets:
            val = CocoInstances(self.val_images, self.val_annotations, with_masks=self.with_masks, category_map=cmap)
            if self.max_val_images is not None:
                val = torch.utils.data.Subset(val, range(min(self.max_val_images, len(val))))
            self.datasets["val"] = self.datasets["test"] = val  # the test loop evaluates the validation split

    def collate(self, stage: str) -> Callable[[list[Any]], Any]:
        return detection_collate
