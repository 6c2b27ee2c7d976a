"""The base of the map-style fine-tuning data modules (VQAv2, NLVR2, COCO captioning, ImageNet, COCO detection).

A dataset's data module says how to build its datasets (``setup``) and how to batch them (``collate``); the
base holds what they all share:

- the loader settings, with the same names in every data module: ``batch_size`` (per device),
  ``eval_batch_size`` (default ``batch_size``), ``num_workers``, ``seed``;
- ``self.datasets``, one dataset per stage (``train``, ``val``, ``test``, ``predict``), built on demand;
- the training loader: ``mmoe.data.resume``'s resumable loader (a permutation per (seed, epoch), per-sample
  augmentation seeds, this rank's slice, the position within the epoch kept in checkpoints), so a run
  resumed mid-epoch sees exactly the batches of the uninterrupted run;
- the evaluation loaders (in order, no shuffling, worker seeds that do not draw from the global RNG).

The vocabulary of the constructor arguments (docs/interfaces.md section 5): per stage ``{stage}_annotations``
(annotation files), ``{stage}_images`` (image folders), VQA's ``{stage}_questions``; the transform arguments
``image_size``, ``image_mean``, ``image_std``, ``train_scale``, ``hflip``, ``color_jitter``, ``auto_augment``;
the tokenizer ``tokenizer``, ``tokenizer_path``, ``max_text_len``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from mmoe.data.resume import ResumableTrainData
from mmoe.data.tokenizer import Tokenizer, build_tokenizer
from mmoe.data.transforms import BEIT3_MEAN, BEIT3_STD, build_transform
from mmoe.train.compat import migrated_checkpoint_file

__all__ = ["ImageTextCollate", "ImageTextDataModule", "TaskDataModule", "STAGES"]

STAGES = ("train", "val", "test", "predict")
_SETUP_STAGE = {"train": "fit", "val": "validate", "test": "test", "predict": "predict"}


class TaskDataModule(ResumableTrainData, LightningDataModule):
    """Shared loaders of the map-style data modules (see the module docstring).

    Subclasses implement ``setup(stage)`` (filling ``self.datasets``) and ``collate(stage)``; they may override
    ``train_drop_last``. A stage without a dataset after ``setup`` is refused with the stage's name, except
    ``val`` when ``optional_val`` is set (then there is no validation loop).
    """

    optional_val: bool = False

    def __init__(
        self, *, batch_size: int, eval_batch_size: int | None = None, num_workers: int = 0, seed: int = 0
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"{type(self).__name__}: batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size or batch_size)
        self.num_workers = int(num_workers)
        self.seed = int(seed)
        self.datasets: dict[str, Dataset] = {}

    # ------------------------------------------------------------------ per dataset
    def collate(self, stage: str) -> Callable[[list[Any]], Any] | None:
        """The collate function of ``stage``'s loader (``None``: PyTorch's default)."""
        return None

    def train_drop_last(self, dataset: Dataset) -> bool:
        """Whether the training loader drops the last incomplete batch (default: yes, equal-size batches)."""
        return True

    # ------------------------------------------------------------------ loaders
    def dataset(self, stage: str) -> Dataset | None:
        """``stage``'s dataset, set up on first use; ``None`` when the stage has no files configured."""
        if stage not in self.datasets:
            self.setup(_SETUP_STAGE[stage])
        return self.datasets.get(stage)

    def loader(self, stage: str) -> DataLoader:
        """The loader of ``stage``: the resumable training loader, or an ordered evaluation loader."""
        ds = self.dataset(stage)
        if ds is None:
            raise ValueError(f"{type(self).__name__}: no {stage!r} files configured (set the {stage}_* arguments)")
        if stage == "train":
            return self.resumable_train_loader(
                ds,
                batch_size=self.batch_size,
                collate_fn=self.collate(stage),
                num_workers=self.num_workers,
                seed=self.seed,
                drop_last=self.train_drop_last(ds),
                persistent_workers=self.num_workers > 0,
            )
        return DataLoader(
            ds,
            batch_size=self.eval_batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=self.collate(stage),
            persistent_workers=self.num_workers > 0,
            generator=torch.Generator().manual_seed(0),  # worker seeds without drawing from the global RNG
        )

    def train_dataloader(self) -> DataLoader:
        return self.loader("train")

    def val_dataloader(self) -> DataLoader | list:
        if self.optional_val and self.dataset("val") is None:
            return []
        return self.loader("val")

    def test_dataloader(self) -> DataLoader:
        return self.loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self.loader("predict")

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        """Lightning's ``load_from_checkpoint``; a checkpoint naming an old class path is mapped first."""
        return super().load_from_checkpoint(migrated_checkpoint_file(checkpoint_path), *args, **kwargs)


class ImageTextDataModule(TaskDataModule):
    """:class:`TaskDataModule` with a tokenizer and the training/evaluation image transforms (VQAv2, NLVR2, COCO
    captioning).

    The subclasses take these arguments through ``**kwargs`` (jsonargparse follows them here, so the CLI still
    checks every key):

    Args:
        tokenizer, tokenizer_path, max_text_len: the text tokenizer (``mmoe.data.tokenizer.build_tokenizer``); it
            must match the model's.
        image_size, image_mean, image_std, train_scale, hflip, color_jitter, auto_augment: the transforms,
            ``mmoe.data.transforms.build_transform``: a random resized crop of scale ``train_scale`` (default
            0.5-1), flips, colour jitter and RandAugment for training; resize + center crop for evaluation; both
            normalized with ``image_mean`` / ``image_std`` (the backbone's; default BEiT-3's 0.5/0.5).
        batch_size, eval_batch_size, num_workers, seed: :class:`TaskDataModule`.
    """

    def __init__(
        self,
        *,
        tokenizer: str = "openclip",
        tokenizer_path: str | None = None,
        max_text_len: int = 32,
        image_size: int = 224,
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
        train_scale: Sequence[float] | None = None,
        hflip: float = 0.0,
        color_jitter: float | None = None,
        auto_augment: str | None = None,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers, seed=seed)
        self.tokenizer = build_tokenizer(tokenizer, max_len=max_text_len, path=tokenizer_path)
        norm = {"mean": tuple(image_mean or BEIT3_MEAN), "std": tuple(image_std or BEIT3_STD)}
        self.train_transform = build_transform(
            image_size,
            train=True,
            scale=tuple(train_scale or (0.5, 1.0)),
            hflip=hflip,
            color_jitter=color_jitter,
            auto_augment=auto_augment,
            **norm,
        )
        self.eval_transform = build_transform(image_size, train=False, **norm)


class ImageTextCollate:
    """List of image-text dataset items -> a batch (docs/interfaces.md section 4); ``None`` items are dropped.

    Unreadable images come back from the datasets as ``None`` (training skips them); an all-``None`` batch is
    ``{}``, which the task's step skips. A subclass names the item fields: ``text_field`` (tokenized into
    ``text`` + ``text_padding_mask``), ``image_fields`` (stacked), ``id_field`` (a tensor when ``tensor_ids``,
    else a list) and ``labels_stacked`` (soft-score rows stacked, else integer labels).
    """

    text_field = "text"
    image_fields: tuple[str, ...] = ("image",)
    id_field = "id"
    tensor_ids = True
    labels_stacked = True

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer

    def __call__(self, items: Sequence[dict[str, Any] | None]) -> dict[str, Any]:
        items = [it for it in items if it is not None]
        if not items:
            return {}
        text, padding = self.tokenizer([it[self.text_field] for it in items])
        batch: dict[str, Any] = {k: torch.stack([it[k] for it in items]) for k in self.image_fields}
        batch.update(text=text, text_padding_mask=padding)
        ids = [it[self.id_field] for it in items]
        batch[self.id_field] = torch.tensor(ids, dtype=torch.long) if self.tensor_ids else ids
        if all("labels" in it for it in items):
            labels = [it["labels"] for it in items]
            batch["labels"] = torch.stack(labels) if self.labels_stacked else torch.tensor(labels, dtype=torch.long)
        return batch
