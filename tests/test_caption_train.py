"""CaptioningTask: loss, attention pattern through the real backbone, checkpoints, one step through the `mmoe` CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import CONFIGS

from mmoe.model import create_model
from mmoe.model.generation import caption_attention_mask
from mmoe.train.captioning import CaptioningTask, masked_caption_loss

RECIPE = CONFIGS / "finetune" / "coco_captioning_synthetic.yaml"


def test_masked_caption_loss_smoothing_and_drop_worst():
    torch.manual_seed(0)
    logits, labels = torch.randn(10, 7), torch.randint(0, 7, (10,))
    ref = F.cross_entropy(logits, labels, label_smoothing=0.1, reduction="none")
    assert masked_caption_loss(logits, labels, label_smoothing=0.1) == pytest.approx(ref.mean().item())
    kept = ref.sort().values[:8]  # 20% of 10 = the 2 worst dropped
    dropped = masked_caption_loss(logits, labels, label_smoothing=0.1, drop_worst_ratio=0.2)
    assert dropped == pytest.approx(kept.mean().item()) and dropped < ref.mean()


def test_captioning_mask_in_the_real_backbone():
    """Image features ignore the text; a text token ignores later tokens ([B3] sec. 3.1)."""
    torch.manual_seed(0)
    model = create_model("tiny").eval()
    image = torch.randn(1, 3, 64, 64)
    text = torch.randint(0, 1000, (1, 6))
    nv = 1 + (64 // model.config.patch_size) ** 2
    mask = caption_attention_mask(nv, 6)
    a = model(image=image, text=text, attn_mask=mask).features
    text2 = text.clone()
    text2[0, 4] = 7
    b = model(image=image, text=text2, attn_mask=mask).features
    torch.testing.assert_close(a[:, : nv + 4], b[:, : nv + 4])  # image + earlier text unchanged
    assert not torch.allclose(a[:, nv + 4 :], b[:, nv + 4 :])
    c = model(image=torch.randn(1, 3, 64, 64), text=text, attn_mask=mask).features
    assert not torch.allclose(a[:, nv:], c[:, nv:])  # text sees the image


def _batch(task: CaptioningTask, b: int = 2) -> dict:
    ids, pad = task.tokenizer(["a small red circle at the top", "two shapes"][:b])
    from mmoe.data.captions import mask_caption_tokens

    text, labels = mask_caption_tokens(
        ids, pad, mask_id=task.tokenizer.mask_id, generator=torch.Generator().manual_seed(0)
    )
    return {
        "image": torch.randn(b, 3, 64, 64),
        "text": text,
        "text_padding_mask": pad,
        "text_labels": labels,
        "image_id": torch.arange(b),
    }


def test_task_step_gradients_and_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    task = CaptioningTask(backbone="tiny_mhmoe")
    batch = _batch(task)
    logits, labels, aux = task(batch)
    assert logits.shape == (int((batch["text_labels"] != -100).sum()), task.backbone.config.vocab_size)
    loss = masked_caption_loss(logits, labels) + aux
    loss.backward()
    assert torch.isfinite(loss) and task.lm_head.weight.grad is not None
    assert task.backbone.blocks[0].attn is not None and any(
        p.grad is not None and p.grad.abs().sum() > 0 for p in task.backbone.blocks[-1].parameters()
    )
    # a Lightning-style checkpoint of the task restores backbone + head through init_from
    ckpt = {"state_dict": task.state_dict()}
    task.on_save_checkpoint(ckpt)
    torch.save(ckpt, tmp_path / "task.ckpt")
    again = CaptioningTask(backbone="tiny_mhmoe", init_from=str(tmp_path / "task.ckpt"))
    for k, v in task.state_dict().items():
        torch.testing.assert_close(again.state_dict()[k], v)


@pytest.fixture(scope="module")
def shapes_world(tmp_path_factory) -> Path:
    from mmoe.data.synthetic import make_world

    out = tmp_path_factory.mktemp("shapes")
    make_world(out, num_train=8, num_val=4, image_size=64, seed=0)
    return out


def _cli_args(world: Path, root: Path) -> list[str]:
    coco = world / "coco"
    return [
        "--config",
        str(RECIPE),
        f"--data.train_annotations={coco / 'annotations' / 'captions_train2014.json'}",
        f"--data.train_images={coco / 'train2014'}",
        f"--data.val_annotations={coco / 'annotations' / 'captions_val2014.json'}",
        f"--data.val_images={coco / 'val2014'}",
        f"--data.test_annotations={coco / 'annotations' / 'captions_val2014.json'}",
        f"--data.test_images={coco / 'val2014'}",
        "--data.batch_size=4",
        "--data.eval_batch_size=4",
        "--model.generation.max_length=6",
        "--model.generation.num_beams=2",
        f"--trainer.default_root_dir={root}",
        "--trainer.enable_progress_bar=false",
    ]


def test_one_training_step_through_the_cli(shapes_world, tmp_path):
    from mmoe.train.cli import main

    root = tmp_path / "run"
    main(
        [
            "fit",
            *_cli_args(shapes_world, root),
            "--trainer.max_steps=1",
            "--trainer.val_check_interval=1",
            "--trainer.log_every_n_steps=1",
            "--trainer.limit_val_batches=1",
        ]
    )
    ckpt = root / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert saved["mmoe_config"]["dim"] == 128 and saved["global_step"] == 1
    version = sorted(root.glob("version_*"))[-1]
    metrics = (version / "metrics.csv").read_text()
    assert "train/loss" in metrics and "val/CIDEr" in metrics
    results = json.loads(next(version.glob("captions_val_step*.json")).read_text())
    assert len(results) == 4 and set(results[0]) == {"image_id", "caption"}


@pytest.mark.slow
def test_cli_predict_on_a_folder_writes_official_results(shapes_world, tmp_path):
    from mmoe.train.cli import main

    root = tmp_path / "run"
    main(["fit", *_cli_args(shapes_world, root), "--trainer.max_steps=1", "--trainer.limit_val_batches=0"])
    out = tmp_path / "predict.json"
    main(
        [
            "predict",
            *_cli_args(shapes_world, root),
            f"--ckpt_path={root / 'checkpoints' / 'last.ckpt'}",
            f"--data.predict_images={shapes_world / 'coco' / 'val2014'}",
            f"--model.results_path={out}",
        ]
    )
    results = json.loads(out.read_text())
    val_ids = {
        img["id"]
        for img in json.loads((shapes_world / "coco" / "annotations" / "captions_val2014.json").read_text())["images"]
    }
    assert {r["image_id"] for r in results} == val_ids
    assert all(set(r) == {"image_id", "caption"} and isinstance(r["caption"], str) for r in results)
