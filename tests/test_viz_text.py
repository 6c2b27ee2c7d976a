"""Text tokens -> words, tables and the routing picture (mmoe.viz.text)."""

from __future__ import annotations

import numpy as np

from mmoe.viz.experts import color_experts
from mmoe.viz.records import TokenRouting
from mmoe.viz.text import draw_text_routing, markdown_table, split_words, text_rows, word_rows

_SP = {5: "\u2581the", 6: "\u2581floor", 7: "boards", 8: "\u2581c|at"}  # sentencepiece-style pieces


def _sp_decode(ids):
    return "".join(_SP[i] for i in ids).replace("\u2581", " ").strip()


def test_split_words_sentencepiece_style():
    pieces = split_words([0, 5, 6, 7, 8, 2], _sp_decode, {0: "<bos>", 2: "<eos>"})
    assert pieces.pieces == ["<bos>", "the", "floor", "boards", "c|at", "<eos>"]
    assert pieces.words == ["<bos>", "the", "floorboards", "c|at", "<eos>"]
    assert pieces.word_index == [0, 1, 2, 2, 3, 4]


def test_split_words_openclip_bpe():
    from mmoe.data.tokenizer import build_tokenizer

    tok = build_tokenizer("openclip", max_len=16)
    ids, pad = tok(["the floorboards creak"])
    pieces = split_words(ids[0][~pad[0]].tolist(), tok.decode, {tok.bos_id: "<bos>", tok.eos_id: "<eos>"})
    assert pieces.words == ["<bos>", "the", "floorboards", "creak", "<eos>"]
    assert len(pieces.pieces) == len(ids[0][~pad[0]])


def test_rows_table_and_picture():
    pieces = split_words([5, 6, 7, 8], _sp_decode)
    ids = np.array([[[[1, 2], [3, 0]], [[1, 0], [1, 2]], [[2, 1], [2, 1]], [[0, 1], [3, 2]]]])  # (1, T=4, h=2, K=2)
    tokens = TokenRouting(ids, np.full(ids.shape, 0.25, np.float32), ids >= 0, 4)
    rows = text_rows(tokens, 0, pieces)
    assert [r["distinct"] for r in rows] == [2, 1, 1, 2]
    assert rows[1]["word"] == rows[2]["word"] == "floorboards"
    assert word_rows(rows)[1] == {"word": "floorboards", "tokens": ["floor", "boards"], "experts": [1, 2]}
    md = markdown_table("layer1", rows)
    assert "| c\\|at | c\\|at | e0:0.25, e1:0.25 | e3:0.25, e2:0.25 | e0 | 2 |" in md
    fig, drawn = draw_text_routing({"layer1": ids[0, :, :, 0]}, pieces, 4)
    grid = np.concatenate([ids[0, :, :, 0].T, [[1, 1, 2, 0]]], 0)  # heads, then majority (ties -> lower id)
    np.testing.assert_array_equal(drawn["layer1"], color_experts(grid, 4))
