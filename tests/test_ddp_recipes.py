"""Every shipped recipe trains under plain multi-process DDP (2 CPU processes, gloo) through the real ``mmoe`` CLI.

Plain ``strategy=ddp`` (no unused-parameter search) fails a step in which a trainable parameter got no
gradient. Each run: 3 steps of ``mmoe fit --config <recipe> --trainer.devices 2 --trainer.strategy ddp`` in a
folder whose ``data/shapes`` is a tiny synthetic world, so the recipes' own relative paths are used unchanged.
Checked: exit status 0, no "not used in producing the loss" in either rank's output, a checkpoint at step 3.
Also: the per-segment expert path with a router forced to leave an expert empty, and the tiny pretraining
with its experts sharded over the 2 processes (expert parallelism). FSDP is not run here: Lightning 2.6 refuses
``strategy=fsdp`` without a GPU (docs/scaling.md section 4).
"""

from __future__ import annotations

import csv
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import CONFIGS

FINETUNE = CONFIGS / "finetune"
PRETRAIN = CONFIGS / "pretrain" / "tiny_mhmoe.yaml"
SYNTHETIC = sorted(p.name for p in FINETUNE.glob("*_synthetic.yaml"))
UNUSED = "not used in producing the loss"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with ``data/shapes``: every split the recipes read, shards for pretraining, the VQA vocabulary."""
    from mmoe.data.synthetic import make_world
    from mmoe.data.vqa import build_answer_vocab, save_answer_vocab

    root = tmp_path_factory.mktemp("ddp")
    world = root / "data" / "shapes"
    make_world(world, num_train=16, num_val=4, image_size=64, seed=0, nlvr2_sets=(2, 1), shards=True, shard_maxcount=8)
    anns = json.loads((world / "vqa" / "v2_mscoco_train2014_annotations.json").read_text())["annotations"]
    save_answer_vocab(world / "vqa" / "answer_vocab.json", build_answer_vocab([anns], min_count=1))
    return root


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry_point() -> list[str]:
    # The module the ``mmoe`` console script runs; independent of how (or whether) the script is installed.
    return [sys.executable, "-m", "mmoe.train.cli"]


def _fit_ddp(workdir: Path, recipe: Path, root: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """3 steps of ``mmoe fit`` on 2 gloo processes; returns the finished process (asserted successful)."""
    cmd = _entry_point() + [
        "fit",
        f"--config={recipe}",
        "--trainer.accelerator=cpu",
        "--trainer.devices=2",
        "--trainer.strategy=ddp",
        "--trainer.max_steps=3",
        "--trainer.limit_val_batches=0",
        "--trainer.val_check_interval=null",
        "--trainer.log_every_n_steps=1",
        "--checkpoint.every_n_train_steps=3",
        f"--trainer.default_root_dir={root}",
        *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=400, cwd=workdir)
    out = proc.stdout + proc.stderr
    assert UNUSED not in out, out[-4000:]
    assert proc.returncode == 0, out[-4000:]
    return proc


def _trained_checkpoint(root: Path) -> dict[str, Any]:
    ckpt = root / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["global_step"] == 3
    assert "mmoe_config" in state
    return state


def _train_rows(root: Path) -> list[dict[str, str]]:
    with open(root / "version_0" / "metrics.csv") as f:
        return [r for r in csv.DictReader(f) if r.get("train/loss")]


def _pretrain_args(*overrides: str) -> list[str]:
    return [
        "--data.init_args.batch_size=3",
        "--data.init_args.num_workers=0",
        "--data.init_args.shuffle_buffer=8",
        "--model.init_args.log_routing_every=1",
        *overrides,
    ]


@pytest.mark.slow
@pytest.mark.parametrize("recipe", SYNTHETIC)
def test_finetuning_recipe_trains_under_ddp(recipe: str, workdir: Path, tmp_path: Path) -> None:
    root = tmp_path / "run"
    _fit_ddp(workdir, FINETUNE / recipe, root, "--trainer.logger=false", "--data.init_args.batch_size=2")
    state = _trained_checkpoint(root)
    vision_only = recipe.startswith(("imagenet", "coco_detection"))
    assert list(state["mmoe_config"]["modalities"]) == (["vision"] if vision_only else ["vision", "text"])
    assert any(k.startswith("backbone.text_embed.") for k in state["state_dict"]) is not vision_only
    from mmoe.model import load_model

    assert load_model(root / "checkpoints" / "last.ckpt").config.has_text is not vision_only  # rebuilds as trained


def test_synthetic_recipes_are_all_covered() -> None:
    """The DDP runs above cover every shipped synthetic recipe, and no recipe asks DDP to search for unused ones."""
    for path in FINETUNE.glob("*.yaml"):
        assert "find_unused" not in path.read_text(), path.name
    assert SYNTHETIC == [
        "coco_captioning_synthetic.yaml",
        "coco_detection_synthetic.yaml",
        "coco_retrieval_synthetic.yaml",
        "imagenet_synthetic.yaml",
        "nlvr2_synthetic.yaml",
        "vqav2_synthetic.yaml",
    ]


@pytest.fixture(scope="module")
def pretrain_ddp(workdir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, str]]:
    root = tmp_path_factory.mktemp("pretrain_ddp") / "run"
    _fit_ddp(workdir, PRETRAIN, root, *_pretrain_args())
    _trained_checkpoint(root)
    return _train_rows(root)


@pytest.mark.slow
def test_tiny_pretraining_trains_under_ddp(pretrain_ddp: list[dict[str, str]]) -> None:
    assert [int(r["step"]) for r in pretrain_ddp] == [0, 1, 2]
    assert all(math.isfinite(float(r["train/loss"])) for r in pretrain_ddp)


@pytest.mark.slow
def test_tiny_pretraining_with_itc_and_itm_trains_under_ddp(workdir: Path, tmp_path: Path) -> None:
    """ITC gathers the pair embeddings of both ranks with gradients; every ITC/ITM parameter gets a gradient."""
    root = tmp_path / "run"
    extra = ["--model.init_args.itc_weight=1.0", "--model.init_args.itm_weight=1.0", "--data.init_args.batch_size=6"]
    _fit_ddp(workdir, PRETRAIN, root, *_pretrain_args(*extra))  # 6 = 2 pairs a rank: ITM needs a negative
    _trained_checkpoint(root)
    rows = _train_rows(root)
    assert [int(r["step"]) for r in rows] == [0, 1, 2]
    assert all(math.isfinite(float(r["train/loss_itc_pair"])) and float(r["train/loss_itm_pair"]) > 0 for r in rows)


@pytest.mark.slow
def test_segments_path_with_an_empty_expert_trains_under_ddp(workdir: Path, tmp_path: Path) -> None:
    """``expert_impl="segments"`` and a routing bias that keeps expert 7 of every MoE layer out of the top 2."""
    from mmoe.model import create_model, save_model

    moe = {"extra": {"expert_impl": "segments", "balance_bias_rate": 1.0e-6}}
    model = create_model("tiny_mhmoe", moe=moe)
    with torch.no_grad():
        for blk in model.blocks:
            if blk.moe is not None:
                blk.moe.routing_bias[-1] = -10.0  # nothing updates the bias during training (no balancing call)
    save_model(model, tmp_path / "forced.pt")
    root = tmp_path / "run"
    overrides = "{moe: {extra: {expert_impl: segments, balance_bias_rate: 1.0e-6}}}"
    _fit_ddp(
        workdir,
        PRETRAIN,
        root,
        *_pretrain_args(
            f"--model.init_args.backbone_overrides={overrides}",
            f"--model.init_args.init_from={tmp_path / 'forced.pt'}",
            "--trainer.limit_val_batches=1",  # one validation batch after step 3: it logs every expert's load
            "--trainer.val_check_interval=3",
            "--data.init_args.val_steps=1",
        ),
    )
    _trained_checkpoint(root)
    rows = _train_rows(root)
    assert [int(r["step"]) for r in rows] == [0, 1, 2]
    for layer in ("layer1", "layer3"):
        loads = [float(r[f"train/moe/{layer}/activation_ratio"]) for r in rows]
        assert all(0 < v <= 7 / 8 for v in loads), (layer, loads)  # at most 7 of the 8 experts ever get tokens
    with open(root / "version_0" / "metrics.csv") as f:
        val = [r for r in csv.DictReader(f) if r.get("val/moe/layer1/load/e7")]
    assert val, "no validation routing logged"
    for layer in ("layer1", "layer3"):
        shares = [float(val[-1][f"val/moe/{layer}/load/e{i}"]) for i in range(8)]
        assert shares[7] == 0.0 and min(shares[:7]) > 0.0, (layer, shares)


@pytest.mark.slow
def test_tiny_pretraining_with_expert_parallelism(
    workdir: Path, tmp_path: Path, pretrain_ddp: list[dict[str, str]]
) -> None:
    """The 8 experts of each MoE layer split 4 + 4 over the 2 processes; the first loss equals plain DDP's."""
    root = tmp_path / "run"
    proc = _fit_ddp(
        workdir, PRETRAIN, root, *_pretrain_args("--trainer.callbacks+=mmoe.train.expert_parallel.ExpertParallel")
    )
    assert "ExpertParallel: 2 MoE layers sharded over expert-parallel groups of 2 ranks" in proc.stdout + proc.stderr
    state = _trained_checkpoint(root)
    w1 = state["state_dict"]["backbone.blocks.1.moe.experts.w1"]
    assert w1.shape[0] == 8  # the checkpoint holds the full (all-gathered) expert tensors
    rows = _train_rows(root)
    assert [int(r["step"]) for r in rows] == [0, 1, 2]
    # Same seed, weights and data: step 0 (before any update) is the same computation, experts on other ranks.
    ep0, dp0 = float(rows[0]["train/loss"]), float(pretrain_ddp[0]["train/loss"])
    assert abs(ep0 - dp0) <= 1e-4 * abs(dp0), (ep0, dp0)


def test_expert_parallel_callback_without_a_process_group() -> None:
    """One process: nothing to shard by default; an explicit ep_size > 1 is an error naming the strategy."""
    from mmoe.train.expert_parallel import ExpertParallel
    from mmoe.train.pretraining import MaskedPretraining

    module = MaskedPretraining(backbone="tiny_mhmoe", backbone_overrides={"depth": 2})
    cb = ExpertParallel()
    cb.setup(None, module, "fit")  # type: ignore[arg-type]
    assert cb.converted == [] and not hasattr(module, "_ddp_params_and_buffers_to_ignore")
    with pytest.raises(RuntimeError, match="--trainer.strategy ddp"):
        ExpertParallel(ep_size=2).setup(None, module, "fit")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ep_size"):
        ExpertParallel(ep_size=0)
