"""mmoe.metrics.captions: the Python PTB tokenizer, scores vs pycocoevalcap's Java pipeline, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import SAMPLES
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

import mmoe.metrics.captions as mc
from mmoe.metrics.captions import evaluate_files, java_available, main, ptb_tokenize, score_captions

CAPTIONS = SAMPLES / "coco" / "annotations" / "captions_val2017.json"
needs_samples = pytest.mark.skipif(not CAPTIONS.is_file(), reason="datasets/samples/coco is missing")
needs_java = pytest.mark.skipif(not java_available(), reason="java is not on PATH (official PTB tokenizer/METEOR)")


@pytest.mark.parametrize(
    "text, expected",
    [
        # expectations are the Java PTBTokenizer (stanford-corenlp-3.4.1, -lowerCase) + punctuation removal
        (
            "A man's dog, running (fast) on the \"beach\"... isn't it?",
            "a man 's dog running -lrb- fast -rrb- on the beach is n't it",
        ),
        ("Two cats-and dogs; 3.5 km/h U.S. e-mail", "two cats-and dogs 3.5 km/h u.s. e-mail"),
        ("I cannot do it, gonna wanna", "i can not do it gon na wan na"),
        ("He said 'hello' [ok] {x} & 50% $5 #1", "he said hello -lsb- ok -rsb- -lcb- x -rcb- & 50 % $ 5 # 1"),
        ("Don\u2019t \u201cquoted\u201d", "do n't quoted"),
        ("etc. Mr. Smith at 5 p.m. in St. Louis.", "etc. mr. smith at 5 p.m. in st. louis"),
        ("a b -- c - d ... e", "a b c d e"),
        ("1,000 people 3:30 2.5x the 80's", "1,000 people 3:30 2.5 x the 80 's"),
        ("A model kitchen from the 1950s.", "a model kitchen from the 1950s"),
        ("what?!", "what ?!"),
        ("can't won't", "ca n't wo n't"),
    ],
)
def test_ptb_tokenize_matches_java_on_known_cases(text, expected):
    assert ptb_tokenize(text) == expected


def _sample_refs() -> dict[int, list[str]]:
    return mc.load_references(CAPTIONS)


@needs_samples
def test_perfect_and_constant_predictions():
    refs = _sample_refs()
    assert len(refs) == 10 and all(len(v) == 5 for v in refs.values())
    # a caption identical to one reference scores BLEU-1 = 1 against that reference set
    perfect = score_captions({k: [v[0]] for k, v in refs.items()}, {k: v[0] for k, v in refs.items()}, meteor=False)
    assert perfect["Bleu_1"] == pytest.approx(1.0, abs=1e-6) and perfect["Bleu_4"] == pytest.approx(1.0, abs=1e-6)
    held_out = score_captions({k: v[1:] for k, v in refs.items()}, {k: v[0] for k, v in refs.items()}, meteor=False)
    constant = score_captions(
        {k: v[1:] for k, v in refs.items()}, {k: "a picture of something" for k in refs}, meteor=False
    )
    assert held_out["CIDEr"] > 3 * constant["CIDEr"]
    assert held_out["Bleu_4"] > constant["Bleu_4"]
    assert held_out["METEOR"] is None and "METEOR" in held_out["unavailable"]  # not computed -> unavailable, not 0


def test_meteor_unavailable_without_java(monkeypatch):
    monkeypatch.setattr(mc, "java_available", lambda: False)
    out = score_captions({1: ["a red circle"]}, {1: "a red circle"})
    assert out["METEOR"] is None and out["unavailable"] == ["METEOR"]
    with pytest.raises(RuntimeError, match="java"):
        mc.tokenize_captions({1: ["x"]}, "java")


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(KeyError, match="no references"):
        score_captions({1: ["a"]}, {2: "b"})
    bad = tmp_path / "res.json"
    bad.write_text(json.dumps([{"image_id": 1, "caption": "a"}, {"image_id": 1, "caption": "b"}]))
    with pytest.raises(ValueError, match="more than one caption"):
        mc.load_results(bad)


@needs_samples
@needs_java
def test_python_pipeline_agrees_with_java_pipeline_within_1_percent():
    """Leave-one-out on the real COCO samples: each of the 5 captions in turn is the prediction, the other 4 the
    references; the official Java PTB tokenizer (one JVM call for everything) vs ours, same pycocoevalcap scorers."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    refs = _sample_refs()
    flat = {(k, j): [{"caption": c}] for k, v in refs.items() for j, c in enumerate(v)}
    keyed = {i: flat[key] for i, key in enumerate(flat)}
    java_tok = PTBTokenizer().tokenize(keyed)
    java = {key: java_tok[i][0] for i, key in enumerate(flat)}
    py = {key: ptb_tokenize(v[0]["caption"]) for key, v in flat.items()}
    assert sum(java[k] == py[k] for k in flat) / len(flat) >= 0.98  # tokenization itself agrees
    for held in range(5):
        scores = {}
        for name, toks in (("java", java), ("python", py)):
            gts = {k: [toks[(k, j)] for j in range(5) if j != held] for k in refs}
            res = {k: [toks[(k, held)]] for k in refs}
            bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
            scores[name] = [*bleu, Rouge().compute_score(gts, res)[0], Cider().compute_score(gts, res)[0]]
        for a, b in zip(scores["python"], scores["java"]):
            assert a == pytest.approx(b, rel=0.01, abs=1e-6)


def test_cli_prints_json(tmp_path, capsys):
    ann = {
        "images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}],
        "annotations": [
            {"image_id": 1, "id": 1, "caption": "A red circle on the left."},
            {"image_id": 1, "id": 2, "caption": "A small red circle."},
            {"image_id": 2, "id": 3, "caption": "Two blue squares."},
            {"image_id": 2, "id": 4, "caption": "Blue squares, two of them."},
        ],
    }
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    res = [
        {"image_id": 1, "caption": "a small red circle"},
        {"image_id": 2, "caption": "two blue squares"},
        {"image_id": 9, "caption": "not annotated"},
    ]
    (tmp_path / "res.json").write_text(json.dumps(res))
    assert (
        main(
            [
                "--annotations",
                str(tmp_path / "ann.json"),
                "--results",
                str(tmp_path / "res.json"),
                "--no-meteor",
                "--ignore-missing",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["num_images"] == 2 and out["num_ignored"] == 1
    assert out["Bleu_1"] == pytest.approx(1.0, abs=1e-6)
    assert 0.0 < out["CIDEr"] and out["METEOR"] is None
    with pytest.raises(KeyError):
        evaluate_files(tmp_path / "ann.json", tmp_path / "res.json")  # image 9 has no references


@pytest.mark.slow
@needs_samples
@needs_java
def test_full_java_pipeline_with_meteor(tmp_path):
    """The whole official pipeline (Java PTB tokenizer + METEOR jar, one METEOR JVM) through our CLI entry."""
    refs = _sample_refs()
    res = [{"image_id": k, "caption": v[0]} for k, v in refs.items()]
    (tmp_path / "res.json").write_text(json.dumps(res))
    out_java = evaluate_files(CAPTIONS, tmp_path / "res.json", tokenizer="java", meteor=True)
    out_py = evaluate_files(CAPTIONS, tmp_path / "res.json", tokenizer="python", meteor=False)
    assert 0.0 < out_java["METEOR"] <= 1.0 and out_java["unavailable"] == [] and out_java["tokenizer"] == "java"
    for key in ("Bleu_4", "ROUGE_L", "CIDEr"):
        assert out_py[key] == pytest.approx(out_java[key], rel=0.01)


def test_constant_caption_baseline_picks_frequent_captions(tmp_path, capsys):
    """The constant-caption baseline scores the most frequent train caption; top-K picks the best on the refs."""

    def coco(path: Path, caps: dict[int, list[str]]) -> Path:
        anns = [{"id": i * 10 + j, "image_id": i, "caption": c} for i, cs in caps.items() for j, c in enumerate(cs)]
        path.write_text(json.dumps({"images": [{"id": i} for i in caps], "annotations": anns}))
        return path

    train = coco(
        tmp_path / "train.json",
        {1: ["A red circle.", "a red circle"], 2: ["A red circle!", "Two blue squares."], 3: ["Two blue squares."]},
    )
    val = coco(
        tmp_path / "val.json",
        {7: ["Two blue squares.", "two blue squares"], 8: ["Two blue squares here."], 9: ["A green star."]},
    )
    one = mc.constant_caption_baseline(train, val, top=1)
    assert one["baseline"] == {"caption": "a red circle", "candidates": 1, "train_frequency": 3}
    assert one["num_images"] == 3 and one["CIDEr"] >= 0.0
    two = mc.constant_caption_baseline(train, val, top=2)
    assert two["baseline"]["caption"] == "two blue squares" and two["CIDEr"] > one["CIDEr"]
    # the CLI prints the same numbers
    assert main(["--annotations", str(val), "--baseline-from", str(train), "--baseline-top", "2"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["CIDEr"] == pytest.approx(two["CIDEr"]) and printed["baseline"] == two["baseline"]
    with pytest.raises(ValueError, match="top must be >= 1"):
        mc.constant_caption_baseline(train, val, top=0)
