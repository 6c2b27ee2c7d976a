"""A non-transformer yardstick for VQA: a small CNN + GRU with FiLM fusion (Perez et al. 2018, [FiLM]).

Why it exists: a VQA accuracy on the synthetic shapes world means little alone. This ~100-line model,
trained on the same files for the same minutes, says what a simple learner reaches on that data, so that
the Multiway Transformer's number has a yardstick (docs/results/learning.md).

The model: question words (lower-cased, split on non-letters, a vocabulary from the training questions)
-> embedding -> one GRU layer -> its last state; the image -> 4 conv blocks (3x3, BatchNorm, ReLU; 32, 64,
128, 128 channels, the first three with stride 2) with two coordinate channels appended before the last
two blocks (positions are answers here), where the question's per-channel (gamma, beta) modulate the
normalised features (FiLM); global max pooling -> an MLP over the answer vocabulary, soft-score BCE as the
VQA recipes use ([B3] sec. 3.1). Images are decoded once into memory (the world is small).

CLI (prints the official-metric summary as JSON and writes ``results.json`` in the VQA results format)::

    python -m mmoe.baselines.film_vqa --world data/shapes --minutes 8 --out runs/film_vqa
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from mmoe.data.vqa import VQADataset, VQAFiles, load_answer_vocab
from mmoe.files import atomic_write_json
from mmoe.metrics.vqa import evaluate_vqa, load_vqa_json

__all__ = ["FiLMVQA", "tokenize", "run", "main"]


def tokenize(text: str) -> list[str]:
    """Lower-cased alphabetic words of a question (numbers and punctuation are not needed here)."""
    return re.findall(r"[a-z]+", text.lower())


def _coords(x: torch.Tensor) -> torch.Tensor:
    b, _, h, w = x.shape
    ys = torch.linspace(-1, 1, h, device=x.device, dtype=x.dtype).view(1, 1, h, 1).expand(b, 1, h, w)
    xs = torch.linspace(-1, 1, w, device=x.device, dtype=x.dtype).view(1, 1, 1, w).expand(b, 1, h, w)
    return torch.cat([x, ys, xs], dim=1)


class FiLMVQA(nn.Module):
    """CNN image encoder, GRU question encoder, FiLM-modulated last two conv blocks, MLP answer head."""

    def __init__(self, vocab_size: int, num_answers: int, *, width: int = 128, embed: int = 64) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            *[m for c_in, c_out in ((3, 32), (32, 64), (64, width)) for m in self._block(c_in, c_out, 2)]
        )
        self.film_convs = nn.ModuleList([nn.Conv2d(width + 2, width, 3, 1, 1, bias=False) for _ in range(2)])
        self.film_norms = nn.ModuleList([nn.BatchNorm2d(width, affine=False) for _ in range(2)])
        self.embed = nn.Embedding(vocab_size, embed, padding_idx=0)
        self.gru = nn.GRU(embed, width, batch_first=True)
        self.film = nn.Linear(width, 2 * 2 * width)
        self.head = nn.Sequential(nn.Linear(2 * width, 256), nn.ReLU(inplace=True), nn.Linear(256, num_answers))

    @staticmethod
    def _block(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]

    def forward(self, image: torch.Tensor, words: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        packed = nn.utils.rnn.pack_padded_sequence(
            self.embed(words), lengths.cpu(), batch_first=True, enforce_sorted=False
        )
        q = self.gru(packed)[1][0]  # (B, width): last hidden state
        gammas_betas = self.film(q).view(q.shape[0], 2, 2, -1, 1, 1)
        x = self.stem(image)
        for i, (conv, norm) in enumerate(zip(self.film_convs, self.film_norms)):
            h = norm(conv(_coords(x)))
            h = F.relu((1 + gammas_betas[:, i, 0]) * h + gammas_betas[:, i, 1])
            x = x + h  # residual, as FiLM's blocks
        pooled = torch.cat([x.amax(dim=(2, 3)), q], dim=1)
        return self.head(pooled)


def _load_split(world: Path, split: str, vocab: Sequence[str], image_size: int) -> tuple[VQADataset, torch.Tensor]:
    files = VQAFiles(
        questions=str(world / "vqa" / f"v2_OpenEnded_mscoco_{split}2014_questions.json"),
        annotations=str(world / "vqa" / f"v2_mscoco_{split}2014_annotations.json"),
        image_dir=str(world / "coco" / f"{split}2014"),
    )
    ds = VQADataset(files, answer_vocab=vocab, on_missing="error")
    paths = sorted({it["image_path"] for it in ds.items})
    index = {p: i for i, p in enumerate(paths)}
    arrays = [np.asarray(Image.open(p).convert("RGB").resize((image_size, image_size))) for p in paths]
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
    for it in ds.items:
        it["image_index"] = index[it["image_path"]]
    return ds, images


def _encode_words(questions: Sequence[str], word_ids: dict[str, int]) -> tuple[torch.Tensor, torch.Tensor]:
    toks = [[word_ids.get(w, 1) for w in tokenize(q)] or [1] for q in questions]
    lengths = torch.tensor([len(t) for t in toks])
    words = torch.zeros(len(toks), int(lengths.max()), dtype=torch.long)
    for i, t in enumerate(toks):
        words[i, : len(t)] = torch.tensor(t)
    return words, lengths


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train for ``--minutes`` (or ``--steps``), answer the val questions, score them with the VQA metric."""
    p = argparse.ArgumentParser(prog="python -m mmoe.baselines.film_vqa", description=__doc__.split("\n")[0])
    p.add_argument("--world", required=True, type=Path, help="a shapes-world folder (mmoe-synthetic --out)")
    p.add_argument("--answer-vocab", type=Path, default=None, help="default: WORLD/vqa/answer_vocab.json")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--minutes", type=float, default=8.0, help="training wall-clock budget")
    p.add_argument("--steps", type=int, default=None, help="stop after this many steps (before --minutes)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    vocab = load_answer_vocab(args.answer_vocab or args.world / "vqa" / "answer_vocab.json")
    train, train_images = _load_split(args.world, "train", vocab, args.image_size)
    val, val_images = _load_split(args.world, "val", vocab, args.image_size)
    words = sorted({w for it in train.items for w in tokenize(it["question"])})
    word_ids = {w: i + 2 for i, w in enumerate(words)}  # 0 pad, 1 unknown
    tr_words, tr_len = _encode_words([it["question"] for it in train.items], word_ids)
    tr_img = torch.tensor([it["image_index"] for it in train.items])
    tr_y = torch.stack([train.targets(it["answers"]) for it in train.items])
    model = FiLMVQA(len(word_ids) + 2, len(vocab))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    t0, step, losses = time.perf_counter(), 0, []
    gen = torch.Generator().manual_seed(args.seed)
    model.train()
    while time.perf_counter() - t0 < 60 * args.minutes and (args.steps is None or step < args.steps):
        idx = torch.randint(len(tr_y), (args.batch_size,), generator=gen)
        logits = model(train_images[tr_img[idx]], tr_words[idx], tr_len[idx])
        loss = F.binary_cross_entropy_with_logits(logits, tr_y[idx], reduction="sum") / len(idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        step += 1
    train_s = time.perf_counter() - t0
    model.eval()
    va_words, va_len = _encode_words([it["question"] for it in val.items], word_ids)
    va_img = torch.tensor([it["image_index"] for it in val.items])
    results = []
    with torch.no_grad():
        for s in range(0, len(va_img), 256):
            logits = model(val_images[va_img[s : s + 256]], va_words[s : s + 256], va_len[s : s + 256])
            for it, k in zip(val.items[s : s + 256], logits.argmax(-1).tolist()):
                results.append({"question_id": it["question_id"], "answer": vocab[k]})
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "results.json", results)
    anns = load_vqa_json(args.world / "vqa" / "v2_mscoco_val2014_annotations.json", "annotations")
    summary = evaluate_vqa(anns, results)
    summary.pop("perQuestion")
    summary.update(steps=step, train_seconds=round(train_s, 1), final_loss=float(np.mean(losses[-50:])))
    atomic_write_json(args.out / "summary.json", summary)
    print(json.dumps(summary, indent=1))
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; exit status 0 when the run finished."""
    run(argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
