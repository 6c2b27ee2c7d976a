"""Vision-only backbones (``MultiwayConfig.modalities``) and tasks whose every trainable parameter gets a gradient.

Plain DDP refuses a step in which a trainable parameter got no gradient. These tests check the condition
itself on one process (one backward, then ``p.grad is None`` for no trainable ``p``), for each fine-tuning
task's model, and that full checkpoints load into a vision-only backbone with the text tensors skipped by name.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from mmoe.model import create_model, load_model, save_model
from mmoe.model.config import MultiwayConfig
from mmoe.model.io import drop_text_branch, is_text_branch_key, load_backbone_weights


def _no_grad_names(module: torch.nn.Module) -> list[str]:
    return [n for n, p in module.named_parameters() if p.requires_grad and p.grad is None]


@pytest.mark.parametrize("name", ["tiny", "tiny_mhmoe"])
def test_vision_only_builds_no_text_branch(name: str) -> None:
    torch.manual_seed(0)
    full = create_model(name)
    torch.manual_seed(0)
    vis = create_model(name, modalities=["vision"])
    assert vis.text_embed is None and not vis.config.has_text
    vis_keys, full_keys = set(vis.state_dict()), set(full.state_dict())
    assert vis_keys < full_keys  # same names for what is kept
    assert not [k for k in vis_keys if is_text_branch_key(k)]
    assert all(is_text_branch_key(k) for k in full_keys - vis_keys)
    assert "text_embed.token_embed.weight" in full_keys - vis_keys
    assert "blocks.0.attn.q_proj.text.weight" in full_keys - vis_keys
    assert "norm.text.weight" in full_keys - vis_keys
    # Same seed, same weights: from-scratch vision runs start where they did with the full backbone.
    full_state = full.state_dict()
    assert all(torch.equal(v, full_state[k]) for k, v in vis.state_dict().items())


def test_vision_only_per_modality_pool_and_vlffn() -> None:
    dense = create_model("tiny", vlffn_layers=1, modalities=["vision"])
    assert not [k for k in dense.state_dict() if ".ffn.vl." in k or ".ffn.text." in k]
    moe = create_model("tiny_mhmoe", moe={"pool": "per_modality"}, modalities=["vision"])
    assert list(moe.blocks[1].moe.keys()) == ["vision"]
    full = create_model("tiny_mhmoe", moe={"pool": "per_modality"})
    state, skipped = drop_text_branch(moe, full.state_dict())
    assert "blocks.1.moe.text.experts.w1" in skipped
    load_backbone_weights(moe, state, strict=True)


def test_full_checkpoint_loads_into_vision_only_skipping_text(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    full = create_model("tiny_mhmoe")
    vis = create_model("tiny_mhmoe", modalities=["vision"])
    n_text = len(full.state_dict()) - len(vis.state_dict())
    assert n_text == 72  # embeddings 2, final norm 2, per block 10 attention + 4 norm + (4 FFN in dense blocks)
    with caplog.at_level(logging.WARNING, logger="mmoe.model.io"):
        missing, unexpected = load_backbone_weights(vis, full.state_dict(), strict=True)
    assert (missing, unexpected) == ([], [])
    assert f"skipped {n_text} text-branch tensors" in caplog.text
    key = "blocks.2.attn.q_proj.vision.weight"
    assert torch.equal(vis.state_dict()[key], full.state_dict()[key])
    image = torch.randn(2, 3, 64, 64)
    full.eval(), vis.eval()
    with torch.no_grad():
        torch.testing.assert_close(vis(image=image).features, full(image=image).features, rtol=0, atol=1e-6)
    # A model file (and the overrides path of load_model) does the same.
    save_model(full, tmp_path / "full.pt")
    again = load_model(tmp_path / "full.pt", modalities=["vision"])
    assert again.text_embed is None and torch.equal(again.state_dict()[key], full.state_dict()[key])
    # Names that are not text-branch ones still fail a strict load.
    bad = {**full.state_dict(), "blocks.0.unknown.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match="unexpected keys"):
        load_backbone_weights(vis, bad, strict=True)


def test_vision_only_refuses_text_and_round_trips() -> None:
    vis = create_model("tiny", modalities=["vision"])
    with pytest.raises(ValueError, match="vision-only"):
        vis(image=torch.randn(1, 3, 64, 64), text=torch.zeros(1, 3, dtype=torch.long))
    cfg = MultiwayConfig.from_dict(vis.config.to_dict())
    assert cfg.modalities == ("vision",) and "modalities:\n- vision\n" in vis.config.to_yaml()
    with pytest.raises(ValueError, match="modalities"):
        MultiwayConfig(modalities=("text",))


def _vl_batch(batch: int = 2, length: int = 5) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    pad = torch.zeros(batch, length, dtype=torch.bool)
    pad[0, -2:] = True
    return {
        "image": torch.randn(batch, 3, 32, 32),
        "image2": torch.randn(batch, 3, 32, 32),
        "text": torch.randint(0, 49408, (batch, length)),
        "text_padding_mask": pad,
    }


@pytest.mark.parametrize(
    "kind, kwargs",
    [
        ("vqa", dict(num_classes=4, pooling="image_text_cls", loss="soft_bce")),
        ("nlvr2", dict(num_classes=2, pooling="pair", image2_key="image2")),
        ("imagenet", dict(num_classes=3, pooling="mean_patch", text_key=None)),
    ],
)
def test_classification_tasks_leave_no_parameter_without_gradient(kind: str, kwargs: dict) -> None:
    from mmoe.train.classification import ClassificationTask

    task = ClassificationTask(backbone="tiny_mhmoe", backbone_overrides={"img_size": 32}, **kwargs)
    batch = _vl_batch()
    batch["labels"] = torch.rand(2, 4) if kind == "vqa" else torch.tensor([0, 1])
    assert task.backbone.config.has_text == (kind != "imagenet")
    assert not task.backbone.vision_embed.mask_token.requires_grad
    logits, aux = task.logits_and_aux(batch)
    (task._loss(logits, batch["labels"]) + aux).backward()
    assert _no_grad_names(task) == []


@pytest.mark.parametrize("pooling", ["image_text_cls", "pair"])
def test_vlffn_blocks_in_image_text_tasks_leave_no_parameter_without_gradient(pooling: str) -> None:
    """A dense backbone with a VL-FFN top block: image-text input never reaches that block's V-FFN and L-FFN."""
    from mmoe.train.classification import ClassificationTask

    overrides = {"img_size": 32, "vlffn_layers": 1}
    task = ClassificationTask(
        backbone="tiny", backbone_overrides=overrides, num_classes=2, pooling=pooling, image2_key="image2"
    )
    frozen = sorted(n for n, p in task.backbone.named_parameters() if not p.requires_grad)
    assert "blocks.3.ffn.vision.fc1.weight" in frozen and "blocks.3.ffn.text.fc2.bias" in frozen
    assert [n for n in frozen if not n.startswith(("blocks.3.ffn.vision.", "blocks.3.ffn.text."))] == [
        "vision_embed.mask_token"
    ]
    batch = _vl_batch()
    batch["labels"] = torch.tensor([0, 1])
    logits, aux = task.logits_and_aux(batch)
    (task._loss(logits, batch["labels"]) + aux).backward()
    assert _no_grad_names(task) == []
    # A vision-only task keeps training the V-FFN (its only FFN there); the VL-FFN is not built.
    vision = ClassificationTask(
        backbone="tiny", backbone_overrides=overrides, num_classes=2, pooling="mean_patch", text_key=None
    )
    assert vision.backbone.blocks[3].ffn.vl is None
    assert all(p.requires_grad for p in vision.backbone.blocks[3].ffn.vision.parameters())


def test_imagenet_task_from_a_pretraining_checkpoint(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A full backbone file into the vision-only ImageNet task (name given or rebuilt from the file)."""
    from mmoe.train.classification import ClassificationTask

    full = create_model("tiny_mhmoe", img_size=32)
    save_model(full, tmp_path / "pre.pt")
    kw = dict(num_classes=3, pooling="mean_patch", text_key=None, init_from=str(tmp_path / "pre.pt"))
    with caplog.at_level(logging.WARNING, logger="mmoe.model.io"):
        by_name = ClassificationTask(backbone="tiny_mhmoe", backbone_overrides={"img_size": 32}, **kw)
        rebuilt = ClassificationTask(backbone=None, **kw)
    assert caplog.text.count("skipped 72 text-branch tensors") == 2
    key = "blocks.3.norm2.vision.weight"
    for task in (by_name, rebuilt):
        assert task.backbone.text_embed is None
        assert torch.equal(task.backbone.state_dict()[key], full.state_dict()[key])
    # A checkpoint of the task written with a full backbone (older runs) restores into the vision-only one.
    old = ClassificationTask(
        backbone="tiny_mhmoe",
        backbone_overrides={"img_size": 32, "modalities": ["vision", "text"]},
        num_classes=3,
        pooling="mean_patch",
        text_key=None,
    )
    ckpt = {"state_dict": old.state_dict()}
    by_name.on_load_checkpoint(ckpt)
    by_name.load_state_dict(ckpt["state_dict"], strict=True)


# A DetectionTask small enough for one CPU step on 32-px images.
_TINY_DETECTOR = dict(num_classes=3, min_size=32, max_size=32, anchor_sizes=(4, 8, 16, 32, 64), out_channels=16)


def test_detection_task_leaves_no_parameter_without_gradient() -> None:
    from mmoe.train.detection import DetectionTask

    task = DetectionTask(
        backbone="tiny_mhmoe",
        backbone_overrides={"img_size": 32},
        with_masks=True,
        box_head_dim=32,
        mask_head_channels=8,
        **_TINY_DETECTOR,
    )
    assert task.backbone.text_embed is None and not task.backbone.vision_embed.mask_token.requires_grad
    torch.manual_seed(0)
    masks = torch.zeros(2, 32, 32, dtype=torch.uint8)
    masks[0, 4:14, 6:16] = 1
    masks[1, 16:30, 10:28] = 1
    target = {"boxes": torch.tensor([[6.0, 4.0, 16.0, 14.0], [10.0, 16.0, 28.0, 30.0]]), "labels": torch.tensor([1, 2])}
    target["masks"] = masks
    losses, _ = task([torch.rand(3, 32, 32)], [target])
    torch.stack(list(losses.values())).sum().backward()
    assert _no_grad_names(task) == []


def test_faster_rcnn_builds_no_mask_head() -> None:
    from mmoe.train.detection import DetectionTask

    task = DetectionTask(
        backbone="tiny", backbone_overrides={"img_size": 32}, with_masks=False, box_head_dim=32, **_TINY_DETECTOR
    )
    assert not [n for n, _ in task.named_parameters() if "mask" in n and "mask_token" not in n]
