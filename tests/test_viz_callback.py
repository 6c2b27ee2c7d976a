"""ExpertVisualizationCallback logs the expert pictures to TensorBoard every N validation steps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_viz_helpers import StandInBackbone

from mmoe.train.viz_callback import ExpertVisualizationCallback, find_images

lightning = pytest.importorskip("lightning")


class _Module(lightning.LightningModule):
    """A minimal module with a `.backbone` (the only thing the callback may assume, interfaces.md sec. 7)."""

    def __init__(self, backbone: torch.nn.Module, pretraining_batches: bool) -> None:
        super().__init__()
        self.backbone = backbone
        self.pretraining_batches = pretraining_batches

    def _loader(self, n: int):
        g = torch.Generator().manual_seed(0)
        images = torch.rand(n * 3, 3, 32, 32, generator=g) * 2 - 1
        batches = []
        for i in range(n):
            img = images[3 * i : 3 * i + 3]
            batches.append({"pair": {"image": img, "text": torch.zeros(3, 4, dtype=torch.long)}}
                           if self.pretraining_batches else {"image": img})  # fmt: skip
        return torch.utils.data.DataLoader(batches, batch_size=None)  # each item is one ready batch

    def train_dataloader(self):
        return self._loader(1)

    def val_dataloader(self):
        return self._loader(5)

    def training_step(self, batch, batch_idx):
        return self.backbone.dummy.sum() * 0 + self.backbone.dummy.square().sum()

    def validation_step(self, batch, batch_idx):
        return None

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_find_images_task_and_pretraining_batches():
    img = torch.zeros(2, 3, 8, 8)
    assert find_images({"image": img}) is img
    assert find_images({"text": {"text": torch.zeros(2, 3)}, "image": {"image": img}}) is img
    pair = torch.ones(2, 3, 8, 8)
    assert find_images({"image": {"image": img}, "pair": {"image": pair}}) is pair
    assert find_images({"text": {"text": torch.zeros(2, 3)}}) is None
    assert find_images([img]) is None


def test_render_pictures_not_blank():
    cb = ExpertVisualizationCallback(every_n_val_steps=1, log_diversity=True)
    pics = cb.render(StandInBackbone(), torch.rand(2, 3, 32, 32) * 2 - 1)
    assert set(pics) == {"majority", "heads/layer1", "heads/layer3", "load", "diversity"}
    for arr in pics.values():
        assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3
        assert arr.shape[0] > 100 and arr.shape[1] > 100 and arr.std() > 5


@pytest.mark.parametrize("pretraining_batches", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_callback_logs_to_tensorboard(tmp_path, pretraining_batches):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cb = ExpertVisualizationCallback(every_n_val_steps=2, max_images=2, save_dir=str(tmp_path / "png"))
    logger = TensorBoardLogger(str(tmp_path), name="tb", version=0)
    trainer = lightning.Trainer(
        accelerator="cpu", max_epochs=1, logger=logger, callbacks=[cb], enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=2,
    )  # fmt: skip
    trainer.fit(_Module(StandInBackbone(), pretraining_batches))
    assert cb.val_steps == 5  # sanity-check batches are not counted
    assert len(cb.logged) == 2  # validation steps 2 and 4
    logger.experiment.flush()
    acc = EventAccumulator(str(tmp_path / "tb" / "version_0"), size_guidance={"images": 0})
    acc.Reload()
    tags = set(acc.Tags()["images"])
    assert {"experts/majority", "experts/load", "experts/heads/layer1", "experts/heads/layer3"} <= tags
    assert len(acc.Images("experts/majority")) == 2
    pngs = sorted((tmp_path / "png").rglob("*.png"))
    assert {p.name for p in pngs} == {"majority.png", "load.png", "heads_layer1.png", "heads_layer3.png"}


def test_callback_rejects_bad_arguments():
    with pytest.raises(ValueError, match="every_n_val_steps"):
        ExpertVisualizationCallback(every_n_val_steps=0)
