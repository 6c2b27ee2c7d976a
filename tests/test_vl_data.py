"""VQAv2 / NLVR2 datasets, data modules and the answer vocabulary on real samples and hand-made files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import find_sample
from PIL import Image

from mmoe.data.nlvr2 import NLVR2Dataset, pair_prefix
from mmoe.data.tokenizer import build_tokenizer
from mmoe.data.vqa import (
    VQADataset,
    VQAFiles,
    answer_scores,
    build_answer_vocab,
    holdout_image_keys,
    load_answer_vocab,
    vqa_score,
)
from mmoe.train.data.nlvr2 import NLVR2Collate
from mmoe.train.data.vqav2 import VQACollate, VQADataModule


@pytest.fixture(scope="module")
def real_vqa() -> VQAFiles:
    q = find_sample("vqa_v2_train2014_img458752_questions.json")
    a = find_sample("vqa_v2_train2014_img458752_annotations.json")
    img = find_sample("COCO_train2014_000000458752.jpg")
    if q is None or a is None or img is None:
        pytest.skip("real VQA samples (questions, annotations, COCO_train2014_000000458752.jpg) not found")
    return VQAFiles(questions=str(q), annotations=str(a), image_dir=str(img.parent))


def test_soft_scores() -> None:
    assert [vqa_score(k) for k in range(6)] == [0.0, 0.3, 0.6, 0.9, 1.0, 1.0]
    scores = answer_scores(["Two", "2", "two.", "a cat", "cat", "dog"])
    assert scores == {"2": 0.9, "cat": 0.6, "dog": 0.3}


def test_vqa_dataset_on_real_samples(real_vqa: VQAFiles) -> None:
    anns = json.loads(Path(real_vqa.annotations).read_text())["annotations"]
    vocab = build_answer_vocab([anns], min_count=1)
    ds = VQADataset(real_vqa, answer_vocab=vocab, on_missing="error")
    assert len(ds) == 3 and not ds.skipped
    item = ds[0]
    assert item["question_id"] == 458752000
    assert item["question"] == "What is this photo taken looking through?"
    assert isinstance(item["image"], Image.Image) and item["image"].mode == "RGB"
    labels = item["labels"]
    # 8 x "net" -> 1.0, one "netting" -> 0.3, one "mesh" -> 0.3 (official first-100 annotations).
    assert labels[vocab.index("net")] == 1.0
    assert labels[vocab.index("netting")] == pytest.approx(0.3)
    assert labels[vocab.index("mesh")] == pytest.approx(0.3)
    assert labels.sum() == pytest.approx(1.6)
    # Out-of-vocabulary answers are dropped from the targets.
    small = VQADataset(real_vqa, answer_vocab=["net"], on_missing="error")
    assert small[0]["labels"].tolist() == [1.0]


def test_vqa_collate_batch_keys(real_vqa: VQAFiles) -> None:
    from mmoe.data.transforms import build_transform

    ds = VQADataset(real_vqa, answer_vocab=["net", "pitcher"], transform=build_transform(32, train=False))
    batch = VQACollate(build_tokenizer("openclip", max_len=16))([ds[0], None, ds[1]])
    assert set(batch) == {"image", "text", "text_padding_mask", "labels", "question_id"}
    assert batch["image"].shape == (2, 3, 32, 32)
    assert batch["text"].shape == batch["text_padding_mask"].shape == (2, 16)
    assert batch["question_id"].tolist() == [458752000, 458752001]
    assert batch["labels"].tolist() == [[1.0, 0.0], [0.0, 1.0]]


def test_missing_image_skip_at_train_error_at_test(real_vqa: VQAFiles, tmp_path: Path) -> None:
    files = VQAFiles(questions=real_vqa.questions, annotations=real_vqa.annotations, image_dir=str(tmp_path))
    ds = VQADataset(files, answer_vocab=["net"], on_missing="skip")
    assert len(ds) == 0
    assert [q for q, _ in ds.skipped] == [458752000, 458752001, 458752002]
    assert "COCO_train2014_000000458752.jpg" in ds.skipped[0][1]
    with pytest.raises(FileNotFoundError, match="VQA question 458752000: image file .*COCO_train2014_000000458752"):
        VQADataset(files, answer_vocab=["net"], on_missing="error")


def test_unreadable_image(real_vqa: VQAFiles, tmp_path: Path) -> None:
    src = Path(real_vqa.image_dir) / "COCO_train2014_000000458752.jpg"
    (tmp_path / src.name).write_bytes(src.read_bytes()[:2000])  # truncated JPEG
    files = VQAFiles(questions=real_vqa.questions, annotations=real_vqa.annotations, image_dir=str(tmp_path))
    ds = VQADataset(files, answer_vocab=["net"], on_missing="skip")
    assert len(ds) == 3 and ds[0] is None  # reported and dropped by the collate
    assert VQACollate(build_tokenizer("openclip", max_len=8))([ds[0]]) == {}
    strict = VQADataset(files, answer_vocab=["net"], on_missing="error")
    with pytest.raises(RuntimeError, match="VQA question 458752000: image .* unreadable"):
        strict[0]


def _tiny_vqa(root: Path, subtype: str, image_ids: list[int]) -> VQAFiles:
    img_dir = root / subtype
    img_dir.mkdir(parents=True)
    qs, anns = [], []
    for i in image_ids:
        Image.new("RGB", (8, 8), (i * 10 % 255, 0, 0)).save(img_dir / f"COCO_{subtype}_{i:012d}.jpg")
        qid = i * 10
        qs.append({"image_id": i, "question": f"What is {i}?", "question_id": qid})
        answers = [{"answer": str(i % 3), "answer_confidence": "yes", "answer_id": k + 1} for k in range(10)]
        anns.append({"question_id": qid, "image_id": i, "answers": answers, "answer_type": "number"})
    q = root / f"q_{subtype}.json"
    a = root / f"a_{subtype}.json"
    q.write_text(json.dumps({"data_subtype": subtype, "questions": qs}))
    a.write_text(json.dumps({"data_subtype": subtype, "annotations": anns}))
    return VQAFiles(questions=str(q), annotations=str(a), image_dir=str(img_dir))


def test_vilt_split(tmp_path: Path) -> None:
    train = _tiny_vqa(tmp_path, "train2014", [1, 2, 3])
    val = _tiny_vqa(tmp_path, "val2014", [5, 4, 9, 7])
    assert holdout_image_keys([val], 2) == {("val2014", 7), ("val2014", 9)}
    assert len(holdout_image_keys([val], 2, seed=3)) == 2
    with pytest.raises(ValueError, match="asked for 5 held-out images"):
        holdout_image_keys([val], 5)
    vocab = tmp_path / "vocab.json"
    vocab.write_text(json.dumps({"answers": ["0", "1", "2"]}))
    dm = VQADataModule(
        train_questions=train.questions,
        train_annotations=train.annotations,
        train_images=train.image_dir,
        val_questions=[val.questions],
        val_annotations=[val.annotations],
        val_images=[val.image_dir],
        answer_vocab=str(vocab),
        split="vilt",
        holdout_images=2,
        image_size=16,
        batch_size=2,
    )
    dm.setup("fit")
    train_ids = sorted(it["question_id"] for it in dm.datasets["train"].items)
    val_ids = sorted(it["question_id"] for it in dm.datasets["val"].items)
    assert train_ids == [10, 20, 30, 40, 50]  # train + val minus held-out images 7 and 9
    assert val_ids == [70, 90]
    batch = next(iter(dm.val_dataloader()))
    assert batch["image"].shape == (2, 3, 16, 16)
    assert batch["labels"].shape == (2, 3) and batch["labels"].sum(1).tolist() == [1.0, 1.0]


def test_build_vqa_vocab_tool(tmp_path: Path) -> None:
    path = find_sample("v2_mscoco_train2014_annotations.first100.json")
    if path is None:
        pytest.skip("official first-100 VQA annotations not found")
    from mmoe.cli import build_vqa_vocab as mod

    out = tmp_path / "vocab.json"
    assert mod.main(["--annotations", str(path), "--out", str(out), "--min-count", "9"]) == 0
    vocab = load_answer_vocab(out)
    anns = json.loads(path.read_text())["annotations"]
    assert vocab == build_answer_vocab([anns], min_count=9)
    assert vocab[:2] == ["yes", "no"]  # most frequent first
    assert all(a == a.lower() and not a.startswith(("a ", "the ")) for a in vocab)
    out2 = tmp_path / "vocab2.json"
    mod.main(["--annotations", str(path), "--out", str(out2), "--min-count", "9"])
    assert out2.read_text() == out.read_text()  # deterministic


@pytest.fixture(scope="module")
def real_nlvr2() -> tuple[Path, Path]:
    dev = find_sample("tiny-dev.json")
    img = find_sample("dev-850-0-img0.jpg")
    if dev is None or img is None:
        pytest.skip("NLVR2 samples (datasets/samples/nlvr2: tiny-dev.json and pair images) not found")
    return dev, img.parent


def test_nlvr2_dataset_on_real_pairs(real_nlvr2: tuple[Path, Path], tmp_path: Path) -> None:
    dev, images = real_nlvr2
    ds = NLVR2Dataset(str(dev), str(images), on_missing="error")
    assert len(ds) == 8
    labels = [json.loads(line)["label"] == "True" for line in dev.read_text().splitlines() if line.strip()]
    assert [it["labels"] for it in ds.items] == [int(x) for x in labels]
    item = ds[0]
    assert item["identifier"] == "dev-850-0-0" and pair_prefix(item["identifier"]) == "dev-850-0"
    assert item["image"].size != item["image2"].size  # two different photos
    from mmoe.data.transforms import build_transform

    ds_t = NLVR2Dataset(str(dev), str(images), transform=build_transform(32, train=False))
    batch = NLVR2Collate(build_tokenizer("openclip", max_len=24))([ds_t[0], ds_t[1]])
    assert set(batch) == {"image", "image2", "text", "text_padding_mask", "labels", "identifier"}
    assert batch["image2"].shape == (2, 3, 32, 32) and batch["labels"].dtype == torch.long
    # Missing pair: reported and skipped at train time, an error naming the example at test time.
    partial = tmp_path / "imgs"
    partial.mkdir()
    for p in images.glob("dev-850-*"):
        if not p.name.startswith("dev-850-1-"):
            shutil.copy(p, partial / p.name)
    skip = NLVR2Dataset(str(dev), str(partial), on_missing="skip")
    assert len(skip) == 6 and {i for i, _ in skip.skipped} == {"dev-850-1-0", "dev-850-1-1"}
    with pytest.raises(FileNotFoundError, match="NLVR2 example dev-850-1-.*dev-850-1-img0"):
        NLVR2Dataset(str(dev), str(partial), on_missing="error")


def test_answer_tags_mines_present_objects() -> None:
    """A tag named by a question with a non-negative answer, or in the answer, is there; a denied one is not."""
    from mmoe.data.grounded import CaptionTags
    from mmoe.data.vqa import answer_tags

    tags = CaptionTags(["disc", "wedge", "red bus"])
    found = answer_tags(
        [
            ("a", "How many discs can you see?", ["two"] * 9 + ["0"]),  # plural, majority not negative
            ("a", "Can you see a wedge?", ["no"] * 6 + ["yes"] * 4),  # denied: not a tag
            ("b", "Which shape is furthest left?", ["wedge"] * 10),  # the answer names it
            ("b", "What colour is the red bus?", ["Red"] * 10),  # a phrase
            ("c", "How many wedges?", ["0"] * 10),
            ("d", "Is it sunny?", []),  # no answers: nothing to mine
        ],
        tags,
    )
    assert found == {"a": {0}, "b": {1, 2}, "c": set(), "d": set()}


def test_vqa_dataset_tags_and_collate(tmp_path: Path) -> None:
    """With tag_words every item carries its image's mined tags (the same row for all questions of one image)."""
    from mmoe.data.synthetic import make_world
    from mmoe.data.transforms import build_transform

    make_world(tmp_path, num_train=6, num_val=2, image_size=32, nlvr2_sets=(1, 1))
    world = json.loads((tmp_path / "world.json").read_text())
    vqa, coco = tmp_path / "vqa", tmp_path / "coco"
    files = VQAFiles(
        questions=str(vqa / "v2_OpenEnded_mscoco_train2014_questions.json"),
        annotations=str(vqa / "v2_mscoco_train2014_annotations.json"),
        image_dir=str(coco / "train2014"),
    )
    ds = VQADataset(files, answer_vocab=["yes"], transform=build_transform(32, train=False), tag_words=world["shapes"])
    instances = json.loads((coco / "annotations" / "instances_train2014.json").read_text())
    names = {c["id"]: c["name"] for c in instances["categories"]}
    present: dict[int, set[str]] = {}
    for ann in instances["annotations"]:
        present.setdefault(ann["image_id"], set()).add(names[ann["category_id"]])
    questions = json.loads(Path(files.questions).read_text())["questions"]
    by_qid = {q["question_id"]: q["image_id"] for q in questions}
    mined = 0
    for i in range(len(ds)):
        item = ds[i]
        on = {world["shapes"][j] for j in item["tags"].nonzero().flatten().tolist()}
        assert on <= present[by_qid[item["question_id"]]]  # never a shape that is not in the image
        mined += len(on)
    assert mined > 0
    batch = VQACollate(build_tokenizer("openclip", max_len=16))([ds[0], None, ds[1]])
    assert batch["tags"].shape == (2, len(world["shapes"]))
    plain = VQADataset(files, answer_vocab=["yes"], transform=build_transform(32, train=False))
    assert "tags" not in VQACollate(build_tokenizer("openclip", max_len=16))([plain[0], plain[1]])
    with pytest.raises(ValueError, match="annotation"):
        VQADataset(VQAFiles(questions=files.questions, annotations=None, image_dir=files.image_dir), tag_words=["disc"])
