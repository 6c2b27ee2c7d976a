"""MaskedPretraining with ``image_target: vqkd`` ([B3] sec. 2.2): VQ-KD codes as masked-image targets.

A tiny random tokenizer in the released key layout (``helpers.write_vqkd_file``) with its own input size (16 px,
4-px patches) and normalization stands in for the released one; the backbone sees 32-px images in 8-px patches, so
both grids are 4 x 4 and every batch is resized and renormalized on the way to the tokenizer.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
from helpers import CONFIGS, TINY_VQKD, shard_args, shard_world, write_vqkd_file

from mmoe.model.vqkd import load_vqkd
from mmoe.train.cli import main
from mmoe.train.pretraining import MaskedPretraining

pytestmark = pytest.mark.usefixtures("one_thread")

# The tokenizer's own normalization differs from the backbone's 0.5/0.5, so renormalization is exercised.
TOKENIZER = {**TINY_VQKD, "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}


@pytest.fixture(scope="module")
def vqkd_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_vqkd_file(tmp_path_factory.mktemp("vqkd") / "vqkd_tiny.pth")


def _module(vqkd_file: Path, **kwargs: object) -> MaskedPretraining:
    args: dict = {
        "backbone": "tiny_dense",
        "backbone_overrides": {"img_size": 32, "depth": 2},
        "image_target": "vqkd",
        "vqkd_checkpoint": str(vqkd_file),
        "vqkd_config": TOKENIZER,
        "optim": {"lr": 1e-3, "total_steps": 5},
    }
    return MaskedPretraining(**{**args, **kwargs})


def _batch(seed: int = 0, *, img: int = 32, patches: int = 16) -> dict:
    g = torch.Generator().manual_seed(seed)

    def image_sub() -> dict:
        mask = torch.rand(4, patches, generator=g) < 0.4
        mask[:, 0] = True
        return {"image": torch.rand(4, 3, img, img, generator=g) * 2 - 1, "image_mask": mask}

    ids = torch.randint(0, 1000, (4, 8), generator=g)
    labels = torch.where(torch.rand(4, 8, generator=g) < 0.5, ids, -100)
    labels[:, 0] = ids[:, 0]
    text = {"text": ids, "text_padding_mask": torch.zeros(4, 8, dtype=torch.bool), "text_labels": labels}
    return {"image": image_sub(), "pair": {**image_sub(), **text}}


def test_vqkd_targets_are_the_tokenizer_codes_of_the_masked_patches(vqkd_file: Path) -> None:
    torch.manual_seed(0)
    m = _module(vqkd_file)
    assert m.mim_head.out_features == 64 and m.vqkd is not None and not m.vqkd.training
    batch = _batch()
    losses, _, _ = m.stream_losses(batch)
    assert set(losses) == {"mim_image", "mim_pair", "mlm_pair"}
    assert abs(float(losses["mim_image"]) - math.log(64)) < 1.0  # CE of an untrained head over 64 codes
    # the targets are the tokenizer's codes of the backbone-normalized batch, resized and renormalized
    sub = batch["image"]
    tok = load_vqkd(vqkd_file, TOKENIZER)
    codes = tok.codes_from(sub["image"], mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    torch.testing.assert_close(m._vqkd_codes(sub["image"], sub["image_mask"]), codes[sub["image_mask"]])
    m._total(losses, torch.zeros(())).backward()
    assert m.mim_head.weight.grad is not None and m.mim_head.weight.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in m.vqkd.parameters())
    m.train()
    assert m.training and not m.vqkd.training


def test_vqkd_configuration_errors_are_named(vqkd_file: Path) -> None:
    with pytest.raises(ValueError, match="vqkd_checkpoint"):
        MaskedPretraining(backbone="tiny_dense", image_target="vqkd")
    # 64-px backbone in 8-px patches = 8 x 8 patches; the tokenizer gives 4 x 4 codes
    with pytest.raises(ValueError, match=r"4x4 code grid \(16 px / patch 4\).*8x8 patch grid \(64 px / patch 8\)"):
        _module(vqkd_file, backbone_overrides={"depth": 2})
    # a batch at another size than the backbone's: its patch grid no longer matches the codes
    m = _module(vqkd_file)
    with pytest.raises(ValueError, match=r"8x8 patch grid.*4x4 codes per image"):
        m.stream_losses({"image": _batch(img=64, patches=64)["image"]})


def _rows(root: Path, version: int = 0) -> list[dict[str, str]]:
    with open(root / f"version_{version}" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_tiny_vqkd_recipe_trains_five_steps_and_resumes(
    vqkd_file: Path, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    world = shard_world(tmp_path_factory, num_train=12, num_val=4, image_size=32, shard_maxcount=6)
    root = tmp_path / "run"
    tokenizer = "{" + ", ".join(f"{k}: {v}" for k, v in TOKENIZER.items()) + "}"
    common = [
        f"--config={CONFIGS / 'pretrain' / 'tiny_mhmoe.yaml'}",
        "--trainer.log_every_n_steps=1",
        "--trainer.val_check_interval=5",
        f"--trainer.default_root_dir={root}",
        "--model.init_args.backbone_overrides={img_size: 32}",
        "--model.init_args.image_target=vqkd",
        f"--model.init_args.vqkd_checkpoint={vqkd_file}",
        f"--model.init_args.vqkd_config={tokenizer}",
        "--checkpoint.every_n_train_steps=5",
        *shard_args(world, val=True),
        "--data.init_args.image_size=32",
        "--data.init_args.batch_size=3",
        "--data.init_args.num_workers=0",
        "--data.init_args.val_steps=1",
        "--data.init_args.shuffle_buffer=6",
    ]
    main(["fit", *common, "--trainer.max_steps=5"])
    train = [r for r in _rows(root) if r.get("train/loss")]
    assert [int(r["step"]) for r in train] == [0, 1, 2, 3, 4]
    for key in ("loss", "loss_mim_image", "loss_mim_pair", "ppl_mim_image", "ppl_mim_pair", "ppl_mlm_text"):
        assert all(math.isfinite(float(r[f"train/{key}"])) for r in train), key
    assert abs(float(train[0]["train/loss_mim_image"]) - math.log(64)) < 1.0
    val = [r for r in _rows(root) if r.get("val/loss")]
    assert val and 1.0 < float(val[-1]["val/ppl_mim_image"]) < 64 * math.e
    # the checkpoint leaves the tokenizer out (it is rebuilt from vqkd_checkpoint) and loads back strictly
    ckpt = root / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert state and not any(k.startswith("vqkd.") for k in state)
    restored = MaskedPretraining.load_from_checkpoint(ckpt)
    x = _batch()["image"]["image"]
    tok = load_vqkd(vqkd_file, TOKENIZER)
    assert torch.equal(
        restored.vqkd.codes_from(x, mean=(0.5,) * 3, std=(0.5,) * 3), tok.codes_from(x, mean=(0.5,) * 3, std=(0.5,) * 3)
    )
    main(["fit", *common, "--trainer.max_steps=6", "--ckpt_path=last"])  # the trainer's strict restore
    assert [int(r["step"]) for r in _rows(root, 1) if r.get("train/loss")] == [5]
