"""Old ``class_path``s and data-module argument names, for checkpoints and run configs written before the move.

``mmoe.train`` once kept several tasks per file (``tasks.py``, ``vision.py``, ``datamodule.py``,
``task_data.py``) and its data modules named the same things differently (``train_dir``, ``train_image_root``,
``mean``, a list of ``VQAFiles`` per split). Now every task module and every dataset's data module has a file
named after it, and the data modules share one vocabulary (docs/interfaces.md section 5). A Lightning
checkpoint stores the ``class_path`` of its module (``hyper_parameters["_class_path"]``) and a run's
``config.yaml`` stores both class paths and every argument, so both would stop loading. This module maps them:

- :data:`CLASS_PATHS`: old class path -> new class path;
- :data:`ARG_RENAMES` and :func:`migrate_init_args`: the argument renames of a data module that moved;
- :func:`migrate_config` (a CLI config, any nesting, ``class_path`` + ``init_args``), :func:`migrate_hparams`
  (the flat hyper-parameters of a checkpoint, ``_class_path`` + arguments) and :func:`migrate_checkpoint`.

The ``mmoe`` CLI applies them to ``--config`` files, to ``--model``/``--data`` class paths and to the
hyper-parameters read from ``--ckpt_path``; ``load_from_checkpoint`` of our modules applies them too. The
``mmoe-migrate`` command rewrites files for good (:func:`main`). Nothing here imports Lightning or a task
module, so the table stays cheap to import.
"""

from __future__ import annotations

import argparse
import copy
import io
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

from mmoe.files import atomic_torch_save, atomic_write_text

__all__ = [
    "ARG_RENAMES",
    "CLASS_PATHS",
    "main",
    "migrate_checkpoint",
    "migrate_class_path",
    "migrate_config",
    "migrate_hparams",
    "migrate_init_args",
    "migrated_checkpoint_file",
]

_VQA = "mmoe.train.task_data.VQADataModule"

#: Old class path -> new class path (the move to one file per task module and per dataset).
CLASS_PATHS: dict[str, str] = {
    "mmoe.train.pretrain.MaskedPretraining": "mmoe.train.pretraining.MaskedPretraining",
    "mmoe.train.tasks.ClassificationTask": "mmoe.train.classification.ClassificationTask",
    "mmoe.train.vision.DetectionTask": "mmoe.train.detection.DetectionTask",
    "mmoe.train.datamodule.PretrainDataModule": "mmoe.train.data.pretraining.PretrainDataModule",
    _VQA: "mmoe.train.data.vqav2.VQADataModule",
    "mmoe.train.task_data.NLVR2DataModule": "mmoe.train.data.nlvr2.NLVR2DataModule",
    "mmoe.train.captioning.CaptioningDataModule": "mmoe.train.data.coco_captioning.CaptioningDataModule",
    "mmoe.train.vision.ImageNetDataModule": "mmoe.train.data.imagenet.ImageNetDataModule",
    "mmoe.train.vision.CocoDetectionDataModule": "mmoe.train.data.coco_detection.CocoDetectionDataModule",
}

_MEAN_STD = {"mean": "image_mean", "std": "image_std"}
_STAGES = ("train", "val", "test", "predict")

#: Old class path -> {old argument: new argument} of the data modules whose arguments were renamed with the move.
ARG_RENAMES: dict[str, dict[str, str]] = {
    "mmoe.train.datamodule.PretrainDataModule": {**_MEAN_STD, "crop_scale": "train_scale"},
    "mmoe.train.task_data.NLVR2DataModule": {f"{s}_image_root": f"{s}_images" for s in _STAGES},
    "mmoe.train.captioning.CaptioningDataModule": dict(_MEAN_STD),
    "mmoe.train.vision.ImageNetDataModule": {
        **_MEAN_STD,
        "train_dir": "train_images",
        "val_dir": "val_images",
        "scale": "train_scale",
    },
}


def _vqa_files(args: dict[str, Any]) -> dict[str, Any]:
    """``train: [{questions, annotations, image_dir}, ...]`` -> ``train_questions/annotations/images`` lists."""
    out = {k: v for k, v in args.items() if k not in _STAGES}
    for stage in _STAGES:
        files = args.get(stage)
        if files is None:
            continue
        files = [files] if isinstance(files, Mapping) else list(files)
        out[f"{stage}_questions"] = [f["questions"] for f in files]
        out[f"{stage}_annotations"] = [f.get("annotations") for f in files]
        out[f"{stage}_images"] = [f.get("image_dir", "") for f in files]
    return out


_ARG_FUNCS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {_VQA: _vqa_files}


def migrate_class_path(class_path: str) -> str:
    """The current class path of ``class_path`` (itself when it did not move)."""
    return CLASS_PATHS.get(class_path, class_path)


def migrate_init_args(old_class_path: str, args: Mapping[str, Any]) -> dict[str, Any]:
    """The constructor arguments of ``old_class_path`` in the current vocabulary (a new dict)."""
    out = dict(args)
    if old_class_path in _ARG_FUNCS:
        out = _ARG_FUNCS[old_class_path](out)
    for old, new in ARG_RENAMES.get(old_class_path, {}).items():
        if old in out:
            out[new] = out.pop(old)
    return out


def migrate_config(config: Any) -> Any:
    """A CLI config (``class_path`` + ``init_args`` nodes at any depth) with old class paths mapped; a new object."""
    if isinstance(config, list):
        return [migrate_config(v) for v in config]
    if not isinstance(config, Mapping):
        return config
    out = {k: migrate_config(v) for k, v in config.items()}
    old = out.get("class_path")
    if isinstance(old, str) and old in CLASS_PATHS:
        out["class_path"] = CLASS_PATHS[old]
        for key in ("init_args", "dict_kwargs"):
            if isinstance(out.get(key), Mapping):
                out[key] = migrate_init_args(old, out[key])
    return out


def migrate_hparams(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """Flat checkpoint hyper-parameters (``_class_path`` and the arguments) with an old class path mapped."""
    out = dict(hparams)
    old = out.get("_class_path")
    if isinstance(old, str) and old in CLASS_PATHS:
        out = migrate_init_args(old, out)
        out["_class_path"] = CLASS_PATHS[old]
    return out


def migrate_checkpoint(checkpoint: Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
    """A checkpoint dict with its module's and data module's hyper-parameters migrated; (new dict, changed)."""
    out = dict(checkpoint)
    changed = False
    for key in ("hyper_parameters", "datamodule_hyper_parameters"):
        value = out.get(key)
        if isinstance(value, Mapping):
            new = migrate_hparams(value)
            if new != dict(value):
                out[key], changed = new, True
    return out, changed


def migrated_checkpoint_file(path: str | Path | IO[bytes]) -> str | Path | IO[bytes]:
    """``path``, or an in-memory copy of it with old class paths mapped (:func:`migrate_checkpoint`)."""
    import torch

    if not isinstance(path, str | Path):
        return path
    ckpt, changed = migrate_checkpoint(torch.load(path, map_location="cpu", weights_only=True))
    if not changed:
        return path
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    buf.seek(0)
    return buf


def _migrate_file(path: Path, out: Path) -> bool:
    """Rewrite one checkpoint (``.ckpt``/``.pt``) or YAML config; returns whether anything changed."""
    if path.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        new = migrate_config(copy.deepcopy(data))
        if new == data:
            return False
        atomic_write_text(out, yaml.safe_dump(new, sort_keys=False))
        return True
    import torch

    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    new, changed = migrate_checkpoint(ckpt)
    if changed:
        atomic_torch_save(new, out)
    return changed


def main(argv: list[str] | None = None) -> int:
    """``mmoe-migrate FILE ... [--out-dir DIR]``: rewrite checkpoints and run configs to the current class paths.

    Without ``--out-dir`` the files are replaced in place (atomically); files that need no change are left alone.
    Exit status 0; one line per file says what happened.
    """
    p = argparse.ArgumentParser(prog="mmoe-migrate", description=main.__doc__)
    p.add_argument("files", nargs="+", type=Path, help="Lightning checkpoints (.ckpt) and run configs (.yaml)")
    p.add_argument("--out-dir", type=Path, default=None, help="write the migrated files here instead of in place")
    args = p.parse_args(argv)
    for path in args.files:
        out = path if args.out_dir is None else args.out_dir / path.name
        changed = _migrate_file(path, out)
        print(f"mmoe-migrate: {path}: {'migrated -> ' + str(out) if changed else 'already current'}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
