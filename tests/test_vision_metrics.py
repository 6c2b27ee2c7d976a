"""mmoe.metrics.detection against direct pycocotools calls on real COCO ground truth (datasets/samples)."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import sample
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from mmoe.metrics.detection import STAT_NAMES, encode_mask, evaluate_coco, main, to_coco_results


@pytest.fixture(scope="module")
def gt_file() -> Path:
    return sample("instances_val2017.json")


@pytest.fixture(scope="module")
def fake_bbox_file() -> Path:
    return sample("instances_val2014_fakebbox100_results.json")


def _direct(gt_file: Path, results: list[dict], iou: str, img_ids: list[int] | None = None) -> np.ndarray:
    """The official recipe, verbatim from the pycocotools demo."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_file))
        dt = gt.loadRes(copy.deepcopy(results))
        ev = COCOeval(gt, dt, iou)
        if img_ids is not None:
            ev.params.imgIds = img_ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


def _perturbed_boxes(gt_file: Path, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    data = json.loads(gt_file.read_text())
    cat_ids = [c["id"] for c in data["categories"]]
    out = []
    for ann in data["annotations"]:
        if ann.get("iscrowd"):
            continue
        x, y, w, h = ann["bbox"]
        jitter = [rng.gauss(0, 0.1) * w, rng.gauss(0, 0.1) * h, rng.gauss(0, 0.15) * w, rng.gauss(0, 0.15) * h]
        cat = ann["category_id"] if rng.random() > 0.15 else rng.choice(cat_ids)  # some wrong classes
        out.append(
            {
                "image_id": ann["image_id"],
                "category_id": cat,
                "bbox": [x + jitter[0], y + jitter[1], max(1.0, w + jitter[2]), max(1.0, h + jitter[3])],
                "score": rng.random(),
            }
        )
    return out


def test_bbox_matches_direct_pycocotools_on_perturbed_gt(gt_file: Path) -> None:
    results = _perturbed_boxes(gt_file)
    ours = evaluate_coco(gt_file, results, "bbox")
    ref = _direct(gt_file, results, "bbox")
    assert list(ours) == list(STAT_NAMES)
    np.testing.assert_allclose([ours[k] for k in STAT_NAMES], ref, atol=1e-12)
    # perturbed boxes are good but not perfect: AP strictly between 0 and 1, AP50 above AP75
    assert 0.2 < ours["AP"] < 0.95 and ours["AP50"] > ours["AP75"]
    # exact ground truth scores (almost) 1
    exact = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
        for a in json.loads(gt_file.read_text())["annotations"]
        if not a.get("iscrowd")
    ]
    assert evaluate_coco(gt_file, exact, "bbox")["AP50"] > 0.99


def test_segm_matches_direct_pycocotools(gt_file: Path) -> None:
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_file))
    rng = np.random.default_rng(0)
    results = []
    for ann in gt.dataset["annotations"][:200]:
        if ann.get("iscrowd"):
            continue
        m = gt.annToMask(ann)
        m = np.roll(m, shift=int(rng.integers(-3, 4)), axis=int(rng.integers(0, 2)))  # shifted masks
        results.append(
            {
                "image_id": ann["image_id"],
                "category_id": ann["category_id"],
                "segmentation": encode_mask(m),
                "score": float(rng.random()),
            }
        )
    assert isinstance(results[0]["segmentation"]["counts"], str)
    json.dumps(results)  # the official JSON form
    ours = evaluate_coco(gt_file, results, "segm")
    ref = _direct(gt_file, results, "segm")
    np.testing.assert_allclose([ours[k] for k in STAT_NAMES], ref, atol=1e-12)
    assert 0.1 < ours["AP"] < 1.0


def test_official_demo_results_on_images_139_and_802(gt_file: Path, fake_bbox_file: Path) -> None:
    demo = [r for r in json.loads(fake_bbox_file.read_text()) if r["image_id"] in (139, 802)]
    assert len(demo) > 5
    ours = evaluate_coco(gt_file, demo, "bbox", image_ids=[139, 802])
    ref = _direct(gt_file, demo, "bbox", img_ids=[139, 802])
    np.testing.assert_allclose([ours[k] for k in STAT_NAMES], ref, atol=1e-12)
    assert ours["AP"] > 0.3  # the demo's fake detections are near-GT on these two images


def test_cli_prints_json(gt_file: Path, fake_bbox_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    demo = [r for r in json.loads(fake_bbox_file.read_text()) if r["image_id"] in (139, 802)]
    res = tmp_path / "results.json"
    res.write_text(json.dumps(demo))
    assert (
        main(["--annotations", str(gt_file), "--results", str(res), "--iou", "bbox", "--image-ids", "139", "802"]) == 0
    )
    printed = json.loads(capsys.readouterr().out)
    for key in ("AP", "AP50", "AP75", "APs", "APm", "APl"):
        assert key in printed
    assert printed["AP"] == pytest.approx(evaluate_coco(gt_file, demo, "bbox", image_ids=[139, 802])["AP"])


def test_to_coco_results_official_format() -> None:
    masks = torch.zeros(2, 1, 20, 30)
    masks[0, 0, 2:6, 3:9] = 0.9
    masks[1, 0, 10:12, 0:4] = 0.4  # below the 0.5 threshold -> empty mask
    pred = {
        "boxes": torch.tensor([[3.0, 2.0, 9.0, 6.0], [0.0, 10.0, 4.0, 12.0]]),
        "labels": torch.tensor([1, 2]),
        "scores": torch.tensor([0.9, 0.3]),
        "masks": masks,
    }
    res = to_coco_results(pred, 42, [0, 18, 90])
    assert [r["category_id"] for r in res] == [18, 90]
    assert res[0]["bbox"] == [3.0, 2.0, 6.0, 4.0] and res[0]["image_id"] == 42
    rle = res[0]["segmentation"]
    assert isinstance(rle["counts"], str) and rle["size"] == [20, 30]
    assert mask_utils.area({"size": rle["size"], "counts": rle["counts"].encode()}) == 24
    assert mask_utils.area({"size": res[1]["segmentation"]["size"], "counts": res[1]["segmentation"]["counts"]}) == 0
    json.dumps(res)
    with pytest.raises(KeyError, match="label 5"):
        to_coco_results({**pred, "labels": torch.tensor([5, 1])}, 1, [0, 18, 90])


def test_empty_and_bad_results(gt_file: Path) -> None:
    assert evaluate_coco(gt_file, [], "bbox") == {k: 0.0 for k in STAT_NAMES}
    with pytest.raises(ValueError, match="not in the ground truth"):
        evaluate_coco(gt_file, [{"image_id": -5, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 1.0}], "bbox")
    with pytest.raises(KeyError, match="segmentation"):
        evaluate_coco(gt_file, [{"image_id": 139, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 1.0}], "segm")
