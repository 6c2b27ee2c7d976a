"""ImageNet-1k classification data: ImageFolder layout, timm augmentation, class names, val sorting.

ImageNet ([B3] sec. 3.2): vision-only fine-tuning with RandAugment (``rand-m9-mstd0.5-inc1``), random
erasing 0.25, then Mixup 0.8 / CutMix 1.0 with label smoothing 0.1 on the batch (done by the task, since it
needs the whole batch) and top-1/top-5 evaluation. Layout (``torchvision.datasets.ImageFolder``)::

    ROOT/train/n01440764/*.JPEG ... ROOT/val/n01440764/*.JPEG   (one folder per WordNet id)

The official validation set ships flat (``ILSVRC2012_val_00000001.JPEG`` ...) with its labels in the devkit
(``data/ILSVRC2012_validation_ground_truth.txt``: one ILSVRC2012_ID in 1..1000 per image, in file order, and
``data/meta.mat``: ILSVRC2012_ID -> WordNet id). :func:`sort_val_images` (CLI ``tools/sort_imagenet_val.py``)
moves/copies/links the images into the per-synset folders; it also reads Kaggle's ``LOC_val_solution.csv``.

Class names are timm's ImageNet-1k descriptions (``timm.data.ImageNetInfo``), looked up by folder name; any
other folder name (e.g. the synthetic shapes world's ``circle``/``square``) is its own class name.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder

from mmoe.data.transforms import BEIT3_MEAN, BEIT3_STD, build_transform
from mmoe.files import atomic_write

__all__ = [
    "ImageNetFolder",
    "imagenet_class_names",
    "imagenet_transform",
    "classification_collate",
    "read_devkit_synsets",
    "read_val_labels",
    "sort_val_images",
]

RANDAUGMENT = "rand-m9-mstd0.5-inc1"
_WNID = re.compile(r"^n\d{8}$")
_VAL_NAME = re.compile(r"ILSVRC2012_val_(\d{8})\.(?:JPEG|jpeg|jpg|JPG|png)$")


def imagenet_class_names(folders: Sequence[str]) -> list[str]:
    """Human-readable names for class folders: timm's ImageNet descriptions for WordNet ids, else the folder.

    ``timm.data.ImageNetInfo`` (ImageNet-1k) is the source, so no class list is written by hand here; the
    first comma-separated synonym is used ("tench, Tinca tinca" -> "tench").
    """
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    known = set(info.label_names())
    names = []
    for folder in folders:
        if folder in known:
            names.append(info.label_name_to_description(folder).split(",")[0].strip())
        else:
            names.append(folder)
    return names


def imagenet_transform(
    train: bool,
    *,
    image_size: int = 224,
    mean: Sequence[float] = BEIT3_MEAN,
    std: Sequence[float] = BEIT3_STD,
    auto_augment: str | None = RANDAUGMENT,
    re_prob: float = 0.25,
    color_jitter: float | None = 0.4,
    hflip: float = 0.5,
    scale: Sequence[float] = (0.08, 1.0),
    crop_pct: float = 0.875,
    interpolation: str = "bicubic",
) -> Callable[[Any], Tensor]:
    """timm's ImageNet training transform (RandAugment, random erasing) or the resize + centre-crop eval one.

    The defaults are the BEiT / BEiT-3 ImageNet fine-tuning recipe ([B3] sec. 3.2); ``mean``/``std`` must be the
    backbone's (``config.image_mean/std``, 0.5 for BEiT-3).
    """
    return build_transform(
        image_size,
        train=train,
        mean=mean,
        std=std,
        scale=scale,
        hflip=hflip,
        color_jitter=color_jitter,
        auto_augment=auto_augment,
        re_prob=re_prob,
        interpolation=interpolation,
        eval_resize="center_crop",
        crop_pct=crop_pct,
    )


class ImageNetFolder(Dataset):
    """ImageFolder split -> ``(image (3, H, W), label)``; ``classes`` are folder names, ``class_names`` readable.

    ``classes`` can be given to fix the label order across splits (a val folder may miss a class); by default
    it is the sorted list of sub-folders, torchvision's rule, which for WordNet ids is the standard 0..999 order.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        transform: Callable[[Any], Tensor] | None = None,
        classes: Sequence[str] | None = None,
    ) -> None:
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"ImageNetFolder: {root} is not a folder (expected ROOT/{{class}}/*.JPEG)")
        self.root = root
        fixed = list(classes) if classes is not None else None

        class _Folder(ImageFolder):
            def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:  # noqa: D102
                if fixed is None:
                    return super().find_classes(directory)
                return fixed, {c: i for i, c in enumerate(fixed)}

        if fixed is not None:
            missing = [c for c in fixed if not (root / c).is_dir()]
            if len(missing) == len(fixed):
                raise FileNotFoundError(f"ImageNetFolder: none of the {len(fixed)} class folders exist under {root}")
        self.folder = _Folder(str(root), transform=transform, allow_empty=fixed is not None)
        self.classes: list[str] = list(self.folder.classes)
        self.class_names = imagenet_class_names(self.classes)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def targets(self) -> list[int]:
        return list(self.folder.targets)

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.folder[index]


def classification_collate(batch: Sequence[tuple[Tensor, int]]) -> dict[str, Tensor]:
    """``[(image, label)] -> {"image": (B, 3, H, W), "labels": (B,) int64}`` (docs/interfaces.md section 4)."""
    images = torch.stack([img for img, _ in batch])
    labels = torch.tensor([int(lbl) for _, lbl in batch], dtype=torch.int64)
    return {"image": images, "labels": labels}


# ----------------------------------------------------------------------------------------------- val sorting
def read_devkit_synsets(path: str | Path) -> list[str]:
    """WordNet ids in ILSVRC2012_ID order (index 0 = ID 1) from the devkit's ``meta.mat`` or a text list.

    ``meta.mat`` holds all 1860 synsets of the hierarchy; the 1000 classes are the leaves (``num_children == 0``)
    with ILSVRC2012_ID 1..1000. A text file must have one WordNet id per line (first token), in ID order.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ImageNet devkit synsets: {path} does not exist (expected data/meta.mat)")
    if path.suffix == ".mat":
        from scipy.io import loadmat

        synsets = loadmat(str(path), squeeze_me=True)["synsets"]
        pairs = []
        for row in synsets:
            ilsvrc_id, wnid, num_children = int(row["ILSVRC2012_ID"]), str(row["WNID"]), int(row["num_children"])
            if num_children == 0:
                pairs.append((ilsvrc_id, wnid))
        pairs.sort()
        ids = [i for i, _ in pairs]
        if ids != list(range(1, len(ids) + 1)):
            raise ValueError(f"ImageNet devkit {path}: leaf ILSVRC2012_IDs are not 1..{len(ids)}")
        return [w for _, w in pairs]
    wnids = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    bad = [w for w in wnids if not _WNID.match(w)]
    if bad:
        raise ValueError(f"ImageNet synset list {path}: {bad[:3]} are not WordNet ids (nXXXXXXXX)")
    return wnids


def read_val_labels(labels: str | Path, synsets: str | Path | None = None) -> dict[int, str]:
    """Validation image number (1-based, from ``ILSVRC2012_val_NNNNNNNN``) -> WordNet id.

    ``labels`` is the devkit's ``ILSVRC2012_validation_ground_truth.txt`` (needs ``synsets``) or Kaggle's
    ``LOC_val_solution.csv`` (``ImageId,PredictionString`` whose first token is the WordNet id).
    """
    labels = Path(labels)
    if not labels.is_file():
        raise FileNotFoundError(f"ImageNet val labels: {labels} does not exist")
    if labels.suffix == ".csv":
        out: dict[int, str] = {}
        with labels.open(newline="") as f:
            for row in csv.DictReader(f):
                if "ImageId" not in row or "PredictionString" not in row:
                    raise ValueError(f"{labels}: expected columns ImageId,PredictionString (Kaggle LOC_val_solution)")
                number = int(row["ImageId"].rsplit("_", 1)[-1])
                out[number] = row["PredictionString"].split()[0]
        return out
    if synsets is None:
        raise ValueError(f"ImageNet val labels {labels}: the devkit ground truth needs the synsets (--meta meta.mat)")
    wnids = read_devkit_synsets(synsets)
    out = {}
    for number, line in enumerate(labels.read_text().split(), start=1):
        idx = int(line)
        if not 1 <= idx <= len(wnids):
            raise ValueError(f"{labels} line {number}: ILSVRC2012_ID {idx} is not in 1..{len(wnids)}")
        out[number] = wnids[idx - 1]
    return out


def sort_val_images(
    val_dir: str | Path,
    labels: dict[int, str],
    *,
    out_dir: str | Path | None = None,
    mode: Literal["move", "copy", "symlink"] = "move",
) -> dict[str, int]:
    """Put each ``ILSVRC2012_val_*.JPEG`` of ``val_dir`` into ``out_dir/<wnid>/`` (default: in place).

    Returns counts ``{"sorted": n, "skipped": files that are not val images, "unlabelled": val images without a
    label}``. Running it twice is harmless: already-sorted files are not in ``val_dir``'s top level any more.
    """
    val_dir = Path(val_dir)
    out = Path(out_dir) if out_dir is not None else val_dir
    if not val_dir.is_dir():
        raise FileNotFoundError(f"sort_val_images: {val_dir} is not a folder")
    if mode not in ("move", "copy", "symlink"):
        raise ValueError(f"sort_val_images: mode must be move, copy or symlink, got {mode!r}")
    counts = {"sorted": 0, "skipped": 0, "unlabelled": 0}
    for path in sorted(val_dir.iterdir()):
        if not path.is_file():
            continue
        m = _VAL_NAME.search(path.name)
        if m is None:
            counts["skipped"] += 1
            continue
        wnid = labels.get(int(m.group(1)))
        if wnid is None:
            counts["unlabelled"] += 1
            continue
        dest = out / wnid / path.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        if mode == "move":
            os.replace(path, dest)
        elif mode == "copy":
            with path.open("rb") as src:
                atomic_write(dest, lambda f, src=src: shutil.copyfileobj(src, f))
        else:
            if dest.is_symlink() or dest.exists():
                dest.unlink()
            dest.symlink_to(path.resolve())
        counts["sorted"] += 1
    return counts
