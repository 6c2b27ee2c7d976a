"""``mmoe-vqa-vocab``: build the VQAv2 answer vocabulary ([B3] sec. 3.1, as in [ViLT] and BEiT-3).

Every human answer of the given official annotation files (normally train2014 + val2014) is
normalized like the official evaluator (``mmoe.metrics.vqa.normalize_answer``: punctuation, number
words, articles, contractions) and counted; answers seen at least ``--min-count`` times (default 9,
giving 3129 answers on VQAv2 train+val) are kept, ordered by count (descending) then alphabetically,
so the same files always give the same class ids. Output: ``{"answers": [...], "meta": {...}}``,
read by ``mmoe.data.vqa.load_answer_vocab`` and stored in every fine-tuned checkpoint.

    mmoe-vqa-vocab --annotations A_train.json A_val.json --out answers.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from mmoe.data.vqa import build_answer_vocab, save_answer_vocab


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mmoe-vqa-vocab`` console script; exit status 0 when the vocabulary is written."""
    parser = argparse.ArgumentParser(prog="mmoe-vqa-vocab", description=__doc__.splitlines()[0])
    parser.add_argument("--annotations", nargs="+", required=True, help="official v2_mscoco_*_annotations.json files")
    parser.add_argument("--out", required=True, help="output JSON file")
    parser.add_argument("--min-count", type=int, default=9, help="keep answers seen at least this often (default 9)")
    args = parser.parse_args(argv)
    if args.min_count < 1:
        parser.error(f"--min-count must be >= 1, got {args.min_count}")
    lists = []
    for path in args.annotations:
        p = Path(path)
        if not p.is_file():
            parser.error(f"--annotations: {p} is not a file")
        data = json.loads(p.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or "annotations" not in data:
            parser.error(f"--annotations: {p} has no 'annotations' list (expected the official VQA format)")
        lists.append(data["annotations"])
    answers = build_answer_vocab(lists, min_count=args.min_count)
    meta = {"min_count": args.min_count, "sources": [Path(p).name for p in args.annotations], "size": len(answers)}
    save_answer_vocab(args.out, answers, meta)
    print(f"wrote {len(answers)} answers (seen >= {args.min_count} times) to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
