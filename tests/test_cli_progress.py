"""Progress of the offline commands: bars on stderr only on a terminal (never in stdout's JSON), ``--no-progress``,
the summary line, and the library callbacks the bars are fed from (``make_world``, ``kmeans``, ``collect_routing``)."""

from __future__ import annotations

import argparse
import io
import json

import numpy as np
import pytest
import torch
from rich.console import Console

from mmoe.cli.progress import ToolProgress, add_progress_flag


def _terminal() -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, force_terminal=True, width=100), buf


def test_bars_draw_on_a_terminal_and_count() -> None:
    console, buf = _terminal()
    with ToolProgress("mmoe-x", True, console=console) as progress:
        assert list(progress.track(range(5), "items", total=5)) == [0, 1, 2, 3, 4]
        stage = progress.stages("world")
        stage("train text", 3, 4)
        with progress.step("writing"):
            pass
    out = buf.getvalue()
    assert "items" in out and "5/5" in out and "world: train text" in out and "3/4" in out and "writing" in out


def test_no_bars_off_a_terminal_or_with_no_progress(capsys: pytest.CaptureFixture) -> None:
    buf = io.StringIO()
    quiet = Console(file=buf)  # not a terminal: a log file, a pipe
    with ToolProgress("mmoe-x", None, console=quiet) as progress:
        assert not progress.enabled
        list(progress.track(range(3), "items"))
    console, tty = _terminal()
    p = argparse.ArgumentParser()
    add_progress_flag(p)
    args = p.parse_args(["--no-progress"])
    assert args.no_progress and not ToolProgress.from_args("mmoe-x", args).enabled
    with ToolProgress("mmoe-x", False, console=console) as progress:
        list(progress.track(range(3), "items"))
        line = progress.summary("3 items")
    assert buf.getvalue() == "" and tty.getvalue() == ""
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.strip() == line and line.startswith("mmoe-x: 3 items (")


def test_codebook_stdout_stays_one_json_document(
    tmp_path, tmp_path_factory: pytest.TempPathFactory, capsys: pytest.CaptureFixture
) -> None:
    from helpers import shard_world

    from mmoe.cli import build_visual_codebook

    world = shard_world(tmp_path_factory, num_train=6, num_val=2)
    out = tmp_path / "codebook.pt"
    argv = ["--shards", str(world / "shards/image/train-*.tar"), "--out", str(out), "--codes", "4"]
    build_visual_codebook.run([*argv, "--image-size", "32", "--max-images", "4", "--iters", "3"])
    captured = capsys.readouterr()
    summary = json.loads(captured.out)  # nothing but the JSON on stdout
    assert summary["codes"] == 4 and out.is_file()
    assert captured.err.strip().splitlines()[-1].startswith(f"mmoe-codebook: 4 codes from {summary['num_patches']}")


def test_make_world_reports_every_stage(tmp_path) -> None:
    from mmoe.data.synthetic import make_world

    calls: list[tuple[str, int, int]] = []
    make_world(tmp_path / "w", num_train=2, num_val=1, image_size=16, shards=True, progress=lambda *a: calls.append(a))
    assert [c[1] for c in calls] == list(range(1, 10)) and {c[2] for c in calls} == {9}
    assert calls[0][0] == "train COCO/VQA" and calls[-1][0] == "shards"


def test_kmeans_ticks_once_per_lloyd_iteration() -> None:
    from mmoe.data.codebook import kmeans

    ticks: list[int] = []
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(50, 3))).float()
    plain, _ = kmeans(x, 4, iters=5, seed=0)
    with_bar, _ = kmeans(x, 4, iters=5, seed=0, progress=ticks.append)
    assert ticks == [1] * 5 and torch.equal(plain, with_bar)


def test_collect_routing_advances_by_batch() -> None:
    from PIL import Image
    from test_viz_helpers import StandInBackbone

    from mmoe.viz.capture import collect_routing
    from mmoe.viz.inputs import VizInput

    inputs = [VizInput(f"{i}.png", Image.new("RGB", (32, 32), (40 * i, 0, 0))) for i in range(5)]
    steps: list[int] = []
    collect_routing(StandInBackbone(), inputs, label="m", batch_size=2, progress=steps.append)
    assert steps == [2, 2, 1]
