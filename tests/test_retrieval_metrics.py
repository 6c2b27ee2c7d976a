"""Retrieval recall at K (``mmoe.metrics.retrieval``) against a slow per-query reference, ties included."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mmoe.metrics.retrieval import load_scores, recall_at_k, retrieval_ranks


def _reference(scores: np.ndarray, t2i: np.ndarray, ks: tuple[int, ...]) -> dict[str, float]:
    """Per query, loops only: rank = wrong items scoring >= the best correct item; a hit at k when rank < k."""
    num_images, num_texts = scores.shape
    i2t_ranks = []
    for i in range(num_images):
        correct = [j for j in range(num_texts) if t2i[j] == i]
        if not correct:
            continue
        best = max(scores[i, j] for j in correct)
        i2t_ranks.append(sum(1 for j in range(num_texts) if t2i[j] != i and scores[i, j] >= best))
    t2i_ranks = []
    for j in range(num_texts):
        own = scores[t2i[j], j]
        t2i_ranks.append(sum(1 for i in range(num_images) if i != t2i[j] and scores[i, j] >= own))
    out = {f"i2t_r{k}": 100.0 * sum(r < k for r in i2t_ranks) / len(i2t_ranks) for k in ks}
    out.update({f"t2i_r{k}": 100.0 * sum(r < k for r in t2i_ranks) / len(t2i_ranks) for k in ks})
    out["rsum"] = sum(out.values())
    return out


@pytest.mark.parametrize("seed", range(6))
def test_recall_matches_the_slow_reference_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    num_images = int(rng.integers(3, 30))
    per_image = int(rng.integers(1, 6))
    t2i = np.repeat(np.arange(num_images), per_image)
    rng.shuffle(t2i)
    t2i[: max(1, num_images // 4)] = 0  # an image with extra captions; some images may end up with none
    # small integers: many exact ties, none of them a float near-tie
    scores = rng.integers(-3, 4, size=(num_images, t2i.size)).astype(np.float32)
    ks = (1, 2, 5, 10)
    want = _reference(scores, t2i, ks)
    for block in (1, 7, 1 << 24):  # one element a block, ragged blocks, the whole matrix
        got = recall_at_k(torch.from_numpy(scores), torch.from_numpy(t2i), ks=ks, block_elements=block)
        assert got.keys() == want.keys()
        for key in want:
            assert got[key] == pytest.approx(want[key], abs=1e-9), (key, block)
    assert recall_at_k(scores, t2i.tolist(), ks=ks) == pytest.approx(want)  # numpy / list inputs
    assert recall_at_k(scores.astype(np.int64), t2i, ks=ks) == pytest.approx(want)  # integer scores


def test_constant_scores_get_nothing_and_a_perfect_matrix_everything() -> None:
    t2i = torch.arange(12).repeat_interleave(5)  # more than 10 images: R@10 cannot hit by exhaustion
    flat = recall_at_k(torch.zeros(12, 60), t2i)
    assert all(v == 0.0 for v in flat.values()), flat
    perfect = (t2i[None, :] == torch.arange(12)[:, None]).float()
    top = recall_at_k(perfect, t2i)
    assert top == {k: 100.0 for k in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")} | {"rsum": 600.0}


def test_hand_computed_ranks() -> None:
    # image 0 owns texts 0, 1; image 1 owns text 2; image 2 owns nothing
    scores = torch.tensor([[0.1, 0.9, 0.9], [0.5, 0.2, 0.3], [0.0, 0.0, 0.3]])
    i2t, t2i = retrieval_ranks(scores, torch.tensor([0, 0, 1]))
    # image 0: best correct 0.9 (text 1), wrong text 2 ties it -> rank 1; image 1: text 0 (0.5) beats 0.3 -> 1
    assert i2t.tolist() == [1, 1, -1]
    # text 0: own 0.1 < 0.5 -> 1; text 1: own 0.9 is the top -> 0; text 2: own 0.3 < 0.9 and ties image 2 -> 2
    assert t2i.tolist() == [1, 0, 2]
    got = recall_at_k(scores, torch.tensor([0, 0, 1]), ks=(1, 2))
    assert got["i2t_r1"] == 0.0 and got["i2t_r2"] == 100.0  # the caption-less image is not a query
    assert got["t2i_r1"] == pytest.approx(100 / 3) and got["t2i_r2"] == pytest.approx(200 / 3)


def test_bad_inputs_are_refused_naming_the_argument() -> None:
    with pytest.raises(ValueError, match="scores must be"):
        recall_at_k(torch.zeros(3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"text_to_image must be \(4,\)"):
        recall_at_k(torch.zeros(2, 4), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="indices in"):
        recall_at_k(torch.zeros(2, 2), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="NaN"):
        recall_at_k(torch.tensor([[float("nan"), 0.0]]), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="ks"):
        recall_at_k(torch.zeros(2, 2), torch.tensor([0, 1]), ks=(0,))


def test_large_matrix_in_blocks_is_exact() -> None:
    """A COCO-shaped slice (500 images x 2500 texts) through small blocks equals one block."""
    g = torch.Generator().manual_seed(0)
    t2i = torch.arange(500).repeat_interleave(5)
    scores = torch.randint(0, 50, (500, 2500), generator=g).float()
    scores[t2i, torch.arange(2500)] += 20  # a weak signal
    assert recall_at_k(scores, t2i, block_elements=10_000) == recall_at_k(scores, t2i)


@pytest.mark.parametrize("suffix", [".pt", ".npz"])
def test_cli_scores_a_saved_file(tmp_path: Path, suffix: str) -> None:
    scores = np.array([[2.0, 1.0, 0.0], [0.0, 0.0, 3.0]], dtype=np.float32)
    t2i = np.array([0, 1, 1])
    path = tmp_path / f"scores{suffix}"
    if suffix == ".pt":
        torch.save({"scores": torch.from_numpy(scores), "text_to_image": torch.from_numpy(t2i)}, path)
    else:
        np.savez(path, scores=scores, text_to_image=t2i)
    loaded, t = load_scores(path)
    assert torch.equal(loaded, torch.from_numpy(scores)) and t.tolist() == [0, 1, 1]
    proc = subprocess.run(
        [sys.executable, "-m", "mmoe.metrics.retrieval", "--scores", str(path), "--ks", "1"],
        capture_output=True,
        text=True,
        check=True,
    )
    out = json.loads(proc.stdout)
    assert out == {
        "num_images": 2,
        "num_texts": 3,
        "i2t_r1": 100.0,
        "t2i_r1": pytest.approx(200 / 3),
        "rsum": out["rsum"],
    }
    bad = tmp_path / "bad.npz"
    np.savez(bad, scores=scores)
    proc = subprocess.run(
        [sys.executable, "-m", "mmoe.metrics.retrieval", "--scores", str(bad)], capture_output=True, text=True
    )
    assert proc.returncode == 2 and "text_to_image" in proc.stderr and "bad.npz" in proc.stderr
