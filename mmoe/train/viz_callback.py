"""Lightning callback: pictures of which experts image patches go to, during validation, through any logger.

Every `every_n_val_steps` validation batches it takes up to `max_images` images from the batch,
runs the module's `backbone` on them (image only, no masking; docs/interfaces.md sec. 2 and 7: the
module is only assumed to have `.backbone`) and logs:

- `{tag}/majority`: images x MoE layers, each patch coloured by the expert most of its sub-tokens
  chose ([MH1] Fig. 1b) -- picture (a) of `mmoe-viz`;
- `{tag}/heads/{layer}`: the first image with one panel per MoE head plus the majority (a);
- `{tag}/load`: the experts x layers load heat map over those images ([MH1] Fig. 5) -- picture (c);
- `{tag}/diversity` (optional): distinct experts per patch ([MH1] Fig. 8).

Every configured logger gets the pictures in its own way (:func:`send_pictures`): TensorBoard through its
SummaryWriter's `add_image`, Weights & Biases through `WandbLogger.log_image`, MLflow through the client's
`log_image` (one artifact per picture and step; `log_artifact` of a PNG on clients without it), and a logger that
takes no images (CSV, or any other) as PNG files in its run folder, `{log_dir}/{tag}/step{S}_val{V}/{name}.png`.
The loggers are recognised by what they offer, not by class, so none of their packages is needed here. With
`save_dir` set, the PNGs are also written there.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from mmoe.files import atomic_write
from mmoe.viz.capture import RoutedBatch, forward_routing, to_display
from mmoe.viz.experts import draw_assignment, draw_load_heatmaps, draw_map_grid, figure_to_array
from mmoe.viz.records import RoutingAccumulator, diversity, majority_expert, patch_gates, patch_grid

_STREAM_ORDER = ("pair", "image")


def _png_bytes(arr: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def write_pngs(folder: Path, pictures: Mapping[str, np.ndarray]) -> list[Path]:
    """Write each picture as `folder/{name with / as _}.png` (atomically); returns the paths."""
    paths = []
    for name, arr in pictures.items():
        path = folder / (name.replace("/", "_") + ".png")
        atomic_write(path, lambda f, arr=arr: f.write(_png_bytes(arr)))
        paths.append(path)
    return paths


def send_pictures(
    loggers: list[Any], pictures: Mapping[str, np.ndarray], *, tag: str, step: int, subfolder: str
) -> list[str]:
    """Send (H, W, 3) uint8 `pictures` (name -> array) to every logger in the way it takes images.

    - `experiment.add_image` (TensorBoard's SummaryWriter): one image per `{tag}/{name}` at `step`;
    - `log_image(key=, images=, step=)` on the logger (Lightning's `WandbLogger`);
    - `run_id` and `experiment.log_image` (Lightning's `MLFlowLogger` on an `MlflowClient`): one artifact
      `{tag}/{name}/step{step:08d}.png`; a client without `log_image` gets the PNG through `log_artifact`;
    - anything else (`CSVLogger`, custom loggers): PNG files in its `log_dir` (else `save_dir`) under
      `{tag}/{subfolder}/`; loggers sharing a folder get the files once. A logger with no folder is skipped.

    Returns one line per delivery (``"tensorboard"``, ``"wandb"``, ``"mlflow"``, ``"files:<folder>"``), for
    the callback's record and the tests.
    """
    sent: list[str] = []
    folders: set[Path] = set()
    for logger in loggers:
        experiment = getattr(logger, "experiment", None)
        if hasattr(experiment, "add_image"):
            for name, arr in pictures.items():
                experiment.add_image(f"{tag}/{name}", arr, global_step=step, dataformats="HWC")
            sent.append("tensorboard")
        elif callable(getattr(logger, "log_image", None)):
            for name, arr in pictures.items():
                logger.log_image(key=f"{tag}/{name}", images=[arr], step=step)
            sent.append("wandb")
        elif getattr(logger, "run_id", None) is not None and hasattr(experiment, "log_image"):
            for name, arr in pictures.items():
                experiment.log_image(logger.run_id, arr, artifact_file=f"{tag}/{name}/step{step:08d}.png")
            sent.append("mlflow")
        elif getattr(logger, "run_id", None) is not None and hasattr(experiment, "log_artifact"):
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                for path in write_pngs(Path(tmp) / subfolder, pictures):
                    experiment.log_artifact(logger.run_id, str(path), artifact_path=f"{tag}/{subfolder}")
            sent.append("mlflow")
        else:
            root = getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None)
            if not root:
                continue
            folder = Path(root) / tag / subfolder
            if folder not in folders:
                folders.add(folder)
                write_pngs(folder, pictures)
                sent.append(f"files:{folder}")
    return sent


def find_images(batch: Any) -> torch.Tensor | None:
    """The (B, 3, H, W) images of a batch: a task batch's `image`, else a pretraining batch's
    `pair` or `image` stream (docs/interfaces.md sec. 4). None when the batch has no images."""
    if not isinstance(batch, Mapping):
        return None
    img = batch.get("image")
    if isinstance(img, torch.Tensor) and img.ndim == 4:
        return img
    streams = [batch[k] for k in _STREAM_ORDER if isinstance(batch.get(k), Mapping)]
    streams += [v for k, v in batch.items() if k not in _STREAM_ORDER and isinstance(v, Mapping)]
    for sub in streams:
        img = sub.get("image")
        if isinstance(img, torch.Tensor) and img.ndim == 4:
            return img
    return None


class ExpertVisualizationCallback(Callback):
    """Log expert-assignment pictures (a) and the load heat map (c) every N validation steps.

    Args:
        every_n_val_steps: log on every N-th validation batch (counted across epochs, sanity check excluded).
        max_images: images taken from the batch.
        tag: tag prefix (TensorBoard tag, W&B key, MLflow artifact folder, folder of the PNG files).
        log_heads: also log the per-head panels of the first image, one picture per MoE layer.
        log_diversity: also log the distinct-experts-per-patch grid.
        save_dir: also write the PNGs to `save_dir/step{global_step:08d}_val{validation step:06d}/`.
        include_sanity_check: log during Lightning's sanity-check validation too.
    """

    def __init__(
        self,
        every_n_val_steps: int = 50,
        *,
        max_images: int = 4,
        tag: str = "experts",
        log_heads: bool = True,
        log_diversity: bool = False,
        save_dir: str | None = None,
        include_sanity_check: bool = False,
    ) -> None:
        super().__init__()
        if every_n_val_steps < 1:
            raise ValueError(f"ExpertVisualizationCallback: every_n_val_steps must be >= 1, got {every_n_val_steps}")
        if max_images < 1:
            raise ValueError(f"ExpertVisualizationCallback: max_images must be >= 1, got {max_images}")
        self.every_n_val_steps, self.max_images = int(every_n_val_steps), int(max_images)
        self.tag, self.save_dir, self.include_sanity_check = tag, save_dir, include_sanity_check
        self.log_heads, self.log_diversity = log_heads, log_diversity
        self.val_steps = 0
        self.logged: list[int] = []  # global steps at which pictures were logged
        self.deliveries: list[list[str]] = []  # per logging, where the pictures went (send_pictures)

    def state_dict(self) -> dict[str, Any]:
        return {"val_steps": self.val_steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.val_steps = int(state_dict.get("val_steps", 0))

    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if trainer.sanity_checking and not self.include_sanity_check:
            return
        self.val_steps += 1
        if self.val_steps % self.every_n_val_steps:
            return
        self._log(trainer, pl_module, batch)

    def _log(self, trainer: Trainer, pl_module: LightningModule, batch: Any) -> None:
        images = find_images(batch)
        backbone = getattr(pl_module, "backbone", None)
        if images is None or backbone is None:
            return
        images = images[: self.max_images]
        # Every rank runs the forward (an expert-parallel backbone does collective all-to-alls in it);
        # only rank zero draws and logs.
        routed = self.route(backbone, images)
        if not trainer.is_global_zero:
            return
        pictures = self.draw(routed, images, backbone.config)
        if not pictures:
            return
        step = int(trainer.global_step)
        subfolder = f"step{step:08d}_val{self.val_steps:06d}"
        sent = send_pictures(trainer.loggers, pictures, tag=self.tag, step=step, subfolder=subfolder)
        if self.save_dir:
            write_pngs(Path(self.save_dir) / subfolder, pictures)
            sent.append(f"files:{Path(self.save_dir) / subfolder}")
        self.logged.append(step)
        self.deliveries.append(sent)

    @staticmethod
    def route(backbone: torch.nn.Module, images: torch.Tensor) -> RoutedBatch:
        """Run `backbone` on `images` (eval mode, no grad) and split its routing records per modality."""
        was_training = backbone.training
        backbone.eval()
        try:
            with torch.no_grad():
                return forward_routing(backbone, image=images)
        finally:
            backbone.train(was_training)

    def render(self, backbone: torch.nn.Module, images: torch.Tensor) -> dict[str, np.ndarray]:
        """Route and draw: name -> (H, W, 3) uint8 picture."""
        return self.draw(self.route(backbone, images), images, backbone.config)

    def draw(self, routed: RoutedBatch, images: torch.Tensor, cfg: Any) -> dict[str, np.ndarray]:
        """The pictures of one routed batch: name -> (H, W, 3) uint8 (empty if no MoE layer saw the images)."""
        if routed.grid_size is None:
            return {}
        views = [v for v in routed.views if v.vision is not None]
        if not views:
            return {}
        display = to_display(images, cfg.image_mean, cfg.image_std)
        keys = [v.key for v in views]
        firsts = {v.key: patch_grid(v.vision, routed.grid_size) for v in views}
        gates = {v.key: patch_gates(v.vision, routed.grid_size) for v in views}
        num_e = max(v.num_experts for v in views)
        rows = [f"image {i}" for i in range(len(display))]
        pictures: dict[str, np.ndarray] = {}
        maj = [[majority_expert(firsts[k][i], gates[k][i]) for k in keys] for i in range(len(display))]
        fig, _ = draw_map_grid(
            display, maj, row_labels=rows, col_labels=keys, kind="expert", num_classes=num_e,
            title="majority expert per patch",
        )  # fmt: skip
        pictures["majority"] = figure_to_array(fig)
        if self.log_heads:
            for v in views:
                fig, _ = draw_assignment(
                    display[0], firsts[v.key][0], maj[0][keys.index(v.key)], v.num_experts, title=f"{v.key}, image 0"
                )
                pictures[f"heads/{v.key}"] = figure_to_array(fig)
        if self.log_diversity:
            div = [[diversity(firsts[k][i]) for k in keys] for i in range(len(display))]
            fig, _ = draw_map_grid(
                display, div, row_labels=rows, col_labels=keys, kind="diversity",
                num_classes=max(v.num_heads for v in views), title="distinct experts per patch",
            )  # fmt: skip
            pictures["diversity"] = figure_to_array(fig)
        acc = RoutingAccumulator()
        acc.add(routed.views, routed.grid_size)
        fig, _ = draw_load_heatmaps({"validation images": acc.load()}, title=f"expert load over {len(display)} images")
        pictures["load"] = figure_to_array(fig)
        return pictures
