"""Every shipped YAML under configs/ parses with the ``mmoe`` CLI and builds its model and data module classes.

Recipes (``configs/{pretrain,finetune,demo}/**``) are parsed by the real CLI parser (unknown keys and wrong types
are refused there) and their model/data classes are instantiated on the meta device, so base-size models cost no
memory. Model-size YAMLs (``configs/model/*.yaml``) are built with ``create_model(..., device="meta")``.
The slow test runs one real optimizer step of every ``base_*`` pretraining recipe at a reduced size.
"""

from __future__ import annotations

import functools
import gc
import math
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from helpers import CONFIGS, REPO, shard_args
from lightning.pytorch import LightningDataModule, LightningModule

from mmoe.train.cli import MMoECLI, build_cli

RECIPES = sorted(p for sub in ("pretrain", "finetune", "demo") for p in (CONFIGS / sub).rglob("*.yaml") if p.is_file())
MODEL_YAMLS = sorted((CONFIGS / "model").glob("*.yaml"))


class _ParseOnly(MMoECLI):
    """The real CLI parser, without instantiating anything (classes are built by the test on the meta device)."""

    def instantiate_classes(self) -> None:
        pass


@functools.cache
def _parser() -> Any:
    """The CLI's parser, built once (building it introspects every signature and costs about a second)."""
    cli = _ParseOnly(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        run=False,
        seed_everything_default=0,
        parser_kwargs={"parser_mode": "yaml"},
        args=["--config", str(CONFIGS / "pretrain" / "tiny_mhmoe.yaml")],
    )
    return cli.parser


def _paths_in(node: Any) -> list[str]:
    """Every string value in a parsed YAML that looks like a relative file path."""
    if isinstance(node, dict):
        return [p for v in node.values() for p in _paths_in(v)]
    if isinstance(node, list):
        return [p for v in node for p in _paths_in(v)]
    return [node] if isinstance(node, str) and "/" in node and not node.startswith("/") else []


def test_recipes_exist() -> None:
    names = {p.name for p in RECIPES}
    for v in ("dense", "smoe", "xmoe", "mhmoe"):
        assert f"tiny_{v}.yaml" in names and f"base_{v}.yaml" in names


@pytest.mark.parametrize("path", RECIPES, ids=[str(p.relative_to(CONFIGS)) for p in RECIPES])
def test_recipe_parses_and_builds(path: Path) -> None:
    raw = yaml.safe_load(path.read_text())
    extra: list[str] = []
    init_from = (raw.get("model", {}).get("init_args") or {}).get("init_from")
    if init_from and not Path(init_from).exists() and not (REPO / init_from).exists():
        extra.append("--model.init_args.init_from=null")  # a checkpoint made by an earlier step (demo, pretrain)
    cwd = os.getcwd()
    os.chdir(REPO)  # recipes use repo-relative paths
    try:
        parser = _parser()
        config = parser.parse_args(["--config", str(path), *extra])  # parsing must always succeed
        try:
            with torch.device("meta"):
                init = parser.instantiate_classes(config)
        except (ValueError, FileNotFoundError) as e:
            # A recipe may need a file made by a preparation tool (answer vocabulary, annotations). Then building
            # must stop with a clear message naming that file and the tool, which is what a user would see.
            text = str(e)
            missing = [p for p in _paths_in(raw) if not (REPO / p).exists() and p in text]
            if not missing or not any(w in text for w in ("no such file", "does not exist", "not found")):
                raise
            line = next(ln for ln in text.splitlines() if missing[0] in ln).strip()
            pytest.skip(f"{path.name}: needs prepared data {missing[0]} (refused with: {line[:200]})")
    finally:
        os.chdir(cwd)
    model, data = init.get("model"), init.get("data")
    assert isinstance(model, LightningModule), f"{path}: model is {type(model).__name__}"
    assert data is None or isinstance(data, LightningDataModule), f"{path}: data is {type(data).__name__}"
    assert sum(p.numel() for p in model.parameters()) > 0
    if hasattr(model, "backbone"):
        assert model.backbone.config is not None


@pytest.mark.parametrize("path", MODEL_YAMLS, ids=[p.name for p in MODEL_YAMLS])
def test_model_yaml_builds(path: Path) -> None:
    from mmoe.model import create_model

    model = create_model(str(path), device="meta")
    assert sum(p.numel() for p in model.parameters()) > 0


@pytest.mark.slow
@pytest.mark.parametrize(
    "name", ["base_dense", "base_smoe", "base_xmoe", "base_mhmoe", "base_mhmoe_32e", "base_mhmoe_parity"]
)
def test_base_recipe_runs_one_step(name: str, tmp_path: Path) -> None:
    """Paper-size recipe, one bf16-mixed step on CPU at reduced image size/batch/depth.

    Width, heads, FFN and expert shapes of base are kept; depth is cut to 4 (2 MoE layers) because the full 12-layer
    base_smoe (379M parameters) needs ~6 GB for weights, gradients and AdamW states per test, and five such tests in
    one CI process ran a 24 GiB machine out of memory.
    """
    from mmoe.data.synthetic import make_world

    world = tmp_path / "world"
    make_world(world, num_train=8, num_val=4, image_size=64, seed=0, shards=True, shard_maxcount=8)
    root = tmp_path / "run"
    build_cli(
        [
            "fit",
            f"--config={CONFIGS / 'pretrain' / f'{name}.yaml'}",
            "--trainer.accelerator=cpu",
            "--trainer.devices=1",
            "--trainer.max_steps=1",
            "--trainer.log_every_n_steps=1",
            "--trainer.limit_val_batches=0",
            "--trainer.val_check_interval=null",
            f"--trainer.default_root_dir={root}",
            "--model.init_args.backbone_overrides={img_size: 32, drop_path: 0.1, depth: 4}",
            "--model.init_args.optim.warmup_steps=1",
            *shard_args(world, val=False),
            "--data.init_args.batch_size=3",
            "--data.init_args.image_size=32",
            "--data.init_args.min_mask_patches=1",
            "--data.init_args.max_text_len=16",
            "--data.init_args.num_workers=0",
            "--data.init_args.pin_memory=false",
            "--data.init_args.shuffle_buffer=4",
        ]
    )
    import csv

    with open(root / "version_0" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    assert rows and math.isfinite(float(rows[0]["train/loss"]))
    gc.collect()  # the trainer and its optimizer form reference cycles; free them before the next base model
    last = root / "checkpoints" / "last.ckpt"
    assert last.is_file()
    last.unlink()  # 1.5-4.7 GB each, and pytest keeps the temp folders of the last three runs
