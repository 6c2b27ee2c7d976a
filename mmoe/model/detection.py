"""ViTDet-style detection on the Multiway Transformer: simple feature pyramid + torchvision R-CNN heads.

COCO detection ([B3] sec. 3.2; [MH1]'s vision experiments; docs/references.md [ViTDet]): the plain (non-hierarchical)
backbone's last map at stride ``p`` (the patch size, 16 for base/large) feeds a *simple feature pyramid*
(Li et al., "Exploring Plain Vision Transformer Backbones for Object Detection", 2022, sec. 3): stride 4 and 8
by transposed convolutions, stride 16 as is, stride 32 by max-pooling, each followed by a 1x1 and a 3x3
convolution with channel LayerNorm; a further max-pooled level ("pool", stride 64) is added as in FPN. For a
backbone whose patch size is not 16 (the tiny test model uses 8) the same rule is applied to the actual stride:
each level is reached by ``log2(p / s)`` transposed convolutions or a ``s / p`` max-pool.

The detection heads are torchvision's (``MaskRCNN`` or ``FasterRCNN`` without masks): RPN, RoIAlign box head
and mask head. Images are normalized with the *backbone's* ``image_mean/std`` (torchvision's transform does
it, so we pass those values), resized by torchvision's ``GeneralizedRCNNTransform`` and padded to a multiple of
``lcm(32, p)`` so every pyramid stride is exact. The padded batch is usually not square: the backbone
interpolates its position embeddings to the grid (docs/interfaces.md section 2).

Weights layout: :class:`ViTDet` holds ``backbone`` (the ``MultiwayTransformer``) and ``detector``
(:class:`ViTDetHeads`: pyramid + R-CNN heads). The Lightning ``DetectionTask`` registers the same two names,
so its checkpoints load into :class:`ViTDet` unchanged and ``mmoe.model.load_model`` finds ``backbone.*``.
The MoE auxiliary loss of the backbone is returned with the detection losses (``loss_moe_aux``).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

__all__ = ["LayerNorm2d", "SimpleFeaturePyramid", "ViTDetHeads", "ViTDet", "heads_for_backbone", "backbone_feature_map"]

PYRAMID_STRIDES: tuple[int, ...] = (4, 8, 16, 32)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an (B, C, H, W) map (ViTDet's "LN" in the pyramid)."""

    def forward(self, x_BCHW: Tensor) -> Tensor:
        return super().forward(x_BCHW.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _scale_path(in_dim: int, in_stride: int, out_stride: int) -> tuple[nn.Module, int]:
    """Layers taking a stride-``in_stride`` map to ``out_stride``, and the channels they output.

    Upsampling by 2^n: n ConvTranspose2d(k=2, s=2), halving channels each time, LN + GELU in between (ViTDet's
    stride-4 branch); downsampling: one MaxPool2d with kernel = stride = the factor (ViTDet's stride-32 branch).
    """
    if out_stride == in_stride:
        return nn.Identity(), in_dim
    if out_stride > in_stride:
        factor = out_stride // in_stride
        if factor * in_stride != out_stride:
            raise ValueError(
                f"SimpleFeaturePyramid: stride {out_stride} is not a multiple of the backbone stride {in_stride}"
            )
        return nn.MaxPool2d(kernel_size=factor, stride=factor), in_dim
    factor = in_stride // out_stride
    steps = int(round(math.log2(factor))) if factor > 0 else -1
    if factor * out_stride != in_stride or 2**steps != factor:
        raise ValueError(
            f"SimpleFeaturePyramid: backbone stride {in_stride} / pyramid stride {out_stride} must be a power of two"
        )
    layers: list[nn.Module] = []
    dim = in_dim
    for i in range(steps):
        layers.append(nn.ConvTranspose2d(dim, dim // 2, kernel_size=2, stride=2))
        dim //= 2
        if i < steps - 1:
            layers += [LayerNorm2d(dim), nn.GELU()]
    return nn.Sequential(*layers), dim


class SimpleFeaturePyramid(nn.Module):
    """ViTDet simple feature pyramid from one stride-``backbone_stride`` map (Li et al. 2022, sec. 3).

    ``forward`` maps (B, D, H/p, W/p) to an ``OrderedDict`` ``{"0": stride 4, "1": 8, "2": 16, "3": 32,
    "pool": 64}`` of (B, out_channels, ...) maps, the layout torchvision's R-CNN heads expect
    (``MultiScaleRoIAlign(["0", "1", "2", "3"])`` and one anchor size per level).
    """

    def __init__(
        self,
        in_dim: int,
        backbone_stride: int,
        *,
        out_channels: int = 256,
        strides: Sequence[int] = PYRAMID_STRIDES,
        top_pool: bool = True,
    ) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.backbone_stride = backbone_stride
        self.strides = tuple(int(s) for s in strides)
        self.out_channels = out_channels
        self.top_pool = top_pool
        self.scales = nn.ModuleList()
        self.lateral = nn.ModuleList()
        for stride in self.strides:
            path, dim = _scale_path(in_dim, backbone_stride, stride)
            self.scales.append(path)
            self.lateral.append(
                nn.Sequential(
                    nn.Conv2d(dim, out_channels, kernel_size=1, bias=False),
                    LayerNorm2d(out_channels),
                    nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
                    LayerNorm2d(out_channels),
                )
            )

    @property
    def names(self) -> list[str]:
        return [str(i) for i in range(len(self.strides))] + (["pool"] if self.top_pool else [])

    def forward(self, x_BDhw: Tensor) -> OrderedDict[str, Tensor]:
        out: OrderedDict[str, Tensor] = OrderedDict()
        for i, (scale, lateral) in enumerate(zip(self.scales, self.lateral)):
            out[str(i)] = lateral(scale(x_BDhw))
        if self.top_pool:
            # torchvision's LastLevelMaxPool: kernel 1, stride 2 on the coarsest level (FPN's P6).
            out["pool"] = nn.functional.max_pool2d(out[str(len(self.strides) - 1)], kernel_size=1, stride=2)
        return out


def backbone_feature_map(backbone: nn.Module, images_B3HW: Tensor) -> tuple[Tensor, Tensor]:
    """Run the backbone on images only and return the patch tokens as a map, plus its MoE aux loss.

    (B, 3, H, W) -> (B, D, H/p, W/p): the CLS token is dropped and the patch tokens are laid back on the grid
    the backbone reports (``out.grid_size``), so the actual stride is whatever the patch size is.
    """
    out = backbone(image=images_B3HW)
    grid = out.grid_size
    if grid is None:
        raise RuntimeError("backbone_feature_map: the backbone returned no grid_size for an image input")
    gh, gw = grid
    n_vis = out.num_vision_tokens
    if n_vis != 1 + gh * gw:
        raise RuntimeError(f"backbone_feature_map: expected 1 + {gh}*{gw} vision tokens, got {n_vis}")
    patches_BND = out.features[:, 1:n_vis]
    fmap = patches_BND.transpose(1, 2).reshape(patches_BND.shape[0], patches_BND.shape[2], gh, gw)
    aux = out.aux_loss if out.aux_loss is not None else images_B3HW.new_zeros(())
    return fmap, aux


class ViTDetHeads(nn.Module):
    """Everything of ViTDet but the backbone: resize/normalize transform, feature pyramid, RPN, RoI heads.

    The R-CNN pieces are those of a torchvision ``MaskRCNN`` (``with_masks=True``) or ``FasterRCNN`` built with
    the pyramid as its "backbone"; only its ``transform``, ``rpn`` and ``roi_heads`` are used, with the
    pyramid fed from :func:`backbone_feature_map`. ``forward(backbone, images, targets)`` follows
    torchvision's ``GeneralizedRCNN.forward`` (transform -> features -> rpn -> roi_heads -> postprocess).

    Args:
        in_dim, backbone_stride: width and patch size of the backbone.
        num_classes: object classes *including* background (COCO: 81).
        image_mean, image_std: the backbone's normalization (``config.image_mean/std``).
        min_size, max_size: torchvision resize (shorter side, cap on the longer side); for fixed-size
            (LSJ-style) training both equal the crop size.
        anchor_sizes: one size per pyramid level (5 with the pool level); default (32, 64, 128, 256, 512).
        aspect_ratios: RPN anchor aspect ratios, the same for every level.
        box_detections_per_img, box_score_thresh, rpn_*: torchvision's arguments of the same name.
        box_head_dim: width of the two-layer box MLP (torchvision: 1024).
        mask_head_channels: width of the four 3x3 convolutions of the mask head (torchvision: 256).
    """

    def __init__(
        self,
        *,
        in_dim: int,
        backbone_stride: int,
        num_classes: int,
        image_mean: Sequence[float],
        image_std: Sequence[float],
        with_masks: bool = True,
        out_channels: int = 256,
        min_size: int = 800,
        max_size: int = 1333,
        anchor_sizes: Sequence[int] = (32, 64, 128, 256, 512),
        aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
        box_detections_per_img: int = 100,
        box_score_thresh: float = 0.05,
        rpn_pre_nms_top_n_train: int = 2000,
        rpn_post_nms_top_n_train: int = 2000,
        rpn_pre_nms_top_n_test: int = 1000,
        rpn_post_nms_top_n_test: int = 1000,
        box_batch_size_per_image: int = 512,
        box_head_dim: int = 1024,
        mask_head_channels: int = 256,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"ViTDetHeads: num_classes={num_classes} must count the background too (>= 2)")
        self.pyramid = SimpleFeaturePyramid(in_dim, backbone_stride, out_channels=out_channels)
        levels = len(self.pyramid.names)
        if len(anchor_sizes) != levels:
            raise ValueError(
                f"ViTDetHeads: anchor_sizes needs one size per pyramid level ({levels}), got {list(anchor_sizes)}"
            )
        anchors = AnchorGenerator(
            sizes=tuple((int(s),) for s in anchor_sizes),
            aspect_ratios=(tuple(float(a) for a in aspect_ratios),) * levels,
        )
        resolution = 7  # torchvision's box RoIAlign output size
        kwargs: dict[str, Any] = dict(
            box_head=TwoMLPHead(out_channels * resolution**2, box_head_dim),
            box_predictor=FastRCNNPredictor(box_head_dim, num_classes),
            min_size=min_size,
            max_size=max_size,
            image_mean=list(image_mean),
            image_std=list(image_std),
            rpn_anchor_generator=anchors,
            box_detections_per_img=box_detections_per_img,
            box_score_thresh=box_score_thresh,
            rpn_pre_nms_top_n_train=rpn_pre_nms_top_n_train,
            rpn_post_nms_top_n_train=rpn_post_nms_top_n_train,
            rpn_pre_nms_top_n_test=rpn_pre_nms_top_n_test,
            rpn_post_nms_top_n_test=rpn_post_nms_top_n_test,
            box_batch_size_per_image=box_batch_size_per_image,
        )
        if with_masks:
            kwargs["mask_head"] = MaskRCNNHeads(out_channels, [mask_head_channels] * 4, 1)
            kwargs["mask_predictor"] = MaskRCNNPredictor(mask_head_channels, mask_head_channels, num_classes)
        rcnn = (MaskRCNN if with_masks else FasterRCNN)(self.pyramid, num_classes=None, **kwargs)
        # Pad to a multiple of every pyramid stride and of the patch size, so each level's grid is exact.
        rcnn.transform.size_divisible = math.lcm(max(PYRAMID_STRIDES), backbone_stride)
        self.transform = rcnn.transform
        self.rpn = rcnn.rpn
        self.roi_heads = rcnn.roi_heads
        self.with_masks = with_masks
        self.num_classes = num_classes

    def forward(
        self,
        backbone: nn.Module,
        images: Sequence[Tensor],
        targets: Sequence[dict[str, Tensor]] | None = None,
    ) -> tuple[dict[str, Tensor], list[dict[str, Tensor]]]:
        """Return ``(losses, detections)``: losses when training (detections empty), detections otherwise.

        ``images``: list of (3, H, W) float tensors in [0, 1], any sizes; ``targets`` (training): dicts with
        ``boxes`` (N, 4) xyxy pixels, ``labels`` (N,) contiguous ids in [1, num_classes), ``masks`` (N, H, W).
        Detections are in the input images' pixel coordinates (torchvision's postprocess).
        """
        if self.training and targets is None:
            raise ValueError("ViTDetHeads.forward: targets are required in training mode")
        original_sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        image_list, targets_t = self.transform(list(images), None if targets is None else [dict(t) for t in targets])
        fmap, aux_loss = backbone_feature_map(backbone, image_list.tensors)
        features = self.pyramid(fmap)
        proposals, rpn_losses = self.rpn(image_list, features, targets_t)
        detections, roi_losses = self.roi_heads(features, proposals, image_list.image_sizes, targets_t)
        losses: dict[str, Tensor] = {}
        if self.training:
            losses.update(rpn_losses)
            losses.update(roi_losses)
            losses["loss_moe_aux"] = aux_loss
            return losses, []
        detections = self.transform.postprocess(detections, image_list.image_sizes, original_sizes)
        return losses, detections

    def image_list(self, images: Sequence[Tensor]) -> ImageList:
        """The resized, normalized, padded batch the backbone sees (for inspection and tests)."""
        return self.transform(list(images))[0]


def heads_for_backbone(
    backbone: nn.Module, *, num_classes: int, with_masks: bool = True, **head_kwargs: Any
) -> ViTDetHeads:
    """:class:`ViTDetHeads` sized for ``backbone``: its width, its real patch stride and its own normalization."""
    config = backbone.config
    return ViTDetHeads(
        in_dim=config.dim,
        backbone_stride=config.patch_size,
        num_classes=num_classes,
        image_mean=config.image_mean,
        image_std=config.image_std,
        with_masks=with_masks,
        **head_kwargs,
    )


class ViTDet(nn.Module):
    """Backbone + :class:`ViTDetHeads` as one module (outside Lightning): ``ViTDet(backbone, num_classes=81)``.

    ``forward(images, targets=None)`` returns the loss dict in training mode (as torchvision detectors do)
    and a list of detection dicts in eval mode. ``state_dict`` keys are ``backbone.*`` and ``detector.*``,
    the same as ``mmoe.train.detection.DetectionTask``'s.
    """

    def __init__(self, backbone: nn.Module, *, num_classes: int, with_masks: bool = True, **head_kwargs: Any) -> None:
        super().__init__()
        self.backbone = backbone
        self.detector = heads_for_backbone(backbone, num_classes=num_classes, with_masks=with_masks, **head_kwargs)

    def forward(
        self, images: Sequence[Tensor], targets: Sequence[dict[str, Tensor]] | None = None
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        losses, detections = self.detector(self.backbone, images, targets)
        return losses if self.training else detections
