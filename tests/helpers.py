"""Paths and small builders that several test modules share (the shared fixtures are in ``conftest.py``).

Real sample data is read from the repository only: ``datasets/samples`` (sources and licences in its
``SOURCES.md``). A test whose sample is missing skips with the file's name.
"""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "datasets" / "samples"
CONFIGS = REPO / "configs"

# The console scripts pyproject.toml declares and an installed wheel must provide: command -> module:function.
CONSOLE_SCRIPTS = {
    "mmoe": "mmoe.train.cli:main",
    "mmoe-recipes": "mmoe.cli.recipes:main",
    "mmoe-shards": "mmoe.cli.make_shards:main",
    "mmoe-synthetic": "mmoe.cli.make_synthetic:main",
    "mmoe-convert": "mmoe.cli.convert_checkpoint:main",
    "mmoe-viz": "mmoe.cli.visualize_experts:main",
    "mmoe-vqa-vocab": "mmoe.cli.build_vqa_vocab:main",
    "mmoe-codebook": "mmoe.cli.build_visual_codebook:main",
    "mmoe-migrate": "mmoe.train.compat:main",
}


def find_sample(name: str) -> Path | None:
    """The first file called ``name`` under ``datasets/samples``; None if there is none."""
    hits = sorted(SAMPLES.rglob(name)) if SAMPLES.is_dir() else []
    return hits[0] if hits else None


def sample(name: str) -> Path:
    """The sample file called ``name`` (see :func:`find_sample`); skips the calling test when it is missing."""
    path = find_sample(name)
    if path is None:
        pytest.skip(f"datasets/samples has no {name}")
    return path


STREAMS = ("image", "text", "pair")


def shard_world(tmp_path_factory: pytest.TempPathFactory, **world: object) -> Path:
    """A synthetic shapes world with pretraining shards in a fresh temporary folder (``make_world`` arguments).

    The defaults are the tiny world the data and resume tests share: 24 training scenes of 32 px, 6 samples a shard.
    """
    from mmoe.data.synthetic import make_world

    out = tmp_path_factory.mktemp("world")
    make_world(out, **{"num_train": 24, "image_size": 32, "seed": 0, "shards": True, "shard_maxcount": 6, **world})
    return out


def shard_lists(world: Path) -> dict[str, list[str]]:
    """``PretrainDataModule`` keyword arguments for the training shards of every stream of a shard world."""
    return {f"{k}_shards": [str(world / "shards" / k / "train-*.tar")] for k in STREAMS}


def pretrain_data_args(world: Path, **overrides: object) -> dict[str, object]:
    """``PretrainDataModule`` arguments for a shard world at the tests' tiny size: the training shards of every
    stream, batches of 6, 32-px images in 8-px patches, 16 text tokens, no workers; ``overrides`` add or replace."""
    tiny = {"batch_size": 6, "image_size": 32, "patch_size": 8, "max_text_len": 16, "num_workers": 0}
    return {**shard_lists(world), **tiny, **overrides}


def shard_args(world: Path, *, val: bool) -> list[str]:
    """The six ``--data.init_args.*_shards`` options for a shard world: training shards of every stream, and the
    validation shards (``val=True``) or none (each ``val_*_shards`` set to null)."""
    s = world / "shards"
    train = [f"--data.init_args.{k}_shards=[{s}/{k}/train-*.tar]" for k in STREAMS]
    return train + [f"--data.init_args.val_{k}_shards=" + (f"[{s}/{k}/val-*.tar]" if val else "null") for k in STREAMS]
