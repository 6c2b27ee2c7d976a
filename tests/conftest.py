"""Fixtures several test modules share. Paths and small builders are in ``helpers.py``."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Run a module's tests on one torch thread and restore the count after it.

    Tiny models run fastest on one thread; on a shared, loaded CPU, OpenMP spinning costs up to 50x. Modules opt in
    with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
