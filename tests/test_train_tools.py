"""mmoe.cli.build_visual_codebook (k-means codebook) and tools/run_demo.py."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from helpers import REPO


def _tool(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"_tool_{name}", REPO / "tools" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_kmeans_recovers_separated_clusters() -> None:
    from mmoe.cli.build_visual_codebook import kmeans

    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 6, generator=g) * 10
    x = torch.cat([c + 0.1 * torch.randn(50, 6, generator=g) for c in centers])
    found, inertia = kmeans(x, 4, iters=10, seed=0)
    # every true center has a centroid within noise distance, and the mean squared distance is the noise level
    assert torch.cdist(centers, found).min(dim=1).values.max() < 0.5
    assert inertia < 6 * 0.1**2 * 2
    with pytest.raises(SystemExit, match="fewer than"):
        kmeans(x[:3], 4)


@pytest.mark.slow
def test_build_codebook_from_shards(tmp_path: Path) -> None:
    from mmoe.data.codebook import load_codebook
    from mmoe.data.synthetic import make_world

    make_world(tmp_path / "w", num_train=16, num_val=4, image_size=64, seed=0, shards=True, shard_maxcount=8)
    out = tmp_path / "cb.pt"
    from mmoe.cli import build_visual_codebook

    summary = build_visual_codebook.run(
        ["--shards", str(tmp_path / "w/shards/image/train-*.tar"), "--codes", "8", "--max-images", "16",
         "--iters", "3", "--out", str(out)]
    )  # fmt: skip
    assert summary["num_patches"] == 16 * 64
    assert load_codebook(out, patch_size=8).shape == (8, 8 * 8 * 3)


@pytest.mark.slow
def test_demo_quick_runs_every_step_and_is_idempotent(tmp_path: Path) -> None:
    demo = _tool("run_demo")
    report = demo.main(["--out", str(tmp_path / "demo"), "--quick"])
    text = report.read_text()
    assert "train/loss_mlm_text" in text and "activation ratio" in text
    assert "| from the pretraining above |" in text and "| from scratch (same recipe, steps and seed) |" in text
    assert (tmp_path / "demo" / "experts" / "index.html").is_file() and "experts/index.html" in text  # the viewer
    first_ckpt = tmp_path / "demo" / "pretrain" / "checkpoints" / "last.ckpt"
    mtime = first_ckpt.stat().st_mtime
    demo.main(["--out", str(tmp_path / "demo"), "--quick"])  # second run reuses every output
    assert first_ckpt.stat().st_mtime == mtime
    assert "pretraining reused" in report.read_text()


def test_relational_questions_name_the_extreme_object(tmp_path: Path) -> None:
    import json

    from mmoe.data.synthetic import make_world

    make_world(tmp_path / "w", num_train=24, num_val=6, image_size=32, seed=3)
    added = _tool("add_relational_questions").add_relational(tmp_path / "w", tmp_path / "r")
    assert added["train"] > 0 and (tmp_path / "r" / "coco" / "train2014").is_dir()
    inst = json.loads((tmp_path / "w" / "coco" / "annotations" / "instances_train2014.json").read_text())
    names = {c["id"]: c["name"] for c in inst["categories"]}
    scenes: dict[int, list[dict]] = {}
    for a in inst["annotations"]:
        scenes.setdefault(a["image_id"], []).append(a)
    src = json.loads((tmp_path / "w" / "vqa" / "v2_mscoco_train2014_annotations.json").read_text())["annotations"]
    out = json.loads((tmp_path / "r" / "vqa" / "v2_mscoco_train2014_annotations.json").read_text())["annotations"]
    assert out[: len(src)] == src and len(out) == len(src) + added["train"]
    for a in out[len(src) :]:
        objs = scenes[a["image_id"]]
        # from the boxes, not the cell names the tool reads: the answer's object lies strictly right of / below the rest
        if a["question_type"] == "what color is the object":
            key, answer = (lambda o: o["bbox"][0]), (lambda o: o["attributes"]["color"])
        else:
            key, answer = (lambda o: o["bbox"][1]), (lambda o: names[o["category_id"]])
        ranked = sorted(objs, key=key)
        assert len(objs) >= 2 and a["multiple_choice_answer"] == answer(ranked[-1])
        assert key(ranked[-1]) > key(ranked[-2])


@pytest.mark.parametrize("variant", ["standard", "alt", "holdout"])
def test_shape_diagnosis_catches_an_answerer_blind_to_shapes(tmp_path: Path, variant: str) -> None:
    """A rule that answers presence questions from the colour alone is right on every "no" group but the one that
    needs the shape, which it gets wrong every time; the correct answers score 100 in every group."""
    import json
    import re

    from mmoe.data.synthetic import make_world

    tool = _tool("diagnose_vqa_shapes")
    make_world(tmp_path / "w", num_train=8, num_val=60, image_size=32, seed=5, variant=variant)
    inst = json.loads((tmp_path / "w" / "coco" / "annotations" / "instances_val2014.json").read_text())
    colours_of: dict[int, set[str]] = {}
    for a in inst["annotations"]:
        colours_of.setdefault(a["image_id"], set()).add(a["attributes"]["color"])
    vqa = tmp_path / "w" / "vqa"
    questions = {
        q["question_id"]: q
        for q in json.loads((vqa / "v2_OpenEnded_mscoco_val2014_questions.json").read_text())["questions"]
    }
    anns = json.loads((vqa / "v2_mscoco_val2014_annotations.json").read_text())["annotations"]
    truth = [{"question_id": a["question_id"], "answer": a["multiple_choice_answer"]} for a in anns]
    blind = []
    for a in anns:
        words = set(re.findall(r"[a-z]+", questions[a["question_id"]]["question"].lower()))
        answer = a["multiple_choice_answer"]
        if a["question_type"] in tool.PRESENCE_TYPES:
            answer = "yes" if words & colours_of[a["image_id"]] else "no"
        blind.append({"question_id": a["question_id"], "answer": answer})
    (tmp_path / "truth.json").write_text(json.dumps(truth))
    (tmp_path / "blind.json").write_text(json.dumps(blind))
    right = tool.diagnose(tmp_path / "w", tmp_path / "truth.json")
    counts = right.pop("how many <shape>: answers given")
    n_counts = sum(v["n"] for k, v in right.items() if k.startswith("how many <shape>"))
    assert counts["n"] == n_counts > 0 and sum(counts["predicted"].values()) == n_counts
    assert right and all(g["acc"] == 100.0 for g in right.values())
    assert right["answer is a shape"]["predicted_in_scene"] == 100.0
    wrong = tool.diagnose(tmp_path / "w", tmp_path / "blind.json")
    key = "presence: no, that colour with another shape"
    assert wrong[key]["n"] > 0 and wrong[key]["acc"] == 0.0
    assert wrong["presence: no, neither"]["acc"] == 100.0 and wrong["presence: yes"]["acc"] == 100.0


def test_token_shape_probe_reads_the_token_under_each_object(tmp_path: Path) -> None:
    from mmoe.data.synthetic import make_world
    from mmoe.model.registry import create_model

    tool = _tool("probe_token_shapes")
    make_world(tmp_path / "w", num_train=12, num_val=4, image_size=64, seed=2, variant="alt")
    images, objects, classes = tool.load_split(tmp_path / "w", "train")
    assert images.shape == (12, 3, 64, 64) and classes == 5 and all(objects)
    model = create_model("tiny_dense").eval()
    feats = tool.token_features(model, images, objects)
    n = sum(len(o) for o in objects)
    assert feats["stem"][0].shape == (n, model.config.dim) and feats["last layer"][1].tolist() == [
        s for objs in objects for _, _, s in objs
    ]
    # the probe itself: features that carry the label one-hot are read perfectly, shuffled labels are not
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 5, (400,), generator=g)
    x = torch.randn(400, 16, generator=g) * 0.1
    x[torch.arange(400), labels] += 1.0
    assert tool.linear_probe((x[:300], labels[:300]), (x[300:], labels[300:]), 5) == 1.0
    noise = torch.randn(400, 16, generator=g)
    assert tool.linear_probe((noise[:300], labels[:300]), (noise[300:], labels[300:]), 5) < 0.5


def test_caption_loss_probe_reads_its_world_and_trains_each_target(tmp_path: Path) -> None:
    from mmoe.data.synthetic import make_world

    tool = _tool("probe_caption_losses")
    make_world(tmp_path / "w", num_train=12, num_val=4, image_size=64, seed=3, variant="alt")
    x, shapes, caps = tool.load_split(tmp_path / "w", "val")
    assert x.shape == (4, 3, 64, 64) and -1.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert all(shapes) and all(len(c) == 5 for c in caps)
    # the first caption lists every object, so the tags of all captions are the image's shapes
    from mmoe.data.grounded import CaptionTags

    words = ["disc", "diamond", "hexagon", "wedge", "plus"]
    tags = CaptionTags(words)
    for present, c in zip(shapes, caps, strict=True):
        assert {words[i] for i in tags.tags(" . ".join(c))} == present
    for target in ("words", "grounded", "tags"):
        recs = tool.run(tmp_path / "w", target, model="tiny_dense", steps=2, batch=4, lr=1e-3, eval_every=2, seed=0)
        assert len(recs) == 1 and 0.0 <= recs[0]["shape_precision"] <= 1.0 and math.isfinite(recs[0]["loss"])
