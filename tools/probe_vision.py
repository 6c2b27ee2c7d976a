#!/usr/bin/env python
"""How fast does the tiny backbone learn to see? Shape classification on a shapes world's ImageFolder split.

Why: VQA from scratch stays at its blind prior for hundreds of steps. This probe takes the language out and asks
how quickly one image -> shape label is learned, through three readouts of the same model:

- ``stem``: the conv patch stem alone, max over its token grid (a small CNN);
- ``max``: stem + Transformer, max over the final patch tokens;
- ``cls``: stem + Transformer, the image CLS token (how the BEiT-3 heads read an image).

Each prints validation accuracy every 100 steps as JSON lines (docs/results/learning.md)::

    python tools/probe_vision.py --world data/shapes --readout stem max cls --steps 300 --lr 3e-4
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from mmoe.model.registry import create_model


def load_split(folder: Path) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Images as a (N, 3, H, W) tensor in [-1, 1] (the tiny models' mean/std 0.5) and their class ids."""
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if not classes:
        raise SystemExit(f"probe_vision: no class folders under {folder}")
    images, labels = [], []
    for k, name in enumerate(classes):
        for f in sorted((folder / name).iterdir()):
            images.append(np.asarray(Image.open(f).convert("RGB")))
            labels.append(k)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    return x, torch.tensor(labels), classes


class Probe(nn.Module):
    """The backbone with one readout and a linear classifier on top."""

    def __init__(self, model: str, readout: str, num_classes: int, overrides: dict) -> None:
        super().__init__()
        self.backbone = create_model(model, **overrides)
        self.readout = readout
        dim = self.backbone.config.dim
        self.head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, num_classes))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if self.readout == "stem":
            return self.head(self.backbone.vision_embed.patch_embed(image).amax(dim=1))
        feats = self.backbone(image=image).features
        return self.head(feats[:, 0] if self.readout == "cls" else feats[:, 1:].amax(dim=1))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=Path, required=True, help="a shapes world (mmoe-synthetic --out)")
    p.add_argument("--model", default="tiny_mhmoe")
    p.add_argument("--overrides", default="{}", help="backbone overrides as JSON, e.g. '{\"stem_blocks\": 0}'")
    p.add_argument("--readout", nargs="+", default=["stem", "max", "cls"], choices=["stem", "max", "cls"])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    x_tr, y_tr, classes = load_split(args.world / "imagenet" / "train")
    x_va, y_va, _ = load_split(args.world / "imagenet" / "val")
    for readout in args.readout:
        torch.manual_seed(args.seed)
        model = Probe(args.model, readout, len(classes), json.loads(args.overrides))
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
        gen = torch.Generator().manual_seed(args.seed)
        t0 = time.perf_counter()
        for step in range(1, args.steps + 1):
            idx = torch.randint(len(y_tr), (args.batch_size,), generator=gen)
            loss = F.cross_entropy(model(x_tr[idx]), y_tr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step % 100 == 0 or step == args.steps:
                model.eval()
                with torch.no_grad():
                    acc = float((model(x_va).argmax(-1) == y_va).float().mean())
                model.train()
                row = {"readout": readout, "step": step, "seconds": round(time.perf_counter() - t0, 1), "val_acc": acc}
                print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
