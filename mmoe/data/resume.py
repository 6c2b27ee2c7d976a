"""Exact mid-epoch resume of data loading: per-sample seeds, and a resumable sampler/loader for map-style data.

Lightning restores the model, the optimizer, the schedule and its loop counters from a checkpoint, but a plain
``DataLoader`` starts its epoch again from the first batch, with a shuffle order and augmentations drawn from
whatever state the global random generators are in at that moment. A run killed mid-epoch and resumed then trains
on other batches than the uninterrupted run would have. Three things make the resumed batches identical:

* **Order is a function of (seed, epoch)**: ``ResumableSampler`` permutes with a private generator seeded by
  ``seed + epoch`` (the ``DistributedSampler`` rule, so ranks get disjoint, equally long slices), never with the
  global torch RNG.
* **Per-sample randomness is a function of (seed, epoch, index)**: augmentations and collate-time masks run under
  ``seeded_rng(derive_seed(...))``, so a sample looks the same whichever worker decodes it and however many
  batches were skipped before it; the global generators are saved and restored around it, so the model-side
  randomness (dropout, drop-path, Mixup), which ``mmoe.train.callbacks.RNGState`` checkpoints, is not disturbed.
* **The position is what the trainer consumed**: workers and Lightning prefetch ahead, so ``state_dict`` records
  the batches the training loop has taken in the current epoch (``fit_progress``), not the batches produced; on
  resume the sampler starts ``consumed * batch_size`` samples into the epoch's order.

The pretraining stream (``mmoe.data.shard_reader.ShardStream``) uses the same seeds and ``fit_progress``; it skips
forward by its own means (see its docstring).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, default_collate

log = logging.getLogger(__name__)

__all__ = [
    "ResumableLoader",
    "ResumableSampler",
    "ResumableTrainData",
    "SeededCollate",
    "SeededDataset",
    "derive_seed",
    "fit_progress",
]

Progress = Callable[[], "tuple[int, float] | None"]


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any printable parts (stable across processes and Python versions, unlike ``hash``)."""
    digest = hashlib.sha256("/".join(str(p) for p in ("mmoe", *parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@contextmanager
def seeded_rng(seed: int) -> Iterator[None]:
    """Run a block with Python's, NumPy's and torch's (CPU) global generators seeded by ``seed``, then put them back.

    Transforms (timm/torchvision crops, flips, jitter, RandAugment, random erasing) and collators draw from the
    global generators; seeding them per sample makes their output independent of the worker and of what ran
    before. Only the CPU torch generator is touched (``torch.manual_seed`` would also reseed CUDA, which the model
    uses).
    """
    py, npy, th = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(th)


def fit_progress(trainer: Any) -> tuple[int, float] | None:
    """(training batches the fit loop has taken in its current epoch, batches per epoch), or None when not fitting.

    This is the position a checkpoint should record: the loop counts a batch when it hands it to the model, while
    the loader has already produced the batches prefetched by Lightning and by the workers.
    """
    if trainer is None:
        return None
    try:
        loop = trainer.fit_loop.epoch_loop
        ready = int(loop.batch_progress.current.ready)
        total = float(trainer.num_training_batches)
    except (AttributeError, RuntimeError, TypeError):
        return None
    return ready, total


class SeededDataset(Dataset):
    """``dataset[(epoch, index)] -> (seed, dataset[index])``, the item built under ``seeded_rng(seed)``.

    ``seed = derive_seed(base_seed, "sample", epoch, index)``: the same sample gets the same augmentation in a
    resumed run, in any worker. Plain integer keys work too (epoch 0).
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[int, Any]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        seed = derive_seed(self.seed, "sample", int(epoch), int(index))
        with seeded_rng(seed):
            return seed, self.dataset[index]

    def __getattr__(self, name: str) -> Any:  # e.g. ``answers``/``classes`` of the wrapped dataset
        # never dunders: the DataLoader would pick up a wrapped ``__getitems__`` (``Subset`` has one) and bypass
        # the seeding; ``dataset`` itself is missing only while unpickling in a worker
        if name == "dataset" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.dataset, name)


class SeededCollate:
    """Collate ``(seed, item)`` pairs: the inner collate runs under a seed derived from the batch's sample seeds.

    Collate-time randomness (e.g. the captioning text masks) is then a function of which samples the batch holds.
    """

    def __init__(self, collate_fn: Callable[[list[Any]], Any] | None, seed: int) -> None:
        self.collate_fn = collate_fn or default_collate
        self.seed = int(seed)

    def __call__(self, pairs: Sequence[tuple[int, Any]]) -> Any:
        seeds = [s for s, _ in pairs]
        with seeded_rng(derive_seed(self.seed, "batch", *seeds)):
            return self.collate_fn([item for _, item in pairs])


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` order (seed + epoch) that yields ``(epoch, index)`` keys and can start mid-epoch.

    ``start`` (set by ``ResumableLoader``) skips that many of this rank's samples; ``__len__`` stays the full
    epoch so that Lightning's batches-per-epoch count does not change on resume. A ``DistributedSampler``
    subclass, so Lightning never replaces it under DDP; rank and world size are given explicitly.
    ``set_epoch`` (Lightning calls it every epoch) only records a request: the loader decides the epoch, because
    on a resumed run Lightning calls it after the epoch's iterator already exists. Without requests the loader
    moves to the next epoch at every ``iter()`` (unlike ``DistributedSampler``, which repeats its order).
    """

    def __init__(
        self, dataset: Dataset, *, num_replicas: int, rank: int, shuffle: bool, seed: int, drop_last: bool = False
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
        self.start = 0
        self.requested_epoch: int | None = None

    def set_epoch(self, epoch: int) -> None:
        self.requested_epoch = int(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        epoch = self.epoch
        # only indices are skipped: nothing is loaded for the samples consumed before a resume
        for i in itertools.islice(super().__iter__(), self.start, None):
            yield epoch, int(i)


class ResumableLoader(DataLoader):
    """Training ``DataLoader`` over a map-style dataset whose position within an epoch survives a checkpoint.

    Epoch ``e`` visits this rank's slice of ``permutation(seed + e)`` in batches of ``batch_size``; items and
    batches are built under per-sample seeds (``SeededDataset``/``SeededCollate``); worker seeds come from a private
    generator, so starting an epoch does not consume the global torch RNG. ``state_dict`` holds the epoch and the
    batches consumed in it (``progress``, set by the data module to ``fit_progress`` of its trainer; without it the
    batches this loader has yielded); ``load_state_dict`` makes the next ``iter()`` continue that epoch, or start
    the next one when it was complete. Lightning saves and restores it itself (it has ``state_dict``), and so do
    our data modules.
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        batch_size: int,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        shuffle: bool = True,
        drop_last: bool = True,
        num_workers: int = 0,
        persistent_workers: bool = False,
        pin_memory: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        sampler = ResumableSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed)
        super().__init__(
            SeededDataset(dataset, seed),
            batch_size=batch_size,
            sampler=sampler,
            drop_last=drop_last,
            num_workers=num_workers,
            collate_fn=SeededCollate(collate_fn, seed),
            persistent_workers=persistent_workers and num_workers > 0,
            pin_memory=pin_memory,
            generator=torch.Generator().manual_seed(derive_seed(seed, "workers", rank)),
        )
        self.seed = int(seed)
        self.progress: Progress | None = None
        self._epoch: int | None = None  # epoch of the current (or last) pass
        self._yielded = 0  # batches of that pass handed out (including skipped ones on resume)
        self._resume: tuple[int, int] | None = None  # (epoch, batches to skip) for the next pass
        self._loaded: dict[str, Any] | None = None  # state loaded and not yet iterated

    @property
    def resumable_sampler(self) -> ResumableSampler:
        return self.sampler  # type: ignore[return-value]

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        sampler = self.resumable_sampler
        if self._resume is not None:
            epoch, skip = self._resume
        elif sampler.requested_epoch is not None and sampler.requested_epoch != self._epoch:
            # Lightning's set_epoch for the coming epoch; a request equal to the pass already begun is the call
            # Lightning makes after the first iter() of a run, and is stale by now
            epoch, skip = sampler.requested_epoch, 0
        else:
            epoch, skip = (0 if self._epoch is None else self._epoch + 1), 0
        self._resume, self._loaded, sampler.requested_epoch = None, None, None
        sampler.epoch, sampler.start = epoch, skip * int(self.batch_size or 1)
        self._epoch, self._yielded = epoch, skip
        if skip:
            log.info("resuming epoch %d of the training data after %d batches", epoch, skip)
        for batch in super().__iter__():
            self._yielded += 1
            yield batch

    def _consumed(self) -> tuple[int, float]:
        got = self.progress() if self.progress is not None else None
        if got is not None:
            return got
        return self._yielded, float(len(self))

    def state_dict(self) -> dict[str, Any]:
        if self._loaded is not None:
            return dict(self._loaded)
        consumed, per_epoch = self._consumed()
        per_epoch = float(len(self)) if not math.isfinite(per_epoch) else per_epoch
        return {
            "seed": self.seed,
            "epoch": -1 if self._epoch is None else self._epoch,
            "consumed": int(consumed),
            "epoch_batches": int(per_epoch),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state or "epoch" not in state:
            return
        if int(state.get("seed", self.seed)) != self.seed:
            log.warning(
                "training loader: checkpoint seed %s differs from the configured %s; the resumed order differs",
                state.get("seed"),
                self.seed,
            )
        epoch, consumed = int(state["epoch"]), int(state.get("consumed", 0))
        if epoch < 0:
            self._epoch, self._resume = None, None
        elif consumed >= int(state.get("epoch_batches", len(self))) or consumed <= 0:
            self._epoch, self._resume = epoch, (epoch + 1, 0) if consumed > 0 else (epoch, 0)
        else:
            self._epoch, self._resume = epoch, (epoch, consumed)
        self._loaded = dict(state)


class ResumableTrainData:
    """Mixin for our map-style ``LightningDataModule``s: a ``ResumableLoader`` for training, kept in checkpoints.

    Lightning saves a stateful train loader with its loops, but restores it only when it restarts an unfinished
    epoch (or a step-based run); the data module's ``state_dict`` is restored with every checkpoint, so the
    loader state travels there too and is applied when ``train_dataloader`` builds the loader.
    """

    _train_loader: ResumableLoader | None = None
    _train_loader_state: dict[str, Any] | None = None

    def resumable_train_loader(
        self,
        dataset: Dataset,
        *,
        batch_size: int,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        num_workers: int = 0,
        seed: int = 0,
        drop_last: bool = True,
        persistent_workers: bool = False,
    ) -> ResumableLoader:
        """The training loader: this rank's slice (from the attached trainer), the position of a loaded state."""
        trainer = getattr(self, "trainer", None)
        rank, world = (int(trainer.global_rank), int(trainer.world_size)) if trainer is not None else (0, 1)
        loader = ResumableLoader(
            dataset,
            batch_size=batch_size,
            collate_fn=collate_fn,
            drop_last=drop_last,
            num_workers=num_workers,
            persistent_workers=persistent_workers,
            seed=seed,
            rank=rank,
            world_size=world,
        )
        loader.progress = lambda: fit_progress(getattr(self, "trainer", None))
        if self._train_loader_state:
            loader.load_state_dict(self._train_loader_state)
            self._train_loader_state = None
        self._train_loader = loader
        return loader

    def state_dict(self) -> dict[str, Any]:
        """``{"train_loader": ResumableLoader.state_dict()}`` (epoch and consumed batches), once there is one."""
        if self._train_loader is not None:
            return {"train_loader": self._train_loader.state_dict()}
        return {"train_loader": dict(self._train_loader_state)} if self._train_loader_state else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the training position; applied now or when the train loader is built."""
        state = (state_dict or {}).get("train_loader")
        if not state:
            return
        if self._train_loader is not None:
            self._train_loader.load_state_dict(state)
        else:
            self._train_loader_state = dict(state)
