"""ViTDet simple feature pyramid + torchvision R-CNN on the Multiway Transformer ([ViTDet] sec. 3)."""

from __future__ import annotations

import pytest
import torch

from mmoe.model import create_model
from mmoe.model.detection import SimpleFeaturePyramid, ViTDet, backbone_feature_map

SMALL_HEADS = dict(
    min_size=64,
    max_size=96,
    anchor_sizes=(8, 16, 32, 64, 128),
    out_channels=32,
    box_head_dim=64,
    mask_head_channels=16,
    box_detections_per_img=10,
    rpn_pre_nms_top_n_train=100,
    rpn_post_nms_top_n_train=50,
    rpn_pre_nms_top_n_test=100,
    rpn_post_nms_top_n_test=50,
    box_batch_size_per_image=32,
)


@pytest.mark.parametrize("stride", [16, 8])
def test_pyramid_strides(stride: int) -> None:
    fpn = SimpleFeaturePyramid(48, stride, out_channels=16)
    h, w = 128, 192  # non-square input
    out = fpn(torch.randn(2, 48, h // stride, w // stride))
    assert list(out) == ["0", "1", "2", "3", "pool"]
    for name, s in zip(["0", "1", "2", "3", "pool"], [4, 8, 16, 32, 64]):
        assert out[name].shape == (2, 16, h // s, w // s), name


def test_pyramid_rejects_odd_stride() -> None:
    with pytest.raises(ValueError, match="power of two"):
        SimpleFeaturePyramid(48, 12, out_channels=16)


def _targets(sizes: list[tuple[int, int]]) -> list[dict[str, torch.Tensor]]:
    out = []
    for i, (h, w) in enumerate(sizes):
        masks = torch.zeros(1, h, w, dtype=torch.uint8)
        masks[0, 8:30, 10:40] = 1
        out.append(
            {"boxes": torch.tensor([[10.0, 8.0, 40.0, 30.0]]), "labels": torch.tensor([1 + i % 3]), "masks": masks}
        )
    return out


@pytest.mark.parametrize("with_masks", [True, False])
def test_vitdet_non_square_forward(with_masks: bool) -> None:
    torch.manual_seed(0)
    backbone = create_model("tiny")
    model = ViTDet(backbone, num_classes=4, with_masks=with_masks, **SMALL_HEADS)
    # the detector normalizes with the backbone's statistics and pads to a multiple of lcm(32, patch)
    assert model.detector.transform.image_mean == list(backbone.config.image_mean)
    assert model.detector.transform.image_std == list(backbone.config.image_std)
    sizes = [(40, 90), (48, 80)]
    images = [torch.rand(3, h, w) for h, w in sizes]
    batch = model.detector.image_list(images).tensors
    assert batch.shape[-2] % 32 == 0 and batch.shape[-1] % 32 == 0 and batch.shape[-2] != batch.shape[-1]
    fmap, _ = backbone_feature_map(backbone, batch)
    p = backbone.config.patch_size
    assert fmap.shape == (2, backbone.config.dim, batch.shape[-2] // p, batch.shape[-1] // p)

    model.train()
    losses = model(
        images,
        _targets(sizes) if with_masks else [{k: v for k, v in t.items() if k != "masks"} for t in _targets(sizes)],
    )
    expected = {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_moe_aux"}
    assert expected | ({"loss_mask"} if with_masks else set()) == set(losses)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    patch_grad = backbone.vision_embed.patch_embed.proj.weight.grad
    assert patch_grad is not None and patch_grad.abs().sum() > 0
    assert model.detector.pyramid.lateral[0][0].weight.grad.abs().sum() > 0

    model.eval()
    with torch.no_grad():
        dets = model(images)
    assert len(dets) == 2
    for det, (h, w) in zip(dets, sizes):
        assert set(det) >= {"boxes", "labels", "scores"}
        if len(det["boxes"]):  # boxes are in the input image's pixels
            assert det["boxes"][:, 2].max() <= w + 1e-3 and det["boxes"][:, 3].max() <= h + 1e-3
            assert det["labels"].min() >= 1 and det["labels"].max() < 4
        if with_masks:
            assert det["masks"].shape[1:] == (1, h, w)


def test_vitdet_needs_targets_in_training() -> None:
    model = ViTDet(create_model("tiny"), num_classes=3, **SMALL_HEADS)
    with pytest.raises(ValueError, match="targets are required"):
        model([torch.rand(3, 64, 64)])


def test_state_dict_layout_matches_task_convention() -> None:
    model = ViTDet(create_model("tiny"), num_classes=3, **SMALL_HEADS)
    prefixes = {k.split(".")[0] for k in model.state_dict()}
    assert prefixes == {"backbone", "detector"}  # DetectionTask registers the same two names


def test_detection_task_layer_decay_groups() -> None:
    from mmoe.train.detection import DetectionTask
    from mmoe.train.optim import param_groups

    task = DetectionTask(
        backbone="tiny",
        num_classes=3,
        **{k: v for k, v in SMALL_HEADS.items() if "rpn" not in k and k != "box_batch_size_per_image"},
    )
    groups = param_groups(task, lr=1.0, weight_decay=0.1, layer_decay=0.5)
    depth = task.backbone.config.depth
    by_name = {g["name"]: g for g in groups}
    # layer-wise decay through the backbone's group_matcher: each block trains at 0.5x the lr of the next one,
    # the embeddings below block 0, and the ViTDet pyramid and R-CNN heads at the full lr
    lrs = [by_name[f"backbone.layer{i}_decay"]["lr"] for i in range(depth + 1)]
    assert all(lrs[i + 1] == pytest.approx(2 * lrs[i]) for i in range(depth))
    assert max(g["lr"] for g in groups if g["name"].startswith("backbone")) < 1.0
    head_params = {id(p) for g in groups if g["name"].startswith("head") for p in g["params"]}
    assert all(id(p) in head_params for p in task.detector.parameters())
    assert all(g["lr"] == 1.0 for g in groups if g["name"].startswith("head"))
