"""Mid-epoch resume of the data path: the batches after a checkpoint are the ones the uninterrupted run would see.

- pretraining stream: a pass stopped after ``k`` consumed batches (with prefetched ones beyond) and resumed from
  the loader state gives exactly the rest of the pass, for 0 and 2 workers, mixed and alternate mixing, with raw
  cursors (skip without decoding) and without them (rebuild and drop); counters are the consumed batches';
- map-style training loader (fine-tuning tasks): order from (seed, epoch), per-sample augmentation seeds, resume
  after ``k`` batches with workers, DDP-like rank slices of equal length, no global-RNG consumption.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from helpers import pretrain_data_args, shard_world
from torch.utils.data import Dataset

from mmoe.data.resume import ResumableLoader, seeded_rng
from mmoe.train.data.pretraining import PretrainDataModule


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shard_world(tmp_path_factory, num_val=4)


def _dm(world: Path, **kw) -> PretrainDataModule:
    args = pretrain_data_args(
        world,
        min_mask_patches=4,
        steps_per_epoch=7,
        shuffle_buffer=5,
        train_scale=(0.5, 1.0),  # random crops, flips and jitter: per-sample seeds must cover them
        color_jitter=0.4,
        hflip=0.5,
    )
    return PretrainDataModule(**{**args, **kw})


def _flat(batch: dict) -> list[torch.Tensor]:
    return [batch[s][k] for s in sorted(batch) for k in sorted(batch[s])]


def _same(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(x, y) for x, y in zip(_flat(a), _flat(b)))


@pytest.mark.parametrize(
    ("workers", "mode", "cursors"),
    [(0, "mixed", True), (2, "mixed", True), (2, "alternate", True), (2, "mixed", False)],
)
def test_stream_resumes_mid_pass_exactly(world: Path, workers: int, mode: str, cursors: bool) -> None:
    ref_dm = _dm(world, num_workers=workers, mode=mode)
    ref_loader = ref_dm.train_dataloader()
    reference = list(ref_loader)
    second = list(ref_loader)  # the next pass
    assert len(reference) == 7 and not _same(reference[0], second[0])

    k = 3  # consumed by the trainer; the loader has produced one more (Lightning prefetches)
    dm = _dm(world, num_workers=workers, mode=mode)
    loader = dm.train_dataloader()
    it = iter(loader)
    got = [next(it) for _ in range(k + 1)]
    assert all(_same(a, b) for a, b in zip(got, reference))
    loader.progress = lambda: (k, 7.0)
    state = dm.state_dict()
    del it
    assert state["pass"] == 0 and state["consumed"] == k
    assert set(state["cursors"]["0"]) == ({"0"} if workers == 0 else {"0", "1"})  # worker roles with a batch
    # counters as of the consumed batches, not the prefetched one
    assert state["batches_seen"] == k and sum(state["samples_seen"].values()) == 6 * k
    if not cursors:  # as on ranks > 0, whose cursors are not in rank 0's checkpoint
        state = {**state, "cursors": {}}

    resumed_dm = _dm(world, num_workers=workers, mode=mode)
    resumed_dm.load_state_dict(state)  # before the loader exists, as Lightning does on restore
    resumed_loader = resumed_dm.train_dataloader()
    rest = list(resumed_loader)
    assert len(rest) == 7 - k
    assert all(_same(a, b) for a, b in zip(rest, reference[k:]))
    # the pass after it is the uninterrupted run's second pass
    nxt = list(resumed_loader)
    assert len(nxt) == 7 and all(_same(a, b) for a, b in zip(nxt, second))
    final = resumed_dm.state_dict()
    assert final["batches_seen"] == 14 and final["pass"] == 1 and final["consumed"] == 7


def test_stream_resume_refuses_another_worker_count(world: Path, caplog: pytest.LogCaptureFixture) -> None:
    dm = _dm(world, num_workers=2)
    loader = dm.train_dataloader()
    it = iter(loader)
    for _ in range(3):
        next(it)
    state = dm.state_dict()
    del it
    other = _dm(world, num_workers=0)
    other.load_state_dict(state)
    with caplog.at_level("WARNING"):
        assert len(list(other.train_dataloader())) == 7  # a fresh pass, the next one
    assert "cannot continue that pass exactly" in caplog.text


def test_stream_state_of_an_older_reader_starts_the_next_pass(world: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A mid-pass position written before the reader's pass layout changed (no ``reader`` key) is not replayed."""
    dm = _dm(world)
    it = iter(dm.train_dataloader())
    for _ in range(3):
        next(it)
    state = dm.state_dict()
    del it
    assert state["pass"] == 0 and state["consumed"] == 3 and state["reader"] == 2
    old = {k: v for k, v in state.items() if k != "reader"}
    other = _dm(world)
    other.load_state_dict(old)
    with caplog.at_level("WARNING"):
        assert len(list(other.train_dataloader())) == 7  # a fresh pass, the next one
    assert "of an older shard reader" in caplog.text and other.state_dict()["pass"] == 1


def test_stream_does_not_touch_global_rng(world: Path) -> None:
    """Model-side randomness (dropout, noise) must not depend on how much data was loaded since a checkpoint."""
    torch.manual_seed(123)
    random.seed(5)
    before = (torch.get_rng_state(), random.getstate())
    for _ in _dm(world, num_workers=0).train_dataloader():
        pass
    assert torch.equal(before[0], torch.get_rng_state()) and before[1] == random.getstate()


class _Noisy(Dataset):
    """Items drawn from the global generators, as timm/torchvision augmentations are."""

    def __len__(self) -> int:
        return 23

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"index": torch.tensor(i), "aug": torch.rand(2), "py": torch.tensor(random.random())}


def _collect(loader) -> list[dict[str, torch.Tensor]]:
    return [dict(b) for b in loader]


def _eq(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


@pytest.mark.parametrize("workers", [0, 2])
def test_map_loader_resumes_mid_epoch(workers: int) -> None:
    kw = dict(batch_size=4, num_workers=workers, seed=3, drop_last=True)
    ref = ResumableLoader(_Noisy(), **kw)
    epochs = [_collect(ref) for _ in range(3)]
    assert len(epochs[0]) == len(ref) == 5
    assert not torch.equal(epochs[0][0]["index"], epochs[1][0]["index"])  # reshuffled per epoch
    assert sorted(torch.cat([b["index"] for b in epochs[0]]).tolist()) != list(range(20))  # a permutation subset

    k = 2
    part = ResumableLoader(_Noisy(), **kw)
    it = iter(part)
    assert _eq([next(it) for _ in range(k + 1)], epochs[0][: k + 1])
    part.progress = lambda: (k, 5.0)
    state = part.state_dict()
    del it
    assert state == {"seed": 3, "epoch": 0, "consumed": k, "epoch_batches": 5}

    torch.manual_seed(999)  # a different global RNG state than the reference run had: augmentations must not care
    resumed = ResumableLoader(_Noisy(), **kw)
    resumed.load_state_dict(state)
    assert _eq(_collect(resumed), epochs[0][k:])
    assert _eq(_collect(resumed), epochs[1])
    end = resumed.state_dict()
    assert end["epoch"] == 1 and end["consumed"] == 5
    again = ResumableLoader(_Noisy(), **kw)
    again.load_state_dict(end)  # an epoch-end checkpoint: the next epoch starts
    assert _eq(_collect(again), epochs[2]) and again.state_dict()["epoch"] == 2


def test_map_loader_rank_slices_and_rng() -> None:
    ranks = [ResumableLoader(_Noisy(), batch_size=3, seed=1, rank=r, world_size=2, drop_last=True) for r in range(2)]
    parts = [_collect(x) for x in ranks]
    assert len(parts[0]) == len(parts[1]) == len(ranks[0]) == 4  # 12 samples per rank (23 padded to 24)
    seen = [set(torch.cat([b["index"] for b in p]).tolist()) for p in parts]
    assert len(seen[0] & seen[1]) <= 1  # disjoint up to DistributedSampler's padding
    state = torch.get_rng_state()
    _collect(ranks[0])
    assert torch.equal(state, torch.get_rng_state())
    with seeded_rng(7):
        a = torch.rand(3)
    with seeded_rng(7):
        b = torch.rand(3)
    assert torch.equal(a, b) and torch.equal(state, torch.get_rng_state())


def test_data_module_mixin_carries_the_position() -> None:
    """The data module's state (restored by Lightning with every checkpoint) is applied when the loader is built."""
    from lightning.pytorch import LightningDataModule

    from mmoe.data.resume import ResumableTrainData

    class DM(ResumableTrainData, LightningDataModule):
        def train_dataloader(self) -> ResumableLoader:
            return self.resumable_train_loader(_Noisy(), batch_size=4, seed=3, num_workers=0)

    ref = DM().train_dataloader()
    epoch0 = _collect(ref)
    assert DM().state_dict() == {}
    dm = DM()
    dm.load_state_dict({"train_loader": {"seed": 3, "epoch": 0, "consumed": 3, "epoch_batches": 5}})
    assert dm.state_dict()["train_loader"]["consumed"] == 3  # pending, not lost before the loader exists
    loader = dm.train_dataloader()
    assert dm.state_dict()["train_loader"]["consumed"] == 3  # loaded, not yet iterated
    assert _eq(_collect(loader), epoch0[3:])
    assert dm.state_dict()["train_loader"] == {"seed": 3, "epoch": 0, "consumed": 5, "epoch_batches": 5}


def test_seeded_dataset_is_not_bypassed_by_a_batched_getitems() -> None:
    from torch.utils.data import Subset

    from mmoe.data.resume import SeededDataset

    wrapped = SeededDataset(Subset(_Noisy(), range(8)), seed=0)
    assert not hasattr(wrapped, "__getitems__")  # the DataLoader fetches item by item, through the seeding
    assert len(wrapped) == 8 and list(wrapped.indices) == list(range(8))  # plain attributes still pass through
    s1, a = wrapped[(0, 3)]
    s2, b = wrapped[(0, 3)]
    assert s1 == s2 and torch.equal(a["aug"], b["aug"]) and not torch.equal(a["aug"], wrapped[(1, 3)][1]["aug"])


def _task_modules(world: Path) -> dict[str, object]:
    """Every map-style training data module, on the shapes world, with random augmentation switched on."""
    from mmoe.train.data.coco_captioning import CaptioningDataModule
    from mmoe.train.data.coco_detection import CocoDetectionDataModule
    from mmoe.train.data.imagenet import ImageNetDataModule
    from mmoe.train.data.nlvr2 import NLVR2DataModule

    coco = world / "coco"
    return {
        "imagenet": ImageNetDataModule(
            train_images=str(world / "imagenet" / "train"),
            val_images=str(world / "imagenet" / "val"),
            image_size=32,
            batch_size=4,
            num_workers=0,
        ),
        "nlvr2": NLVR2DataModule(
            train_annotations=str(world / "nlvr2" / "train.json"),
            train_images=str(world / "nlvr2" / "images" / "train"),
            image_size=32,
            batch_size=4,
            hflip=0.5,
        ),
        "captioning": CaptioningDataModule(
            train_annotations=str(coco / "annotations" / "captions_train2014.json"),
            train_images=str(coco / "train2014"),
            image_size=32,
            batch_size=4,
            hflip=0.5,
        ),
        "detection": CocoDetectionDataModule(
            train_images=str(coco / "train2014"),
            train_annotations=str(coco / "annotations" / "instances_train2014.json"),
            val_images=str(coco / "val2014"),
            val_annotations=str(coco / "annotations" / "instances_val2014.json"),
            batch_size=2,
            num_workers=0,
            with_masks=False,
            lsj_size=64,
        ),
    }


def _tensors(x: object) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, dict):
        return [t for k in sorted(x) for t in _tensors(x[k])]
    if isinstance(x, list | tuple):
        return [t for v in x for t in _tensors(v)]
    return []


@pytest.mark.parametrize("name", ["imagenet", "nlvr2", "captioning", "detection"])
def test_task_data_modules_resume_mid_epoch(world: Path, name: str) -> None:
    """Random crops/flips/RandAugment/LSJ and caption masks survive a resume whatever the global RNG state."""
    torch.manual_seed(1)
    dm = _task_modules(world)[name]
    dm.setup("fit")
    loader = dm.train_dataloader()
    epoch = [_tensors(b) for _, b in zip(range(4), loader)]
    assert len(epoch) == 4
    loader.progress = lambda: (2, float(len(loader)))
    state = dm.state_dict()
    assert state["train_loader"]["consumed"] == 2

    torch.manual_seed(2)
    random.seed(2)
    again = _task_modules(world)[name]
    again.setup("fit")
    again.load_state_dict(state)
    rest = [_tensors(b) for _, b in zip(range(2), again.train_dataloader())]
    for got, want in zip(rest, epoch[2:]):
        assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want))


def test_map_loader_epochs_follow_set_epoch_and_advance_without_it() -> None:
    loader = ResumableLoader(_Noisy(), batch_size=4, seed=3)
    first = _collect(loader)
    loader.resumable_sampler.set_epoch(0)  # Lightning's call after the first iter(): stale, not a repeat
    assert loader.state_dict()["epoch"] == 0
    second = _collect(loader)
    assert loader.state_dict()["epoch"] == 1 and not _eq(first, second)
    loader.resumable_sampler.set_epoch(5)
    _collect(loader)
    assert loader.state_dict()["epoch"] == 5
    loader.resumable_sampler.set_epoch(0)  # an explicit earlier epoch is honoured: same order and augmentations
    assert _eq(_collect(loader), first)
