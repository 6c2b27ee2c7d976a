"""Image-text retrieval data module: COCO / Flickr30k Karpathy splits or COCO caption files ([B3] sec. 3.1).

Training batches: ``image`` (B,3,H,W), ``text`` (B,L) ``[BOS] caption [EOS]`` (unmasked), ``text_padding_mask``,
``image_id`` (B,) int64, one (image, caption) pair per row. Evaluation batches (``mmoe.data.retrieval``): the
images of the split with all of their captions, and their rows / columns in the split's scores matrix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mmoe.data.captions import CaptionDataset, CaptionRecord
from mmoe.data.retrieval import RetrievalEvalCollate, RetrievalEvalDataset, load_retrieval_records
from mmoe.train.data.base import ImageTextCollate, ImageTextDataModule

__all__ = ["RetrievalDataModule", "RetrievalTrainCollate"]


class RetrievalTrainCollate(ImageTextCollate):
    """(image, caption) items -> ``image``, ``text``, ``text_padding_mask``, ``image_id``."""

    text_field = "caption"
    id_field = "image_id"


class RetrievalDataModule(ImageTextDataModule):
    """Retrieval splits of a Karpathy file (``dataset_coco.json``, ``dataset_flickr30k.json``) or a COCO caption file.

    ``*_annotations`` is the Karpathy file (``*_split`` picks the split; ``train`` also takes COCO's ``restval``) or
    a ``captions_*.json`` (then ``*_image_list``, a file of image ids or file names, selects the split's images);
    ``*_images`` is the image root (Karpathy COCO: the folder holding ``train2014/`` and ``val2014/``; Flickr30k:
    ``flickr30k-images/``; COCO file: the folder of its ``file_name``s); a stage without ``*_images`` takes
    ``train_images``, then the annotation file's folder. Without ``val_annotations`` there is no validation loop.
    ``max_train_images`` / ``max_eval_images`` cap the images read. Tokenizer, transform and loader arguments
    (``**kwargs``) are ``mmoe.train.data.base.ImageTextDataModule``'s; the tokenizer must be the model's. The
    training loader drops an incomplete last batch (the base's default), which the contrastive loss needs: every
    rank must hold as many rows, since the negatives are gathered across ranks.
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
        train_split: str = "train",
        val_split: str = "val",
        test_split: str = "test",
        train_image_list: str | None = None,
        val_image_list: str | None = None,
        test_image_list: str | None = None,
        max_train_images: int | None = None,
        max_eval_images: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.annotations = {"train": train_annotations, "val": val_annotations, "test": test_annotations}
        self.images = {"train": train_images, "val": val_images, "test": test_images}
        self.splits = {"train": train_split, "val": val_split, "test": test_split}
        self.image_lists = {"train": train_image_list, "val": val_image_list, "test": test_image_list}
        self.max_train_images, self.max_eval_images = max_train_images, max_eval_images
        self.records: dict[str, list[CaptionRecord]] = {}

    def _records(self, stage: str) -> list[CaptionRecord]:
        if stage in self.records:
            return self.records[stage]
        ann = self.annotations[stage]
        if not ann:
            raise ValueError(f"RetrievalDataModule: {stage}_annotations is not set (needed for {stage})")
        root = self.images[stage] or self.images["train"] or str(Path(ann).parent)
        recs = load_retrieval_records(ann, root, self.splits[stage], self.image_lists[stage])
        limit = self.max_train_images if stage == "train" else self.max_eval_images
        if limit is not None:
            recs = recs[:limit]
        if stage == "train":
            recs = [r for r in recs if r.captions]
        if not recs or not any(r.captions for r in recs):
            raise ValueError(f"RetrievalDataModule: {ann} has no captioned images for split {self.splits[stage]!r}")
        self.records[stage] = recs
        return recs

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit") and "train" not in self.datasets:
            self.datasets["train"] = CaptionDataset(self._records("train"), self.train_transform, per_caption=True)
        for name, stages in (("val", (None, "fit", "validate")), ("test", (None, "test"))):
            if stage in stages and name not in self.datasets and (name == "test" or self.annotations["val"]):
                self.datasets[name] = RetrievalEvalDataset(self._records(name), self.eval_transform)

    def collate(self, stage: str) -> RetrievalTrainCollate | RetrievalEvalCollate:
        return RetrievalTrainCollate(self.tokenizer) if stage == "train" else RetrievalEvalCollate(self.tokenizer)
