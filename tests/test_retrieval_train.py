"""Image-text retrieval: data (synthetic split, Karpathy COCO/Flickr30k files, the real COCO samples), the dual-encoder
task (training step, zero-shot start, ``mmoe test`` scores file) and ITC/ITM in pretraining."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import CONFIGS, sample

from mmoe.data.retrieval import RetrievalEvalCollate, RetrievalEvalDataset, load_retrieval_records
from mmoe.data.tokenizer import build_tokenizer
from mmoe.data.transforms import build_transform
from mmoe.metrics.retrieval import load_scores, recall_at_k
from mmoe.train.data.retrieval import RetrievalDataModule
from mmoe.train.pretraining import MaskedPretraining
from mmoe.train.retrieval import RetrievalTask

pytestmark = pytest.mark.usefixtures("one_thread")

RECIPE = CONFIGS / "finetune" / "coco_retrieval_synthetic.yaml"
SMALL = {"depth": 2, "moe": {"every": 2}}  # one dense and one MoE block: fast, still routed


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mmoe.data.synthetic import make_world

    out = tmp_path_factory.mktemp("shapes")
    summary = make_world(out, num_train=8, num_val=5, image_size=32, seed=0)
    assert summary["retrieval"] == {"train": 8, "val": 2, "test": 3}
    return out


def test_synthetic_split_is_a_karpathy_file(world: Path) -> None:
    data = json.loads((world / "retrieval" / "dataset_coco.json").read_text())
    caps = json.loads((world / "coco" / "annotations" / "captions_val2014.json").read_text())
    test = [img for img in data["images"] if img["split"] == "test"]
    assert [img["cocoid"] for img in test] == [img["id"] for img in caps["images"][2:]]
    want = [a["caption"] for a in caps["annotations"] if a["image_id"] == test[0]["cocoid"]]
    assert [s["raw"] for s in test[0]["sentences"]] == want and len(want) == 5
    records = load_retrieval_records(world / "retrieval" / "dataset_coco.json", world / "coco", "test")
    assert [Path(r.path).name for r in records] == [img["filename"] for img in test]
    assert all(Path(r.path).is_file() for r in records)


def test_eval_batches_index_every_image_and_caption_once(world: Path) -> None:
    records = load_retrieval_records(world / "retrieval" / "dataset_coco.json", world / "coco", "train")
    ds = RetrievalEvalDataset(records, build_transform(32, train=False))
    collate = RetrievalEvalCollate(build_tokenizer("openclip", max_len=16))
    batches = [collate([ds[i] for i in idx]) for idx in ([0, 1, 2], [3, 4, 5, 6, 7])]
    assert torch.cat([b["image_index"] for b in batches]).tolist() == list(range(8))
    text_index = torch.cat([b["text_index"] for b in batches])
    assert text_index.tolist() == list(range(ds.num_texts)) and ds.num_texts == 40
    owner = torch.cat([b["text_image_index"] for b in batches])
    assert torch.equal(owner, ds.text_to_image())
    assert batches[0]["text"].shape == (15, 16) and batches[0]["image"].shape == (3, 3, 32, 32)


def test_real_coco_samples_with_a_split_list_and_a_flickr_style_file(tmp_path: Path) -> None:
    captions = sample("captions_val2017.json")
    images = captions.parent.parent / "val2017"
    (tmp_path / "split.txt").write_text("# three of the ten sample images\n139\n000000000802.jpg\n397133\n")
    recs = load_retrieval_records(captions, images, "test", tmp_path / "split.txt")
    assert sorted(r.image_id for r in recs) == [139, 802, 397133]
    assert all(len(r.captions) >= 5 and Path(r.path).is_file() for r in recs)
    # dataset_flickr30k.json entries: no filepath, no cocoid (imgid is the id)
    flickr = {
        "dataset": "flickr30k",
        "images": [
            {"imgid": k, "filename": Path(r.path).name, "split": "test", "sentences": [{"raw": c} for c in r.captions]}
            for k, r in enumerate(recs)
        ],
    }
    (tmp_path / "dataset_flickr30k.json").write_text(json.dumps(flickr))
    again = load_retrieval_records(tmp_path / "dataset_flickr30k.json", images, "test")
    assert [r.image_id for r in again] == [0, 1, 2] and [r.path for r in again] == [r.path for r in recs]
    with pytest.raises(ValueError, match="no image of"):
        (tmp_path / "none.txt").write_text("12345\n")
        load_retrieval_records(captions, images, "test", tmp_path / "none.txt")


def _data(world: Path, **kw: object) -> RetrievalDataModule:
    ann = str(world / "retrieval" / "dataset_coco.json")
    args = {"train_annotations": ann, "train_images": str(world / "coco"), "val_annotations": ann}
    args.update(test_annotations=ann, image_size=32, max_text_len=16, batch_size=4, eval_batch_size=2)
    return RetrievalDataModule(**{**args, **kw})  # type: ignore[arg-type]


def _trainer(root: Path, **kw: object):  # noqa: ANN202 - a Lightning Trainer
    from lightning.pytorch import Trainer

    return Trainer(
        accelerator="cpu",
        devices=1,
        default_root_dir=str(root),
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kw,  # type: ignore[arg-type]
    )


def test_task_trains_every_parameter_and_tests_into_a_scores_file(world: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    task = RetrievalTask(backbone_overrides={**SMALL, "img_size": 32}, scores_path=str(tmp_path / "s.pt"))
    dm = _data(world)
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"image", "text", "text_padding_mask", "image_id"} and batch["image"].shape[0] == 4
    loss = task.training_step(batch, 0)
    loss.backward()
    missing = [n for n, p in task.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing  # plain DDP needs a gradient on every trainable parameter
    assert task.itc_head.logit_scale.grad is not None
    trainer = _trainer(tmp_path / "run", max_steps=2, logger=False, enable_checkpointing=False)
    trainer.fit(task, datamodule=dm)
    out = trainer.test(task, datamodule=dm)[0]
    scores, t2i = load_scores(tmp_path / "s.pt")
    assert scores.shape == (3, 15) and t2i.tolist() == [i for i in range(3) for _ in range(5)]
    want = recall_at_k(scores, t2i)
    assert {k: out[f"test/{k}"] for k in want} == pytest.approx(want)


def _pretraining_checkpoint(path: Path, *, itc: bool) -> MaskedPretraining:
    torch.manual_seed(1)
    pre = MaskedPretraining(backbone_overrides={**SMALL, "img_size": 32}, itc_weight=1.0 if itc else 0.0)
    torch.save({"state_dict": pre.state_dict(), "mmoe_config": pre.backbone.config.to_dict()}, path)
    return pre


def test_zero_shot_start_uses_the_itc_projections_or_the_plain_cls(tmp_path: Path) -> None:
    pre = _pretraining_checkpoint(tmp_path / "itc.ckpt", itc=True)
    task = RetrievalTask(backbone=None, init_from=str(tmp_path / "itc.ckpt"))
    assert pre.itc_head is not None
    for name, value in pre.itc_head.state_dict().items():
        assert torch.equal(task.itc_head.state_dict()[name], value), name
    _pretraining_checkpoint(tmp_path / "plain.ckpt", itc=False)
    plain = RetrievalTask(backbone=None, init_from=str(tmp_path / "plain.ckpt"))
    x = torch.randn(3, plain.backbone.config.dim)
    assert torch.allclose(plain.itc_head.embed_image(x), torch.nn.functional.normalize(x, dim=-1), atol=1e-6)
    with pytest.raises(ValueError, match="embed_dim"):
        RetrievalTask(backbone=None, init_from=str(tmp_path / "itc.ckpt"), embed_dim=16)
    # projections trained on another pooling are refused, naming the setting that fits
    ckpt = torch.load(tmp_path / "itc.ckpt", weights_only=True)
    torch.save({**ckpt, "hyper_parameters": {"itc_pooling": "cls_max"}}, tmp_path / "itc_max.ckpt")
    with pytest.raises(ValueError, match="pooling='cls_max'.*set model.init_args.pooling to 'cls_max'"):
        RetrievalTask(backbone=None, init_from=str(tmp_path / "itc_max.ckpt"))
    fits = RetrievalTask(backbone=None, init_from=str(tmp_path / "itc_max.ckpt"), pooling="cls_max")
    assert torch.equal(fits.itc_head.image_proj.weight, pre.itc_head.image_proj.weight)


def test_pretraining_itc_and_itm_losses_reach_every_parameter() -> None:
    from test_train_pretrain import _batch

    torch.manual_seed(0)
    m = MaskedPretraining(backbone_overrides=SMALL, itc_weight=0.5, itm_weight=0.5)
    batch = _batch()
    losses, aux, _ = m.stream_losses(batch)
    assert {"itc_pair", "itm_pair"} <= set(losses)
    # untrained: ITC near log(B) both ways, ITM near log(2)
    assert abs(float(losses["itc_pair"]) - math.log(2)) < 0.7 and abs(float(losses["itm_pair"]) - math.log(2)) < 0.7
    again, _, _ = m.stream_losses(batch)
    assert float(again["itm_pair"]) == float(losses["itm_pair"])  # the negatives' draw is seeded by the batch
    m._total(losses, aux).backward()
    missing = [n for n, p in m.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    plain = MaskedPretraining(backbone_overrides=SMALL)
    assert plain.itc_head is None and set(plain.stream_losses(batch)[0]) == {
        "mim_image",
        "mlm_text",
        "mim_pair",
        "mlm_pair",
    }
    with pytest.raises(ValueError, match="itm_weight > 0 needs itc_weight"):
        MaskedPretraining(backbone_overrides=SMALL, itm_weight=1.0)
    with pytest.raises(ValueError, match="itc_weight"):
        MaskedPretraining(backbone_overrides=SMALL, itc_weight=-1.0)


def test_recipe_trains_a_step_and_tests_through_the_cli(world: Path, tmp_path: Path) -> None:
    from mmoe.train.cli import main

    ann = world / "retrieval" / "dataset_coco.json"
    common = [
        f"--config={RECIPE}",
        f"--data.init_args.train_annotations={ann}",
        f"--data.init_args.val_annotations={ann}",
        f"--data.init_args.test_annotations={ann}",
        f"--data.init_args.train_images={world / 'coco'}",
        "--data.init_args.batch_size=4",
        f"--model.init_args.backbone_overrides={json.dumps({**SMALL, 'img_size': 64})}",
        "--trainer.enable_progress_bar=false",
    ]
    root = tmp_path / "run"
    main(
        [
            "fit",
            *common,
            f"--trainer.default_root_dir={root}",
            "--trainer.max_steps=1",
            "--trainer.val_check_interval=1",
        ]
    )
    ckpt = root / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    metrics = (sorted(root.glob("version_*"))[-1] / "metrics.csv").read_text()
    assert "val/rsum" in metrics and "val/t2i_r1" in metrics
    scores = tmp_path / "scores.pt"
    main(
        [
            "test",
            *common,
            f"--trainer.default_root_dir={root}",
            f"--ckpt_path={ckpt}",
            f"--model.init_args.scores_path={scores}",
        ]
    )
    s, t2i = load_scores(scores)
    assert s.shape == (3, 15) and t2i.shape == (15,)


def test_cls_max_pooling_matches_a_hand_computation_and_skips_padding() -> None:
    from mmoe.model.contrastive import pool_embedding

    torch.manual_seed(0)
    f = torch.randn(3, 5, 4)
    assert torch.equal(pool_embedding(f, "cls"), f[:, 0])
    assert torch.allclose(pool_embedding(f, "cls_max"), f[:, 0] + f[:, 1:].max(dim=1).values)
    pad = torch.tensor([[False, False, True, True, True], [False] * 5, [False, True, True, True, True]])
    f[0, 2:] = 1e4  # padding rows that would win the max
    got = pool_embedding(f, "cls_max", pad)
    assert torch.allclose(got[0], f[0, 0] + f[0, 1])  # only token 1 besides CLS
    assert torch.allclose(got[1], f[1, 0] + f[1, 1:].max(dim=0).values)
    assert torch.equal(got[2], f[2, 0])  # a one-token text keeps its CLS alone
    with pytest.raises(ValueError, match="pooling='mean'"):
        pool_embedding(f, "mean")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="padding mask"):
        pool_embedding(f, "cls_max", pad[:, :3])


def test_cls_max_task_and_pretraining_itc_train_every_parameter(world: Path) -> None:
    from test_train_pretrain import _batch

    torch.manual_seed(0)
    task = RetrievalTask(backbone_overrides={**SMALL, "img_size": 32}, pooling="cls_max")
    batch = next(iter(_data(world).train_dataloader()))
    task.training_step(batch, 0).backward()
    missing = [n for n, p in task.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    with pytest.raises(ValueError, match="RetrievalTask: pooling='max'"):
        RetrievalTask(backbone_overrides={**SMALL, "img_size": 32}, pooling="max")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="MaskedPretraining: pooling='max'"):
        MaskedPretraining(backbone_overrides=SMALL, itc_weight=1.0, itc_pooling="max")  # type: ignore[arg-type]
    pre = MaskedPretraining(backbone_overrides=SMALL, itc_weight=1.0, itc_pooling="cls_max")
    losses, aux, _ = pre.stream_losses(_batch())
    pre._total(losses, aux).backward()
    missing = [n for n, p in pre.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
