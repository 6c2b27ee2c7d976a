"""Does a VQA model on the shapes world see shapes, or does it answer from colours and counts alone?

Why: a question kind's score can sit well above its blind prior without the skill it names. "Can you see a
magenta disc?" is answered "no" correctly whenever no magenta object is there, so a model that reads colours and
not shapes scores ~85% on it (docs/results/learning.md, "What the model does not see"). This tool splits a
results file (the VQA results format, ``mmoe predict`` or ``mmoe.baselines.film_vqa``) by what each question
needs, using the COCO instance attributes (colour, shape) that ``mmoe-synthetic`` writes:

- presence questions naming a colour and a shape ("can you see a", "is there a"): the "yes" ones, and the "no" ones
  split into "that colour is there with another shape" (the only group that needs the shape), "that shape is there
  in another colour", "neither";
- questions answered by a shape name: correct, and how often the predicted shape is in the scene at all;
- "how many <shape>s": scenes where every object has that shape (a shape-blind count of all objects is right)
  against scenes with other shapes too.

Accuracy here is exact match with the majority answer (``multiple_choice_answer``), not the 10-annotator VQA
score. Usage::

    python tools/diagnose_vqa_shapes.py --world data/shapes_alt --results runs/vqa/results/vqa_results.json
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mmoe.metrics.vqa import load_vqa_json

PRESENCE_TYPES = ("can you see a", "is there a", "does the scene contain")
COUNT_TYPES = ("how many", "what number of")


def _read(path: Path, key: str | None = None) -> Any:
    """``mmoe.metrics.vqa.load_vqa_json``, its errors turned into one line that names the file."""
    try:
        return load_vqa_json(path, key)
    except (OSError, ValueError) as e:
        where = "" if str(path) in str(e) else f"{path}: "
        raise SystemExit(f"diagnose_vqa_shapes: {where}{e}") from None


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def _named_shape(words: list[str], shapes: Sequence[str]) -> str | None:
    found = [s for s in shapes if s in words or s + "s" in words or s + "es" in words]
    return found[0] if len(found) == 1 else None


def diagnose(world: Path, results: Path, split: str = "val") -> dict[str, dict[str, Any]]:
    """Group name -> {"n", "correct", "acc"} (plus ``predicted`` counts for shape answers)."""
    inst = _read(world / "coco" / "annotations" / f"instances_{split}2014.json")
    names = {c["id"]: c["name"] for c in inst["categories"]}
    scenes: dict[int, list[tuple[str, str]]] = defaultdict(list)
    for a in inst["annotations"]:
        scenes[a["image_id"]].append((a["attributes"]["color"], names[a["category_id"]]))
    colours = sorted({c for objs in scenes.values() for c, _ in objs})
    shapes = sorted(names.values())
    questions = {q["question_id"]: q for q in _read(world / "vqa" / f"v2_OpenEnded_mscoco_{split}2014_questions.json",
                                                    "questions")}  # fmt: skip
    anns = _read(world / "vqa" / f"v2_mscoco_{split}2014_annotations.json", "annotations")
    predicted = {r["question_id"]: r["answer"] for r in _read(results)}
    groups: dict[str, list[bool]] = defaultdict(list)
    shape_preds: Counter[str] = Counter()
    count_preds: Counter[str] = Counter()
    in_scene: list[bool] = []
    for a in anns:
        qid = a["question_id"]
        if qid not in predicted:
            raise SystemExit(f"diagnose_vqa_shapes: {results} has no answer for question {qid}")
        objs, gt, pred = scenes[a["image_id"]], a["multiple_choice_answer"], predicted[qid]
        words = _words(questions[qid]["question"])
        shape = _named_shape(words, shapes)
        colour = next((c for c in colours if c in words), None)
        if a["question_type"] in PRESENCE_TYPES and shape and colour:
            if gt == "yes":
                group = "presence: yes"
            elif any(c == colour for c, _ in objs):
                group = "presence: no, that colour with another shape"
            elif any(s == shape for _, s in objs):
                group = "presence: no, that shape in another colour"
            else:
                group = "presence: no, neither"
            groups[group].append(pred == gt)
        elif gt in shapes:
            groups["answer is a shape"].append(pred == gt)
            shape_preds[pred] += 1
            in_scene.append(pred in {s for _, s in objs})
        elif a["question_type"] in COUNT_TYPES and shape:
            every = all(s == shape for _, s in objs)
            groups[f"how many <shape>: {'every object' if every else 'not every object'} has it"].append(pred == gt)
            count_preds[pred] += 1
    out: dict[str, dict[str, Any]] = {
        k: {"n": len(v), "correct": sum(v), "acc": round(100 * sum(v) / len(v), 2)} for k, v in sorted(groups.items())
    }
    if in_scene:
        out["answer is a shape"]["predicted_in_scene"] = round(100 * sum(in_scene) / len(in_scene), 2)
        out["answer is a shape"]["predicted"] = dict(shape_preds.most_common())
    if count_preds:
        out["how many <shape>: answers given"] = {
            "n": sum(count_preds.values()),
            "predicted": dict(count_preds.most_common()),
        }
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Print the groups as a markdown table (and JSON with --json)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--world", type=Path, required=True, help="the mmoe-synthetic world the results answer")
    p.add_argument("--results", type=Path, required=True, help="VQA results JSON ([{question_id, answer}])")
    p.add_argument("--split", default="val")
    p.add_argument("--json", type=Path, default=None, help="also write the groups here")
    args = p.parse_args(argv)
    out = diagnose(args.world, args.results, args.split)
    print("| group | questions | exact-match accuracy |\n|---|---|---|")
    for k, v in out.items():
        if "acc" not in v:  # the answers given to the named-shape counts
            print(f"| {k} | {v['n']} | {', '.join(f'{a!r}: {c}' for a, c in v['predicted'].items())} |")
            continue
        extra = f" (predicted shape in the scene: {v['predicted_in_scene']})" if "predicted_in_scene" in v else ""
        print(f"| {k} | {v['n']} | {v['acc']}{extra} |")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
