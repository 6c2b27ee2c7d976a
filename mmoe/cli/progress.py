"""Progress bars and the closing summary line of the offline commands (shards, synthetic world, codebook, viz, convert).

Bars are drawn by ``rich`` (a runtime dependency already) on stderr, so a command whose stdout is JSON
(``mmoe-codebook``, ``mmoe-synthetic``) keeps it clean for a pipe. They are off when stderr is not a terminal (CI logs,
``2> file``: no carriage-return soup) and with ``--no-progress``; the summary line is printed either way.

The library functions the commands call take a plain callable where they report progress (``make_world(progress=)``,
``collect_routing(progress=)``), so only this module knows about rich.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

__all__ = ["ToolProgress", "add_progress_flag"]

T = TypeVar("T")


def add_progress_flag(parser: argparse.ArgumentParser) -> None:
    """The ``--no-progress`` option every offline command has."""
    parser.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bars on stderr (they are also off when stderr is not a terminal); the summary stays",
    )


class ToolProgress:
    """Progress bars of one command run, and its summary line (``with ToolProgress("mmoe-x", enabled) as p:``).

    `enabled` None means "when stderr is a terminal"; a disabled instance still counts and times, so the summary
    reads the same with and without bars.
    """

    def __init__(self, command: str, enabled: bool | None = None, *, console: Console | None = None) -> None:
        self.command = command
        self.console = console or Console(stderr=True)
        self.enabled = self.console.is_terminal if enabled is None else bool(enabled and self.console.is_terminal)
        self._bars = Progress(
            SpinnerColumn(),
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            disable=not self.enabled,
        )
        self.t0 = time.perf_counter()

    @classmethod
    def from_args(cls, command: str, args: argparse.Namespace) -> ToolProgress:
        """Bars unless ``--no-progress`` was given (and only on a terminal)."""
        return cls(command, None if not getattr(args, "no_progress", False) else False)

    def __enter__(self) -> ToolProgress:
        self._bars.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._bars.stop()

    @property
    def seconds(self) -> float:
        """Seconds since the command started."""
        return time.perf_counter() - self.t0

    def task(self, description: str, total: int | None = None) -> Callable[[int], None]:
        """A bar; returns ``advance(n=1)``. With no `total` the bar counts without an end."""
        task_id = self._bars.add_task(description, total=total)
        return lambda n=1: self._bars.advance(task_id, n)

    def track(self, items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
        """Yield `items`, advancing a bar by one for each."""
        advance = self.task(description, total)
        for item in items:
            yield item
            advance(1)

    def stages(self, description: str) -> Callable[[str, int, int], None]:
        """A bar over named stages: the callable ``(stage, done, total)`` that ``make_world(progress=)`` takes."""
        task_id: TaskID = self._bars.add_task(description, total=None)

        def update(stage: str, done: int, total: int) -> None:
            self._bars.update(task_id, completed=done, total=total, description=f"{description}: {stage}")

        return update

    @contextmanager
    def step(self, description: str) -> Iterator[None]:
        """One long call without inner progress (a load, a save): a spinner while it runs, a tick when done."""
        task_id = self._bars.add_task(description, total=1)
        yield
        self._bars.update(task_id, completed=1)

    def summary(self, text: str) -> str:
        """Print ``<command>: <text> (<seconds> s)`` on stderr (always, bars or not) and return it."""
        line = f"{self.command}: {text} ({self.seconds:.1f} s)"
        print(line, file=sys.stderr, flush=True)
        return line
