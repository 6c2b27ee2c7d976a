"""The shared atomic writers: the target is replaced whole or not at all."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mmoe.files import (
    IMAGE_EXTS,
    atomic_open,
    atomic_torch_save,
    atomic_write,
    atomic_write_json,
    atomic_write_text,
    is_image_file,
)


def test_writers_replace_the_target_and_leave_no_temp_files(tmp_path: Path) -> None:
    out = tmp_path / "sub" / "a.json"
    atomic_write_json(out, {"x": 1})
    assert json.loads(out.read_text()) == {"x": 1}
    atomic_write_text(out, "second")
    assert out.read_text() == "second"
    atomic_torch_save({"w": torch.arange(3)}, tmp_path / "m.pt")
    assert torch.equal(torch.load(tmp_path / "m.pt", weights_only=True)["w"], torch.arange(3))
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.json", "m.pt", "sub"]


def test_a_failed_write_keeps_the_previous_file(tmp_path: Path) -> None:
    out = tmp_path / "keep.txt"
    atomic_write_text(out, "old")

    def broken(f):
        f.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(out, broken)
    assert out.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]
    with pytest.raises(ValueError, match="mode='rb'"):
        with atomic_open(out, "rb"):
            pass


def test_image_extensions() -> None:
    assert all(e.startswith(".") and e == e.lower() for e in IMAGE_EXTS)
    assert is_image_file("a/B.JPG") and is_image_file("x.png") and not is_image_file("x.txt")
