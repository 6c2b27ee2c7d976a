"""The command-line tools a user runs, installed as console scripts (pyproject ``[project.scripts]``).

Each module has ``main(argv=None) -> int`` (the exit status) and also runs as ``python -m mmoe.cli.<module>``:

- ``mmoe-recipes`` (``recipes``): list, show, locate or copy out the shipped model sizes and recipes;
- ``mmoe-synthetic`` (``make_synthetic``): the synthetic shapes world;
- ``mmoe-shards`` (``make_shards``): validated webdataset shards;
- ``mmoe-convert`` (``convert_checkpoint``): BEiT-3 / timm conversion and sparse upcycling;
- ``mmoe-viz`` (``visualize_experts``): expert-assignment pictures;
- ``mmoe-vqa-vocab`` (``build_vqa_vocab``): the VQAv2 answer vocabulary;
- ``mmoe-codebook`` (``build_visual_codebook``): the k-means visual codebook.

``compare_pretraining`` (no console script; ``python -m mmoe.cli.compare_pretraining``) runs the tiny
Dense/SMoE/X-MoE/MH-MoE pretraining comparison of ``docs/results/tiny_pretraining.md``.

``progress`` holds what the offline commands share for long work: rich progress bars on stderr (``--no-progress``)
and the closing summary line.

Training itself is the ``mmoe`` command (``mmoe.train.cli``). In a source checkout ``tools/<module>.py`` is a
wrapper running the same ``main``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["entry_point"]


def entry_point(run: Callable[[list[str] | None], Any], command: str) -> Callable[[list[str] | None], int]:
    """``main`` of a command whose ``run(argv)`` does the work and returns its summary (tests call ``run``).

    A failure raises (argparse's ``SystemExit(2)``, or the error itself), so a returning ``run`` means exit 0.
    """

    def main(argv: list[str] | None = None) -> int:
        run(argv)
        return 0

    main.__doc__ = f"Entry point of the ``{command}`` console script; exit status 0 when ``run`` returns."
    return main
