#!/usr/bin/env python
"""Throughput of the pretraining data pipeline (shards -> decoded, augmented, masked batches).

Measures samples/s of ``PretrainDataModule``'s training loader (three streams mixed in each batch:
decode, timm transforms, tokenizer, block-wise image masks, BERT text masks, collation) at the tiny
(64 px, patch 8) and base (224 px, patch 16) settings, for several worker counts, and optionally the
tiny model's training step on the same batches, to check that the loader outpaces it (the target: by at
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

from mmoe.data.shard_writer import iter_coco_captions, iter_image_folder, iter_text_files, write_shards
from mmoe.data.synthetic import make_world
from mmoe.train.data.pretraining import PretrainDataModule

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
    from mmoe.train.pretraining import MaskedPretraining

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


def probe_vqa(world: Path, epochs: int, seed: int = 0) -> dict[str, Any]:
    """Learnability check of the shapes world: a tiny CNN x bag-of-words VQA classifier from scratch.

    Not the project's model (no MoE, no pretraining): evidence that answers follow from the pixels,
    i.e. that the synthetic recipes can get well above the majority-answer baseline in minutes.
    """
    import re

    import numpy as np
    from PIL import Image
    from torch import nn

    torch.manual_seed(seed)

    def load(split: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str], list[str]]:
        qs = json.loads((world / f"vqa/v2_OpenEnded_mscoco_{split}2014_questions.json").read_text())["questions"]
        anns = json.loads((world / f"vqa/v2_mscoco_{split}2014_annotations.json").read_text())["annotations"]
        by_id = {a["question_id"]: a for a in anns}
        ids = sorted({q["image_id"] for q in qs})
        pos = {k: i for i, k in enumerate(ids)}
        imgs = [Image.open(world / f"coco/{split}2014/COCO_{split}2014_{k:012d}.jpg").convert("RGB") for k in ids]
        x = torch.tensor(np.stack([np.asarray(im, dtype=np.float32) / 127.5 - 1 for im in imgs])).permute(0, 3, 1, 2)
        words = [re.findall(r"[a-z]+", q["question"].lower())[:12] for q in qs]
        answers = [by_id[q["question_id"]]["multiple_choice_answer"] for q in qs]
        types = [by_id[q["question_id"]]["answer_type"] for q in qs]
        return x, torch.tensor([pos[q["image_id"]] for q in qs]), words, answers, types  # type: ignore[return-value]

    tx, ti, tw, ta, _ = load("train")
    vx, vi, vw, va, vt = load("val")
    vocab = {w: i + 1 for i, w in enumerate(sorted({w for ws in tw + vw for w in ws}))}
    labels = {a: i for i, a in enumerate(sorted(set(ta)))}

    def encode(words: list[list[str]], answers: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        q = torch.zeros(len(words), 12, dtype=torch.long)
        for i, ws in enumerate(words):
            q[i, : len(ws)] = torch.tensor([vocab[w] for w in ws])
        return q, torch.tensor([labels.get(a, -1) for a in answers])

    tq, ty = encode(tw, ta)
    vq, vy = encode(vw, va)
    side = tx.shape[-1] // 8
    cnn = nn.Sequential(
        nn.Conv2d(3, 32, 3, 2, 1),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, 2, 1),
        nn.ReLU(),
        nn.Conv2d(64, 64, 3, 2, 1),
        nn.ReLU(),
    )
    img_fc, emb = nn.Linear(64 * side * side, 256), nn.EmbeddingBag(len(vocab) + 1, 256, mode="mean", padding_idx=0)
    head = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, len(labels)))
    params = [*cnn.parameters(), *img_fc.parameters(), *emb.parameters(), *head.parameters()]
    opt = torch.optim.Adam(params, lr=2e-3)

    def forward(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return head(torch.relu(img_fc(cnn(x).flatten(1))) * emb(q))

    t0 = time.perf_counter()
    history = []
    for epoch in range(epochs):
        for b in torch.randperm(len(tq)).split(128):
            loss = nn.functional.cross_entropy(forward(tx[ti[b]], tq[b]), ty[b], ignore_index=-1)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            right = forward(vx[vi], vq).argmax(1) == vy
        acc = {"all": right.float().mean().item()}
        for t in ("yes/no", "number", "other"):
            sel = torch.tensor([x == t for x in vt])
            acc[t] = right[sel].float().mean().item()
        history.append({"epoch": epoch + 1, "seconds": time.perf_counter() - t0, **acc})
        print(f"probe epoch {epoch + 1}: val acc {acc['all']:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    majority = max(va.count(a) for a in set(va)) / len(va)
    return {"train_questions": len(tq), "val_questions": len(vq), "majority_baseline": majority, "history": history}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", nargs="+", default=["tiny", "base"], choices=sorted(SETTINGS))
    p.add_argument("--sources", nargs="+", default=["synthetic", "samples"], choices=["synthetic", "samples"])
    p.add_argument("--workers", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--batch-size", type=int, default=24, help="samples per batch (three streams together)")
    p.add_argument("--batches", type=int, default=20, help="timed batches per measurement (after 3 warm-up)")
    p.add_argument("--model", default=None, help="also time this backbone's pretraining step at the tiny setting")
    p.add_argument("--model-steps", type=int, default=5)
    p.add_argument(
        "--probe-vqa",
        type=int,
        default=0,
        metavar="EPOCHS",
        help="also train a tiny CNN x bag-of-words VQA probe on a 2000-scene shapes world",
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads in the main process (0: torch default)")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)  # main-process torch threads (DataLoader workers use 1 each)
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
        if args.probe_vqa:
            world = Path(tmp) / "probe-world"
            make_world(world, num_train=2000, num_val=200, image_size=64, seed=0)
            out["probe_vqa"] = probe_vqa(world, args.probe_vqa)
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
    if "probe_vqa" in out:
        pr = out["probe_vqa"]
        last = pr["history"][-1]
        print(
            f"VQA probe after {last['epoch']} epochs ({last['seconds']:.0f} s): val acc {last['all']:.3f} "
            f"(yes/no {last['yes/no']:.3f}, number {last['number']:.3f}, other {last['other']:.3f}); "
            f"majority answer {pr['majority_baseline']:.3f}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
