"""Linear probe: can an object's shape be read from the backbone's image token at the object's centre?

Why: on the shapes world the VQA recipe learns colours, positions and counts but no shapes
(``tools/diagnose_vqa_shapes.py``). This says where the shape is lost. For every object of a
``mmoe-synthetic`` world (its COCO instances), the token of the 8-px grid cell under the object's box centre is
taken from the conv stem's output and from the last layer (image-only forward, CLS dropped); a logistic
regression is fitted on the train scenes' tokens and scored on the val scenes'. A backbone whose tokens carry
shape scores far above chance (1 / number of shapes); one with freshly initialised weights is the floor.

Usage (checkpoints: anything ``mmoe.model.load_model`` reads, e.g. a fine-tuning run's ``last.ckpt``;
``random:<model>`` for a fresh ``create_model(<model>)``)::

    python tools/probe_token_shapes.py --world data/shapes_alt --models random:tiny_mhmoe runs/vqa/checkpoints/last.ckpt
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mmoe.model.registry import create_model, load_model


def load_split(world: Path, split: str) -> tuple[torch.Tensor, list[list[tuple[float, float, int]]], int]:
    """Images (N, 3, H, W) in [0, 1], per image its objects' (box centre y, x, shape index), number of shapes."""
    path = world / "coco" / "annotations" / f"instances_{split}2014.json"
    try:
        inst = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise SystemExit(f"probe_token_shapes: {path} not found (is --world a mmoe-synthetic world?)") from e
    files = {im["id"]: im["file_name"] for im in inst["images"]}
    shape_index = {c["id"]: i for i, c in enumerate(sorted(inst["categories"], key=lambda c: c["id"]))}
    objects: dict[int, list[tuple[float, float, int]]] = defaultdict(list)
    for a in inst["annotations"]:
        x, y, w, h = a["bbox"]
        objects[a["image_id"]].append((y + h / 2, x + w / 2, shape_index[a["category_id"]]))
    ids = sorted(objects)
    arrays = [np.asarray(Image.open(world / "coco" / f"{split}2014" / files[i]).convert("RGB")) for i in ids]
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div_(255.0)
    return images, [objects[i] for i in ids], len(shape_index)


@torch.no_grad()
def token_features(
    model: torch.nn.Module, images: torch.Tensor, objects: list[list[tuple[float, float, int]]]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Readout name -> (features of the token under each object's centre, shape labels). ``images`` in [0, 1]
    are normalised with the model's own ``image_mean`` / ``image_std``, as its transforms do."""
    cfg = model.config
    mean = torch.tensor(cfg.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.image_std).view(1, 3, 1, 1)
    grid = cfg.img_size // cfg.patch_size
    scale = cfg.img_size / images.shape[-1]
    chunks: dict[str, list[torch.Tensor]] = {"stem": [], "last layer": []}
    for s in range(0, len(images), 200):
        batch = (images[s : s + 200] - mean) / std
        if scale != 1:
            batch = torch.nn.functional.interpolate(batch, size=cfg.img_size)
        chunks["stem"].append(model.vision_embed.patch_embed(batch))
        chunks["last layer"].append(model(image=batch).features[:, 1:])
    out = {}
    for name, parts in chunks.items():
        tokens = torch.cat(parts)
        feats, labels = [], []
        for b, objs in enumerate(objects):
            for cy, cx, shape in objs:
                r = min(int(cy * scale // cfg.patch_size), grid - 1)
                c = min(int(cx * scale // cfg.patch_size), grid - 1)
                feats.append(tokens[b, r * grid + c])
                labels.append(shape)
        out[name] = (torch.stack(feats), torch.tensor(labels))
    return out


def linear_probe(
    train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor], classes: int
) -> float:
    """Val accuracy of a logistic regression (standardised features, Adam, 300 full-batch steps)."""
    torch.manual_seed(0)
    mu, sd = train[0].mean(0), train[0].std(0) + 1e-5
    x_tr, x_va = (train[0] - mu) / sd, (val[0] - mu) / sd
    lin = torch.nn.Linear(x_tr.shape[1], classes)
    opt = torch.optim.Adam(lin.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(300):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(lin(x_tr), train[1]).backward()
        opt.step()
    with torch.no_grad():
        return float((lin(x_va).argmax(1) == val[1]).float().mean())


def main(argv: Sequence[str] | None = None) -> int:
    """Print one line per model: val accuracy of the probe on the stem's and the last layer's tokens."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--world", type=Path, required=True)
    p.add_argument("--models", nargs="+", required=True, help="checkpoints, or random:<model name>")
    p.add_argument("--json", type=Path, default=None, help="also write the accuracies here")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    train_images, train_objects, classes = load_split(args.world, "train")
    val_images, val_objects, _ = load_split(args.world, "val")
    results = {}
    print(f"| model | stem tokens | last-layer tokens | (chance {1 / classes:.3f})\n|---|---|---|")
    for spec in args.models:
        model = create_model(spec.split(":", 1)[1]) if spec.startswith("random:") else load_model(spec, strict=False)
        model.eval()
        tr = token_features(model, train_images, train_objects)
        va = token_features(model, val_images, val_objects)
        results[spec] = {k: round(linear_probe(tr[k], va[k], classes), 3) for k in tr}
        print(f"| {spec} | {results[spec]['stem']} | {results[spec]['last layer']} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
