"""NLVR2 data module: the official JSONL files and image folders ([B3] sec. 3.1).

Batches (docs/interfaces.md section 4): ``image``, ``image2`` (B,3,H,W), ``text`` (B,L), ``text_padding_mask``
(B,L), ``labels`` (B,) int64 (1 = True), ``identifier`` list[str]. Training skips unreadable images (reported by
id), evaluation refuses them by default (``eval_on_missing``), as in ``mmoe.train.data.vqav2``.
"""

from __future__ import annotations

from typing import Any

from mmoe.data.nlvr2 import NLVR2Dataset
from mmoe.train.data.base import STAGES, ImageTextCollate, ImageTextDataModule
from mmoe.train.data.vqav2 import OnMissing

__all__ = ["NLVR2Collate", "NLVR2DataModule"]


class NLVR2Collate(ImageTextCollate):
    """``NLVR2Dataset`` items -> an nlvr2 batch (module docstring); ``None`` items (unreadable images) are dropped."""

    text_field = "sentence"
    image_fields = ("image", "image2")
    id_field = "identifier"
    tensor_ids = False
    labels_stacked = False


class NLVR2DataModule(ImageTextDataModule):
    """NLVR2 from the official JSONL files and image folders (``mmoe.data.nlvr2``).

    Args:
        train_annotations, val_annotations, test_annotations, predict_annotations: JSONL files
            (``predict`` defaults to ``test``).
        train_images, val_images, test_images, predict_images: image folders (searched recursively;
            ``predict`` defaults to ``test``'s).
        eval_on_missing: behaviour for missing images outside training (default ``"error"``).
        kwargs: tokenizer, transforms and loaders: ``mmoe.train.data.base.ImageTextDataModule``.
    """

    def __init__(
        self,
        *,
        train_annotations: str | None = None,
        train_images: str | None = None,
        val_annotations: str | None = None,
        val_images: str | None = None,
        test_annotations: str | None = None,
        test_images: str | None = None,
        predict_annotations: str | None = None,
        predict_images: str | None = None,
        eval_on_missing: OnMissing = "error",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.eval_on_missing: OnMissing = eval_on_missing
        self.files: dict[str, tuple[str | None, str | None]] = {
            "train": (train_annotations, train_images),
            "val": (val_annotations, val_images),
            "test": (test_annotations, test_images),
            "predict": (predict_annotations or test_annotations, predict_images or test_images),
        }
        for name, (ann, root) in self.files.items():
            if bool(ann) != bool(root):
                raise ValueError(f"NLVR2DataModule: {name}_annotations and {name}_images must be given together")

    def collate(self, stage: str) -> NLVR2Collate:
        return NLVR2Collate(self.tokenizer)

    def setup(self, stage: str | None = None) -> None:
        want = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("predict",)}
        for name in want.get(stage or "", STAGES):
            ann, root = self.files[name]
            if name in self.datasets or not ann:
                continue
            train = name == "train"
            self.datasets[name] = NLVR2Dataset(
                ann,
                root,
                transform=self.train_transform if train else self.eval_transform,
                on_missing="skip" if train else self.eval_on_missing,
                # Unlabelled submission files (e.g. hidden test2) have no labels; predict never needs them.
                with_labels=name != "predict",
            )
