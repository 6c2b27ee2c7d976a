"""Where tests find real sample data: the repo's ``datasets/samples`` first, then the shared data folder.

The shared folder (larger real data that is not committed, e.g. NLVR2 images whose licence is unclear) is
``$MMOE_SHARED_DATA`` when set, else ``../shared/data`` beside the repository; tests that need it skip when absent.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "datasets" / "samples"
SHARED = Path(os.environ.get("MMOE_SHARED_DATA", REPO.parent / "shared" / "data"))


def find_sample(name: str) -> Path | None:
    """The first file called ``name`` under datasets/samples, then under the shared data folder; None if neither."""
    for root in (SAMPLES, SHARED):
        if root.is_dir():
            hits = sorted(root.rglob(name))
            if hits:
                return hits[0]
    return None
