"""COCO detection and instance-segmentation evaluation through the official pycocotools COCOeval.

COCO detection ([COCO], pycocotools ``COCOeval``): boxes in results are ``[x, y, w, h]`` in original image pixels
with the *original* COCO category ids; masks are compressed RLE whose ``counts`` is a ``str`` (the
JSON form pycocotools writes and reads). This module

- converts torchvision detector outputs (``boxes`` xyxy, contiguous ``labels``, ``scores``,
  ``masks`` (N, 1, H, W) probabilities) into official result entries (:func:`to_coco_results`),
- runs COCOeval for ``bbox`` or ``segm`` and returns the 12 standard numbers by name
  (:func:`evaluate_coco`),
- offers a CLI that prints them as JSON::

    python -m mmoe.metrics.detection --annotations instances.json --results results.json [--iou segm]

Nothing is re-implemented: matching and averaging are COCOeval's own, so numbers equal a direct
pycocotools run on the same inputs (tested). The only departure, borrowed from detectron2 and
documented there, is that for ``segm`` the ``bbox`` key is dropped from result entries before
``loadRes``: otherwise pycocotools takes the *box* area instead of the mask area to bucket
detections into small/medium/large (ground truth uses the mask area). Pass
``drop_bbox_for_segm=False`` to get pycocotools' behaviour unchanged.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

IouType = Literal["bbox", "segm"]

# The order of COCOeval.stats for bbox/segm (pycocotools cocoeval.py, summarize()).
STAT_NAMES: tuple[str, ...] = (
    "AP",
    "AP50",
    "AP75",
    "APs",
    "APm",
    "APl",
    "AR1",
    "AR10",
    "AR100",
    "ARs",
    "ARm",
    "ARl",
)


def load_coco(annotations: str | Path | COCO | Mapping[str, Any]) -> COCO:
    """Return a pycocotools ``COCO`` for a path, an already-built ``COCO`` or a dataset dict.

    pycocotools prints progress on stdout; it is silenced so that the CLI prints only JSON.
    """
    if isinstance(annotations, COCO):
        return annotations
    coco = COCO()
    if isinstance(annotations, Mapping):
        dataset = copy.deepcopy(dict(annotations))
    else:
        path = Path(annotations)
        if not path.is_file():
            raise FileNotFoundError(f"COCO annotation file {path} does not exist (expected instances_*.json)")
        with path.open() as f:
            dataset = json.load(f)
    for key in ("images", "annotations", "categories"):
        if key not in dataset:
            raise ValueError(
                f"COCO annotations {annotations!s:.200}: missing key {key!r} (need images/annotations/categories)"
            )
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def encode_mask(mask: np.ndarray | torch.Tensor) -> dict[str, Any]:
    """Binary (H, W) mask -> compressed RLE with ``counts`` as ``str`` (JSON-serialisable, official form)."""
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    if mask.ndim != 2:
        raise ValueError(f"encode_mask: expected a 2-D (H, W) mask, got shape {tuple(mask.shape)}")
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def xyxy_to_xywh(boxes: torch.Tensor) -> torch.Tensor:
    """(N, 4) corner boxes -> (N, 4) COCO ``[x, y, w, h]`` boxes."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([x0, y0, x1 - x0, y1 - y0], dim=-1)


def to_coco_results(
    prediction: Mapping[str, torch.Tensor],
    image_id: int,
    contiguous_to_coco: Mapping[int, int] | Sequence[int],
    *,
    mask_threshold: float = 0.5,
    with_masks: bool | None = None,
) -> list[dict[str, Any]]:
    """Turn one torchvision detection output into official COCO result entries.

    Args:
        prediction: ``{"boxes": (N, 4) xyxy, "labels": (N,) contiguous ids, "scores": (N,),
            "masks": optional (N, 1, H, W) or (N, H, W) probabilities}`` in original image pixels.
        image_id: the COCO image id the prediction belongs to.
        contiguous_to_coco: contiguous label -> original COCO category id (a mapping, or a sequence
            indexed by the contiguous label; index 0 is the background).
        mask_threshold: probability above which a mask pixel is foreground (torchvision uses 0.5).
        with_masks: add ``segmentation``; default: when the prediction has ``masks``.
    """
    boxes = prediction["boxes"].detach().float().cpu()
    labels = prediction["labels"].detach().cpu().tolist()
    scores = prediction["scores"].detach().float().cpu().tolist()
    if with_masks is None:
        with_masks = "masks" in prediction
    masks = None
    if with_masks:
        if "masks" not in prediction:
            raise KeyError(f"to_coco_results: image {image_id}: with_masks=True but the prediction has no 'masks'")
        masks = prediction["masks"].detach().cpu()
        if masks.ndim == 4:
            masks = masks[:, 0]
        masks = (masks > mask_threshold).numpy()
    xywh = xyxy_to_xywh(boxes).tolist()
    results: list[dict[str, Any]] = []
    for i, (label, score) in enumerate(zip(labels, scores)):
        try:
            category_id = int(contiguous_to_coco[label])
        except (KeyError, IndexError) as err:
            raise KeyError(f"to_coco_results: image {image_id}: label {label} has no COCO category id") from err
        entry: dict[str, Any] = {
            "image_id": int(image_id),
            "category_id": category_id,
            "bbox": [round(float(v), 3) for v in xywh[i]],
            "score": round(float(score), 5),
        }
        if masks is not None:
            entry["segmentation"] = encode_mask(masks[i])
        results.append(entry)
    return results


def _prepare_results(results: Iterable[Mapping[str, Any]], iou_type: IouType, drop_bbox_for_segm: bool) -> list[dict]:
    entries = [dict(r) for r in results]
    for i, entry in enumerate(entries):
        for key in ("image_id", "category_id", "score"):
            if key not in entry:
                raise KeyError(f"result entry {i}: missing key {key!r} (official format: image_id, category_id, score)")
        if iou_type == "bbox" and "bbox" not in entry:
            raise KeyError(f"result entry {i}: missing 'bbox' ([x, y, w, h]) needed for --iou bbox")
        if iou_type == "segm":
            if "segmentation" not in entry:
                raise KeyError(f"result entry {i}: missing 'segmentation' (compressed RLE) needed for --iou segm")
            entry["segmentation"] = dict(entry["segmentation"])
            if drop_bbox_for_segm:
                entry.pop("bbox", None)
        if iou_type == "bbox":
            # COCO.loadRes would fill a polygon 'segmentation' from the box; an RLE one would be ignored,
            # so drop it to keep bbox evaluation independent of whether masks were predicted.
            entry.pop("segmentation", None)
    return entries


def evaluate_coco(
    annotations: str | Path | COCO | Mapping[str, Any],
    results: str | Path | Iterable[Mapping[str, Any]],
    iou_type: IouType = "bbox",
    *,
    image_ids: Sequence[int] | None = None,
    drop_bbox_for_segm: bool = True,
    verbose: bool = False,
) -> dict[str, float]:
    """Run pycocotools COCOeval and return ``{"AP": ..., "AP50": ..., ..., "ARl": ...}`` (fractions in [0, 1]).

    ``image_ids`` restricts evaluation to those images (``params.imgIds``, as the official demo does);
    default: every image of the ground truth. An empty result list scores 0 everywhere (pycocotools
    itself cannot load an empty list). Entries of -1 mean COCOeval found no ground truth for that bucket.
    """
    if iou_type not in ("bbox", "segm"):
        raise ValueError(f"evaluate_coco: iou_type must be 'bbox' or 'segm', got {iou_type!r}")
    gt = load_coco(annotations)
    if isinstance(results, (str, Path)):
        path = Path(results)
        if not path.is_file():
            raise FileNotFoundError(f"COCO results file {path} does not exist")
        with path.open() as f:
            results = json.load(f)
        if not isinstance(results, list):
            raise ValueError(
                f"COCO results file {path}: expected a JSON list of detections, got {type(results).__name__}"
            )
    entries = _prepare_results(results, iou_type, drop_bbox_for_segm)
    known = set(gt.getImgIds())
    unknown = sorted({e["image_id"] for e in entries} - known)
    if unknown:
        raise ValueError(f"COCO results: image ids {unknown[:10]} are not in the ground truth ({len(unknown)} unknown)")
    if image_ids is not None:
        wanted = set(int(i) for i in image_ids)
        entries = [e for e in entries if e["image_id"] in wanted]
    if not entries:
        return {name: 0.0 for name in STAT_NAMES}
    sink = sys.stderr if verbose else io.StringIO()
    with contextlib.redirect_stdout(sink):
        dt = gt.loadRes(entries)
        ev = COCOeval(gt, dt, iou_type)
        if image_ids is not None:
            ev.params.imgIds = sorted(int(i) for i in image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {name: float(v) for name, v in zip(STAT_NAMES, ev.stats)}


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: print COCOeval's numbers for a result file as one JSON object on stdout."""
    parser = argparse.ArgumentParser(
        prog="python -m mmoe.metrics.detection", description="COCO bbox/segm AP with pycocotools COCOeval."
    )
    parser.add_argument("--annotations", required=True, help="ground truth, COCO instances_*.json")
    parser.add_argument("--results", required=True, help="detections, official COCO results JSON list")
    parser.add_argument("--iou", choices=("bbox", "segm"), default="bbox", help="COCOeval iouType (default bbox)")
    parser.add_argument("--image-ids", type=int, nargs="*", default=None, help="evaluate only these image ids")
    parser.add_argument("--verbose", action="store_true", help="show pycocotools' own summary on stderr")
    args = parser.parse_args(argv)
    stats = evaluate_coco(args.annotations, args.results, args.iou, image_ids=args.image_ids, verbose=args.verbose)
    print(json.dumps(stats, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
