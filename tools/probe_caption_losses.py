#!/usr/bin/env python
"""Which caption-word loss teaches the tiny backbone to see shapes? Image-only training on a shapes world.

Each run trains a fresh backbone (``create_model``) plus a linear head on the pooled image tokens (CLS + the max
over the patch tokens, ``pool_embedding(..., "cls_max")``), from the world's training images and their COCO
captions, with one of three targets:

* ``words``: a softmax over the caption vocabulary against one caption's distinct words ([Joulin16] sec. 3, the
  form of ``MaskedPretraining(bow_weight)``);
* ``grounded``: one binary loss per grounded word (shapes, colours, sizes, numbers, positions of ``world.json``)
  named by any of the image's captions;
* ``tags``: one binary loss per shape word named by any of the image's captions (``CaptionTags``, the form of
  ``MaskedPretraining(tag_weight)``).

It reports, every ``--eval-every`` steps, how often the shapes the head ranks highest are the ones in the val
image ("shape precision": for an image with n distinct shapes, the share of its top-n shape logits that are
there; ranking at random gives about 0.45 on these worlds). Why: in a loss over every word the colour, count and
position words are learned first and starve the slow shape words of gradient ([Pezeshki21]); docs/results/learning.md.

    python tools/probe_caption_losses.py --world runs/world --targets words grounded tags --steps 400
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from mmoe.data.grounded import CaptionTags
from mmoe.model.contrastive import pool_embedding
from mmoe.model.registry import create_model
from mmoe.train.optim import cosine_with_warmup

GROUNDED_GROUPS = ("shapes", "colors", "sizes", "numbers", "positions")


def load_split(world: Path, split: str) -> tuple[torch.Tensor, list[set[str]], list[list[str]]]:
    """Images (N, 3, H, W) in [-1, 1], the shape names in each (COCO instances) and each image's captions."""
    ann = world / "coco" / "annotations"
    inst = json.loads((ann / f"instances_{split}2014.json").read_text())
    caps = json.loads((ann / f"captions_{split}2014.json").read_text())
    names = {c["id"]: c["name"] for c in inst["categories"]}
    shapes: dict[int, set[str]] = {}
    for a in inst["annotations"]:
        shapes.setdefault(a["image_id"], set()).add(names[a["category_id"]])
    texts: dict[int, list[str]] = {}
    for c in caps["annotations"]:
        texts.setdefault(c["image_id"], []).append(c["caption"])
    ids = sorted(shapes)
    files = {im["id"]: im["file_name"] for im in inst["images"]}
    arrays = [np.asarray(Image.open(world / "coco" / f"{split}2014" / files[i]).convert("RGB")) for i in ids]
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return x, [shapes[i] for i in ids], [texts[i] for i in ids]


def run(
    world: Path, target: str, *, model: str, steps: int, batch: int, lr: float, eval_every: int, seed: int
) -> list[dict]:
    """Train one backbone + head with ``target``; the shape precision at every ``eval_every`` steps."""
    torch.manual_seed(seed)
    summary = json.loads((world / "world.json").read_text())
    shape_words = list(summary["shapes"])
    tx, _, tcaps = load_split(world, "train")
    vx, vshapes, _ = load_split(world, "val")
    if target == "words":
        vocab = sorted({w for caps in tcaps for c in caps for w in CaptionTags.words_of(c)})
        index = {w: i for i, w in enumerate(vocab)}
        shape_cols = [index[s] for s in shape_words]
        width = len(vocab)
    else:
        words = shape_words if target == "tags" else [w for g in GROUNDED_GROUPS for w in summary.get(g, [])]
        tags = CaptionTags(words)
        shape_cols = list(range(len(shape_words)))
        width = len(tags)
    backbone = create_model(model, drop_path=0.0)
    head = nn.Linear(backbone.config.dim, width)
    params = [*backbone.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.05)
    sched = cosine_with_warmup(opt, warmup_steps=30, total_steps=steps, min_lr_ratio=0.1)
    rng = random.Random(seed)

    def logits(x: torch.Tensor) -> torch.Tensor:
        return head(pool_embedding(backbone(image=x).features, "cls_max"))

    def precision() -> float:
        backbone.eval()
        with torch.no_grad():
            lg = torch.cat([logits(vx[i : i + 100]) for i in range(0, len(vx), 100)])[:, shape_cols]
        backbone.train()
        hit = total = 0
        for row, present in enumerate(vshapes):
            top = lg[row].topk(len(present)).indices.tolist()
            hit += sum(shape_words[j] in present for j in top)
            total += len(present)
        return hit / total

    out = []
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        idx = rng.sample(range(len(tx)), batch)
        lg = logits(tx[idx])
        if target == "words":
            t = torch.zeros(batch, width)
            for r, i in enumerate(idx):
                for w in set(CaptionTags.words_of(rng.choice(tcaps[i]))):
                    t[r, index[w]] = 1.0
            loss = -(t / t.sum(1, keepdim=True) * F.log_softmax(lg, -1)).sum(1).mean()
        else:
            loss = F.binary_cross_entropy_with_logits(lg, tags([" . ".join(tcaps[i]) for i in idx]))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % eval_every == 0:
            rec = {"target": target, "step": step, "loss": float(loss.detach()), "shape_precision": precision(),
                   "seconds": time.perf_counter() - t0}  # fmt: skip
            print(json.dumps(rec), flush=True)
            out.append(rec)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world", required=True, type=Path)
    p.add_argument("--targets", nargs="+", default=["words", "grounded", "tags"], choices=["words", "grounded", "tags"])
    p.add_argument("--model", default="tiny_mhmoe")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=None, help="also write every record here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    records = []
    for target in args.targets:
        records += run(args.world, target, model=args.model, steps=args.steps, batch=args.batch_size, lr=args.lr,
                       eval_every=args.eval_every, seed=args.seed)  # fmt: skip
    print("| target | " + " | ".join(f"step {r['step']}" for r in records if r["target"] == args.targets[0]) + " |")
    for target in args.targets:
        print(
            f"| {target} | "
            + " | ".join(f"{r['shape_precision']:.3f}" for r in records if r["target"] == target)
            + " |"
        )
    if args.json:
        args.json.write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    main()
