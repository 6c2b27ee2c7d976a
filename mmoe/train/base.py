"""The plumbing every mmoe LightningModule shares: backbone, optimizer, checkpoint keys, DDP gather.

A task module subclasses :class:`TaskModule` and keeps only its heads, steps and metric. The base holds:

- the backbone, built by the one builder ``mmoe.model.create_model`` from ``backbone`` (a registered name or a
  model YAML; ``None`` rebuilds the configuration of ``init_from``), ``backbone_overrides`` and ``init_from``
  (an mmoe model file, a ``save_pretrained`` folder or one of our Lightning checkpoints; position tables
  resampled, the text branch of a full checkpoint skipped by name in a vision-only backbone):
  :meth:`TaskModule.init_backbone`;
- ``optim`` as an :class:`mmoe.train.optim.OptimConfig` (each task its own default), stored in the
  hyper-parameters as a plain dict so checkpoints load with ``torch.load(weights_only=True)``, and
  ``configure_optimizers`` (AdamW, layer decay, head lr multiplier, warm-up + cosine per step);
- the checkpoint keys of docs/interfaces.md section 7: ``mmoe_config`` (``mmoe.model.load_model`` rebuilds the
  backbone from the checkpoint alone); on load, the text tensors a vision-only backbone has no place for are
  dropped (checkpoints written when vision tasks still built the full backbone);
- ``load_from_checkpoint`` that also reads checkpoints written under the old class paths
  (:mod:`mmoe.train.compat`);
- ``flops_per_batch``, what Lightning's ``ThroughputMonitor`` (``mmoe.train.callbacks.Throughput``) reads for
  FLOP/s and MFU: the backbone's active FLOPs for the shapes of the batch in flight (``mmoe.model.flops``), three
  times the forward in training (backward = 2x forward); task heads are not counted;
- :func:`gather_objects`, the one DDP object gather (per-rank result rows to every rank).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.utilities import GradClipAlgorithmType, rank_zero_warn

from mmoe.model import create_model
from mmoe.model.config import MultiwayConfig
from mmoe.model.flops import forward_flops
from mmoe.model.io import drop_text_branch, load_checkpoint_file, parse_checkpoint
from mmoe.train.callbacks import batch_forwards
from mmoe.train.compat import migrated_checkpoint_file
from mmoe.train.optim import OptimConfig, configure_optimizers

__all__ = ["TaskModule", "gather_objects"]


def gather_objects(rows: list[Any]) -> list[Any]:
    """Concatenate a per-rank list over all ranks, in rank order (the list itself without torch.distributed)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return rows
    parts: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, list(rows))
    return [x for part in parts for x in part]


class TaskModule(LightningModule):
    """Base of the mmoe LightningModules (see the module docstring).

    Args:
        optim: optimizer/schedule (an ``OptimConfig`` or its fields as a dict); ``None`` takes ``default_optim``.
        default_optim: the task's default ``OptimConfig`` (not a hyper-parameter).
        hparams_ignore: constructor arguments of the subclass to leave out of the hyper-parameters.
    """

    def __init__(
        self,
        *,
        optim: OptimConfig | Mapping[str, Any] | None = None,
        default_optim: OptimConfig | None = None,
        hparams_ignore: tuple[str, ...] = (),
    ) -> None:
        super().__init__()
        if isinstance(optim, Mapping):
            optim = OptimConfig(**optim)
        self.optim: OptimConfig = optim if optim is not None else (default_optim or OptimConfig())
        # The subclass's constructor arguments (Lightning reads them from the calling frames); under LightningCLI
        # the parsed config with its "_class_path", so that `--ckpt_path` can re-parse it.
        self.save_hyperparameters(ignore=["optim", "default_optim", "hparams_ignore", *hparams_ignore])
        self.hparams["optim"] = dataclasses.asdict(self.optim)  # plain dict: weights_only=True loads it
        self._batch_flops: int | None = None

    def init_backbone(
        self,
        backbone: str | None,
        overrides: Mapping[str, Any] | None,
        init_from: str | None,
        *,
        vision_only: bool = False,
        fine_tune: bool = True,
    ) -> Mapping[str, Any] | None:
        """Build ``self.backbone`` with ``mmoe.model.create_model``; returns the ``init_from`` checkpoint (or None).

        ``vision_only`` builds no text branch (``modalities: [vision]`` unless ``overrides`` sets it): its
        parameters would never get a gradient, which plain DDP refuses. ``fine_tune`` freezes the mask token,
        which only masked image modeling uses ([B3] sec. 2.2), for the same reason. The returned checkpoint
        lets a task read its other weights (e.g. a head) without reading the file twice.
        """
        kwargs = dict(overrides or {})
        if vision_only:
            kwargs.setdefault("modalities", ["vision"])
        name = type(self).__name__
        if backbone is None and init_from is None:
            raise ValueError(f"{name}: backbone=None needs init_from (a checkpoint to rebuild it from)")
        ckpt = load_checkpoint_file(init_from) if init_from else None
        if ckpt is not None:
            parse_checkpoint(ckpt, init_from)  # a file that is not ours is refused here, naming it
        self.backbone = create_model(backbone, init_from=ckpt, **kwargs)
        if fine_tune:
            self.backbone.freeze_mask_token_()
        return ckpt

    # ------------------------------------------------------------------ FLOPs (Lightning's ThroughputMonitor)
    def batch_flops(self, batch: Any, *, training: bool) -> int | None:
        """Active backbone FLOPs of `batch` (its forwards per ``batch_forwards``), x3 when `training`."""
        backbone = getattr(self, "backbone", None)
        if backbone is None:
            return None
        flops = sum(
            forward_flops(backbone.config, batch=n, image_size=size, text_len=length)
            for n, size, length in batch_forwards(batch)
        )
        return 3 * flops if training else flops

    @property
    def flops_per_batch(self) -> int | None:
        """FLOPs of the batch in flight (set at each batch start); None before the first batch."""
        return self._batch_flops

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._batch_flops = self.batch_flops(batch, training=True)

    def on_validation_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._batch_flops = self.batch_flops(batch, training=False)

    def on_test_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._batch_flops = self.batch_flops(batch, training=False)

    def on_predict_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._batch_flops = self.batch_flops(batch, training=False)

    # ------------------------------------------------------------------ optimizer, checkpoints
    def configure_optimizers(self) -> dict[str, Any]:
        return configure_optimizers(self, self.optim)

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Lightning's clipping, except that ``bf16-mixed`` may clip the gradients of a fused AdamW.

        Why: Lightning's mixed-precision plugin refuses to clip for any optimizer that unscales gradients itself
        (fused AdamW), a guard that matters for fp16's loss scaler only. bf16 autocast has no scaler, so the
        gradients are already the true ones and the plain clipping applies; the base recipes run bf16-mixed with
        ``optim.fused`` (docs/results/moe_cpu_model.md). With a scaler (fp16) Lightning's own path, and its
        error, stay.
        """
        plugin = self.trainer.precision_plugin
        if gradient_clip_val and isinstance(plugin, MixedPrecision) and plugin.scaler is None:
            algorithm = GradClipAlgorithmType((gradient_clip_algorithm or "norm").lower())
            Precision.clip_gradients(plugin, optimizer, float(gradient_clip_val), algorithm)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # docs/interfaces.md section 7: lets mmoe.model.load_model rebuild the backbone from this checkpoint.
        checkpoint["mmoe_config"] = self.backbone.config.to_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The backbone the checkpoint was written with wins over what its hyperparameters name today: a named
        # size may have changed since (e.g. the tiny models' conv stem), and the full config is in the file.
        saved = checkpoint.get("mmoe_config")
        backbone = getattr(self, "backbone", None)
        if isinstance(saved, dict) and isinstance(backbone, torch.nn.Module) and hasattr(backbone, "config"):
            config = MultiwayConfig.from_dict(dict(saved), source="checkpoint mmoe_config")
            if config.to_dict() != backbone.config.to_dict():
                frozen_mask = not backbone.vision_embed.mask_token.requires_grad
                rank_zero_warn(
                    f"{type(self).__name__}: the checkpoint's backbone config differs from the one its arguments "
                    "build today; rebuilding the backbone from the checkpoint's mmoe_config"
                )
                self.backbone = create_model(config)
                if frozen_mask:
                    self.backbone.freeze_mask_token_()
        # A vision-only backbone restored from a checkpoint written with the full backbone: its text tensors
        # have no place here (for a backbone with a text branch nothing is dropped).
        if isinstance(checkpoint.get("state_dict"), dict):
            checkpoint["state_dict"], _ = drop_text_branch(self.backbone, checkpoint["state_dict"], prefix="backbone.")

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        """Lightning's ``load_from_checkpoint``; a checkpoint naming an old class path is mapped first."""
        return super().load_from_checkpoint(migrated_checkpoint_file(checkpoint_path), *args, **kwargs)
