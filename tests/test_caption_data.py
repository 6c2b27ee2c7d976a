"""mmoe.data.captions on the real COCO samples: COCO and Karpathy loaders, references, masking, batches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import SAMPLES

from mmoe.data.captions import (
    CaptionCollator,
    CaptionDataset,
    ImageListDataset,
    image_id_from_filename,
    list_images,
    load_caption_records,
    load_coco_captions,
    load_karpathy,
    mask_caption_tokens,
    references_of,
    write_coco_references,
)
from mmoe.data.tokenizer import build_tokenizer
from mmoe.data.transforms import build_transform
from mmoe.metrics.captions import load_references

COCO = SAMPLES / "coco"
ANN = COCO / "annotations" / "captions_val2017.json"
pytestmark = pytest.mark.skipif(not ANN.is_file(), reason="datasets/samples/coco is missing")


def _karpathy_file(tmp_path: Path) -> Path:
    """A dataset_coco.json in the Karpathy layout built from the real sample captions."""
    ann = json.loads(ANN.read_text())
    splits = ["train"] * 6 + ["restval"] * 2 + ["val", "test"]
    images = []
    for split, img in zip(splits, sorted(ann["images"], key=lambda x: x["id"])):
        sents = [
            {"raw": a["caption"], "tokens": a["caption"].lower().split(), "imgid": 0, "sentid": a["id"]}
            for a in ann["annotations"]
            if a["image_id"] == img["id"]
        ]
        images.append(
            {
                "filepath": "val2017",
                "filename": img["file_name"],
                "cocoid": img["id"],
                "split": split,
                "sentences": sents,
                "sentids": [s["sentid"] for s in sents],
                "imgid": len(images),
            }
        )
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps({"images": images, "dataset": "coco"}))
    return path


def test_coco_caption_loader_and_datasets():
    recs = load_coco_captions(ANN, COCO / "val2017")
    assert len(recs) == 10 and all(len(r.captions) == 5 and Path(r.path).is_file() for r in recs)
    tf = build_transform(64, train=False)
    train = CaptionDataset(recs, tf, per_caption=True)
    evald = CaptionDataset(recs, tf, per_caption=False)
    assert len(train) == 50 and len(evald) == 10
    item = train[7]
    assert item["image"].shape == (3, 64, 64) and item["caption"] == recs[1].captions[2]
    assert item["image_id"] == recs[1].image_id


def test_karpathy_loader_splits_and_references(tmp_path):
    kp = _karpathy_file(tmp_path)
    train = load_karpathy(kp, COCO, ("train", "restval"))
    assert len(train) == 8 and all(Path(r.path).is_file() for r in train)
    assert [len(load_caption_records(kp, COCO, s)) for s in ("train", "val", "test")] == [8, 1, 1]
    test = load_caption_records(kp, COCO, "test")
    ref_file = write_coco_references(test, tmp_path / "refs" / "captions_test.json")
    assert load_references(ref_file) == references_of(test)
    # the written file is what the official API reads
    from pycocotools.coco import COCO as CocoApi

    api = CocoApi(str(ref_file))
    res = api.loadRes([{"image_id": test[0].image_id, "caption": "a caption"}])
    assert res.getImgIds() == [test[0].image_id] and len(api.imgToAnns[test[0].image_id]) == 5
    with pytest.raises(ValueError, match="unknown splits"):
        load_karpathy(kp, COCO, ("dev",))


def test_loader_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"images": [{"split": "train", "filename": "x.jpg", "sentences": []}]}))
    with pytest.raises(ValueError, match="cocoid"):
        load_karpathy(bad, tmp_path, ("train",))
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_caption_records(tmp_path / "missing.json", tmp_path)


def test_masking_ratio_bos_eos_and_pads():
    tok = build_tokenizer("openclip", max_len=32)
    ids, pad = tok([f"a {'very ' * (i % 9)}small red circle at the top" for i in range(200)])
    gen = torch.Generator().manual_seed(0)
    text, labels = mask_caption_tokens(ids, pad, mask_id=tok.mask_id, ratio=(0.6, 0.7), generator=gen)
    chosen = labels != -100
    assert not chosen[:, 0].any() and not chosen[pad].any()  # BOS and pads are never masked
    n = (~pad).sum(1) - 1
    share = chosen.sum(1).float() / n
    assert share.min() >= 0.6 - 0.5 / n.min() and share.max() <= 0.7 + 0.5 / n.min()
    assert torch.equal(text[chosen], torch.full_like(text[chosen], tok.mask_id))
    assert torch.equal(labels[chosen], ids[chosen]) and torch.equal(text[~chosen], ids[~chosen])
    eos_pos = (~pad).sum(1) - 1
    eos_masked = chosen[torch.arange(len(ids)), eos_pos]
    assert 0.3 < eos_masked.float().mean() < 0.95  # EOS is maskable, so the model learns where captions end


def test_collator_batches_and_fixed_seed():
    recs = load_coco_captions(ANN, COCO / "val2017")
    ds = CaptionDataset(recs[:4], build_transform(32, train=False), per_caption=False)
    tok = build_tokenizer("openclip", max_len=24)
    items = [ds[i] for i in range(4)]
    a = CaptionCollator(tok, seed=3)(items)
    b = CaptionCollator(tok, seed=3)(items)
    assert set(a) == {"image", "image_id", "text", "text_padding_mask", "text_labels"}
    assert a["image"].shape == (4, 3, 32, 32) and a["text"].shape == (4, 24)
    assert torch.equal(a["text"], b["text"])  # validation masks repeat across epochs
    assert a["image_id"].tolist() == [r.image_id for r in recs[:4]]


def test_image_list_for_predict(tmp_path):
    files = list_images(COCO / "val2017")
    assert len(files) == 10 and list_images(files[0]) == [files[0]]
    ds = ImageListDataset(files, build_transform(32, train=False))
    assert ds.image_ids == [int(f.stem) for f in files]
    batch = CaptionCollator(build_tokenizer("openclip"))([ds[0], ds[1]])
    assert set(batch) == {"image", "image_id", "file_name"}
    assert image_id_from_filename("COCO_val2014_000000391895.jpg") == 391895
    assert image_id_from_filename("cat.png") is None
    with pytest.raises(FileNotFoundError, match="no images"):
        list_images(tmp_path)
