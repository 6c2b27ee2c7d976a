"""COCO caption metrics: BLEU-1..4, METEOR, ROUGE-L and CIDEr-D as the official coco-caption toolkit computes them.

The official pipeline (tylin/coco-caption, packaged as ``pycocoevalcap``) first runs the Stanford PTB tokenizer
(Java, ``-lowerCase -preserveLines``) and drops the punctuation tokens in ``PTBTokenizer.PUNCTUATIONS``, then feeds
the token strings to the scorers. BLEU, ROUGE-L and CIDEr-D (pycocoevalcap's ``Cider`` is the CIDEr-D variant:
Gaussian length penalty sigma 6, clipped n-gram counts, x10) are pure Python; METEOR and the tokenizer need Java.

This module reproduces the tokenizer's effect in Python (:func:`ptb_tokenize`), so the pure-Python scorers run on any
machine, and uses the real Java tokenizer and METEOR when ``java`` is on PATH. A metric that cannot be computed is
reported as ``None`` and listed under ``"unavailable"``, never as 0 (docs/references.md [CIDEr]; [B3] reports BLEU-4,
METEOR, CIDEr and SPICE on the Karpathy test split). SPICE downloads Stanford models at run time and is not offered.

Scores are returned on pycocoevalcap's scale (BLEU in [0, 1], CIDEr-D around 1.2 for good models); papers print
them x100.

CLI::

    python -m mmoe.metrics.captions --annotations captions_val2014.json --results results.json [--tokenizer java]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path

from mmoe.metrics import add_scored_input

__all__ = [
    "PTB_PUNCTUATIONS",
    "ptb_tokenize",
    "tokenize_captions",
    "java_available",
    "score_captions",
    "load_references",
    "load_results",
    "evaluate_files",
    "constant_caption_baseline",
    "main",
]

# The tokens pycocoevalcap drops after PTB tokenization (pycocoevalcap/tokenizer/ptbtokenizer.py). Note that the
# Java tokenizer lower-cases "-LRB-" to "-lrb-", so brackets survive in the official pipeline; we reproduce that.
PTB_PUNCTUATIONS: frozenset[str] = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)

_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
# Abbreviations whose final period the PTB lexer keeps (a subset of PTBLexer's list that occurs in captions).
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr st jr sr prof gen rep sen gov lt col capt sgt mt ave blvd rd co corp inc ltd etc vs no jan feb "
    "mar apr jun jul aug sep sept oct nov dec e.g i.e a.m p.m u.s u.k".split()
)
# Multi-word contractions PTB splits into two tokens.
_SPLIT_WORDS = {"cannot": ("can", "not"), "gonna": ("gon", "na"), "gotta": ("got", "ta"), "wanna": ("wan", "na")}
_CLITIC_RE = re.compile(r"^(.+?)((?:n't|'s|'re|'ve|'ll|'d|'m)+)$")
_CLITIC_SPLIT_RE = re.compile(r"n't|'s|'re|'ve|'ll|'d|'m")

# One alternation, tried left to right at each position of a whitespace-free chunk.
_TOKEN_RE = re.compile(
    r"""
    (?P<url>(?:https?://|www\.)\S+|[\w.+-]+@[\w-]+(?:\.[\w-]+)+)
  | (?P<ellipsis>\.\.+)
  | (?P<number>\d+(?:[.,:/]\d+)+)
  | (?P<acronym>(?:[A-Za-z]\.){2,}(?![A-Za-z])|[A-Z]\.(?=$))
  | (?P<word>'n'|'\d\ds|[^\W_]+(?:[\w]|[-'/.&](?=[^\W_]))*\.?)
  | (?P<qmark>[?!]+)
  | (?P<dashes>-+)
  | (?P<other>.)
    """,
    re.VERBOSE,
)


def _split_word(word: str) -> list[str]:
    """Split one lower-cased word the way PTB does: clitics (``n't``, ``'s``...) and ``cannot``-style words."""
    if word in _SPLIT_WORDS:
        return list(_SPLIT_WORDS[word])
    m = _CLITIC_RE.match(word)
    if m and m.group(1) not in {"o", "'n"}:
        stem, clitics = m.group(1), m.group(2)
        parts = _CLITIC_SPLIT_RE.findall(clitics)
        return [stem, *parts]
    return [word]


def ptb_tokenize(text: str) -> str:
    """Tokenize one caption with the effect of coco-caption's Java PTB tokenizer plus punctuation removal.

    Lower-cases, splits punctuation and clitics (``isn't`` -> ``is n't``, ``dog's`` -> ``dog 's``), maps brackets to
    ``-lrb-``-style tokens, keeps abbreviations (``u.s.``, ``mr.``), decimals and thousands separators, and drops the
    tokens in :data:`PTB_PUNCTUATIONS`. Agrees with the Java tokenizer on every caption of the COCO samples shipped
    with the repository (tested); exotic inputs (emoticons, URLs with trailing punctuation) may differ slightly.
    """
    text = text.replace("\n", " ").replace("&amp;", "&")
    # Typographic quotes and dashes: PTB normalizes them to `` '' ` ' --, which are then dropped; apostrophes inside
    # words become ASCII (don't -> do n't).
    text = re.sub(r"(?<=\w)[\u2019\u2018](?=\w)", "'", text)
    text = re.sub(r"[\u201c\u201d\u2018\u2019\u2013\u2014]", " ", text)
    tokens: list[str] = []
    chunks = text.split()
    for chunk in chunks:
        pos = 0
        while pos < len(chunk):
            m = _TOKEN_RE.match(chunk, pos)
            assert m is not None  # the last alternative matches any character
            pos = m.end()
            kind, tok = m.lastgroup, m.group(0)
            if kind == "url":
                tokens.append(tok.lower())
            elif kind in ("ellipsis", "dashes"):
                continue
            elif kind == "number":
                tokens.append(tok)
            elif kind == "acronym":
                tokens.append(tok.lower())
            elif kind == "word":
                low = tok.lower()
                if low.endswith("."):
                    stem = low[:-1]
                    if stem in _ABBREVIATIONS or "." in stem:
                        tokens.append(low)
                        continue
                    low = stem  # sentence period: a separate "." token, which is dropped
                tokens.extend(_split_word(low))
            elif kind == "qmark":
                if len(tok) > 1:
                    tokens.append(tok)  # "?!" is one PTB token and not in the punctuation list
            elif tok in _BRACKETS:
                tokens.append(_BRACKETS[tok])
            elif tok in "\"'`.,;:":
                continue
            else:
                tokens.append(tok.lower())
    return " ".join(t for t in tokens if t and t not in PTB_PUNCTUATIONS)


def java_available() -> bool:
    """True when a ``java`` executable is on PATH (needed by the official PTB tokenizer and METEOR)."""
    return shutil.which("java") is not None


def tokenize_captions(captions: Mapping[int, Iterable[str]], backend: str = "python") -> dict[int, list[str]]:
    """Tokenize ``{image_id: [caption, ...]}`` with the Python reproduction or the official Java tokenizer."""
    if backend == "python":
        return {k: [ptb_tokenize(c) for c in v] for k, v in captions.items()}
    if backend == "java":
        if not java_available():
            raise RuntimeError("tokenizer backend 'java' requested but no `java` executable is on PATH")
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        return PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in captions.items()})
    raise ValueError(f"tokenizer backend must be 'python' or 'java', got {backend!r}")


def score_captions(
    references: Mapping[int, list[str]],
    predictions: Mapping[int, str],
    *,
    tokenizer: str = "python",
    meteor: bool | None = None,
) -> dict:
    """Score one predicted caption per image against its references.

    Args:
        references: ``{image_id: [reference caption, ...]}``; must cover every predicted image.
        predictions: ``{image_id: caption}``.
        tokenizer: ``"python"`` (default, no Java), ``"java"`` (official Stanford PTB tokenizer) or ``"auto"``.
        meteor: compute METEOR (Java); ``None`` = when Java is available.

    Returns:
        ``{"Bleu_1".."Bleu_4", "METEOR", "ROUGE_L", "CIDEr": float | None, "unavailable": [...],
        "tokenizer": str, "num_images": int}``.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    if not predictions:
        raise ValueError("score_captions: no predictions to score")
    missing = [k for k in predictions if k not in references or not references[k]]
    if missing:
        raise KeyError(f"score_captions: {len(missing)} predicted image ids have no references, e.g. {missing[:5]}")
    if tokenizer == "auto":
        tokenizer = "java" if java_available() else "python"
    ids = sorted(predictions)
    gts = tokenize_captions({k: list(references[k]) for k in ids}, tokenizer)
    res = tokenize_captions({k: [predictions[k]] for k in ids}, tokenizer)

    out: dict = {}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    for n, value in enumerate(bleu, start=1):
        out[f"Bleu_{n}"] = float(value)
    out["METEOR"] = None
    unavailable: list[str] = []
    want_meteor = java_available() if meteor is None else meteor
    if want_meteor and java_available():
        from pycocoevalcap.meteor.meteor import Meteor

        m = Meteor()
        try:
            out["METEOR"] = float(m.compute_score(gts, res)[0])
        finally:
            del m
    else:
        unavailable.append("METEOR")
    out["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    out["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    out["unavailable"] = unavailable
    out["tokenizer"] = tokenizer
    out["num_images"] = len(ids)
    return out


def load_references(path: str | Path) -> dict[int, list[str]]:
    """Read ``{image_id: [captions]}`` from a COCO caption file (``captions_*.json``) or a Karpathy split file.

    A Karpathy file (``dataset_coco.json``) yields the references of every image in it; use
    :func:`mmoe.data.captions.write_coco_references` to write one split as a COCO-format file first.
    """
    data = json.loads(Path(path).read_text())
    refs: dict[int, list[str]] = {}
    if isinstance(data, dict) and "annotations" in data:
        for ann in data["annotations"]:
            refs.setdefault(int(ann["image_id"]), []).append(str(ann["caption"]))
        for img in data.get("images", []):
            refs.setdefault(int(img["id"]), [])
        return refs
    if isinstance(data, dict) and "images" in data and data["images"] and "sentences" in data["images"][0]:
        for img in data["images"]:
            refs[int(img["cocoid"])] = [s["raw"] for s in img["sentences"]]
        return refs
    raise ValueError(f"{path}: expected a COCO caption file (keys 'images', 'annotations') or a Karpathy split file")


def load_results(path: str | Path) -> dict[int, str]:
    """Read the official results format ``[{"image_id": int, "caption": str}, ...]`` (one caption per image)."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, list):
        raise ValueError(
            f"{path}: expected a JSON list of {{'image_id', 'caption'}} objects, got {type(data).__name__}"
        )
    out: dict[int, str] = {}
    for i, item in enumerate(data):
        if not isinstance(item, dict) or "image_id" not in item or "caption" not in item:
            raise ValueError(f"{path}: entry {i} must have keys 'image_id' and 'caption', got {item!r}")
        key = int(item["image_id"])
        if key in out:
            raise ValueError(f"{path}: image_id {key} has more than one caption (entry {i}); expected one per image")
        out[key] = str(item["caption"])
    return out


def evaluate_files(
    annotations: str | Path,
    results: str | Path,
    *,
    tokenizer: str = "python",
    meteor: bool | None = None,
    ignore_missing: bool = False,
) -> dict:
    """Score a results file against a COCO caption annotation file (see :func:`score_captions`)."""
    refs = load_references(annotations)
    preds = load_results(results)
    if ignore_missing:
        dropped = [k for k in preds if not refs.get(k)]
        preds = {k: v for k, v in preds.items() if refs.get(k)}
    out = score_captions(refs, preds, tokenizer=tokenizer, meteor=meteor)
    if ignore_missing:
        out["num_ignored"] = len(dropped)
    return out


def constant_caption_baseline(
    train_annotations: str | Path,
    annotations: str | Path,
    *,
    top: int = 1,
    tokenizer: str = "python",
) -> dict:
    """Score the same caption for every image: what a model that ignores the image can reach.

    Why: captioning metrics reward the dataset's frequent phrasings, so a model is only reading the image when it
    beats a constant caption. The candidates are the ``top`` most frequent training captions (after
    :func:`ptb_tokenize`, ties broken alphabetically); the best of them on ``annotations`` by CIDEr-D is reported.
    With ``top > 1`` that choice looks at the evaluation references, so it is an optimistic baseline.

    Returns the :func:`score_captions` dict plus ``"baseline": {"caption", "candidates", "train_frequency"}``.
    """
    if top < 1:
        raise ValueError(f"constant_caption_baseline: top must be >= 1, got {top}")
    counts = Counter(ptb_tokenize(cap) for caps in load_references(train_annotations).values() for cap in caps)
    if not counts:
        raise ValueError(f"constant_caption_baseline: {train_annotations} holds no captions")
    refs = {k: v for k, v in load_references(annotations).items() if v}
    candidates = sorted(counts, key=lambda c: (-counts[c], c))[:top]
    best: dict | None = None
    for cap in candidates:
        scores = score_captions(refs, dict.fromkeys(refs, cap), tokenizer=tokenizer, meteor=False)
        if best is None or scores["CIDEr"] > best["CIDEr"]:
            meta = {"caption": cap, "candidates": len(candidates), "train_frequency": counts[cap]}
            best = {**scores, "baseline": meta}
    assert best is not None
    return best


def main(argv: list[str] | None = None) -> int:
    """``python -m mmoe.metrics.captions --annotations A --results R``: print the scores as JSON."""
    p = argparse.ArgumentParser(description="COCO caption metrics (BLEU, METEOR, ROUGE-L, CIDEr-D)")
    p.add_argument("--annotations", required=True, help="COCO captions_*.json or Karpathy dataset_coco.json")
    add_scored_input(
        p,
        results='results JSON: [{"image_id": int, "caption": str}, ...]',
        baseline="score a constant caption instead: the most frequent caption of this training file "
        "(see --baseline-top)",
    )
    p.add_argument(
        "--baseline-top",
        type=int,
        default=1,
        help="with --baseline-from: best of the K most frequent training captions, picked on --annotations (K>1 is "
        "optimistic: it looks at the evaluation references)",
    )
    p.add_argument("--tokenizer", choices=["python", "java", "auto"], default="python")
    p.add_argument("--no-meteor", action="store_true", help="skip METEOR even when Java is available")
    p.add_argument("--ignore-missing", action="store_true", help="drop results whose image has no references")
    args = p.parse_args(argv)
    if args.baseline_from:
        out = constant_caption_baseline(
            args.baseline_from, args.annotations, top=args.baseline_top, tokenizer=args.tokenizer
        )
    else:
        out = evaluate_files(
            args.annotations,
            args.results,
            tokenizer=args.tokenizer,
            meteor=False if args.no_meteor else None,
            ignore_missing=args.ignore_missing,
        )
    json.dump(out, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
