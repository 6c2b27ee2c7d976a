"""Trainer callbacks and plugins the ``mmoe`` CLI installs by default (docs/interfaces.md section 5).

- :class:`PlainProgress`: one plain line per ``every_n_steps`` steps, used when stdout is not a TTY (CI logs, the
  demo's log file), where a rich/tqdm bar would write carriage-return soup.
- :class:`StepTimer`: wall time per optimizer step without data loading (``train/step_time``), the "step time"
  column of the [MH1] Table 1-style comparison. Lightning's ``ThroughputMonitor`` cannot give it: it times from one
  batch end to the next, data loading included.
- :class:`Throughput`: Lightning's ``ThroughputMonitor`` with our batch sizes and the backbone's FLOPs per batch
  (``TaskModule.flops_per_batch``, from ``mmoe.model.flops``): ``train/device/samples_per_sec``,
  ``train/device/flops_per_sec``, ``train/device/mfu`` (where the device's peak is known: Lightning's table of
  GPUs, or ``peak_flops``), the same under ``validate/``; with several devices also the global rates.
- :class:`AtomicCheckpointIO`: Lightning's ``_atomic_save`` writes through an fsspec transaction whose temp file
  lives in the system temp dir and is then ``shutil.move``-d, which is a copy (not atomic) when ``/tmp`` is on
  another file system. This plugin writes through ``mmoe.files`` (a temp file next to the target, renamed).
"""

from __future__ import annotations

import random
import sys
import time
from typing import Any

import numpy as np
import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ThroughputMonitor
from lightning.pytorch.callbacks.progress import ProgressBar
from lightning.pytorch.plugins.io import TorchCheckpointIO

from mmoe.files import atomic_torch_save

__all__ = [
    "PlainProgress",
    "StepTimer",
    "Throughput",
    "AtomicCheckpointIO",
    "RNGState",
    "batch_forwards",
    "batch_size_of",
]


def batch_size_of(batch: Any) -> int:
    """Number of samples in one of our batches (docs/interfaces.md section 4), streams summed for pretraining."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.ndim else 1
    if isinstance(batch, dict):
        if any(k in batch for k in ("image", "text", "labels", "images")):
            for key in ("image", "text", "labels"):
                v = batch.get(key)
                if isinstance(v, torch.Tensor) and v.ndim:
                    return int(v.shape[0])
            if isinstance(batch.get("images"), list | tuple):
                return len(batch["images"])
        return sum(batch_size_of(v) for v in batch.values() if isinstance(v, dict))
    if isinstance(batch, list | tuple) and batch:
        return batch_size_of(batch[0])
    return 0


def batch_forwards(batch: Any) -> list[tuple[int, tuple[int, int] | None, int]]:
    """The backbone forwards one of our batches implies: ``(sequences, (H, W) or None, text length)`` each.

    Per docs/interfaces.md section 4: a task batch's ``image`` and/or ``text`` is one forward (NLVR2's ``image2``
    a second one with the same text), a detection batch's ``images`` one forward per image at its size, and a
    pretraining batch the forwards of its streams.
    """
    if not isinstance(batch, dict):
        return []
    image, text = batch.get("image"), batch.get("text")
    image = image if isinstance(image, torch.Tensor) and image.ndim == 4 else None
    text = text if isinstance(text, torch.Tensor) and text.ndim == 2 else None
    if image is not None or text is not None:
        n = int((image if image is not None else text).shape[0])  # type: ignore[union-attr]
        size = (int(image.shape[-2]), int(image.shape[-1])) if image is not None else None
        length = int(text.shape[1]) if text is not None else 0
        out = [(n, size, length)]
        image2 = batch.get("image2")
        if isinstance(image2, torch.Tensor) and image2.ndim == 4:
            out.append((n, (int(image2.shape[-2]), int(image2.shape[-1])), length))
        return out
    if isinstance(batch.get("images"), list | tuple):
        return [(1, (int(im.shape[-2]), int(im.shape[-1])), 0) for im in batch["images"]]
    return [f for v in batch.values() if isinstance(v, dict) for f in batch_forwards(v)]


class Throughput(ThroughputMonitor):
    """Lightning's ``ThroughputMonitor`` set up for mmoe batches (the ``mmoe`` CLI adds one by default).

    Samples per batch come from :func:`batch_size_of`, FLOPs per batch from the module's ``flops_per_batch``
    (``TaskModule``: the backbone's active FLOPs for the batch's shapes, x3 in training). Rates are rolling
    averages over ``window_size`` batches and appear once that many batches were seen. MFU needs the device's peak
    FLOP/s: Lightning knows many GPUs; where it does not (a CPU, or a GPU name missing from its table) give
    ``peak_flops`` (per device, for the run's precision), otherwise only FLOP/s are logged.
    """

    def __init__(self, window_size: int = 10, peak_flops: float | None = None) -> None:
        if window_size < 2:
            raise ValueError(f"Throughput: window_size={window_size} must be >= 2 (rates need two time points)")
        if peak_flops is not None and not peak_flops > 0:
            raise ValueError(f"Throughput: peak_flops={peak_flops!r} must be > 0 (FLOP/s of one device) or None")
        super().__init__(batch_size_fn=batch_size_of, window_size=window_size)
        self.peak_flops = peak_flops

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.peak_flops is not None:
            self.available_flops = int(self.peak_flops)
            for throughput in self._throughputs.values():
                throughput.available_flops = self.available_flops


class PlainProgress(ProgressBar):
    """Plain-text progress: ``step 20/300  loss 5.123  lr 1.0e-03  0.41 s/step`` every ``every_n_steps`` steps."""

    def __init__(self, every_n_steps: int = 10) -> None:
        super().__init__()
        if every_n_steps < 1:
            raise ValueError(f"PlainProgress: argument every_n_steps={every_n_steps} must be >= 1")
        self.every_n_steps = every_n_steps
        self._enabled = True
        self._t0 = 0.0
        self._last_step = 0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._t0 = time.perf_counter()
        self._last_step = trainer.global_step

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if not self._enabled or not trainer.is_global_zero or step == self._last_step:
            return
        if step % self.every_n_steps and step != trainer.max_steps:
            return
        now = time.perf_counter()
        per_step = (now - self._t0) / max(1, step - self._last_step)
        self._t0, self._last_step = now, step
        metrics = self.get_metrics(trainer, pl_module)
        parts = [f"step {step}" + (f"/{trainer.max_steps}" if trainer.max_steps and trainer.max_steps > 0 else "")]
        for key in ("train/loss", "train/loss_mlm_text", "train/loss_mim_image", "train/aux_loss"):
            if key in metrics:
                parts.append(f"{key.removeprefix('train/')} {float(metrics[key]):.4f}")
        opt = trainer.optimizers[0] if trainer.optimizers else None
        if opt is not None:
            parts.append(f"lr {max(g['lr'] for g in opt.param_groups):.2e}")
        parts.append(f"{per_step:.3f} s/step")
        print("  ".join(parts), file=sys.stdout, flush=True)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._enabled and trainer.is_global_zero and not trainer.sanity_checking:
            metrics = {k: v for k, v in self.get_metrics(trainer, pl_module).items() if str(k).startswith("val")}
            if metrics:
                text = "  ".join(f"{k} {float(v):.4f}" for k, v in sorted(metrics.items()) if _is_number(v))
                print(f"validation at step {trainer.global_step}: {text}", flush=True)


def _is_number(v: Any) -> bool:
    try:
        float(v)
    except (TypeError, ValueError):
        return False
    return True


class StepTimer(Callback):
    """Logs ``train/step_time``: seconds per optimizer step, wall clock, without data loading.

    Timing starts at batch start and ends at batch end, so data loading between batches is excluded: this is the
    model's step time. The first ``skip`` steps (warm-up, allocator growth) are not logged. Samples and FLOPs per
    second come from :class:`Throughput` (Lightning's ``ThroughputMonitor``), which times data loading too.
    """

    def __init__(self, skip: int = 1) -> None:
        super().__init__()
        self.skip = skip
        self._start = 0.0

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step <= self.skip:
            return
        dt = time.perf_counter() - self._start
        pl_module.log("train/step_time", dt, on_step=True, on_epoch=False, batch_size=1, rank_zero_only=True)


class RNGState(Callback):
    """Saves the Python, NumPy and torch (CPU, and CUDA when used) RNG states in checkpoints and restores them.

    Lightning restores the model, optimizer, schedule, loops and the data module's ``state_dict`` but not the global
    random generators, which the model side draws from (dropout, drop-path, Mixup, router noise). Our loaders keep
    the data side off them (per-sample seeds and private worker-seed generators, ``mmoe.data.resume``), so the
    states saved at a checkpoint are exactly the ones the next training step would have used, and
    ``--ckpt_path last`` reproduces the uninterrupted losses, also from the middle of an epoch
    (tests/test_train_cli.py, tests/test_resume_kill.py). States are stored as tensors and ints, so checkpoints
    still load with ``torch.load(weights_only=True)``.
    """

    def state_dict(self) -> dict[str, Any]:
        np_state = np.random.get_state()
        state: dict[str, Any] = {
            "python": _to_plain(random.getstate()),
            "numpy": {
                "kind": str(np_state[0]),
                "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
                "pos": int(np_state[2]),
                "has_gauss": int(np_state[3]),
                "cached_gaussian": float(np_state[4]),
            },
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        version, internal, gauss = state_dict["python"]
        random.setstate((version, tuple(internal), gauss))
        n = state_dict["numpy"]
        np.random.set_state(
            (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
        )
        torch.set_rng_state(state_dict["torch"])
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])


def _to_plain(obj: Any) -> Any:
    """Tuples of ints/floats/None as nested lists/tuples that ``weights_only`` unpickling accepts."""
    if isinstance(obj, tuple):
        return tuple(_to_plain(x) for x in obj)
    return obj


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` through ``mmoe.files.atomic_torch_save``: a temporary file in the target directory
    (``.<name>.<random>.tmp``), fsync, then ``os.replace`` (atomic on POSIX).

    A crash mid-write leaves the previous checkpoint intact and at most a stray temp file, never a truncated
    ``last.ckpt`` that a later ``--ckpt_path last`` would fail on.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(
                f"AtomicCheckpointIO.save_checkpoint: storage_options={storage_options!r} is not supported; "
                "pass None or use Lightning's default CheckpointIO"
            )
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path: _PATH, map_location: Any | None = None, weights_only: bool | None = None) -> Any:
        """Load with ``torch.load(weights_only=True)`` unless the caller asks otherwise (our checkpoints hold only
        tensors, containers and primitives)."""
        return super().load_checkpoint(
            path, map_location=map_location, weights_only=True if weights_only is None else weights_only
        )
