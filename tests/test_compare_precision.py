"""mmoe.cli.compare_precision: window means, the seed-noise verdict, argument checks, and a real 2-step run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from mmoe.cli import compare_precision as cp
from tests.helpers import shard_world


def test_window_means_average_each_full_window() -> None:
    curve = [(0, 1.0), (1, 3.0), (2, 5.0), (3, 7.0), (4, 100.0)]
    assert cp.window_means(curve, 2, 4) == [2.0, 6.0]  # step 4 lies past the last full window
    gap = cp.window_means([(0, 1.0)], 1, 2)
    assert gap[0] == 1.0 and math.isnan(gap[1])  # a run cut short leaves a NaN window


def test_verdict_measures_against_the_seed_gap() -> None:
    ref = [[5.0, 4.0, 3.0], [5.2, 4.1, 3.1]]  # fp32 seeds: largest window gap 0.2, final val gap 0.1
    windows = {"fp32": ref, "close": [[5.1, 4.05, 3.05]], "far": [[5.1, 4.6, 3.05]]}
    final = {"fp32": [2.0, 2.1], "close": [2.06], "far": [2.06]}
    v = cp.verdict(windows, final, "fp32", {"fp32": [0, 1], "close": [1], "far": [1]})
    assert set(v) == {"close", "far"}
    assert v["close"]["same_seed_gap"] == pytest.approx(0.1) and v["far"]["same_seed_gap"] == pytest.approx(0.5)
    assert v["close"]["verdict"] == "match" and v["close"]["fp32_seed_gap"] == pytest.approx(0.2)
    assert v["far"]["verdict"] == "differs" and v["far"]["max_window_gap"] == pytest.approx(0.55)
    # the curves agree but the final validation loss is further off than the seeds' own gap
    v = cp.verdict({"fp32": ref, "c": [[5.1, 4.05, 3.05]]}, {"fp32": [2.0, 2.1], "c": [2.5]}, "fp32")
    assert v["c"]["verdict"] == "differs"
    # a NaN window (a run cut short) never matches
    assert cp.verdict({"fp32": ref, "c": [[5.1, math.nan, 3.0]]}, {"fp32": [2.0, 2.1], "c": [2.05]}, "fp32")["c"][
        "verdict"
    ] == ("differs")
    with pytest.raises(ValueError, match="two or more seeds"):
        cp.verdict({"fp32": ref[:1], "c": ref[1:]}, {"fp32": [2.0], "c": [2.0]}, "fp32")


def test_arguments_are_checked(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        cp.parse_args(["--recipe", "finetune/vqav2_synthetic"])  # not a pretraining recipe
    with pytest.raises(SystemExit):
        cp.parse_args(["--steps", "10", "--window", "20"])
    args = cp.parse_args(["--recipe", "pretrain/tiny_mhmoe", "--world", str(tmp_path), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="no shards/image/train"):
        cp.PrecisionRunner(args)


@pytest.mark.slow
def test_two_fp32_seeds_and_bf16_make_a_table(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    world = shard_world(tmp_path_factory, num_val=6)
    out, records, table = tmp_path / "out", tmp_path / "runs.jsonl", tmp_path / "table.md"
    argv = ["--recipe", "pretrain/tiny_mhmoe", "--world", str(world), "--out", str(out), "--steps", "2",
            "--window", "1", "--val-every", "2", "--val-steps", "1", "--batch-size", "3", "--image-size", "32",
            "--text-len", "16", "--warmup", "1", "--seeds", "0", "1", "--precisions", "32-true", "bf16-mixed",
            "--jobs", "2", "--results", str(records), "--table", str(table)]  # fmt: skip
    assert cp.main(argv) == 0
    rows = [json.loads(line) for line in records.read_text().splitlines()]
    assert sorted(r["key"] for r in rows) == ["32-true/s0", "32-true/s1", "bf16-mixed/s0", "bf16-mixed/s1"]
    for r in rows:
        assert [s for s, _ in r["train_loss"]] == [0, 1] and all(math.isfinite(v) for _, v in r["train_loss"])
    text = table.read_text()
    assert "| bf16-mixed | 1 |" in text and "verdict" in text
    assert "**match**" in text or "**differs**" in text
    # started again with the records kept and OUT gone: nothing reruns, the table is rewritten from the records
    import shutil

    shutil.rmtree(out)
    assert cp.main(argv) == 0
    assert len(records.read_text().splitlines()) == 4 and not list(out.glob("*/s0/fit.log"))
