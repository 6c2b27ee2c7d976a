#!/usr/bin/env python
"""Throughput of the pretraining data pipeline (shards -> decoded, augmented, masked batches).

Measures samples/s of ``PretrainDataModule``'s training loader (three streams mixed in each batch:
decode, timm transforms, tokenizer, block-wise image masks, BERT text masks, collation) at the tiny
(64 px, patch 8) and base (224 px, patch 16) settings, for several worker counts, and optionally the
tiny model's training step on the same batches, to check that the loader outpaces it (issue 4: by at
least 3x on 2 cores).

    python tools/bench_data.py --workers 0 1 2 --batches 30 --model tiny_mhmoe --json bench_data.json

Sources: ``synthetic`` (shapes world rendered at the measured size) and ``samples`` (the real COCO /
ImageNet images of ``datasets/samples`` shrunk to a 384 px longer side, as ``make_shards --max-side``
would). Everything is written to a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from mmoe.data.shards import iter_coco_captions, iter_image_folder, iter_text_files, write_shards
from mmoe.data.synthetic import make_world
from mmoe.train.datamodule import PretrainDataModule

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {
    "tiny": {"image_size": 64, "patch_size": 8, "max_text_len": 32},
    "base": {"image_size": 224, "patch_size": 16, "max_text_len": 64},
}


def build_shards(root: Path, source: str, image_size: int) -> dict[str, list[str]]:
    """Pair/image/text shards for one source under ``root``; returns the patterns per stream."""
    if source == "synthetic":
        make_world(root, num_train=240, num_val=8, image_size=image_size, seed=0, shards=True, shard_maxcount=40)
        sh = root / "shards"
    else:
        samples = REPO / "datasets" / "samples"
        ann = samples / "coco" / "annotations" / "captions_val2017.json"
        if not ann.exists():
            raise FileNotFoundError(f"bench_data: {ann} not found (the samples source needs datasets/samples)")
        sh = root / "shards"
        write_shards(iter_coco_captions(ann, samples / "coco" / "val2017"), sh / "pair", kind="pair", max_side=384)
        write_shards(iter_image_folder(samples / "imagenet" / "val"), sh / "image", kind="image", max_side=384)
        caps = json.loads(ann.read_text())["annotations"]
        txt = root / "captions.txt"
        txt.write_text("\n".join(c["caption"].strip() for c in caps) + "\n")
        write_shards(iter_text_files([txt]), sh / "text", kind="text")
    return {k: [str(sh / k / "train-*.tar")] for k in ("image", "text", "pair")}


def bench_loader(
    patterns: dict[str, list[str]], setting: dict[str, int], *, workers: int, batch_size: int, batches: int
) -> dict[str, Any]:
    dm = PretrainDataModule(
        image_shards=patterns["image"],
        text_shards=patterns["text"],
        pair_shards=patterns["pair"],
        batch_size=batch_size,
        num_workers=workers,
        steps_per_epoch=batches + 3,
        shuffle_buffer=64,
        min_mask_patches=16 if setting["image_size"] // setting["patch_size"] >= 8 else 4,
        hflip=0.0,
        **setting,
    )
    it = iter(dm.train_dataloader())
    for _ in range(3):  # warm-up: worker start, shuffle buffer fill
        next(it)
    t0 = time.perf_counter()
    n = 0
    for batch in it:
        n += sum(int(sub["image"].shape[0] if "image" in sub else sub["text"].shape[0]) for sub in batch.values())
    dt = time.perf_counter() - t0
    return {"samples": n, "seconds": dt, "samples_per_s": n / dt, "per_worker": n / dt / max(1, workers)}


def bench_model(
    model: str, patterns: dict[str, list[str]], setting: dict[str, int], batch_size: int, steps: int
) -> dict[str, Any]:
    """Training step time (forward, backward, AdamW) of MaskedPretraining on real pipeline batches."""
    from mmoe.train.pretrain import MaskedPretraining

    module = MaskedPretraining(backbone=model)
    opt = torch.optim.AdamW(module.parameters(), lr=1e-4)
    dm = PretrainDataModule(
        image_shards=patterns["image"],
        text_shards=patterns["text"],
        pair_shards=patterns["pair"],
        batch_size=batch_size,
        num_workers=0,
        steps_per_epoch=steps + 2,
        shuffle_buffer=64,
        min_mask_patches=4,
        hflip=0.0,
        **setting,
    )
    batches = list(dm.train_dataloader())
    times = []
    for i, batch in enumerate(batches):
        t0 = time.perf_counter()
        losses, aux, _ = module.stream_losses(batch)
        loss = sum(losses.values()) + aux
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i >= 2:  # skip warm-up steps
            times.append(time.perf_counter() - t0)
    step = sum(times) / len(times)
    return {"model": model, "batch_size": batch_size, "step_s": step, "samples_per_s": batch_size / step}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", nargs="+", default=["tiny", "base"], choices=sorted(SETTINGS))
    p.add_argument("--sources", nargs="+", default=["synthetic", "samples"], choices=["synthetic", "samples"])
    p.add_argument("--workers", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--batch-size", type=int, default=24, help="samples per batch (three streams together)")
    p.add_argument("--batches", type=int, default=20, help="timed batches per measurement (after 3 warm-up)")
    p.add_argument("--model", default=None, help="also time this backbone's pretraining step at the tiny setting")
    p.add_argument("--model-steps", type=int, default=5)
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, (os.cpu_count() or 1)))
    rows = []
    out: dict[str, Any] = {
        "host": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "python": sys.version.split()[0],
            "machine": platform.machine(),
        },
        "args": vars(args),
        "loader": rows,
    }
    with tempfile.TemporaryDirectory() as tmp:
        for setting_name in args.settings:
            setting = SETTINGS[setting_name]
            for source in args.sources:
                root = Path(tmp) / f"{setting_name}-{source}"
                patterns = build_shards(root, source, setting["image_size"])
                for w in args.workers:
                    r = bench_loader(patterns, setting, workers=w, batch_size=args.batch_size, batches=args.batches)
                    r.update(setting=setting_name, source=source, workers=w, **setting)
                    rows.append(r)
                    print(
                        f"{setting_name:5s} {source:9s} {setting['image_size']:4d}px workers={w}  "
                        f"{r['samples_per_s']:8.1f} samples/s  ({r['per_worker']:.1f} per worker)",
                        flush=True,
                    )
                if args.model and setting_name == "tiny" and source == "synthetic":
                    m = bench_model(args.model, patterns, setting, args.batch_size, args.model_steps)
                    out["model"] = m
                    print(
                        f"model {args.model}: {m['step_s']:.3f} s/step = {m['samples_per_s']:.1f} samples/s", flush=True
                    )
    print("\n| setting | source | image | workers | samples/s | per worker |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['setting']} | {r['source']} | {r['image_size']} | {r['workers']} | {r['samples_per_s']:.1f} | "
            f"{r['per_worker']:.1f} |"
        )
    if "model" in out:
        best = max(r["samples_per_s"] for r in rows if r["setting"] == "tiny" and r["source"] == "synthetic")
        out["loader_over_model"] = best / out["model"]["samples_per_s"]
        print(f"\nloader (tiny, synthetic, best) / model step throughput = {out['loader_over_model']:.1f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
