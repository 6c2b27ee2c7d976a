"""Copy a standard shapes world's VQA files with two relational question kinds added.

Why: the ``alt`` world asks "which shape is furthest to the left", a question whose answer depends on how the
objects lie relative to each other; the standard (tuning) world has no question of that form, so no lever for it
could be tuned there (docs/results/learning.md, "Relational questions on the tuning world"). This tool adds, per
scene with at least two objects whose extreme column / row holds exactly one of them:

- "What color is the object furthest to the right?" (answer: that object's colour);
- "What shape is the lowest object?" (answer: its shape).

The answers come from the COCO instance attributes that ``mmoe-synthetic`` writes (grid cell, colour, shape);
each gets 10 identical annotator answers. Images are not copied: ``OUT/coco`` links to the source world's.

Usage::

    python tools/add_relational_questions.py --world data/shapes --out data/shapes_rel
    mmoe-vqa-vocab --annotations data/shapes_rel/vqa/v2_mscoco_train2014_annotations.json \\
        --out data/shapes_rel/vqa/answer_vocab.json --min-count 9
"""

from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

Obj = tuple[str, str, str]  # (shape, colour, grid cell)


def _column(cell: str) -> int:
    return 0 if "left" in cell else 2 if "right" in cell else 1


def _row(cell: str) -> int:
    return 0 if "top" in cell else 2 if "bottom" in cell else 1


# (question, question_type, the object's rank along the axis (largest wins), index of the answering attribute)
KINDS: list[tuple[str, str, Callable[[Obj], int], int]] = [
    ("What color is the object furthest to the right?", "what color is the object", lambda o: _column(o[2]), 1),
    ("What shape is the lowest object?", "what shape is the lowest", lambda o: _row(o[2]), 0),
]


def _read(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as e:
        raise SystemExit(f"add_relational_questions: {path} not found (is --world a mmoe-synthetic world?)") from e


def add_relational(world: Path, out: Path) -> dict[str, int]:
    """Write ``out/vqa/*`` (the source questions plus the relational ones) and link ``out/coco``; returns the
    number of questions added per split."""
    (out / "vqa").mkdir(parents=True, exist_ok=True)
    link = out / "coco"
    if not link.exists():
        os.symlink((world / "coco").resolve(), link)
    added: dict[str, int] = {}
    for split in ("train", "val"):
        questions = _read(world / "vqa" / f"v2_OpenEnded_mscoco_{split}2014_questions.json")
        annotations = _read(world / "vqa" / f"v2_mscoco_{split}2014_annotations.json")
        instances = _read(world / "coco" / "annotations" / f"instances_{split}2014.json")
        names = {c["id"]: c["name"] for c in instances["categories"]}
        scenes: dict[int, list[Obj]] = defaultdict(list)
        for a in instances["annotations"]:
            attrs = a.get("attributes")
            if not attrs or "color" not in attrs or "position" not in attrs:
                raise SystemExit(f"add_relational_questions: instances_{split}2014.json annotation {a['id']} has no "
                                 "colour/position attributes (only mmoe-synthetic worlds carry them)")  # fmt: skip
            scenes[a["image_id"]].append((names[a["category_id"]], attrs["color"], attrs["position"]))
        qid = max(q["question_id"] for q in questions["questions"]) + 1
        n = 0
        for image_id, objs in sorted(scenes.items()):
            if len(objs) < 2:
                continue
            for text, qtype, key, field in KINDS:
                top = max(key(o) for o in objs)
                extreme = [o for o in objs if key(o) == top]
                if len(extreme) != 1:
                    continue
                answer = extreme[0][field]
                votes = [{"answer": answer, "answer_confidence": "yes", "answer_id": i + 1} for i in range(10)]
                questions["questions"].append({"image_id": image_id, "question": text, "question_id": qid})
                annotations["annotations"].append(
                    {
                        "question_type": qtype,
                        "multiple_choice_answer": answer,
                        "answers": votes,
                        "image_id": image_id,
                        "answer_type": "other",
                        "question_id": qid,
                    }
                )
                qid, n = qid + 1, n + 1
        (out / "vqa" / f"v2_OpenEnded_mscoco_{split}2014_questions.json").write_text(json.dumps(questions))
        (out / "vqa" / f"v2_mscoco_{split}2014_annotations.json").write_text(json.dumps(annotations))
        added[split] = n
    return added


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=Path, required=True, help="a standard mmoe-synthetic world")
    parser.add_argument("--out", type=Path, required=True, help="folder for the world with relational questions")
    args = parser.parse_args()
    print(json.dumps(add_relational(args.world, args.out)))


if __name__ == "__main__":
    main()
