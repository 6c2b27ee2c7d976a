"""Vision tasks through the real ``mmoe`` CLI on a tiny synthetic shapes world."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from helpers import CONFIGS

FINETUNE = CONFIGS / "finetune"
VISION_RECIPES = ["imagenet.yaml", "imagenet_synthetic.yaml", "coco_detection.yaml", "coco_detection_synthetic.yaml"]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mmoe.data.synthetic import make_world

    root = tmp_path_factory.mktemp("shapes")
    make_world(root, num_train=6, num_val=3, image_size=32, nlvr2_sets=(1, 1))
    return root


def _cli(args: list[str]) -> Any:
    from mmoe.train.cli import build_cli

    argv, sys.argv = sys.argv, ["mmoe"]  # LightningCLI warns when pytest's own argv is present
    try:
        return build_cli(args)
    finally:
        sys.argv = argv


def _override(tmp: Path, model: dict, data: dict) -> Path:
    cfg = {
        "trainer": {
            "max_steps": 1,
            "val_check_interval": 1,
            "limit_val_batches": 1,
            "default_root_dir": str(tmp / "run"),
            "logger": False,
            "enable_progress_bar": False,
            "num_sanity_val_steps": 0,
        },
        "checkpoint": {"every_n_train_steps": 1},
        "model": {"init_args": model},
        "data": {"init_args": data},
    }
    path = tmp / "override.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_detection_one_step_and_eval(world: Path, tmp_path: Path) -> None:
    coco = world / "coco"
    override = _override(
        tmp_path,
        {"min_size": 32, "max_size": 32, "anchor_sizes": [4, 8, 16, 32, 64], "results_dir": str(tmp_path / "res")},
        {
            **{f"{split}_images": str(coco / f"{split}2014") for split in ("train", "val")},
            **{f"{s}_annotations": str(coco / "annotations" / f"instances_{s}2014.json") for s in ("train", "val")},
            "batch_size": 2,
            "eval_batch_size": 3,
        },
    )
    cli = _cli(["fit", "--config", str(FINETUNE / "coco_detection_synthetic.yaml"), "--config", str(override)])
    metrics = cli.trainer.callback_metrics
    for key in ("val/bbox_AP", "val/bbox_AP50", "val/segm_AP", "val/segm_AP75"):
        assert key in metrics and 0.0 <= float(metrics[key]) <= 1.0
    assert float(metrics["val/segm_APl"]) == -1.0  # COCOeval's "no ground truth in this bucket" (32 px images)
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert "mmoe_config" in state
    assert any(k.startswith("backbone.") for k in state["state_dict"])
    assert any(k.startswith("detector.pyramid.") for k in state["state_dict"])
    from mmoe.model import load_model

    assert load_model(ckpt).config.patch_size == 8
    # the official-format results file the validation wrote re-scores with the metric CLI's function
    results = sorted((tmp_path / "res").glob("coco_results_*.json"))
    assert results
    entries = json.loads(results[-1].read_text())
    cats = {c["id"] for c in json.loads((coco / "annotations" / "instances_val2014.json").read_text())["categories"]}
    assert all(e["category_id"] in cats and len(e["bbox"]) == 4 for e in entries)
    assert all(isinstance(e["segmentation"]["counts"], str) for e in entries)


def test_imagenet_one_step(world: Path, tmp_path: Path) -> None:
    pytest.importorskip("mmoe.train.classification")
    # the full recipe's augmentation path (imagenet.yaml): Mixup/CutMix in the task, RandAugment + erasing in the data
    override = _override(
        tmp_path,
        {
            "backbone_overrides": {"img_size": 32, "drop_path": 0.0},
            "mixup": {"mixup_alpha": 0.8, "cutmix_alpha": 1.0},
        },
        {
            "train_images": str(world / "imagenet" / "train"),
            "val_images": str(world / "imagenet" / "val"),
            "auto_augment": "rand-m9-mstd0.5-inc1",
            "re_prob": 0.25,
            "image_size": 32,
            "batch_size": 4,
            "eval_batch_size": 3,
        },
    )
    cli = _cli(["fit", "--config", str(FINETUNE / "imagenet_synthetic.yaml"), "--config", str(override)])
    assert cli.model.mixup_fn is not None and "RandAugment" in repr(cli.datamodule.train_transform)
    metrics = cli.trainer.callback_metrics
    assert "val/acc" in metrics and 0.0 <= float(metrics["val/acc"]) <= 1.0
    assert torch.isfinite(metrics["train/loss"])
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.parametrize("name", VISION_RECIPES)
def test_shipped_vision_recipes_parse(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _cli(["fit", "--config", str(FINETUNE / name), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"].startswith("mmoe.train.")
    assert printed["data"]["class_path"].startswith("mmoe.train.data.")
