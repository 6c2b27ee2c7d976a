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
