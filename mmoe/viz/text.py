"""Which experts each word's sub-tokens go to: tables (markdown / JSON) and a picture.

In MH-MoE every text token is split into h sub-tokens that are routed independently ([MH1] sec. 3),
so a word made of several BPE pieces reaches up to (pieces x h x k) experts. For
each MoE layer this module lists, per token, the top-k experts and gates of every head, the word the
token belongs to and the number of distinct first-choice experts; the picture is a (heads x tokens)
grid per layer coloured by expert ([MH1] Fig. 1b drawn for text).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from mmoe.viz.experts import color_experts, expert_colorbar, new_figure
from mmoe.viz.records import TokenRouting, diversity, majority_expert


@dataclass(frozen=True)
class TokenPieces:
    """The real (non-padding) tokens of one text: display strings and the word each belongs to."""

    pieces: list[str]
    word_index: list[int]
    words: list[str]


def split_words(
    ids: Sequence[int], decode: Callable[[Sequence[int]], str], special: Mapping[int, str] | None = None
) -> TokenPieces:
    """Label every id with its display piece and group pieces into words.

    A token starts a new word when decoding the prefix up to it adds whitespace before its text (BPE
    end-of-word markers and sentencepiece's leading "▁" both decode to a space), so this works for
    any tokenizer with a `decode(ids) -> str`. Ids in `special` (bos/eos/mask) get their own word.
    """
    special = dict(special or {})
    pieces: list[str] = []
    word_index: list[int] = []
    words: list[str] = []
    run: list[int] = []  # ids of the current (non-special) text run
    prev_text = ""
    for tid in (int(t) for t in ids):
        if tid in special:
            pieces.append(special[tid])
            words.append(special[tid])
            word_index.append(len(words) - 1)
            run, prev_text = [], ""
            continue
        run.append(tid)
        text = decode(run)
        piece = decode([tid]).strip() or f"<{tid}>"
        tail = text[len(prev_text) :] if text.startswith(prev_text) else " " + piece
        new_word = len(run) == 1 or tail[:1].isspace() or not words
        if new_word:
            words.append(piece)
        else:
            words[-1] = words[-1] + piece
        word_index.append(len(words) - 1)
        pieces.append(piece)
        prev_text = text
    return TokenPieces(pieces, word_index, words)


def text_rows(tokens: TokenRouting, index: int, pieces: TokenPieces) -> list[dict[str, Any]]:
    """JSON rows for sequence `index` of a layer's text routing: one row per real token."""
    rows = []
    first = tokens.first_choice()[index]
    for t, piece in enumerate(pieces.pieces):
        ids = tokens.expert_ids[index, t]  # (h, K)
        gates = tokens.gates[index, t]
        rows.append(
            {
                "position": t,
                "token": piece,
                "word": pieces.words[pieces.word_index[t]],
                "word_index": pieces.word_index[t],
                "experts": ids.tolist(),
                "gates": [[round(float(g), 4) for g in row] for row in gates],
                "majority": int(majority_expert(first[t][None], gates[:, 0][None])[0]),
                "distinct": int(diversity(first[t][None])[0]),
            }
        )
    return rows


def word_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per word: the tokens it has and the set of experts its sub-tokens' first choices reach."""
    out: dict[int, dict[str, Any]] = {}
    for r in rows:
        w = out.setdefault(r["word_index"], {"word": r["word"], "tokens": [], "experts": set()})
        w["tokens"].append(r["token"])
        w["experts"].update(int(e[0]) for e in r["experts"] if e[0] >= 0)
    return [{"word": w["word"], "tokens": w["tokens"], "experts": sorted(w["experts"])} for w in out.values()]


def markdown_table(layer: str, rows: Sequence[Mapping[str, Any]]) -> str:
    """A markdown table: word | token | head j: expert:gate (top-k) | distinct first choices."""
    if not rows:
        return f"### {layer}\n\n(no text tokens)\n"
    h = len(rows[0]["experts"])
    head = "| word | token | " + " | ".join(f"head {j}" for j in range(h)) + " | majority | distinct |"
    sep = "|" + "---|" * (h + 4)
    lines = [f"### {layer}", "", head, sep]
    for r in rows:
        cells = []
        for ids, gates in zip(r["experts"], r["gates"]):
            cells.append(", ".join(f"e{e}:{g:.2f}" if e >= 0 else "pad" for e, g in zip(ids, gates)))
        word = r["word"].replace("|", "\\|")
        token = r["token"].replace("|", "\\|")
        lines.append(f"| {word} | {token} | " + " | ".join(cells) + f" | e{r['majority']} | {r['distinct']} |")
    return "\n".join(lines) + "\n"


def draw_text_routing(
    layers: Mapping[str, np.ndarray],
    pieces: TokenPieces,
    num_experts: int,
    *,
    gates: Mapping[str, np.ndarray] | None = None,
    title: str = "",
) -> tuple[Figure, dict[str, np.ndarray]]:
    """One panel per layer: rows = MoE heads (+ majority), columns = tokens, cell = first-choice expert.

    Args:
        layers: layer key -> (T, h) first-choice experts of the T real tokens.
        gates: layer key -> (T, h) their gates, to break majority ties as `majority_expert` does.
        pieces: token strings and words (vertical lines separate words).
    Returns the figure and, per layer, the (h+1, T, 3) RGB array drawn.
    """
    drawn: dict[str, np.ndarray] = {}
    n = len(layers)
    num_t = len(pieces.pieces)
    h = max((a.shape[1] for a in layers.values()), default=1)
    fig = new_figure((max(4.0, 0.5 * num_t + 2.0), (0.32 * (h + 1) + 0.9) * max(n, 1) + 0.6))
    axes = fig.subplots(max(n, 1), 1, squeeze=False)[:, 0]
    for ax, (key, first) in zip(axes, layers.items()):
        maj = majority_expert(first, None if gates is None else gates.get(key))
        grid = np.concatenate([first.T, maj[None]], 0)  # (h+1, T)
        rgb = color_experts(grid, num_experts)
        drawn[key] = rgb
        ax.imshow(rgb, interpolation="nearest", aspect="auto")
        if grid.size <= 600:
            for (r, t), e in np.ndenumerate(grid):
                ax.text(t, r, "" if e < 0 else str(e), ha="center", va="center", fontsize=6)
        ax.set_yticks(range(grid.shape[0]), [f"head {j}" for j in range(grid.shape[0] - 1)] + ["majority"], fontsize=7)
        ax.set_xticks(range(num_t), pieces.pieces, rotation=60, ha="right", fontsize=7)
        for t in range(1, num_t):
            if pieces.word_index[t] != pieces.word_index[t - 1]:
                ax.axvline(t - 0.5, color="k", linewidth=1.2)
        ax.axhline(grid.shape[0] - 1.5, color="w", linewidth=2)
        ax.set_title(key, fontsize=9)
    expert_colorbar(fig, list(axes), num_experts)
    fig.suptitle(title or "text sub-token routing (first choice; lines separate words)", fontsize=10)
    return fig, drawn
