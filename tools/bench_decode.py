r"""Benchmark caption decoding: tokens/s with the key/value cache vs re-encoding image + prefix every step.

BEiT-3 decodes captions with a [MASK] query after the prefix ([B3] sec. 3.1). Without a cache every step
re-runs the image (1 + P tokens) and the whole prefix; with the cache (docs/interfaces.md section 8) a step costs
two one-token passes (append the real token, query the mask). This script measures both on the same weights and
checks that they produce the same tokens.

EOS is banned during the benchmark so that every row decodes exactly ``length - 1`` tokens and the numbers compare
like for like. Example::

    python tools/bench_decode.py --model tiny_mhmoe --batch 8 --lengths 8 16 32 --beams 1 3 \
        --out docs/results/decode_cpu.json
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch
from torch import nn

from mmoe.data.tokenizer import build_tokenizer
from mmoe.files import atomic_write_json
from mmoe.model import create_model
from mmoe.model.generation import SpecialIds, beam_search, greedy_search


def bench(
    model_name: str,
    *,
    batch: int,
    lengths: list[int],
    beams: list[int],
    repeats: int,
    image_size: int | None,
    seed: int,
) -> list[dict]:
    """Time greedy/beam decoding with and without the cache; returns one row per (beams, length, cache)."""
    torch.manual_seed(seed)
    overrides = {"img_size": image_size} if image_size else {}
    backbone = create_model(model_name, **overrides).eval()
    cfg = backbone.config
    tok = build_tokenizer(cfg.tokenizer, max_len=cfg.max_text_len, path=cfg.tokenizer_path)
    special = SpecialIds.from_tokenizer(tok)
    lm_head = nn.Linear(cfg.dim, cfg.vocab_size)

    def head(features: torch.Tensor) -> torch.Tensor:
        logits = lm_head(features)
        logits[:, special.eos_id] = float("-inf")  # fixed-length decoding for a fair comparison
        return logits

    image = torch.randn(batch, 3, cfg.img_size, cfg.img_size)
    rows = []
    for k in beams:
        for length in lengths:
            if length > cfg.max_text_len:
                raise ValueError(f"--lengths: {length} exceeds the model's max_text_len {cfg.max_text_len}")
            outputs = {}
            for use_cache in (True, False):
                times = []
                for _ in range(repeats + 1):  # first run warms up
                    t0 = time.perf_counter()
                    if k == 1:
                        out = greedy_search(
                            backbone, head, image, special=special, max_length=length, use_cache=use_cache
                        )
                    else:
                        out = beam_search(
                            backbone,
                            head,
                            image,
                            special=special,
                            num_beams=k,
                            length_penalty=0.6,
                            max_length=length,
                            use_cache=use_cache,
                        )
                    times.append(time.perf_counter() - t0)
                best = min(times[1:])
                generated = sum(len(t) for t in out.tokens)
                outputs[use_cache] = out.tokens
                rows.append(
                    {
                        "beams": k,
                        "length": length,
                        "cache": use_cache,
                        "batch": batch,
                        "generated_tokens": generated,
                        "seconds": best,
                        "tokens_per_s": generated / best,
                    }
                )
            rows[-2]["same_tokens_as_no_cache"] = rows[-1]["same_tokens_as_no_cache"] = outputs[True] == outputs[False]
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny_mhmoe", help="registered model name or YAML path")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lengths", type=int, nargs="+", default=[8, 16, 32], help="text positions incl. BOS")
    p.add_argument("--beams", type=int, nargs="+", default=[1, 3])
    p.add_argument("--repeats", type=int, default=2, help="timed runs after one warm-up (best is reported)")
    p.add_argument("--image-size", type=int, default=None, help="override the model's img_size")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the rows and the environment as JSON here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = ("batch", "lengths", "beams", "repeats", "image_size", "seed")
    rows = bench(args.model, **{k: getattr(args, k) for k in names})
    env = {
        "model": args.model,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "load_avg_1m": os.getloadavg()[0],
        "device": "cpu",
    }
    print(f"# decode benchmark: {env}")
    print("| beams | length | batch | tokens | no cache tok/s | cache tok/s | speed-up | same tokens |")
    print("|---|---|---|---|---|---|---|---|")
    for i in range(0, len(rows), 2):
        c, n = rows[i], rows[i + 1]
        print(
            f"| {c['beams']} | {c['length']} | {c['batch']} | {c['generated_tokens']} | {n['tokens_per_s']:.1f} | "
            f"{c['tokens_per_s']:.1f} | {c['tokens_per_s'] / n['tokens_per_s']:.2f}x | "
            f"{c['same_tokens_as_no_cache']} |"
        )
    if args.out:
        atomic_write_json(args.out, {"env": env, "rows": rows}, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
