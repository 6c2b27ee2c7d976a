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


def test_callback_writes_pngs_in_the_csv_run_folder(tmp_path):
    """A logger that takes no images (CSV) gets PNG files in its run folder; TensorBoard beside it its images."""
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    cb = ExpertVisualizationCallback(every_n_val_steps=2, max_images=2)
    csv = CSVLogger(str(tmp_path), name="", version="version_0")
    tb = TensorBoardLogger(str(tmp_path), name="", version="version_0")
    trainer = lightning.Trainer(
        accelerator="cpu", max_epochs=1, logger=[tb, csv], callbacks=[cb], enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(_Module(StandInBackbone(), True))
    folder = tmp_path / "version_0" / "experts"
    assert cb.deliveries == [["tensorboard", f"files:{folder / 'step00000001_val000002'}"],
                             ["tensorboard", f"files:{folder / 'step00000001_val000004'}"]]  # fmt: skip
    names = {p.relative_to(folder).as_posix() for p in folder.rglob("*.png")}
    assert names == {f"step00000001_val00000{v}/{n}.png" for v in (2, 4) for n in
                     ("majority", "load", "heads_layer1", "heads_layer3")}  # fmt: skip
    from PIL import Image

    with Image.open(folder / "step00000001_val000002" / "majority.png") as img:
        assert img.mode == "RGB" and min(img.size) > 100
    assert not list(folder.rglob(".*.tmp"))


class _FakeWandb:
    """What the callback relies on of Lightning's WandbLogger (the wandb package is not a dependency)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, tuple[int, ...]]] = []

    @property
    def experiment(self) -> object:
        return object()  # a wandb Run: no add_image

    def log_image(self, key: str, images: list, step: int | None = None) -> None:
        assert isinstance(images, list) and len(images) == 1
        self.calls.append((key, step, images[0].shape))


class _FakeMlflowClient:
    def __init__(self, with_log_image: bool) -> None:
        self.images: list[tuple[str, str, tuple[int, ...]]] = []
        self.artifacts: list[tuple[str, str, bytes]] = []
        if with_log_image:
            self.log_image = lambda run_id, image, artifact_file: self.images.append(
                (run_id, artifact_file, image.shape)
            )

    def log_artifact(self, run_id: str, local_path: str, artifact_path: str | None = None) -> None:
        with open(local_path, "rb") as f:
            self.artifacts.append((run_id, f"{artifact_path}/{local_path.rsplit('/', 1)[1]}", f.read(8)))


class _FakeMlflow:
    """What the callback relies on of Lightning's MLFlowLogger: ``run_id`` and its ``MlflowClient``."""

    run_id = "run-1"

    def __init__(self, with_log_image: bool = True) -> None:
        self.experiment = _FakeMlflowClient(with_log_image)


def test_send_pictures_to_wandb_and_mlflow_shapes(tmp_path):
    from mmoe.train.viz_callback import send_pictures

    pics = {"majority": np.full((120, 160, 3), 7, np.uint8), "heads/layer1": np.zeros((110, 130, 3), np.uint8)}
    wandb, mlflow, old_mlflow = _FakeWandb(), _FakeMlflow(), _FakeMlflow(with_log_image=False)
    sent = send_pictures([wandb, mlflow, old_mlflow], pics, tag="experts", step=12, subfolder="step12")
    assert sent == ["wandb", "mlflow", "mlflow"]
    assert wandb.calls == [("experts/majority", 12, (120, 160, 3)), ("experts/heads/layer1", 12, (110, 130, 3))]
    assert mlflow.experiment.images == [
        ("run-1", "experts/majority/step00000012.png", (120, 160, 3)),
        ("run-1", "experts/heads/layer1/step00000012.png", (110, 130, 3)),
    ]
    got = old_mlflow.experiment.artifacts
    assert [a[:2] for a in got] == [
        ("run-1", "experts/step12/majority.png"),
        ("run-1", "experts/step12/heads_layer1.png"),
    ]
    assert all(a[2] == b"\x89PNG\r\n\x1a\n" for a in got)
    # a logger with neither images nor a folder is skipped, not an error
    assert send_pictures([object()], pics, tag="experts", step=1, subfolder="s") == []
