"""A real ``mmoe fit`` process killed mid-epoch (SIGKILL) and resumed logs the uninterrupted run's losses exactly.

For the pretraining recipe (webdataset stream with 2 workers) and the VQA fine-tuning recipe (map-style data with
2 workers, random crops and flips): an uninterrupted reference run, then the same run killed with ``kill -9`` as
soon as a checkpoint in the middle of an epoch exists, then ``--ckpt_path last`` (or that checkpoint, when the
run was quicker than the kill). Every ``train/loss`` the resumed run logs must equal the reference's, bit for bit
(one thread, CPU).
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers import CONFIGS, shard_args, shard_world

from mmoe.data.vqa import build_answer_vocab, save_answer_vocab

PRETRAIN = CONFIGS / "pretrain" / "tiny_mhmoe.yaml"
VQA = CONFIGS / "finetune" / "vqav2_synthetic.yaml"
STEPS_PER_EPOCH = 7  # pretraining; checkpoints every 5 steps land at 5, 10 (epoch 1, batch 3), 15: mid-epoch
MAX_STEPS = 16
EVERY = 5

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = shard_world(tmp_path_factory, num_val=4)
    anns = json.loads((out / "vqa" / "v2_mscoco_train2014_annotations.json").read_text())["annotations"]
    save_answer_vocab(out / "vqa" / "answer_vocab.json", build_answer_vocab([anns], min_count=1))
    return out


def _entry_point() -> list[str]:
    script = Path(sys.executable).parent / "mmoe"
    return [str(script)] if script.exists() else [sys.executable, "-m", "mmoe.train.cli"]


def _common(root: Path) -> list[str]:
    return [
        f"--trainer.max_steps={MAX_STEPS}",
        "--trainer.log_every_n_steps=1",
        "--trainer.val_check_interval=null",
        "--trainer.limit_val_batches=0",
        "--trainer.enable_model_summary=false",
        f"--trainer.default_root_dir={root}",
        f"--checkpoint.every_n_train_steps={EVERY}",
    ]


def _pretrain_args(world: Path, root: Path) -> list[str]:
    return [
        "fit",
        f"--config={PRETRAIN}",
        *_common(root),
        "--model.init_args.log_routing_every=0",
        "--model.init_args.backbone_overrides={depth: 2, img_size: 32}",
        *shard_args(world, val=False),
        "--data.init_args.batch_size=6",
        "--data.init_args.image_size=32",
        "--data.init_args.num_workers=2",
        "--data.init_args.shuffle_buffer=5",
        f"--data.init_args.steps_per_epoch={STEPS_PER_EPOCH}",
        "--data.init_args.train_scale=[0.5, 1.0]",  # random crops and flips: per-sample seeds must cover them
        "--data.init_args.color_jitter=0.2",
    ]


def _vqa_args(world: Path, root: Path, tmp: Path) -> list[str]:
    vqa, coco = world / "vqa", world / "coco"

    def files(stage: str, split: str) -> dict[str, str]:
        return {
            f"{stage}_questions": str(vqa / f"v2_OpenEnded_mscoco_{split}2014_questions.json"),
            f"{stage}_annotations": str(vqa / f"v2_mscoco_{split}2014_annotations.json"),
            f"{stage}_images": str(coco / f"{split}2014"),
        }

    override = tmp / "vqa_override.yaml"
    cfg = {
        "model": {
            "init_args": {
                "backbone_overrides": {"img_size": 32, "depth": 2, "drop_path": 0.1},  # model-side randomness too
                "label_vocab": str(vqa / "answer_vocab.json"),
            }
        },
        "data": {
            "init_args": {
                **files("train", "train"),
                **files("val", "val"),
                **files("test", "val"),
                "answer_vocab": str(vqa / "answer_vocab.json"),
                "image_size": 32,
                "batch_size": 24,  # 160 questions: 6 batches per epoch, so step 10 is batch 4 of epoch 1
                "num_workers": 2,
                "train_scale": [0.5, 1.0],
                "hflip": 0.5,
            }
        },
    }
    override.write_text(yaml.safe_dump(cfg))
    return ["fit", f"--config={VQA}", f"--config={override}", *_common(root)]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def _run(args: list[str], cwd: Path) -> None:
    proc = subprocess.run(
        _entry_point() + args, capture_output=True, text=True, env=_env(), timeout=600, cwd=cwd, check=False
    )
    assert proc.returncode == 0, proc.stderr[-4000:]


def _written(ckpt: Path) -> bool:
    """``ckpt`` exists and ``last.ckpt`` next to it is at least as new (ModelCheckpoint writes ``last`` second).

    Both are written to a temp file and renamed (``AtomicCheckpointIO``), so a visible file is complete.
    """
    last = ckpt.with_name("last.ckpt")
    try:
        return last.stat().st_mtime_ns >= ckpt.stat().st_mtime_ns
    except FileNotFoundError:
        return False


def _run_and_kill(args: list[str], ckpt: Path, cwd: Path) -> bool:
    """Start the run, SIGKILL it once ``ckpt`` (and ``last.ckpt`` after it) exist; False if it finished first."""
    log = open(cwd / "killed_run.log", "w")  # noqa: SIM115 (kept open for the child)
    proc = subprocess.Popen(_entry_point() + args, stdout=log, stderr=subprocess.STDOUT, env=_env(), cwd=cwd)
    deadline = time.monotonic() + 600
    try:
        while proc.poll() is None:
            if _written(ckpt):
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return True
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {ckpt} after 600 s")
            time.sleep(0.01)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    assert proc.returncode == 0, (cwd / "killed_run.log").read_text()[-4000:]
    return False


def _losses(root: Path, version: int) -> dict[int, float]:
    with open(root / f"version_{version}" / "metrics.csv") as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


def _check_kill_and_resume(args_for, tmp_path: Path, state_key: str, position) -> None:
    ref_root, run_root = tmp_path / "reference", tmp_path / "killed"
    _run(args_for(ref_root), tmp_path)
    reference = _losses(ref_root, 0)
    assert sorted(reference) == list(range(MAX_STEPS))

    ckpts = run_root / "checkpoints"
    killed = _run_and_kill(args_for(run_root), ckpts / f"step{2 * EVERY:07d}.ckpt", tmp_path)
    # ``last`` as a user would resume; when the run beat the kill, ``last`` is its end, so take the mid-epoch one
    resume_from = ckpts / "last.ckpt" if killed else ckpts / f"step{2 * EVERY:07d}.ckpt"
    state = torch.load(resume_from, map_location="cpu", weights_only=True)
    step = int(state["global_step"])
    print(f"resuming from step {step}, killed={killed}", state[state_key])
    consumed, per_epoch = position(state[state_key])
    assert 0 < consumed < per_epoch, (step, consumed, per_epoch)  # the checkpoint is in the middle of an epoch
    assert not list(ckpts.glob(".*.tmp")) or killed  # a kill may leave a temp file, never a torn checkpoint

    _run([*args_for(run_root), f"--ckpt_path={'last' if killed else resume_from}"], tmp_path)
    resumed = _losses(run_root, 1)
    assert sorted(resumed) == list(range(step, MAX_STEPS)), (step, sorted(resumed))
    diffs = {s: (resumed[s], reference[s]) for s in resumed if resumed[s] != reference[s]}
    assert not diffs, f"resumed from step {step} (killed={killed}): differing losses {diffs}"


def test_pretraining_killed_mid_epoch_resumes_exactly(world: Path, tmp_path: Path) -> None:
    _check_kill_and_resume(
        lambda root: _pretrain_args(world, root),
        tmp_path,
        "PretrainDataModule",
        lambda s: (s["consumed"], s["pass_batches"]),
    )


def test_vqa_finetuning_killed_mid_epoch_resumes_exactly(world: Path, tmp_path: Path) -> None:
    _check_kill_and_resume(
        lambda root: _vqa_args(world, root, tmp_path),
        tmp_path,
        "VQADataModule",
        lambda s: (s["train_loader"]["consumed"], s["train_loader"]["epoch_batches"]),
    )
