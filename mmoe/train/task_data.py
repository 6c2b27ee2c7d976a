"""Lightning data modules for VQAv2 and NLVR2 fine-tuning (SPEC.md 7; docs/interfaces.md sections 4 and 7).

File paths are config keys (never hard-coded); the tokenizer is given by name/path/length like
``mmoe.data.tokenizer.build_tokenizer``. Training reads with ``on_missing="skip"`` (a question whose image
is missing or unreadable is reported with its id and dropped); validation, test and predict read with
``eval_on_missing="error"`` by default, so no question silently leaves a score.

Batches (docs/interfaces.md section 4):

* vqa: ``image`` (B,3,H,W), ``text`` (B,L), ``text_padding_mask`` (B,L), ``labels`` (B, num_answers) soft
  scores (absent for unannotated test files), ``question_id`` (B,) int64.
* nlvr2: ``image``, ``image2``, ``text``, ``text_padding_mask``, ``labels`` (B,) int64 (1 = True),
  ``identifier`` list[str].

Transforms: ``mmoe.data.transforms.build_transform``. BEiT-3 fine-tunes VQA/NLVR2 with a random resized crop
(scale 0.5-1), flips and RandAugment; flips are off by default here because they turn "left"/"right"
questions false (set ``hflip`` to follow BEiT-3 exactly).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from mmoe.data.nlvr2 import NLVR2Dataset
from mmoe.data.resume import ResumableTrainData
from mmoe.data.tokenizer import Tokenizer, build_tokenizer
from mmoe.data.transforms import BEIT3_MEAN, BEIT3_STD, build_transform
from mmoe.data.vqa import VQADataset, VQAFiles, holdout_image_keys, load_answer_vocab

__all__ = ["VQACollate", "NLVR2Collate", "VQADataModule", "NLVR2DataModule"]

OnMissing = Literal["skip", "error"]


class VQACollate:
    """List of ``VQADataset`` items -> a vqa batch; ``None`` items (unreadable images) are dropped."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer

    def __call__(self, items: Sequence[dict[str, Any] | None]) -> dict[str, Any]:
        items = [it for it in items if it is not None]
        if not items:
            return {}
        text, padding = self.tokenizer([it["question"] for it in items])
        batch: dict[str, Any] = {
            "image": torch.stack([it["image"] for it in items]),
            "text": text,
            "text_padding_mask": padding,
            "question_id": torch.tensor([it["question_id"] for it in items], dtype=torch.long),
        }
        if all("labels" in it for it in items):
            batch["labels"] = torch.stack([it["labels"] for it in items])
        return batch


class NLVR2Collate:
    """List of ``NLVR2Dataset`` items -> an nlvr2 batch; ``None`` items (unreadable images) are dropped."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer

    def __call__(self, items: Sequence[dict[str, Any] | None]) -> dict[str, Any]:
        items = [it for it in items if it is not None]
        if not items:
            return {}
        text, padding = self.tokenizer([it["sentence"] for it in items])
        batch: dict[str, Any] = {
            "image": torch.stack([it["image"] for it in items]),
            "image2": torch.stack([it["image2"] for it in items]),
            "text": text,
            "text_padding_mask": padding,
            "identifier": [it["identifier"] for it in items],
        }
        if all("labels" in it for it in items):
            batch["labels"] = torch.tensor([it["labels"] for it in items], dtype=torch.long)
        return batch


class _TaskDataModule(ResumableTrainData, LightningDataModule):
    """Shared tokenizer, transforms and loaders of the VQA and NLVR2 data modules."""

    def __init__(
        self,
        *,
        tokenizer: str,
        tokenizer_path: str | None,
        max_text_len: int,
        image_size: int,
        image_mean: Sequence[float],
        image_std: Sequence[float],
        train_scale: Sequence[float],
        hflip: float,
        color_jitter: float | None,
        auto_augment: str | None,
        batch_size: int,
        eval_batch_size: int | None,
        num_workers: int,
        eval_on_missing: OnMissing,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.seed = int(seed)
        if batch_size < 1:
            raise ValueError(f"{type(self).__name__}: batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.eval_on_missing: OnMissing = eval_on_missing
        self.tokenizer = build_tokenizer(tokenizer, max_len=max_text_len, path=tokenizer_path)
        common = {"mean": tuple(image_mean), "std": tuple(image_std)}
        self.train_transform = build_transform(
            image_size,
            train=True,
            scale=tuple(train_scale),
            hflip=hflip,
            color_jitter=color_jitter,
            auto_augment=auto_augment,
            **common,
        )
        self.eval_transform = build_transform(image_size, train=False, **common)
        self.datasets: dict[str, Dataset] = {}

    def _collate(self) -> Callable[[Sequence[Any]], dict[str, Any]]:
        raise NotImplementedError

    def _loader(self, stage: str, train: bool) -> DataLoader:
        if stage not in self.datasets:
            raise ValueError(f"{type(self).__name__}: no {stage!r} files configured (set the {stage} paths)")
        if train:  # order from (seed, epoch), per-sample augmentation seeds, position kept in checkpoints
            return self.resumable_train_loader(
                self.datasets[stage],
                batch_size=self.batch_size,
                collate_fn=self._collate(),
                num_workers=self.num_workers,
                seed=self.seed,
                persistent_workers=self.num_workers > 0,
            )
        return DataLoader(
            self.datasets[stage],
            batch_size=self.eval_batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=self._collate(),
            persistent_workers=self.num_workers > 0,
            generator=torch.Generator().manual_seed(0),  # worker seeds without drawing from the global RNG
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict", False)


class VQADataModule(_TaskDataModule):
    """VQAv2 from the official files (``mmoe.data.vqa``).

    Args:
        train, val, test, predict: lists of ``{questions, annotations, image_dir}`` (``VQAFiles``).
            ``predict`` defaults to ``test`` (the files of the official submission, e.g. test-dev).
        answer_vocab: the answer vocabulary file (``mmoe-vqa-vocab``); the same file as the model's.
        split: ``"standard"`` (train on ``train``, validate on ``val``) or ``"vilt"``: the ViLT/BEiT-3 split,
            train on ``train`` + ``val`` minus ``holdout_images`` val images, validate on those images.
        holdout_images, holdout_seed: size and choice of the held-out val images (``holdout_image_keys``).
        tokenizer, tokenizer_path, max_text_len: the text tokenizer (``build_tokenizer``).
        image_size, image_mean, image_std, train_scale, hflip, color_jitter, auto_augment: transforms.
        batch_size, eval_batch_size, num_workers: loaders.
        eval_on_missing: behaviour for missing images outside training (default ``"error"``).
        seed: training order (a permutation per (seed, epoch)) and per-sample augmentation seeds; with these a
            run resumed mid-epoch sees the batches of the uninterrupted run (``mmoe.data.resume``).
    """

    def __init__(
        self,
        *,
        train: list[VQAFiles] | None = None,
        val: list[VQAFiles] | None = None,
        test: list[VQAFiles] | None = None,
        predict: list[VQAFiles] | None = None,
        answer_vocab: str | None = None,
        split: Literal["standard", "vilt"] = "standard",
        holdout_images: int = 1000,
        holdout_seed: int | None = None,
        tokenizer: str = "openclip",
        tokenizer_path: str | None = None,
        max_text_len: int = 32,
        image_size: int = 224,
        image_mean: list[float] | None = None,
        image_std: list[float] | None = None,
        train_scale: list[float] | None = None,
        hflip: float = 0.0,
        color_jitter: float | None = None,
        auto_augment: str | None = None,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        eval_on_missing: OnMissing = "error",
        seed: int = 0,
    ) -> None:
        super().__init__(
            tokenizer=tokenizer,
            tokenizer_path=tokenizer_path,
            max_text_len=max_text_len,
            image_size=image_size,
            image_mean=image_mean or BEIT3_MEAN,
            image_std=image_std or BEIT3_STD,
            train_scale=train_scale or (0.5, 1.0),
            hflip=hflip,
            color_jitter=color_jitter,
            auto_augment=auto_augment,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            eval_on_missing=eval_on_missing,
            seed=seed,
        )
        if split not in ("standard", "vilt"):
            raise ValueError(f"VQADataModule: split={split!r}; expected 'standard' or 'vilt'")
        if split == "vilt" and not (train and val):
            raise ValueError("VQADataModule(split='vilt'): needs train and val files (val gives the held-out images)")
        self.files = {"train": train, "val": val, "test": test, "predict": predict or test}
        self.split, self.holdout_images, self.holdout_seed = split, holdout_images, holdout_seed
        self.label_names: list[str] | None = load_answer_vocab(answer_vocab) if answer_vocab else None
        if (train or val) and self.label_names is None:
            raise ValueError("VQADataModule: answer_vocab is required to train or validate (soft-score targets)")

    def _collate(self) -> VQACollate:
        return VQACollate(self.tokenizer)

    def setup(self, stage: str | None = None) -> None:
        holdout = None
        if self.split == "vilt" and stage in (None, "fit", "validate"):
            holdout = holdout_image_keys(self.files["val"], self.holdout_images, self.holdout_seed)
        want = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("predict",)}
        for name in want.get(stage or "", ("train", "val", "test", "predict")):
            if name in self.datasets or not self.files.get(name):
                continue
            if name == "train":
                files = list(self.files["train"]) + (list(self.files["val"]) if holdout is not None else [])
                self.datasets[name] = VQADataset(
                    files,
                    answer_vocab=self.label_names,
                    transform=self.train_transform,
                    exclude_images=holdout,
                    on_missing="skip",
                )
            else:
                self.datasets[name] = VQADataset(
                    self.files[name],
                    answer_vocab=self.label_names,
                    transform=self.eval_transform,
                    include_images=holdout if name == "val" else None,
                    on_missing=self.eval_on_missing,
                )


class NLVR2DataModule(_TaskDataModule):
    """NLVR2 from the official JSONL files and image folders (``mmoe.data.nlvr2``).

    Args:
        train_annotations, val_annotations, test_annotations, predict_annotations: JSONL files
            (``predict`` defaults to ``test``).
        train_image_root, val_image_root, test_image_root, predict_image_root: image folders (searched
            recursively; ``predict`` defaults to ``test``'s).
        Other arguments as ``VQADataModule``.
    """

    def __init__(
        self,
        *,
        train_annotations: str | None = None,
        train_image_root: str | None = None,
        val_annotations: str | None = None,
        val_image_root: str | None = None,
        test_annotations: str | None = None,
        test_image_root: str | None = None,
        predict_annotations: str | None = None,
        predict_image_root: str | None = None,
        tokenizer: str = "openclip",
        tokenizer_path: str | None = None,
        max_text_len: int = 32,
        image_size: int = 224,
        image_mean: list[float] | None = None,
        image_std: list[float] | None = None,
        train_scale: list[float] | None = None,
        hflip: float = 0.0,
        color_jitter: float | None = None,
        auto_augment: str | None = None,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        eval_on_missing: OnMissing = "error",
        seed: int = 0,
    ) -> None:
        super().__init__(
            tokenizer=tokenizer,
            tokenizer_path=tokenizer_path,
            max_text_len=max_text_len,
            image_size=image_size,
            image_mean=image_mean or BEIT3_MEAN,
            image_std=image_std or BEIT3_STD,
            train_scale=train_scale or (0.5, 1.0),
            hflip=hflip,
            color_jitter=color_jitter,
            auto_augment=auto_augment,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            eval_on_missing=eval_on_missing,
            seed=seed,
        )
        self.files: dict[str, tuple[str | None, str | None]] = {
            "train": (train_annotations, train_image_root),
            "val": (val_annotations, val_image_root),
            "test": (test_annotations, test_image_root),
            "predict": (predict_annotations or test_annotations, predict_image_root or test_image_root),
        }
        for name, (ann, root) in self.files.items():
            if bool(ann) != bool(root):
                raise ValueError(f"NLVR2DataModule: {name}_annotations and {name}_image_root must be given together")

    def _collate(self) -> NLVR2Collate:
        return NLVR2Collate(self.tokenizer)

    def setup(self, stage: str | None = None) -> None:
        want = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("predict",)}
        for name in want.get(stage or "", ("train", "val", "test", "predict")):
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
