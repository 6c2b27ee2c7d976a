"""COCO captioning data module: the Karpathy split file or official caption annotations ([B3] sec. 3.1).

Batches (docs/interfaces.md section 4): ``image`` (B,3,H,W), ``text`` (B,L) ``[BOS] caption [EOS]`` with
``mask_ratio`` (60-70%) of the caption tokens after BOS replaced by [MASK], ``text_padding_mask``,
``text_labels`` (B,L) (-100 where nothing is predicted), ``image_id`` (B,) int64; predict batches hold
``image`` and ``image_id`` only. Training draws one caption per (image, caption) pair, evaluation one item per
image with its references (``references``), which ``CaptioningTask`` scores.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from mmoe.data.captions import (
    CaptionCollator,
    CaptionDataset,
    CaptionRecord,
    ImageListDataset,
    list_images,
    load_caption_records,
    references_of,
)
from mmoe.train.data.base import ImageTextDataModule

__all__ = ["CaptioningDataModule"]


class CaptioningDataModule(ImageTextDataModule):
    """COCO caption data from the Karpathy split file or official caption annotations (``mmoe.data.captions``).

    ``*_annotations`` are a ``dataset_coco.json`` (Karpathy; ``*_split`` picks the split, ``train`` adds
    ``restval``) or a ``captions_*.json``; ``*_images`` is the image root (Karpathy: the COCO root holding
    ``train2014/`` and ``val2014/``; COCO file: the folder of its ``file_name``s, default = Karpathy root
    ``train_images``). ``predict_images`` is a folder of images or one image for ``mmoe predict``.
    The tokenizer must match the model's (``tokenizer``, ``tokenizer_path``, ``max_text_len``). Without
    ``val_annotations`` there is no validation loop. ``mask_ratio``: the (low, high) share of caption tokens
    masked; ``max_train_images`` / ``max_eval_images`` cap the images read; tokenizer, transform and loader
    arguments (``**kwargs``) are ``mmoe.train.data.base.ImageTextDataModule``'s.
    """

    optional_val = True

    def __init__(
        self,
        *,
        train_annotations: str | None = None,
        train_images: str | None = None,
        val_annotations: str | None = None,
        val_images: str | None = None,
        test_annotations: str | None = None,
        test_images: str | None = None,
        predict_images: str | None = None,
        train_split: str = "train",
        val_split: str = "val",
        test_split: str = "test",
        mask_ratio: Sequence[float] = (0.6, 0.7),
        max_train_images: int | None = None,
        max_eval_images: int | None = None,
        **kwargs: Any,
    ) -> None:
        if len(mask_ratio) != 2:
            raise ValueError(f"CaptioningDataModule: mask_ratio must be (low, high), got {list(mask_ratio)}")
        super().__init__(**kwargs)
        self.annotations = {"train": train_annotations, "val": val_annotations, "test": test_annotations}
        self.images = {"train": train_images, "val": val_images, "test": test_images, "predict": predict_images}
        self.splits = {"train": train_split, "val": val_split, "test": test_split}
        self.mask_ratio = (float(mask_ratio[0]), float(mask_ratio[1]))
        self.max_train_images, self.max_eval_images = max_train_images, max_eval_images
        self.records: dict[str, list[CaptionRecord]] = {}

    def _records(self, stage: str) -> list[CaptionRecord]:
        if stage in self.records:
            return self.records[stage]
        ann = self.annotations[stage]
        if not ann:
            raise ValueError(f"CaptioningDataModule: {stage}_annotations is not set (needed for {stage})")
        root = self.images[stage] or self.images["train"] or str(Path(ann).parent)
        recs = load_caption_records(ann, root, self.splits[stage])
        limit = self.max_train_images if stage == "train" else self.max_eval_images
        if limit is not None:
            recs = recs[:limit]
        if not recs:
            raise ValueError(f"CaptioningDataModule: {ann} has no images for split {self.splits[stage]!r}")
        self.records[stage] = recs
        return recs

    def references(self, stage: str) -> dict[int, list[str]]:
        """``{image_id: [reference captions]}`` of a stage (``val``/``test``) for scoring."""
        return references_of(self._records(stage))

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit") and "train" not in self.datasets:
            self.datasets["train"] = CaptionDataset(self._records("train"), self.train_transform, per_caption=True)
        for name, stages in (("val", (None, "fit", "validate")), ("test", (None, "test"))):
            if stage in stages and name not in self.datasets and (name == "test" or self.annotations["val"]):
                self.datasets[name] = CaptionDataset(self._records(name), self.eval_transform, per_caption=False)
        if stage == "predict" and "predict" not in self.datasets:
            if not self.images["predict"]:
                raise ValueError("CaptioningDataModule: predict_images (a folder or an image file) is not set")
            self.datasets["predict"] = ImageListDataset(list_images(self.images["predict"]), self.eval_transform)

    def collate(self, stage: str) -> CaptionCollator:
        # training masks are drawn per sample (seeded by the resumable loader); evaluation masks are fixed
        return CaptionCollator(self.tokenizer, ratio=self.mask_ratio, seed=None if stage == "train" else self.seed)

    def train_drop_last(self, dataset: Dataset[Any]) -> bool:
        return len(dataset) >= self.batch_size  # type: ignore[arg-type]
