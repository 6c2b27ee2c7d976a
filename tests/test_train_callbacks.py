"""mmoe.train.callbacks: atomic checkpoint writes, RNG state round trip, batch sizes, throughput and FLOPs through
Lightning's ThroughputMonitor; cli.next_version."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from mmoe.train.callbacks import AtomicCheckpointIO, RNGState, Throughput, batch_forwards, batch_size_of
from mmoe.train.cli import next_version


def test_atomic_checkpoint_keeps_old_file_on_failure(tmp_path: Path) -> None:
    io = AtomicCheckpointIO()
    path = tmp_path / "ckpts" / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)
    assert io.load_checkpoint(path)["step"] == 1
    with pytest.raises(Exception):  # noqa: B017 - pickling a lambda fails inside torch.save
        io.save_checkpoint({"step": 2, "bad": lambda: None}, path)
    assert io.load_checkpoint(path)["step"] == 1  # the previous checkpoint is intact
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # no temp file left behind
    with pytest.raises(TypeError, match="storage_options"):
        io.save_checkpoint({"step": 3}, path, storage_options={"x": 1})


def test_rng_state_round_trip_through_weights_only_load(tmp_path: Path) -> None:
    cb = RNGState()
    torch.save(cb.state_dict(), tmp_path / "rng.pt")
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    random.seed(123), np.random.seed(123), torch.manual_seed(123)
    cb.load_state_dict(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected


def test_batch_size_of_streams_and_tasks() -> None:
    pre = {"image": {"image": torch.zeros(2, 3, 4, 4)}, "text": {"text": torch.zeros(5, 7)}}
    assert batch_size_of(pre) == 7
    assert batch_size_of({"image": torch.zeros(4, 3, 8, 8), "labels": torch.zeros(4)}) == 4
    assert batch_size_of({"images": [torch.zeros(3, 4, 4)] * 3, "targets": []}) == 3


def test_next_version(tmp_path: Path) -> None:
    assert next_version(tmp_path / "missing") == 0
    for name in ("version_0", "version_3", "version_x", "other"):
        (tmp_path / name).mkdir()
    assert next_version(tmp_path) == 4


def test_batch_forwards_of_every_batch_layout() -> None:
    img, txt = torch.zeros(2, 3, 32, 48), torch.zeros(2, 7, dtype=torch.long)
    pre = {
        "image": {"image": img},
        "text": {"text": torch.zeros(5, 9, dtype=torch.long)},
        "pair": {"image": img, "text": txt},
    }
    assert batch_forwards(pre) == [(2, (32, 48), 0), (5, None, 9), (2, (32, 48), 7)]
    assert (
        batch_forwards({"image": img, "text": txt, "image2": img, "labels": torch.zeros(2)}) == [(2, (32, 48), 7)] * 2
    )
    dets = [torch.zeros(3, 40, 56), torch.zeros(3, 64, 32)]
    assert batch_forwards({"images": dets, "targets": []}) == [(1, (40, 56), 0), (1, (64, 32), 0)]
    assert batch_forwards([img]) == []


def test_throughput_monitor_logs_flops_and_mfu(tmp_path: Path) -> None:
    """A real fit: Lightning's ThroughputMonitor reads TaskModule.flops_per_batch; FLOPs/sample are the formula's."""
    import csv

    import lightning
    from lightning.pytorch.loggers import CSVLogger

    from mmoe.model.flops import forward_flops
    from mmoe.train.base import TaskModule

    class Tiny(TaskModule):
        def __init__(self) -> None:
            super().__init__()
            self.init_backbone("tiny", {"depth": 1, "vocab_size": 1000, "pad_id": 998, "mask_id": 999}, None)

        def training_step(self, batch, batch_idx):
            return self.backbone(image=batch["image"], text=batch["text"]).features.square().mean()

        def train_dataloader(self):
            g = torch.Generator().manual_seed(0)
            batches = [
                {"image": torch.randn(3, 3, 32, 32, generator=g), "text": torch.randint(0, 998, (3, 4), generator=g)}
                for _ in range(8)
            ]
            return torch.utils.data.DataLoader(batches, batch_size=None)

    torch.manual_seed(0)
    module = Tiny()
    trainer = lightning.Trainer(
        accelerator="cpu", max_steps=8, log_every_n_steps=1, logger=CSVLogger(str(tmp_path), name="", version=0),
        callbacks=[Throughput(window_size=3, peak_flops=1e12)], enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(module)
    per_sample = 3 * forward_flops(module.backbone.config, image_size=32, text_len=4)
    assert module.flops_per_batch == 3 * per_sample
    with open(tmp_path / "version_0" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/device/flops_per_sec")]
    assert len(rows) == 6  # rates once the window of 3 batches is full: batches 3..8
    for r in rows:
        flops, samples = float(r["train/device/flops_per_sec"]), float(r["train/device/samples_per_sec"])
        assert flops / samples == pytest.approx(per_sample, rel=1e-9)
        assert float(r["train/device/mfu"]) == pytest.approx(flops / 1e12, rel=1e-9)
    with pytest.raises(ValueError, match="peak_flops"):
        Throughput(peak_flops=0)
