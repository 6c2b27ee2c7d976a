"""PretrainDataModule: the pretraining batch contract (docs/interfaces.md section 4), modes, resume, CLI parsing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import pretrain_data_args, shard_world

from mmoe.train.data.pretraining import PretrainDataModule


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shard_world(tmp_path_factory, num_val=8)


def _dm(world: Path, **kw) -> PretrainDataModule:
    val = [str(world / "shards/pair/val-*.tar")]
    args = pretrain_data_args(world, val_pair_shards=val, steps_per_epoch=3, shuffle_buffer=10, hflip=0.0)
    return PretrainDataModule(**{**args, **kw})


def test_mixed_batches_follow_the_contract(world: Path) -> None:
    dm = _dm(world)
    loader = dm.train_dataloader()
    assert len(loader) == 3
    batches = list(loader)
    assert len(batches) == 3
    b = batches[0]
    assert set(b) == {"image", "text", "pair"}
    assert b["image"]["image"].shape == (2, 3, 32, 32) and b["image"]["image"].dtype == torch.float32
    assert b["image"]["image_mask"].shape == (2, 16) and b["image"]["image_mask"].dtype == torch.bool
    assert (b["image"]["image_mask"].sum(1) == 6).all()  # round(0.4 * 16)
    for stream in ("text", "pair"):
        sub = b[stream]
        assert sub["text"].shape == sub["text_padding_mask"].shape == sub["text_labels"].shape == (2, 16)
        assert sub["text_padding_mask"].dtype == torch.bool and sub["text"].dtype == torch.int64
        assert ((sub["text_labels"] != -100) <= ~sub["text_padding_mask"]).all()
    assert set(b["pair"]) == {"image", "image_mask", "text", "text_padding_mask", "text_labels"}
    assert "image" not in b["text"] and "text" not in b["image"]
    # pairs mask half their text, text-only ~15% (at least one token)
    pair_share = (b["pair"]["text_labels"] != -100).sum() / (~b["pair"]["text_padding_mask"]).sum()
    text_share = (b["text"]["text_labels"] != -100).sum() / (~b["text"]["text_padding_mask"]).sum()
    assert pair_share > text_share
    stats = dm.data_stats()
    assert stats["data/samples_seen/pair"] == 6.0
    val = list(dm.val_dataloader())
    assert sum(v["pair"]["image"].shape[0] for v in val) == 8  # each val sample once


def test_alternate_mode_and_ratios(world: Path) -> None:
    dm = _dm(world, mode="alternate", image_ratio=2.0, text_ratio=1.0, pair_ratio=1.0, steps_per_epoch=8)
    kinds = [next(iter(b)) for b in dm.train_dataloader()]
    assert all(len(k) for k in kinds) and kinds.count("image") == 4 and kinds.count("text") == kinds.count("pair") == 2
    dm = _dm(world, image_shards=None, text_ratio=1.0, pair_ratio=2.0)
    b = next(iter(dm.train_dataloader()))
    assert set(b) == {"text", "pair"} and b["pair"]["text"].shape[0] == 4 and b["text"]["text"].shape[0] == 2


def test_state_dict_resume_and_workers(world: Path) -> None:
    dm = _dm(world, num_workers=2, steps_per_epoch=4)
    loader = dm.train_dataloader()
    first = [b["pair"]["text_labels"] for b in loader]
    assert len(first) == 4
    state = dm.state_dict()
    assert state["iteration"] == 1 and state["samples_seen"]["image"] == 8
    dm2 = _dm(world, num_workers=0, steps_per_epoch=4)
    dm2.load_state_dict(state)  # before the loader exists, as Lightning does on restore
    resumed = [b["pair"]["text_labels"] for b in dm2.train_dataloader()]
    assert not all(torch.equal(a, b) for a, b in zip(first, resumed))
    assert dm2.state_dict()["iteration"] == 2 and dm2.state_dict()["samples_seen"]["image"] == 16


def test_errors_name_the_problem(world: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope-"):
        _dm(world, text_shards=[str(world / "shards/text/nope-*.tar")]).train_dataloader()
    with pytest.raises(ValueError, match="at least one"):
        PretrainDataModule()
    with pytest.raises(ValueError, match="patch_size"):
        _dm(world, image_size=30)


def test_cli_parses_yaml(tmp_path: Path, world: Path) -> None:
    from jsonargparse import ArgumentParser

    cfg = tmp_path / "data.yaml"
    cfg.write_text(
        "image_shards: ['" + str(world / "shards/image/train-*.tar") + "']\n"
        "pair_shards: ['" + str(world / "shards/pair/train-{000000..000003}.tar") + "']\n"
        "mode: alternate\nbatch_size: 4\nimage_size: 32\npatch_size: 8\nnum_workers: 0\nsteps_per_epoch: 2\n"
        "train_scale: [0.5, 1.0]\nimage_mean: [0.5, 0.5, 0.5]\n"
    )
    parser = ArgumentParser()
    parser.add_class_arguments(PretrainDataModule, "data")
    parsed = parser.parse_args(["--data", str(cfg)])
    init = parser.instantiate if hasattr(parser, "instantiate") else parser.instantiate_classes
    dm = init(parsed).data
    assert isinstance(dm, PretrainDataModule) and dm.hparams.mode == "alternate"
    assert len(list(dm.train_dataloader())) == 2


def test_lightning_fit_saves_and_restores_data_state(tmp_path: Path, world: Path) -> None:
    import lightning.pytorch as pl

    class Probe(pl.LightningModule):
        """Tiny module: a linear map over the mean image, enough for Lightning to run steps."""

        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Linear(3, 1)

        def training_step(self, batch, batch_idx):
            assert set(batch) == {"image", "text", "pair"}
            return self.w(batch["image"]["image"].mean((2, 3))).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    kw = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False)
    dm = _dm(world, val_pair_shards=None, steps_per_epoch=2)
    trainer = pl.Trainer(max_epochs=1, default_root_dir=tmp_path, **kw)
    trainer.fit(Probe(), datamodule=dm)
    ckpt_path = next((tmp_path / "checkpoints").glob("*.ckpt"))
    ckpt = torch.load(ckpt_path, weights_only=False)
    state = ckpt["PretrainDataModule"]
    assert state["iteration"] == 1 and state["samples_seen"] == {"image": 4, "text": 4, "pair": 4}
    dm2 = _dm(world, val_pair_shards=None, steps_per_epoch=2)
    pl.Trainer(max_epochs=2, default_root_dir=tmp_path, **kw).fit(Probe(), datamodule=dm2, ckpt_path=ckpt_path)
    assert dm2.state_dict()["iteration"] == 2 and dm2.state_dict()["samples_seen"]["pair"] == 8
