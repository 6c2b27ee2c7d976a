"""Lightning side of the vision tasks: ImageNet data, COCO detection data, and the detection task.

SPEC.md section 7 (ImageNet; COCO detection), [MH1]'s pure-vision experiments (ImageNet-1k top-1, COCO box /
mask AP for Dense vs SMoE vs MH-MoE):

- :class:`ImageNetDataModule`: ImageFolder splits with timm's training transform (RandAugment, random
  erasing 0.25), batches ``{"image", "labels"}``. The model side is the generic
  ``mmoe.train.tasks.ClassificationTask`` with a ``mean_patch`` head, which applies timm Mixup 0.8 / CutMix 1.0
  with label smoothing 0.1 to training batches and reports top-1/top-5 (configs/finetune/imagenet.yaml).
- :class:`CocoDetectionDataModule`: COCO instance JSON through torchvision's ``CocoDetection`` + transforms v2
  (``mmoe.data.coco``), batches ``{"images": [...], "targets": [...]}``.
- :class:`DetectionTask`: backbone + ViTDet heads (``mmoe.model.detection``), layer-wise lr decay through
  ``mmoe.train.optim``, COCOeval bbox (and segm) AP on the validation set (``mmoe.metrics.detection``), with the
  official-format results written to the run folder so ``python -m mmoe.metrics.detection`` can re-score them.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch import LightningDataModule, LightningModule
from torch import Tensor
from torch.utils.data import DataLoader

from mmoe.data.coco import CategoryMap, CocoInstances, detection_collate, detection_transforms
from mmoe.data.imagenet import RANDAUGMENT, ImageNetFolder, classification_collate, imagenet_transform
from mmoe.data.resume import ResumableTrainData
from mmoe.data.transforms import BEIT3_MEAN, BEIT3_STD
from mmoe.metrics.detection import evaluate_coco, to_coco_results
from mmoe.model import create_model
from mmoe.model.detection import heads_for_backbone
from mmoe.model.io import drop_text_branch, load_backbone_weights, read_checkpoint
from mmoe.train.optim import OptimConfig, configure_optimizers

__all__ = ["ImageNetDataModule", "CocoDetectionDataModule", "DetectionTask", "build_backbone"]


# ================================================================================================ ImageNet
class ImageNetDataModule(ResumableTrainData, LightningDataModule):
    """ImageNet-1k (or any ImageFolder, e.g. the synthetic shapes world) for ``ClassificationTask``.

    Args:
        train_dir, val_dir: ImageFolder roots (``{class}/*.JPEG``); the label order is ``train_dir``'s sorted
            folder names and ``val_dir`` must use the same names.
        image_size: crop size; ``mean``/``std`` must be the backbone's normalization (BEiT-3: 0.5/0.5).
        auto_augment, re_prob, color_jitter, hflip, scale, crop_pct: see ``mmoe.data.imagenet.imagenet_transform``.
        batch_size: per device; keep it even when the task uses Mixup (timm mixes a batch with its flip).
        seed: training order (a permutation per (seed, epoch)) and per-sample augmentation seeds (exact resume).

    Batches are ``{"image", "labels"}`` with integer labels; Mixup/CutMix and label smoothing belong to
    ``ClassificationTask`` (``mixup`` / ``label_smoothing``), which mixes training batches on the device.
    """

    def __init__(
        self,
        *,
        train_dir: str,
        val_dir: str,
        image_size: int = 224,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 8,
        mean: Sequence[float] = BEIT3_MEAN,
        std: Sequence[float] = BEIT3_STD,
        auto_augment: str | None = RANDAUGMENT,
        re_prob: float = 0.25,
        color_jitter: float | None = 0.4,
        hflip: float = 0.5,
        scale: Sequence[float] = (0.08, 1.0),
        crop_pct: float = 0.875,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.seed = int(seed)
        self.train_dir, self.val_dir = str(train_dir), str(val_dir)
        self.image_size = image_size
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.train_transform = imagenet_transform(
            True,
            image_size=image_size,
            mean=mean,
            std=std,
            auto_augment=auto_augment,
            re_prob=re_prob,
            color_jitter=color_jitter,
            hflip=hflip,
            scale=scale,
        )
        self.eval_transform = imagenet_transform(False, image_size=image_size, mean=mean, std=std, crop_pct=crop_pct)
        self.train_set: ImageNetFolder | None = None
        self.val_set: ImageNetFolder | None = None

    def _train_classes(self) -> list[str]:
        root = Path(self.train_dir)
        if not root.is_dir():
            raise FileNotFoundError(f"ImageNetDataModule: train_dir {root} is not a folder")
        return sorted(p.name for p in root.iterdir() if p.is_dir())

    @property
    def classes(self) -> list[str]:
        return self.train_set.classes if self.train_set is not None else self._train_classes()

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def setup(self, stage: str | None = None) -> None:
        classes = self._train_classes()
        if stage in (None, "fit"):
            self.train_set = ImageNetFolder(self.train_dir, transform=self.train_transform, classes=classes)
        self.val_set = ImageNetFolder(self.val_dir, transform=self.eval_transform, classes=classes)

    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            self.setup("fit")
        # equal-size batches (timm Mixup needs an even count); order from (seed, epoch), per-sample augmentation
        # seeds and the position within the epoch kept in checkpoints (mmoe.data.resume)
        return self.resumable_train_loader(
            self.train_set,
            batch_size=self.batch_size,
            collate_fn=classification_collate,
            num_workers=self.num_workers,
            seed=self.seed,
            drop_last=True,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        if self.val_set is None:
            self.setup("validate")
        return DataLoader(
            self.val_set,
            batch_size=self.eval_batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=classification_collate,
            generator=torch.Generator().manual_seed(0),  # worker seeds without drawing from the global RNG
        )

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()


# ================================================================================================ COCO
class CocoDetectionDataModule(ResumableTrainData, LightningDataModule):
    """COCO instances (or the shapes world's) for :class:`DetectionTask`.

    Args:
        train_images, train_annotations, val_images, val_annotations: image folders and instances JSON files.
        with_masks: decode masks (Mask R-CNN); False for Faster R-CNN.
        hflip: horizontal-flip probability for training.
        lsj_size, scale_range: large-scale jitter to a square canvas (ViTDet: 1024, (0.1, 2.0)); None = off.
        max_val_images: evaluate on the first N validation images only (quick checks).
        seed: training order and per-sample augmentation seeds (exact mid-epoch resume, ``mmoe.data.resume``).
    """

    def __init__(
        self,
        *,
        train_images: str,
        train_annotations: str,
        val_images: str,
        val_annotations: str,
        batch_size: int = 2,
        eval_batch_size: int | None = None,
        num_workers: int = 4,
        with_masks: bool = True,
        hflip: float = 0.5,
        lsj_size: int | None = None,
        scale_range: Sequence[float] = (0.1, 2.0),
        max_val_images: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.seed = int(seed)
        self.train_images, self.train_annotations = str(train_images), str(train_annotations)
        self.val_images, self.val_annotations = str(val_images), str(val_annotations)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.with_masks = with_masks
        self.hflip, self.lsj_size, self.scale_range = hflip, lsj_size, tuple(scale_range)
        self.max_val_images = max_val_images
        self.train_set: CocoInstances | None = None
        self.val_set: CocoInstances | torch.utils.data.Subset | None = None
        self._category_map: CategoryMap | None = None

    @property
    def category_map(self) -> CategoryMap:
        """Built from the training file (the label space the model learns); val must share its categories."""
        if self._category_map is None:
            self._category_map = CategoryMap.from_file(self.train_annotations)
        return self._category_map

    @property
    def num_classes(self) -> int:
        return self.category_map.num_classes

    def setup(self, stage: str | None = None) -> None:
        cmap = self.category_map
        val_map = CategoryMap.from_file(self.val_annotations)
        if val_map.coco_ids != cmap.coco_ids:
            raise ValueError(
                f"CocoDetectionDataModule: val_annotations {self.val_annotations} has categories {val_map.coco_ids}, "
                f"train_annotations has {cmap.coco_ids}; they must match"
            )
        if stage in (None, "fit") and self.train_set is None:
            tf = detection_transforms(True, hflip=self.hflip, lsj_size=self.lsj_size, scale_range=self.scale_range)
            self.train_set = CocoInstances(
                self.train_images,
                self.train_annotations,
                transforms=tf,
                with_masks=self.with_masks,
                remove_empty=True,
                category_map=cmap,
            )
        if self.val_set is None:
            val = CocoInstances(self.val_images, self.val_annotations, with_masks=self.with_masks, category_map=cmap)
            if self.max_val_images is not None:
                val = torch.utils.data.Subset(val, range(min(self.max_val_images, len(val))))
            self.val_set = val

    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            self.setup("fit")
        return self.resumable_train_loader(  # resumable mid-epoch (mmoe.data.resume)
            self.train_set,
            batch_size=self.batch_size,
            collate_fn=detection_collate,
            num_workers=self.num_workers,
            seed=self.seed,
            drop_last=True,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        if self.val_set is None:
            self.setup("validate")
        return DataLoader(
            self.val_set,
            batch_size=self.eval_batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=detection_collate,
            generator=torch.Generator().manual_seed(0),  # worker seeds without drawing from the global RNG
        )

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()


# ================================================================================================ detection task
def build_backbone(
    backbone: str, overrides: dict[str, Any] | None, init_from: str | None, *, vision_only: bool = False
) -> torch.nn.Module:
    """Create the backbone by name/YAML and optionally load weights (mmoe model file or our Lightning checkpoint).

    Position tables are resampled by ``load_backbone_weights``; missing/unexpected keys raise, naming them.
    ``vision_only`` builds no text branch (``MultiwayConfig.modalities``, unless ``overrides`` sets it): a full
    checkpoint then loads with its text tensors skipped by name (their number is logged).
    """
    overrides = dict(overrides or {})
    if vision_only:
        overrides.setdefault("modalities", ["vision"])
    model = create_model(backbone, **overrides)
    if init_from:
        _, state = read_checkpoint(init_from)
        load_backbone_weights(model, state, strict=True)
    return model


class DetectionTask(LightningModule):
    """Mask R-CNN / Faster R-CNN on the Multiway Transformer with a ViTDet simple feature pyramid (SPEC.md 7).

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
        super().__init__()
        if isinstance(optim, dict):
            optim = OptimConfig(**optim)
        self.optim = optim or OptimConfig(lr=1e-4, weight_decay=0.1, betas=(0.9, 0.999), eps=1e-8, layer_decay=0.7)
        self.save_hyperparameters(ignore=["optim"])
        self.hparams["optim"] = dataclasses.asdict(self.optim)  # plain dict: checkpoints load with weights_only=True
        # Detection reads images only: no text branch, and the MIM mask token is frozen, so every trainable
        # parameter gets a gradient and plain DDP (no unused-parameter search) works.
        self.backbone = build_backbone(backbone, backbone_overrides, init_from, vision_only=True)
        self.backbone.freeze_mask_token_()
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
                "(e.g. mmoe.train.vision.CocoDetectionDataModule)"
            )
        return dm

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "num_classes") and dm.num_classes != self.num_classes:
            raise ValueError(
                f"DetectionTask: model.num_classes={self.num_classes} but the data's annotation file has "
                f"{dm.num_classes - 1} categories (+ background = {dm.num_classes}); set model.init_args.num_classes"
            )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["mmoe_config"] = dataclasses.asdict(self.backbone.config)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Checkpoints written when detection still built the full backbone carry text tensors it has no place for.
        if isinstance(checkpoint.get("state_dict"), dict):
            checkpoint["state_dict"], _ = drop_text_branch(self.backbone, checkpoint["state_dict"], prefix="backbone.")

    def configure_optimizers(self) -> dict[str, Any]:
        return configure_optimizers(self, self.optim)

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
        results, seen = self._results, self._seen_ids
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, (results, seen))
            results = [r for part, _ in gathered for r in part]
            seen = [i for _, part in gathered for i in part]
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
                path = Path(folder) / f"coco_results_step{self.global_step:07d}.json"
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(path.name + ".tmp")
                tmp.write_text(json.dumps(results))
                os.replace(tmp, path)
        return out

    def on_test_epoch_start(self) -> None:
        self.on_validation_epoch_start()

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def on_test_epoch_end(self) -> None:
        self.on_validation_epoch_end()
