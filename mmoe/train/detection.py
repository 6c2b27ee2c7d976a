"""Object detection and instance segmentation: Mask R-CNN / Faster R-CNN on the Multiway Transformer.

[MH1]'s pure-vision experiments (COCO box / mask AP for Dense vs SMoE vs MH-MoE) with a ViTDet simple feature
pyramid: :class:`DetectionTask` is the backbone + ViTDet heads (``mmoe.model.detection``), layer-wise lr decay
through ``mmoe.train.optim``, COCOeval bbox (and segm) AP on the validation set (``mmoe.metrics.detection``), with
the official-format results written to the run folder so ``python -m mmoe.metrics.detection`` can re-score them.
Its data module is ``mmoe.train.data.coco_detection.CocoDetectionDataModule`` (batches
``{"images": [...], "targets": [...]}``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mmoe.files import atomic_write_json
from mmoe.metrics.detection import evaluate_coco, to_coco_results
from mmoe.model.detection import heads_for_backbone
from mmoe.train.base import TaskModule, gather_objects
from mmoe.train.optim import OptimConfig

__all__ = ["DetectionTask"]


class DetectionTask(TaskModule):
    """Mask R-CNN / Faster R-CNN on the Multiway Transformer with a ViTDet simple feature pyramid (module docstring).

    Args:
        backbone, backbone_overrides, init_from: docs/interfaces.md section 7 (e.g. ``drop_path: 0.1``).
        num_classes: object classes + background (COCO: 81); must equal the data module's ``num_classes``.
        with_masks: Mask R-CNN (True) or Faster R-CNN (False).
        min_size, max_size, anchor_sizes, out_channels, box_head_dim, mask_head_channels,
            box_detections_per_img, box_score_thresh: :class:`mmoe.model.detection.ViTDetHeads`.
        detector_overrides: any other ``ViTDetHeads`` keyword (``rpn_*``, ``aspect_ratios``, ...).
        optim: AdamW + warm-up/cosine (``mmoe.train.optim.OptimConfig``); ``layer_decay`` applies to the
            backbone, the pyramid and heads train at ``lr * head_lr_mult``.
        results_dir: where validation results JSON go (default: the logger's folder).

    Logged: ``train/loss`` (sum of torchvision's losses + MoE aux), ``train/loss_*`` per term,
    ``val/bbox_{AP,AP50,AP75,APs,APm,APl}`` and ``val/segm_*`` with masks.
    """

    def __init__(
        self,
        *,
        backbone: str = "tiny_mhmoe",
        backbone_overrides: dict[str, Any] | None = None,
        init_from: str | None = None,
        num_classes: int = 81,
        with_masks: bool = True,
        min_size: int = 1024,
        max_size: int = 1024,
        anchor_sizes: Sequence[int] = (32, 64, 128, 256, 512),
        out_channels: int = 256,
        box_head_dim: int = 1024,
        mask_head_channels: int = 256,
        box_detections_per_img: int = 100,
        box_score_thresh: float = 0.05,
        detector_overrides: dict[str, Any] | None = None,
        optim: OptimConfig | dict[str, Any] | None = None,
        results_dir: str | None = None,
    ) -> None:
        super().__init__(
            optim=optim,
            default_optim=OptimConfig(lr=1e-4, weight_decay=0.1, betas=(0.9, 0.999), eps=1e-8, layer_decay=0.7),
        )
        # Detection reads images only: no text branch, and the MIM mask token is frozen (init_backbone), so
        # every trainable parameter gets a gradient and plain DDP (no unused-parameter search) works.
        self.init_backbone(backbone, backbone_overrides, init_from, vision_only=True)
        self.detector = heads_for_backbone(
            self.backbone,
            num_classes=num_classes,
            with_masks=with_masks,
            out_channels=out_channels,
            min_size=min_size,
            max_size=max_size,
            anchor_sizes=tuple(anchor_sizes),
            box_head_dim=box_head_dim,
            mask_head_channels=mask_head_channels,
            box_detections_per_img=box_detections_per_img,
            box_score_thresh=box_score_thresh,
            **(detector_overrides or {}),
        )
        self.num_classes = num_classes
        self.with_masks = with_masks
        self.results_dir = results_dir
        self._results: list[dict[str, Any]] = []
        self._seen_ids: list[int] = []

    # --------------------------------------------------------------------------------------------- plumbing
    def forward(
        self, images: Sequence[Tensor], targets: Sequence[dict[str, Tensor]] | None = None
    ) -> tuple[dict[str, Tensor], list[dict[str, Tensor]]]:
        return self.detector(self.backbone, images, targets)

    def _datamodule(self) -> Any:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is None or not hasattr(dm, "category_map") or not hasattr(dm, "val_annotations"):
            raise RuntimeError(
                "DetectionTask: evaluation needs a data module with 'category_map' and 'val_annotations' "
                "(e.g. mmoe.train.data.coco_detection.CocoDetectionDataModule)"
            )
        return dm

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "num_classes") and dm.num_classes != self.num_classes:
            raise ValueError(
                f"DetectionTask: model.num_classes={self.num_classes} but the data's annotation file has "
                f"{dm.num_classes - 1} categories (+ background = {dm.num_classes}); set model.init_args.num_classes"
            )

    # --------------------------------------------------------------------------------------------- steps
    @staticmethod
    def _targets(targets: Sequence[dict[str, Any]], with_masks: bool) -> list[dict[str, Tensor]]:
        keys = ("boxes", "labels", "masks") if with_masks else ("boxes", "labels")
        return [{k: t[k] for k in keys} for t in targets]

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        images = batch["images"]
        losses, _ = self(images, self._targets(batch["targets"], self.with_masks))
        loss = torch.stack(list(losses.values())).sum()
        bs = len(images)
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        for name, value in losses.items():
            self.log(f"train/{name}", value, batch_size=bs)
        return loss

    def on_validation_epoch_start(self) -> None:
        self._results, self._seen_ids = [], []

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        to_coco = self._datamodule().category_map.to_coco
        _, detections = self(batch["images"])
        for det, tgt in zip(detections, batch["targets"]):
            image_id = int(tgt["image_id"])
            self._seen_ids.append(image_id)
            self._results.extend(to_coco_results(det, image_id, to_coco, with_masks=self.with_masks))

    def on_validation_epoch_end(self) -> None:
        results, seen = gather_objects(self._results), gather_objects(self._seen_ids)
        metrics = self.evaluate(results, sorted(set(seen)))
        prefix = "test" if self.trainer.testing else "val"
        for name, value in metrics.items():
            self.log(f"{prefix}/{name}", value, sync_dist=False)
        self._results, self._seen_ids = [], []

    def evaluate(self, results: list[dict[str, Any]], image_ids: Sequence[int]) -> dict[str, float]:
        """COCOeval bbox (+ segm) on ``image_ids``; writes the results JSON next to the logs on rank 0."""
        dm = self._datamodule()
        out: dict[str, float] = {}
        iou_types = ("bbox", "segm") if self.with_masks else ("bbox",)
        for iou in iou_types:
            stats = evaluate_coco(dm.val_annotations, results, iou, image_ids=image_ids)
            out.update({f"{iou}_{k}": v for k, v in stats.items() if not k.startswith("AR")})
        if self.trainer.is_global_zero and not self.trainer.sanity_checking:
            folder = self.results_dir or (self.logger.log_dir if self.logger is not None else None)
            if folder:
                atomic_write_json(Path(folder) / f"coco_results_step{self.global_step:07d}.json", results, indent=None)
        return out

    def on_test_epoch_start(self) -> None:
        self.on_validation_epoch_start()

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def on_test_epoch_end(self) -> None:
        self.on_validation_epoch_end()
