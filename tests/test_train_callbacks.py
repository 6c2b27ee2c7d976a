"""mmoe.train.callbacks: atomic checkpoint writes, RNG state round trip, batch sizes; cli.next_version."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from mmoe.train.callbacks import AtomicCheckpointIO, RNGState, batch_size_of
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
