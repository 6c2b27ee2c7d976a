"""The synthetic shapes world: determinism and official-format validity (docs/interfaces.md section 6)."""

from __future__ import annotations

import filecmp
import json
import random
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmoe.data.synthetic import COLORS, SHAPES, caption_scene, make_world, render_scene, sample_scene, vqa_for_scene


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world")
    make_world(out, num_train=12, num_val=4, image_size=48, seed=3, shards=True, shard_maxcount=5)
    return out


def _all_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_deterministic_bytes(world: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    make_world(again, num_train=12, num_val=4, image_size=48, seed=3, shards=True, shard_maxcount=5)
    files = _all_files(world)
    assert files == _all_files(again) and len(files) > 50
    assert "shards/pair/train-000002.tar" in files and "shards/text/val-000000.tar" in files
    match, mismatch, errors = filecmp.cmpfiles(world, again, files, shallow=False)
    assert not mismatch and not errors
    other = tmp_path / "other"
    make_world(other, num_train=12, num_val=4, image_size=48, seed=4)
    assert (other / "coco/train2014/COCO_train2014_000000000001.jpg").read_bytes() != (
        world / "coco/train2014/COCO_train2014_000000000001.jpg"
    ).read_bytes()


def test_coco_files_load_with_pycocotools(world: Path) -> None:
    from pycocotools.coco import COCO

    caps = COCO(str(world / "coco/annotations/captions_train2014.json"))
    assert len(caps.getImgIds()) == 12 and len(caps.anns) == 60
    inst = COCO(str(world / "coco/annotations/instances_val2014.json"))
    assert [c["name"] for c in inst.loadCats(inst.getCatIds())] == list(SHAPES)
    for img_id in inst.getImgIds():
        info = inst.loadImgs(img_id)[0]
        assert (world / "coco/val2014" / info["file_name"]).is_file()
        image = np.asarray(Image.open(world / "coco/val2014" / info["file_name"]).convert("RGB"), dtype=np.float32)
        for ann in inst.loadAnns(inst.getAnnIds(imgIds=img_id)):
            mask = inst.annToMask(ann).astype(bool)
            x, y, w, h = ann["bbox"]
            assert 0 <= x and 0 <= y and x + w <= 48 and y + h <= 48 and mask.sum() > 0
            # the mask covers the drawn shape: its pixels are near the shape's colour
            inside = image[mask].mean(0)
            target = np.array(COLORS[ann["attributes"]["color"]], dtype=np.float32)
            assert np.abs(inside - target).max() < 45, (ann, inside)


def test_vqa_official_keys_and_answers(world: Path) -> None:
    qs = json.loads((world / "vqa/v2_OpenEnded_mscoco_train2014_questions.json").read_text())
    an = json.loads((world / "vqa/v2_mscoco_train2014_annotations.json").read_text())
    assert {"info", "task_type", "data_type", "license", "data_subtype", "questions"} <= qs.keys()
    assert {"info", "license", "data_subtype", "annotations", "data_type"} <= an.keys()
    by_id = {a["question_id"]: a for a in an["annotations"]}
    assert {q["question_id"] for q in qs["questions"]} == set(by_id)
    types = Counter()
    for q in qs["questions"]:
        a = by_id[q["question_id"]]
        assert a["image_id"] == q["image_id"] and q["question_id"] // 1000 == q["image_id"]
        assert len(a["answers"]) == 10 and [x["answer_id"] for x in a["answers"]] == list(range(1, 11))
        assert a["answer_type"] in ("yes/no", "number", "other") and a["question_type"]
        assert a["multiple_choice_answer"] in {x["answer"] for x in a["answers"]}
        types[a["answer_type"]] += 1
    assert set(types) == {"yes/no", "number", "other"}


def test_answers_follow_the_scene() -> None:
    rng = random.Random(0)
    yes = no = 0
    for _ in range(200):
        objs = sample_scene(rng)
        for q in vqa_for_scene(objs, rng):
            if q.question.startswith("How many shapes"):
                assert q.answer == str(len(objs))
            if q.question.startswith("What color is the "):
                shape = q.question.removeprefix("What color is the ").rstrip("?")
                assert [o.color for o in objs if o.shape == shape] == [q.answer]
            if q.question.startswith("Is there "):
                *_, color, shape = q.question.rstrip("?").split()
                assert (q.answer == "yes") == any(o.color == color and o.shape == shape for o in objs)
            yes += q.answer == "yes"
            no += q.answer == "no"
        assert len(caption_scene(objs, rng)) == 5
    assert yes == no  # one yes and one no question per scene


def test_nlvr2_imagefolder_text(world: Path) -> None:
    lines = (world / "nlvr2/train.json").read_text().splitlines()
    recs = [json.loads(x) for x in lines]
    assert len(recs) == 12 and Counter(r["label"] for r in recs) == {"True": 6, "False": 6}
    for r in recs:
        stem = r["identifier"].rsplit("-", 1)[0]
        for side in ("img0", "img1"):
            assert Image.open(world / "nlvr2/images/train" / f"{stem}-{side}.png").size == (48, 48)
    classes = sorted(p.name for p in (world / "imagenet/train").iterdir())
    assert classes == sorted(SHAPES)
    assert sum(1 for _ in (world / "imagenet/val").rglob("*.jpg")) == 4
    docs = (world / "text/train.txt").read_text().splitlines()
    assert len(docs) == 12 and all(d.strip() for d in docs)


def test_render_is_pure_function_of_rng() -> None:
    objs = sample_scene(random.Random(1))
    a = render_scene(objs, 32, random.Random(5))
    b = render_scene(objs, 32, random.Random(5))
    assert a.tobytes() == b.tobytes() and a.size == (32, 32)


def test_alt_world_shares_no_words_with_the_standard_one(tmp_path: Path) -> None:
    from mmoe.data.synthetic import ALT_WORLD, STANDARD_WORLD

    assert not set(ALT_WORLD.colors) & set(STANDARD_WORLD.colors)
    assert not set(ALT_WORLD.shape_words) & set(STANDARD_WORLD.shape_words)
    assert not set(ALT_WORLD.sizes) & set(STANDARD_WORLD.sizes)
    out = tmp_path / "alt"
    summary = make_world(out, num_train=40, num_val=8, image_size=48, seed=1, variant="alt")
    assert summary["variant"] == "alt" and summary["shapes"] == list(ALT_WORLD.shape_words)
    anns = json.loads((out / "vqa/v2_mscoco_train2014_annotations.json").read_text())["annotations"]
    qs = {
        q["question_id"]: q
        for q in json.loads((out / "vqa/v2_OpenEnded_mscoco_train2014_questions.json").read_text())["questions"]
    }
    kinds = Counter(a["question_type"] for a in anns)
    assert set(kinds) == {"how many", "can you see a", "which colour does the", "which shape is furthest"}
    standard_words = set(STANDARD_WORLD.colors) | set(STANDARD_WORLD.shape_words) | {"small", "large"}
    for a in anns:
        words = set(re.findall(r"[a-z]+", qs[a["question_id"]]["question"].lower()))
        assert not words & standard_words, qs[a["question_id"]]["question"]
        if a["question_type"] == "which colour does the":
            assert a["multiple_choice_answer"] in ALT_WORLD.colors
        if a["question_type"] == "how many":
            assert 0 <= int(a["multiple_choice_answer"]) <= ALT_WORLD.max_objects
    cats = json.loads((out / "coco/annotations/instances_train2014.json").read_text())["categories"]
    assert [c["name"] for c in cats] == list(ALT_WORLD.shape_words)
    assert sorted(p.name for p in (out / "imagenet/train").iterdir()) == sorted(ALT_WORLD.shape_words)
    with pytest.raises(ValueError, match="variant='nope'"):
        make_world(tmp_path / "x", num_train=1, num_val=1, variant="nope")


def test_holdout_world_shares_no_words_with_the_other_two(tmp_path: Path) -> None:
    from mmoe.data.synthetic import ALT_WORLD, HOLDOUT_WORLD, STANDARD_WORLD

    for other in (STANDARD_WORLD, ALT_WORLD):
        assert not set(HOLDOUT_WORLD.colors) & set(other.colors)
        assert not set(HOLDOUT_WORLD.shape_words) & set(other.shape_words)
        assert not set(HOLDOUT_WORLD.sizes) & set(other.sizes)
    out = tmp_path / "holdout"
    summary = make_world(out, num_train=40, num_val=8, image_size=48, seed=1, variant="holdout")
    assert summary["variant"] == "holdout" and summary["shapes"] == list(HOLDOUT_WORLD.shape_words)
    anns = json.loads((out / "vqa/v2_mscoco_train2014_annotations.json").read_text())["annotations"]
    qs = {
        q["question_id"]: q["question"]
        for q in json.loads((out / "vqa/v2_OpenEnded_mscoco_train2014_questions.json").read_text())["questions"]
    }
    kinds = Counter(a["question_type"] for a in anns)
    assert set(kinds) == {"what number of", "does the scene contain", "what is the colour", "name the shape"}
    other_words = {w for spec in (STANDARD_WORLD, ALT_WORLD) for w in (*spec.colors, *spec.shape_words)}
    alt_openings = ("how many", "can you see", "which colour", "which shape")
    for a in anns:
        q = qs[a["question_id"]].lower()
        assert not set(re.findall(r"[a-z]+", q)) & other_words, q
        assert not q.startswith(alt_openings), q
        if a["question_type"] == "what is the colour":
            assert a["multiple_choice_answer"] in HOLDOUT_WORLD.colors
        if a["question_type"] == "name the shape":
            assert a["multiple_choice_answer"] in HOLDOUT_WORLD.shape_words


def test_leftmost_answer_follows_the_scene() -> None:
    from mmoe.data.synthetic import ALT_WORLD

    rng = random.Random(5)
    seen = 0
    for _ in range(200):
        objs = sample_scene(rng, spec=ALT_WORLD)
        assert 1 <= len(objs) <= ALT_WORLD.max_objects
        for q in vqa_for_scene(objs, rng, ALT_WORLD):
            if q.question_type == "which shape is furthest":
                left = min(objs, key=lambda o: o.col)
                assert q.answer == left.shape and sum(o.col == left.col for o in objs) == 1
                seen += 1
            if q.question_type == "can you see a":
                color, shape = q.question.removesuffix("?").split()[-2:]
                assert (q.answer == "yes") == any(o.color == color and o.shape == shape for o in objs)
    assert seen > 20
