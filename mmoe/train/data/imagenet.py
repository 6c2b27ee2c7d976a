"""ImageNet-1k data module (or any ImageFolder, e.g. the synthetic shapes world) for ``ClassificationTask``.

[MH1]'s pure-vision experiments (ImageNet-1k top-1 for Dense vs SMoE vs MH-MoE): ImageFolder splits with timm's
training transform (RandAugment, random erasing 0.25), batches ``{"image", "labels"}`` with integer labels. The
model side is the generic ``mmoe.train.classification.ClassificationTask`` with a ``mean_patch`` head, which
applies timm Mixup 0.8 / CutMix 1.0 with label smoothing 0.1 to training batches on the device and reports
top-1/top-5 (configs/finetune/imagenet.yaml).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mmoe.data.imagenet import RANDAUGMENT, ImageNetFolder, classification_collate, imagenet_transform
from mmoe.data.transforms import BEIT3_MEAN, BEIT3_STD
from mmoe.train.data.base import TaskDataModule

__all__ = ["ImageNetDataModule"]


class ImageNetDataModule(TaskDataModule):
    """ImageNet-1k (or any ImageFolder) for ``ClassificationTask``.

    Args:
        train_images, val_images: ImageFolder roots (``{class}/*.JPEG``); the label order is ``train_images``'s
            sorted folder names and ``val_images`` must use the same names.
        image_size: crop size; ``image_mean``/``image_std`` must be the backbone's normalization (BEiT-3: 0.5/0.5).
        auto_augment, re_prob, color_jitter, hflip, train_scale, crop_pct: see
            ``mmoe.data.imagenet.imagenet_transform`` (``train_scale`` is its random-resized-crop ``scale``).
        batch_size: per device; keep it even when the task uses Mixup (timm mixes a batch with its flip).
        seed: training order (a permutation per (seed, epoch)) and per-sample augmentation seeds (exact resume).
    """

    def __init__(
        self,
        *,
        train_images: str,
        val_images: str,
        image_size: int = 224,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 8,
        image_mean: Sequence[float] = BEIT3_MEAN,
        image_std: Sequence[float] = BEIT3_STD,
        auto_augment: str | None = RANDAUGMENT,
        re_prob: float = 0.25,
        color_jitter: float | None = 0.4,
        hflip: float = 0.5,
        train_scale: Sequence[float] = (0.08, 1.0),
        crop_pct: float = 0.875,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers, seed=seed)
        self.train_images, self.val_images = str(train_images), str(val_images)
        self.image_size = image_size
        norm = {"image_size": image_size, "mean": image_mean, "std": image_std}
        self.train_transform = imagenet_transform(
            True,
            auto_augment=auto_augment,
            re_prob=re_prob,
            color_jitter=color_jitter,
            hflip=hflip,
            scale=train_scale,
            **norm,
        )
        self.eval_transform = imagenet_transform(False, crop_pct=crop_pct, **norm)

    def _train_classes(self) -> list[str]:
        root = Path(self.train_images)
        if not root.is_dir():
            raise FileNotFoundError(f"ImageNetDataModule: train_images {root} is not a folder")
        return sorted(p.name for p in root.iterdir() if p.is_dir())

    @property
    def classes(self) -> list[str]:
        train = self.datasets.get("train")
        return train.classes if isinstance(train, ImageNetFolder) else self._train_classes()

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def setup(self, stage: str | None = None) -> None:
        classes = self._train_classes()
        if stage in (None, "fit"):
            self.datasets["train"] = ImageNetFolder(self.train_images, transform=self.train_transform, classes=classes)
        # the test loop evaluates the validation split (ImageNet's test labels are not public)
        self.datasets["val"] = self.datasets["test"] = ImageNetFolder(
            self.val_images, transform=self.eval_transform, classes=classes
        )

    def collate(self, stage: str) -> Callable[[list[Any]], Any]:
        # equal-size training batches (timm Mixup needs an even count): train_drop_last stays True
        return classification_collate
