"""The ``mmoe`` CLI end to end on tiny synthetic shards (and 2-process DDP, docs/scaling.md).

- 5 steps through the real console entry point, CSV log read back (finite losses, routing statistics),
  resolved config and checkpoints in the run folder, the checkpoint loadable by ``mmoe.model.load_model``;
- exact resume: an interrupted run resumed with ``--ckpt_path last`` logs the uninterrupted run's losses;
- bad configs are refused before training, naming the key;
- (slow) 2-process ``strategy=ddp`` on CPU/gloo where each rank reads different shards.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import CONFIGS, shard_args, shard_world

from mmoe.train.cli import main

RECIPE = CONFIGS / "pretrain" / "tiny_mhmoe.yaml"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny shapes world with 4 train shards per stream (so 2 ranks get 2 each) and 1 val shard."""
    return shard_world(tmp_path_factory, num_train=32, num_val=8, image_size=64, shard_maxcount=8)


def _data_args(world: Path, *, batch: int = 6, steps_per_epoch: int = 100) -> list[str]:
    return [
        *shard_args(world, val=True),
        f"--data.init_args.batch_size={batch}",
        "--data.init_args.num_workers=0",
        "--data.init_args.val_steps=1",
        "--data.init_args.shuffle_buffer=8",
        f"--data.init_args.steps_per_epoch={steps_per_epoch}",
    ]


def _read_csv(root: Path, version: int = 0) -> list[dict[str, str]]:
    with open(root / f"version_{version}" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def _losses_by_step(rows: list[dict[str, str]]) -> dict[int, float]:
    return {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}


def _entry_point() -> list[str]:
    script = Path(sys.executable).parent / "mmoe"
    return [str(script)] if script.exists() else [sys.executable, "-m", "mmoe.train.cli"]


def test_cli_fit_five_steps(world: Path, tmp_path: Path) -> None:
    root = tmp_path / "run"
    cmd = _entry_point() + [
        "fit",
        f"--config={RECIPE}",
        "--trainer.max_steps=5",
        "--trainer.log_every_n_steps=1",
        "--trainer.val_check_interval=5",
        f"--trainer.default_root_dir={root}",
        "--model.init_args.log_routing_every=1",
        "--checkpoint.every_n_train_steps=5",
        *_data_args(world, batch=3),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step 5/5" in proc.stdout  # plain progress (stdout is not a TTY here)
    rows = _read_csv(root)
    losses = _losses_by_step(rows)
    assert sorted(losses) == [0, 1, 2, 3, 4]
    assert all(math.isfinite(v) for v in losses.values())
    train = [r for r in rows if r.get("train/loss")]
    for key in ("loss_mlm_text", "loss_mlm_pair", "loss_mim_image", "loss_mim_pair", "aux_loss", "step_time"):
        assert all(math.isfinite(float(r[f"train/{key}"])) for r in train if r.get(f"train/{key}")), key
    for layer in ("layer1", "layer3"):  # tiny_mhmoe: MoE in every 2nd of 4 blocks
        ratio = [float(r[f"train/moe/{layer}/activation_ratio"]) for r in train]
        div = [float(r[f"train/moe/{layer}/diversity"]) for r in train]
        assert all(0 < v <= 1 for v in ratio) and all(1 <= v <= 4 for v in div)
    val = [r for r in rows if r.get("val/loss")]
    assert val and float(val[-1]["val/ppl_mlm_text"]) > 1
    assert "val/moe/layer1/activation_ratio" in val[-1]
    # the resolved config, checkpoints, and the backbone config inside them
    saved = (root / "version_0" / "config.yaml").read_text()
    assert "tiny_mhmoe" in saved and "max_steps: 5" in saved
    ckpt = root / "checkpoints" / "last.ckpt"
    assert ckpt.is_file() and not list((root / "checkpoints").glob(".*.tmp"))
    from mmoe.model import load_model

    model = load_model(ckpt)
    assert model.config.moe is not None and model.config.moe.num_heads == 4


@pytest.mark.slow
def test_resume_reproduces_uninterrupted_losses(world: Path, tmp_path: Path) -> None:
    """4 steps in one go vs 2 steps + ``--ckpt_path last`` for 2 more (checkpoint at a data-pass boundary)."""
    common = [
        f"--config={RECIPE}",
        "--trainer.log_every_n_steps=1",
        "--trainer.val_check_interval=null",
        "--trainer.limit_val_batches=0",
        "--model.init_args.log_routing_every=0",
        "--model.init_args.backbone_overrides={depth: 2}",
        "--checkpoint.every_n_train_steps=2",
        *_data_args(world, batch=3, steps_per_epoch=2),
    ]
    full, part = tmp_path / "full", tmp_path / "part"
    main(["fit", *common, "--trainer.max_steps=4", f"--trainer.default_root_dir={full}"])
    main(["fit", *common, "--trainer.max_steps=2", f"--trainer.default_root_dir={part}"])
    main(["fit", *common, "--trainer.max_steps=4", f"--trainer.default_root_dir={part}", "--ckpt_path=last"])
    ref = _losses_by_step(_read_csv(full))
    first, resumed = _losses_by_step(_read_csv(part, 0)), _losses_by_step(_read_csv(part, 1))
    assert sorted(ref) == [0, 1, 2, 3] and sorted(first) == [0, 1] and sorted(resumed) == [2, 3]
    for step in (0, 1):
        assert first[step] == pytest.approx(ref[step], rel=1e-6)
    for step in (2, 3):
        assert resumed[step] == pytest.approx(ref[step], rel=1e-5), (step, resumed, ref)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("--model.init_args.no_such_key=1", "no_such_key"),
        ("--model.init_args.on_nonfinite=ignore", "on_nonfinite"),
        ("--model.init_args.optim.lr=fast", "lr"),
    ],
)
def test_bad_config_is_refused_naming_the_key(
    override: str, expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["fit", f"--config={RECIPE}", f"--trainer.default_root_dir={tmp_path}", override])
    assert exc.value.code != 0
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "checkpoints").exists()


def test_value_errors_stop_before_training(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(
            [
                "fit",
                f"--config={RECIPE}",
                f"--trainer.default_root_dir={tmp_path}",
                "--model.init_args.optim.layer_decay=2.0",
            ]
        )
    assert exc.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == "mmoe: error: optim.layer_decay=2.0 must be in (0, 1]"
    assert not (tmp_path / "checkpoints").exists()


_RECORDER = textwrap.dedent(
    """
    import json, os
    import mmoe.data.shard_reader as shards
    from lightning.pytorch import Callback

    _orig = shards.read_shard
    READ = []

    def _recording(url, counters):
        READ.append(os.path.basename(os.path.dirname(url)) + "/" + os.path.basename(url))
        yield from _orig(url, counters)

    shards.read_shard = _recording

    class RecordShards(Callback):
        def __init__(self, out: str) -> None:
            self.out = out

        def on_train_end(self, trainer, pl_module):
            with open(os.path.join(self.out, f"rank{trainer.global_rank}.json"), "w") as f:
                json.dump({"world": trainer.world_size, "read": sorted(set(READ))}, f)
    """
)


@pytest.mark.slow
def test_ddp_two_processes_read_different_shards(world: Path, tmp_path: Path) -> None:
    """``mmoe fit`` with ``strategy=ddp`` on 2 CPU processes (gloo): each rank reads its own training shards."""
    (tmp_path / "recorder.py").write_text(_RECORDER)
    root = tmp_path / "run"
    cmd = _entry_point() + [
        "fit",
        f"--config={RECIPE}",
        "--trainer.devices=2",
        "--trainer.strategy=ddp",
        "--trainer.max_steps=3",
        "--trainer.log_every_n_steps=1",
        "--trainer.limit_val_batches=0",
        "--trainer.val_check_interval=null",
        f"--trainer.default_root_dir={root}",
        "--model.init_args.backbone_overrides={depth: 2}",
        "--trainer.callbacks+=recorder.RecordShards",
        f"--trainer.callbacks.out={tmp_path}",
        *_data_args(world, batch=3),
    ]
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=540, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    reads = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world"] == 2 for r in reads)
    train0 = {u for u in reads[0]["read"] if "train-" in u}
    train1 = {u for u in reads[1]["read"] if "train-" in u}
    assert train0 and train1 and not (train0 & train1), reads
    losses = _losses_by_step(_read_csv(root))
    assert sorted(losses) == [0, 1, 2] and all(math.isfinite(v) for v in losses.values())
    shutil.rmtree(root, ignore_errors=True)


def test_cpu_bf16_warning_names_the_key(monkeypatch):
    import torch

    from mmoe.train import cli

    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    msg = cli.cpu_bf16_warning("bf16-mixed", "cpu")
    assert msg is not None and "trainer.precision" in msg and "32-true" in msg
    assert cli.cpu_bf16_warning("bf16-mixed", "auto", cuda=False) is not None
    assert cli.cpu_bf16_warning("bf16-mixed", "auto", cuda=True) is None
    assert cli.cpu_bf16_warning("bf16-mixed", "gpu") is None
    assert cli.cpu_bf16_warning("32-true", "cpu") is None
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert cli.cpu_bf16_warning("bf16-mixed", "cpu") is None
