"""COCO instances and ImageNet folders for the vision tasks: real samples and tmp_path fixtures."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import REPO, SAMPLES
from PIL import Image

from mmoe.data.coco import CategoryMap, CocoInstances, detection_collate, detection_transforms
from mmoe.data.imagenet import (
    ImageNetFolder,
    classification_collate,
    imagenet_class_names,
    imagenet_transform,
    read_devkit_synsets,
    read_val_labels,
    sort_val_images,
)


@pytest.fixture(scope="module")
def coco_sample() -> tuple[Path, Path]:
    """(image folder, instances json) of the real COCO val2017 images in datasets/samples/coco."""
    root = SAMPLES / "coco"
    ann = root / "annotations" / "instances_val2017.json"
    if not (ann.is_file() and (root / "val2017").is_dir()):
        pytest.skip("no COCO sample (datasets/samples/coco)")
    return root / "val2017", ann


def _subset(coco_sample: tuple[Path, Path], tmp_path: Path, image_ids: list[int]) -> Path:
    """A COCO file restricted to a few images that exist on disk (keeps the test fast)."""
    data = json.loads(coco_sample[1].read_text())
    on_disk = {p.name for p in coco_sample[0].iterdir()}
    images = [im for im in data["images"] if im["id"] in image_ids and im["file_name"] in on_disk]
    keep = {im["id"] for im in images}
    out = {**data, "images": images, "annotations": [a for a in data["annotations"] if a["image_id"] in keep]}
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(out))
    return path


def test_category_map_round_trip(coco_sample: tuple[Path, Path]) -> None:
    cmap = CategoryMap.from_file(coco_sample[1])
    assert cmap.num_classes == 81 and cmap.coco_ids[0] == 1 and cmap.coco_ids[-1] == 90
    assert cmap.names[0] == "person" and cmap.names[-1] == "toothbrush"
    ids = torch.tensor([1, 90, 13, 44])  # 12, 26, 29, 30, 45, 66, 68, 69, 71, 83 are unused COCO ids
    contiguous = cmap.contiguous(ids)
    assert contiguous.tolist() == [1, 80, 12, 40]
    assert [cmap.to_coco[i] for i in contiguous.tolist()] == ids.tolist()
    with pytest.raises(KeyError, match="category id 12"):
        cmap.contiguous(torch.tensor([12]))


def test_coco_instances_drops_crowd_and_maps_labels(coco_sample: tuple[Path, Path], tmp_path: Path) -> None:
    data = json.loads(coco_sample[1].read_text())
    crowd_images = {a["image_id"] for a in data["annotations"] if a["iscrowd"]}
    on_disk = {p.name for p in coco_sample[0].iterdir()}
    present = {im["id"] for im in data["images"] if im["file_name"] in on_disk}
    wanted = sorted(crowd_images & present)[:1] + [139]
    ann = _subset(coco_sample, tmp_path, wanted)
    ds = CocoInstances(coco_sample[0], ann)
    assert len(ds) >= 1
    raw = json.loads(ann.read_text())
    cmap = ds.category_map
    for i in range(len(ds)):
        image, target = ds[i]
        image_id = target["image_id"]
        anns = [a for a in raw["annotations"] if a["image_id"] == image_id and not a["iscrowd"]]
        meta = next(im for im in raw["images"] if im["id"] == image_id)
        assert image.shape == (3, meta["height"], meta["width"]) and image.dtype == torch.float32
        assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
        assert len(target["labels"]) == len(anns)  # crowd regions are not training objects
        expected = sorted(cmap.to_contiguous[a["category_id"]] for a in anns)
        assert sorted(target["labels"].tolist()) == expected
        assert target["masks"].shape == (len(anns), meta["height"], meta["width"])
        # boxes are xyxy in pixels and enclose their masks
        boxes = target["boxes"]
        assert torch.all(boxes[:, 2] > boxes[:, 0]) and torch.all(boxes[:, 3] > boxes[:, 1])
        ys, xs = torch.nonzero(target["masks"][0], as_tuple=True)
        assert xs.min() >= boxes[0, 0] - 1 and xs.max() <= boxes[0, 2] + 1
    batch = detection_collate([ds[0], ds[0]])
    assert len(batch["images"]) == 2 and batch["targets"][0]["image_id"] == batch["targets"][1]["image_id"]


def test_lsj_transform_gives_fixed_canvas(coco_sample: tuple[Path, Path], tmp_path: Path) -> None:
    ann = _subset(coco_sample, tmp_path, [139])
    torch.manual_seed(0)
    ds = CocoInstances(coco_sample[0], ann, transforms=detection_transforms(True, lsj_size=128), remove_empty=True)
    for _ in range(3):
        image, target = ds[0]
        assert image.shape == (3, 128, 128)
        n = len(target["labels"])
        assert target["boxes"].shape == (n, 4) and target["masks"].shape == (n, 128, 128)
        if n:
            assert float(target["boxes"].min()) >= 0 and float(target["boxes"].max()) <= 128


def test_empty_image_and_no_masks(tmp_path: Path) -> None:
    Image.new("RGB", (40, 30), (120, 10, 10)).save(tmp_path / "a.jpg")
    Image.new("RGB", (40, 30), (10, 10, 120)).save(tmp_path / "b.jpg")
    data = {
        "images": [
            {"id": 1, "file_name": "a.jpg", "width": 40, "height": 30},
            {"id": 2, "file_name": "b.jpg", "width": 40, "height": 30},
        ],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 7,
                "bbox": [5, 5, 10, 8],
                "area": 80,
                "iscrowd": 0,
                "segmentation": [[5, 5, 15, 5, 15, 13, 5, 13]],
            }
        ],
        "categories": [{"id": 7, "name": "thing"}, {"id": 3, "name": "other"}],
    }
    (tmp_path / "inst.json").write_text(json.dumps(data))
    ds = CocoInstances(tmp_path, tmp_path / "inst.json", with_masks=False)
    assert len(ds) == 2 and ds.category_map.coco_ids == (3, 7)
    _, t1 = ds[0]
    assert t1["labels"].tolist() == [2] and "masks" not in t1
    assert t1["boxes"].tolist() == [[5.0, 5.0, 15.0, 13.0]]
    _, t2 = ds[1]  # an image without annotations gives empty targets
    assert t2["boxes"].shape == (0, 4) and t2["labels"].shape == (0,)
    assert len(CocoInstances(tmp_path, tmp_path / "inst.json", remove_empty=True)) == 1


# ------------------------------------------------------------------------------------------------ ImageNet
def test_class_names_come_from_timm() -> None:
    names = imagenet_class_names(["n01440764", "n02123045", "circle"])
    assert names == ["tench", "tabby", "circle"]
    real = SAMPLES / "imagenet" / "val"
    if real.is_dir():  # the real sample images in the ImageFolder layout
        ds = ImageNetFolder(real, transform=imagenet_transform(False, image_size=32))
        assert len(ds) >= 1 and len(ds.class_names) == len(ds.classes)
        if "n01774384" in ds.classes:
            assert ds.class_names[ds.classes.index("n01774384")] == "black widow"
        image, label = ds[0]
        assert image.shape == (3, 32, 32) and label == 0


def _image_folder(root: Path, classes: list[str], per_class: int = 2) -> None:
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            arr = rng.integers(0, 255, size=(40, 48, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / c / f"{c}_{i}.JPEG")


def test_imagenet_folder_and_transforms(tmp_path: Path) -> None:
    _image_folder(tmp_path / "train", ["n01440764", "n02123045"])
    _image_folder(tmp_path / "val", ["n02123045"], per_class=1)
    train = ImageNetFolder(tmp_path / "train", transform=imagenet_transform(True, image_size=32))
    assert train.classes == ["n01440764", "n02123045"] and train.class_names == ["tench", "tabby"]
    # val misses a class: the train order is kept, so labels agree across splits
    val = ImageNetFolder(tmp_path / "val", transform=imagenet_transform(False, image_size=32), classes=train.classes)
    assert val.targets == [1]
    batch = classification_collate([train[0], train[3]])
    assert batch["image"].shape == (2, 3, 32, 32) and batch["labels"].tolist() == [0, 1]
    # eval transform: deterministic, normalized with BEiT-3's 0.5/0.5 (values in [-1, 1])
    a, b = val[0][0], val[0][0]
    assert torch.equal(a, b) and a.min() >= -1.0 and a.max() <= 1.0
    tf = imagenet_transform(True, image_size=32)
    assert "RandAugment" in repr(tf) and "RandomErasing" in repr(tf)
    with pytest.raises(FileNotFoundError, match="not a folder"):
        ImageNetFolder(tmp_path / "missing")


def _flat_val(tmp_path: Path, n: int) -> Path:
    val = tmp_path / "val"
    val.mkdir()
    for i in range(1, n + 1):
        Image.new("RGB", (8, 8)).save(val / f"ILSVRC2012_val_{i:08d}.JPEG")
    (val / "README.txt").write_text("not an image")
    return val


def test_sort_val_with_devkit_meta_mat(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from scipy.io import savemat

    # devkit meta.mat: synsets with ILSVRC2012_ID; ids 1..3 are leaves, id 4 is an inner node of the hierarchy
    rows = [(1, "n02119789", 0), (2, "n02100735", 0), (3, "n01440764", 0), (4, "n00001740", 3)]
    dtype = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")]
    synsets = np.array([(i, w, "x", c) for i, w, c in rows], dtype=dtype)
    savemat(tmp_path / "meta.mat", {"synsets": synsets})
    assert read_devkit_synsets(tmp_path / "meta.mat") == ["n02119789", "n02100735", "n01440764"]
    (tmp_path / "gt.txt").write_text("3\n1\n3\n2\n")
    val = _flat_val(tmp_path, 4)
    tool = runpy.run_path(str(REPO / "tools" / "sort_imagenet_val.py"), run_name="sort_imagenet_val")
    counts = tool["main"](
        ["--val-dir", str(val), "--labels", str(tmp_path / "gt.txt"), "--meta", str(tmp_path / "meta.mat")]
    )
    assert json.loads(capsys.readouterr().out) == counts == {"sorted": 4, "skipped": 1, "unlabelled": 0}
    assert sorted(p.name for p in (val / "n01440764").iterdir()) == [
        "ILSVRC2012_val_00000001.JPEG",
        "ILSVRC2012_val_00000003.JPEG",
    ]
    assert [p.name for p in (val / "n02100735").iterdir()] == ["ILSVRC2012_val_00000004.JPEG"]
    assert ImageNetFolder(val).classes == ["n01440764", "n02100735", "n02119789"]


def test_sort_val_with_kaggle_csv_and_copy(tmp_path: Path) -> None:
    val = _flat_val(tmp_path, 3)
    (tmp_path / "LOC_val_solution.csv").write_text(
        "ImageId,PredictionString\n"
        "ILSVRC2012_val_00000001,n01751748 1 2 3 4\n"
        "ILSVRC2012_val_00000002,n09193705 5 6 7 8 n09193705 1 1 2 2\n"
    )
    labels = read_val_labels(tmp_path / "LOC_val_solution.csv")
    counts = sort_val_images(val, labels, out_dir=tmp_path / "sorted", mode="copy")
    assert counts == {"sorted": 2, "skipped": 1, "unlabelled": 1}
    assert (tmp_path / "sorted" / "n09193705" / "ILSVRC2012_val_00000002.JPEG").is_file()
    assert (val / "ILSVRC2012_val_00000002.JPEG").is_file()  # copy leaves the originals
    (tmp_path / "bad.txt").write_text("1\n1001\n")
    (tmp_path / "syn.txt").write_text("n01440764 tench\n")
    with pytest.raises(ValueError, match="line 2"):
        read_val_labels(tmp_path / "bad.txt", tmp_path / "syn.txt")
    with pytest.raises(ValueError, match="needs the synsets"):
        read_val_labels(tmp_path / "bad.txt")
