"""Image transforms for pretraining and fine-tuning (PIL image -> normalized (3, H, W) float tensor).

BEiT-3 normalizes with mean = std = 0.5 per channel ([B3] released code, ``IMAGENET_INCEPTION_MEAN/STD``),
so that is our default; ImageNet statistics are one argument away. Training uses timm's
``create_transform`` (random resized crop, horizontal flip, colour jitter, optional RandAugment and
random erasing for ImageNet, [B3] sec. 3.2); evaluation either squashes the image to a square
(``Resize((s, s))``, as unilm ``beit3`` does for VQA/NLVR2/captioning) or resizes the short side and
centre-crops (``crop_pct``, the timm/ImageNet convention).

Spatial words ("left of", "top") in captions and questions are made false by a horizontal flip, and
small crops can cut objects out; recipes on the synthetic shapes world should set ``hflip=0`` and a
large ``scale`` minimum.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
from PIL import Image

__all__ = ["BEIT3_MEAN", "BEIT3_STD", "IMAGENET_MEAN", "IMAGENET_STD", "build_transform", "denormalize"]

BEIT3_MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
BEIT3_STD: tuple[float, float, float] = (0.5, 0.5, 0.5)
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

EvalResize = Literal["squash", "center_crop"]


def _triple(x: Sequence[float], name: str) -> tuple[float, float, float]:
    vals = tuple(float(v) for v in x)
    if len(vals) == 1:
        vals = vals * 3
    if len(vals) != 3:
        raise ValueError(f"build_transform: {name} must have 1 or 3 values, got {list(x)}")
    return vals  # type: ignore[return-value]


def build_transform(
    image_size: int,
    *,
    train: bool,
    mean: Sequence[float] = BEIT3_MEAN,
    std: Sequence[float] = BEIT3_STD,
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3.0 / 4.0, 4.0 / 3.0),
    hflip: float = 0.5,
    color_jitter: float | None = 0.4,
    auto_augment: str | None = None,
    re_prob: float = 0.0,
    interpolation: str = "bicubic",
    eval_resize: EvalResize = "squash",
    crop_pct: float = 0.875,
) -> Callable[[Image.Image], torch.Tensor]:
    """Build a PIL -> tensor transform.

    Args:
        image_size: output side length (square).
        train: random augmentation (timm ``create_transform(is_training=True)``) or deterministic eval.
        mean, std: per-channel normalization (default 0.5/0.5 as BEiT-3).
        scale, ratio: RandomResizedCrop area and aspect ranges (train only).
        hflip: horizontal flip probability (train only; set 0 for data with left/right words).
        color_jitter: brightness/contrast/saturation strength, None or 0 to disable (train only).
        auto_augment: timm auto-augment string, e.g. ``"rand-m9-mstd0.5-inc1"`` (RandAugment), or None.
        re_prob: random erasing probability (train only).
        interpolation: ``"bicubic"``, ``"bilinear"`` or ``"random"`` (train only).
        eval_resize: ``"squash"`` (resize to image_size x image_size) or ``"center_crop"`` (timm crop_pct).
        crop_pct: centre-crop fraction for ``eval_resize="center_crop"``.
    """
    if image_size <= 0:
        raise ValueError(f"build_transform: image_size must be positive, got {image_size}")
    mean_t, std_t = _triple(mean, "mean"), _triple(std, "std")
    if train:
        from timm.data import create_transform

        if len(scale) != 2 or not 0.0 < float(scale[0]) <= float(scale[1]) <= 1.0:
            raise ValueError(f"build_transform: scale must be (min, max) with 0 < min <= max <= 1, got {list(scale)}")
        from torchvision import transforms as T

        timm_tf = create_transform(
            image_size,
            is_training=True,
            scale=(float(scale[0]), float(scale[1])),
            ratio=(float(ratio[0]), float(ratio[1])),
            hflip=float(hflip),
            color_jitter=float(color_jitter or 0.0),
            auto_augment=auto_augment,
            re_prob=float(re_prob),
            interpolation=interpolation,
            mean=mean_t,
            std=std_t,
        )
        return T.Compose([_ToRGB(), timm_tf])
    from torchvision import transforms as T
    from torchvision.transforms import InterpolationMode

    interp = InterpolationMode.BILINEAR if interpolation == "bilinear" else InterpolationMode.BICUBIC
    if eval_resize == "squash":
        resize: list[Callable] = [T.Resize((image_size, image_size), interpolation=interp)]
    elif eval_resize == "center_crop":
        if not 0.0 < crop_pct <= 1.0:
            raise ValueError(f"build_transform: crop_pct must be in (0, 1], got {crop_pct}")
        short = int(round(image_size / crop_pct))
        resize = [T.Resize(short, interpolation=interp), T.CenterCrop(image_size)]
    else:
        raise ValueError(f"build_transform: eval_resize must be 'squash' or 'center_crop', got {eval_resize!r}")
    return T.Compose([_ToRGB(), *resize, T.ToTensor(), T.Normalize(mean_t, std_t)])


class _ToRGB:
    """Convert grey/RGBA/palette images to RGB (COCO has a few greyscale JPEGs)."""

    def __call__(self, img: Image.Image) -> Image.Image:
        return img if img.mode == "RGB" else img.convert("RGB")

    def __repr__(self) -> str:
        return "ToRGB()"


def denormalize(
    image: torch.Tensor, mean: Sequence[float] = BEIT3_MEAN, std: Sequence[float] = BEIT3_STD
) -> torch.Tensor:
    """Undo ``Normalize`` on a (3, H, W) or (B, 3, H, W) tensor, clamped to [0, 1] (for pictures)."""
    m = torch.tensor(_triple(mean, "mean"), dtype=image.dtype, device=image.device).view(-1, 1, 1)
    s = torch.tensor(_triple(std, "std"), dtype=image.dtype, device=image.device).view(-1, 1, 1)
    return (image * s + m).clamp(0.0, 1.0)
