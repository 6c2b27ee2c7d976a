"""Checkpoints and run configs written before the train package's move still load (mmoe.train.compat).

The fixture under tests/data/legacy was written by the code before the move (its README says how): a 2-step
ImageNet-style checkpoint with its saved ``config.yaml``, and the printed configs of six recipes with every old
class path and data-module argument name.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from helpers import REPO

from mmoe.train.cli import build_cli, migrate_args
from mmoe.train.compat import CLASS_PATHS, main, migrate_checkpoint, migrate_config

LEGACY = REPO / "tests" / "data" / "legacy"
CKPT = LEGACY / "imagenet_tiny.ckpt"
CONFIG = LEGACY / "imagenet_tiny_config.yaml"
SAMPLES = REPO / "datasets" / "samples" / "imagenet" / "val"
PRINTED = sorted((LEGACY / "configs").glob("*.yaml"))


def test_every_new_class_path_imports() -> None:
    import importlib

    for new in CLASS_PATHS.values():
        module, name = new.rsplit(".", 1)
        assert isinstance(getattr(importlib.import_module(module), name), type), new


@pytest.mark.parametrize("path", PRINTED, ids=[p.stem for p in PRINTED])
def test_old_printed_config_parses_with_the_new_code(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The CLI maps class paths and argument names of an old config; jsonargparse then accepts every key."""
    with pytest.raises(SystemExit) as exit_info:
        build_cli(["fit", "--config", str(path), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    migrated = migrate_config(yaml.safe_load(path.read_text()))
    for key in ("model", "data"):
        assert printed[key]["class_path"] not in CLASS_PATHS
        assert printed[key]["class_path"] == migrated[key]["class_path"]
        for arg, value in migrated[key]["init_args"].items():
            got = printed[key]["init_args"][arg]
            if isinstance(value, dict):  # a nested dict may gain keys with their defaults (e.g. optim.stem_lr_mult)
                got = {k: got[k] for k in value}
            assert got == value, (key, arg)


def test_vqa_file_lists_become_per_stage_arguments() -> None:
    old = {
        "class_path": "mmoe.train.task_data.VQADataModule",
        "init_args": {
            "train": [{"questions": "q1", "annotations": "a1", "image_dir": "i1"}, {"questions": "q2"}],
            "test": [{"questions": "q3", "annotations": None, "image_dir": "i3"}],
            "batch_size": 4,
        },
    }
    new = migrate_config({"data": old})["data"]
    assert new["class_path"] == "mmoe.train.data.vqav2.VQADataModule"
    assert new["init_args"] == {
        "batch_size": 4,
        "train_questions": ["q1", "q2"],
        "train_annotations": ["a1", None],
        "train_images": ["i1", ""],
        "test_questions": ["q3"],
        "test_annotations": [None],
        "test_images": ["i3"],
    }
    assert migrate_args(
        ["--model=mmoe.train.tasks.ClassificationTask", "--data", "mmoe.train.vision.ImageNetDataModule"]
    ) == [
        "--model=mmoe.train.classification.ClassificationTask",
        "--data",
        "mmoe.train.data.imagenet.ImageNetDataModule",
    ]


def test_old_checkpoint_resumes_with_its_saved_config(tmp_path: Path) -> None:
    """``mmoe fit --config <old config.yaml> --ckpt_path <old checkpoint>`` continues the run with the new code."""
    root = tmp_path / "run"
    build_cli(
        [
            "fit",
            "--config",
            str(CONFIG),
            f"--data.init_args.train_images={SAMPLES}",
            f"--data.init_args.val_images={SAMPLES}",
            f"--trainer.default_root_dir={root}",
            "--trainer.max_steps=3",
            "--trainer.val_check_interval=3",
            "--trainer.logger=false",
            "--trainer.enable_progress_bar=false",
            "--checkpoint.every_n_train_steps=3",
            f"--ckpt_path={CKPT}",
        ]
    )
    ckpt = torch.load(root / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 3  # resumed at step 2, one more step
    assert ckpt["hyper_parameters"]["_class_path"] == "mmoe.train.classification.ClassificationTask"
    assert ckpt["mmoe_config"]["modalities"] == ["vision"]


def test_old_checkpoint_loads_into_the_new_module_and_the_model_loader() -> None:
    from mmoe.model import load_model
    from mmoe.train.classification import ClassificationTask

    task = ClassificationTask.load_from_checkpoint(CKPT, map_location="cpu")
    state = torch.load(CKPT, map_location="cpu", weights_only=True)["state_dict"]
    assert all(torch.equal(v, state[k]) for k, v in task.state_dict().items())
    assert task.num_classes == 13 and task.backbone.config.img_size == 32
    backbone = load_model(CKPT)
    assert all(torch.equal(v, state[f"backbone.{k}"]) for k, v in backbone.state_dict().items())


def test_migrate_command_rewrites_checkpoints_and_configs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for src in (CKPT, CONFIG):
        shutil.copy(src, tmp_path / src.name)
    files = [str(tmp_path / CKPT.name), str(tmp_path / CONFIG.name)]
    assert main(files) == 0
    assert capsys.readouterr().out.count("migrated") == 2
    ckpt = torch.load(tmp_path / CKPT.name, map_location="cpu", weights_only=True)
    assert migrate_checkpoint(ckpt)[1] is False
    assert ckpt["hyper_parameters"]["_class_path"] == "mmoe.train.classification.ClassificationTask"
    cfg = yaml.safe_load((tmp_path / CONFIG.name).read_text())
    assert cfg["data"]["class_path"] == "mmoe.train.data.imagenet.ImageNetDataModule"
    assert cfg["data"]["init_args"]["train_images"] == "datasets/samples/imagenet/val"
    assert "train_dir" not in cfg["data"]["init_args"]
    main(files)
    assert capsys.readouterr().out.count("already current") == 2
