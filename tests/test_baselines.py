"""mmoe.baselines.film_vqa: the FiLM CNN+GRU yardstick trains, answers every val question, scores officially."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mmoe.baselines.film_vqa import FiLMVQA, run, tokenize


def test_film_forward_shapes_and_question_conditioning() -> None:
    torch.manual_seed(0)
    model = FiLMVQA(vocab_size=10, num_answers=7).eval()
    image = torch.randn(3, 3, 64, 64)
    words = torch.tensor([[2, 3, 4], [2, 5, 0], [6, 0, 0]])
    lengths = torch.tensor([3, 2, 1])
    with torch.no_grad():
        out = model(image, words, lengths)
        other = model(image, torch.tensor([[7, 8, 9], [2, 5, 0], [6, 0, 0]]), lengths)
        padded = model(image, torch.tensor([[2, 3, 4], [2, 5, 9], [6, 9, 9]]), lengths)
    assert out.shape == (3, 7)
    assert (out[0] - other[0]).abs().max() > 1e-4 and torch.equal(out[1:], other[1:])  # the question matters
    assert torch.allclose(out, padded)  # ids past a question's length are never read
    assert tokenize("How many Red-stars are there?") == ["how", "many", "red", "stars", "are", "there"]


def test_film_run_on_a_tiny_world(tmp_path: Path) -> None:
    from mmoe.data.synthetic import make_world
    from mmoe.data.vqa import build_answer_vocab, save_answer_vocab

    world = tmp_path / "w"
    make_world(world, num_train=24, num_val=6, image_size=64, seed=0, variant="alt")
    anns = json.loads((world / "vqa/v2_mscoco_train2014_annotations.json").read_text())["annotations"]
    save_answer_vocab(world / "vqa/answer_vocab.json", build_answer_vocab([anns], min_count=1))
    summary = run(["--world", str(world), "--out", str(tmp_path / "out"), "--steps", "3", "--batch-size", "8"])
    assert summary["steps"] == 3 and 0.0 <= summary["overall"] <= 100.0
    results = json.loads((tmp_path / "out/results.json").read_text())
    val_q = json.loads((world / "vqa/v2_OpenEnded_mscoco_val2014_questions.json").read_text())["questions"]
    assert sorted(r["question_id"] for r in results) == sorted(q["question_id"] for q in val_q)
