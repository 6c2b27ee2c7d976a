"""Grounded words: the caption words that name what an image shows, as token-id sequences to mask first.

Why: pair-text masked language modeling ([B3] sec. 2.2, 50% of the caption) is meant to make the model read the
image, but uniformly chosen positions are mostly function words ("a", "the", "on", ".") that the text predicts by
itself. Masking the words that only the image can tell (colour, count, position, size and object words) first
(``mmoe.data.masking.mask_tokens(priority=...)``) makes more of the pair loss depend on the image.

* Word lists: ``resolve_grounded_words`` reads the config value ``pair_mask_words``: ``"default"`` (the list
  shipped in ``grounded_words.json`` next to this module: colours, numbers, positions, sizes and the 80 COCO
  category names), a ``.json`` file (a list of words, or an object whose lists of strings are word groups, such
  as the synthetic world's ``world.json`` with its "shapes", "colors", "positions", "sizes", "numbers"), a
  ``.txt`` file (one word or phrase a line, ``#`` comments), or a list mixing these with literal words.
* Token ids: ``GroundedTokens.from_words`` encodes every word and phrase in the forms a caption may hold (as
  written, lower case, upper case, capitalised, a regular English plural of the last word; standalone and after another
  word, for tokenizers whose pieces carry a leading space) and keeps the id sequences. A word split into several
  BPE pieces ("hydrant" -> "hydr" "ant") is grounded only where the whole sequence occurs, and then every piece
  of it is; a phrase ("fire hydrant") likewise.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from importlib import resources
from pathlib import Path

import torch

from mmoe.data.tokenizer import Tokenizer

__all__ = [
    "DEFAULT_WORDS",
    "CaptionTags",
    "GroundedTokens",
    "default_grounded_words",
    "plural",
    "resolve_grounded_words",
]

#: The config value naming the shipped word list.
DEFAULT_WORDS = "default"
_WORDS_FILE = "grounded_words.json"
_FILE_SUFFIXES = (".json", ".txt")


def plural(word: str) -> str:
    """A regular English plural ("circle" -> "circles", "cross" -> "crosses", "lorry" -> "lorries")."""
    if word.endswith(("s", "x", "z", "ch", "sh")):
        return word + "es"
    if len(word) > 1 and word.endswith("y") and word[-2] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


def _words_of_json(data: object, where: str, group: str | None = None) -> list[str]:
    """A JSON list of strings, or every list-of-strings value of a JSON object (other values are ignored); with
    ``group``, only that value of the object."""
    if group is not None:
        named = {k: v for k, v in data.items() if isinstance(v, list)} if isinstance(data, dict) else {}
        if group not in named:
            raise ValueError(f"{where}: no word group {group!r}; its groups are {sorted(named)}")
        data = named[group]
    if isinstance(data, list):
        groups = [data]
    elif isinstance(data, dict):
        groups = [v for v in data.values() if isinstance(v, list) and v and all(isinstance(x, str) for x in v)]
    else:
        groups = []
    if not groups or not all(isinstance(x, str) for g in groups for x in g):
        raise ValueError(f"{where}: expected a JSON list of words or an object with lists of words")
    return [x for g in groups for x in g]


def default_grounded_words(group: str | None = None) -> list[str]:
    """The shipped list (``mmoe/data/grounded_words.json``): colour, number, position, size and COCO words; with
    ``group`` only that group (``"coco_categories"``: the 80 COCO category names and a few plurals)."""
    text = resources.files("mmoe.data").joinpath(_WORDS_FILE).read_text(encoding="utf-8")
    return list(dict.fromkeys(_words_of_json(json.loads(text), f"mmoe.data {_WORDS_FILE}", group)))


def _split_group(entry: str) -> tuple[str, str | None]:
    """``"world.json#shapes"`` -> (``"world.json"``, ``"shapes"``): one word group of a JSON file."""
    base, sep, group = entry.partition("#")
    return (base, group) if sep and (base == DEFAULT_WORDS or base.endswith(".json")) else (entry, None)


def _is_file_entry(entry: str) -> bool:
    entry = _split_group(entry)[0]
    return entry.endswith(_FILE_SUFFIXES) or "/" in entry or os.sep in entry


def _read_word_file(path: str, key: str) -> list[str]:
    path, group = _split_group(path)
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"{key}: word file {path!r} does not exist")
    text = file.read_text(encoding="utf-8")
    if file.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{key}: word file {path!r} is not valid JSON ({e})") from None
        return _words_of_json(data, f"{key}: word file {path!r}", group)
    return [line.split("#", 1)[0] for line in text.splitlines()]


def resolve_grounded_words(spec: str | Sequence[str] | None, *, key: str = "pair_mask_words") -> list[str]:
    """The words of a ``pair_mask_words`` config value (module docstring), de-duplicated in order; [] for None.

    A single string must be ``"default"`` or a word file; in a list, entries that end in ``.json``/``.txt`` or
    hold a path separator are files, ``"default"`` is the shipped list, anything else is a literal word or
    phrase. ``"default#coco_categories"`` or ``"world.json#shapes"`` takes one word group of the shipped list or
    of a JSON file. Errors name ``key``.
    """
    if spec is None:
        return []
    if isinstance(spec, str):
        if _split_group(spec)[0] != DEFAULT_WORDS and not _is_file_entry(spec):
            raise ValueError(
                f"{key}={spec!r}: expected null, {DEFAULT_WORDS!r}, a .json/.txt word file or a list of words"
            )
        entries: Sequence[str] = [spec]
    elif isinstance(spec, Sequence) and all(isinstance(e, str) for e in spec):
        entries = spec
    else:
        raise ValueError(f"{key}: expected null, a string or a list of strings, got {spec!r}")
    if not entries:
        raise ValueError(f"{key}: the list is empty; use null to turn grounded masking off")
    words: list[str] = []
    for entry in entries:
        base, group = _split_group(entry)
        if base == DEFAULT_WORDS:
            words.extend(default_grounded_words(group))
        elif _is_file_entry(entry):
            words.extend(_read_word_file(entry, key))
        else:
            words.append(entry)
    out = list(dict.fromkeys(" ".join(w.split()) for w in words if w.strip()))
    if not out:
        raise ValueError(f"{key}={spec!r} holds no words")
    return out


def _forms(phrase: str) -> set[str]:
    head, _, last = phrase.rpartition(" ")
    many = f"{head} {plural(last)}".strip()
    out = set()
    for p in (phrase, many):
        out |= {p, p.lower(), p.upper(), p[0].upper() + p[1:], p.lower().capitalize()}
    return out


class GroundedTokens:
    """Token-id sequences of grounded words; ``tokens(ids)`` marks where they occur in a ``(B, L)`` batch.

    Args:
        sequences: id sequences (each a word or phrase in one of its forms); empty ones are dropped.
    """

    def __init__(self, sequences: Iterable[Sequence[int]]) -> None:
        unique = sorted({tuple(int(i) for i in s) for s in sequences if len(s)})
        if not unique:
            raise ValueError("GroundedTokens: no token sequence to mark")
        self.single = torch.tensor([s[0] for s in unique if len(s) == 1], dtype=torch.long)
        by_len: dict[int, list[tuple[int, ...]]] = {}
        for s in unique:
            if len(s) > 1:
                by_len.setdefault(len(s), []).append(s)
        self.multi = {m: torch.tensor(seqs, dtype=torch.long) for m, seqs in sorted(by_len.items())}
        self.num_sequences = len(unique)

    @classmethod
    def from_words(cls, tokenizer: Tokenizer, words: Iterable[str]) -> GroundedTokens:
        """Encode every form of every word (module docstring) with ``tokenizer.encode_one``."""
        lead = tokenizer.encode_one("a")
        sequences: list[list[int]] = []
        for word in words:
            for form in _forms(word):
                sequences.append(tokenizer.encode_one(form))
                in_text = tokenizer.encode_one(f"a {form}")  # the form after a word (a leading-space piece)
                if in_text[: len(lead)] == lead:
                    sequences.append(in_text[len(lead) :])
        return cls(sequences)

    def __repr__(self) -> str:
        return f"GroundedTokens({self.num_sequences} sequences, longest {max(self.multi, default=1)})"

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, L) bool: True at every token of an occurrence of a grounded sequence in ``ids`` (B, L)."""
        out = torch.isin(ids, self.single)
        for m, seqs in self.multi.items():
            if m > ids.shape[1]:
                continue
            windows = ids.unfold(1, m, 1)  # (B, L - m + 1, m)
            hit = (windows[:, :, None, :] == seqs[None, None]).all(-1).any(-1)
            for j in range(m):
                out[:, j : j + hit.shape[1]] |= hit
        return out


class CaptionTags:
    """Which tag words (object names) a sample's captions mention, as a ``(B, T)`` multi-hot target.

    Why: in a caption the colour, count and position words are far easier to read off an image than the object
    words, and in a shared objective their gradients crowd out the slow one (the "gradient starvation" of
    Pezeshki et al. 2021): a bag-of-words loss over every caption word learns the synthetic shapes no faster than
    masked-word prediction (docs/results/learning.md). One binary loss per object word, over all of an image's
    captions, is image-level multi-label recognition with labels taken from the text alone, as in Joulin et al.
    2016 (sec. 3) and the object tags of OSCAR (Li et al. 2020).

    Matching is on lower-case words: a tag (or a phrase, "fire hydrant") or its regular plural, as a whole word.

    Args:
        words: the tag words, in the order of the target's columns (``resolve_grounded_words`` output).
    """

    def __init__(self, words: Sequence[str]) -> None:
        self.words = list(dict.fromkeys(" ".join(w.lower().split()) for w in words if w.strip()))
        if not self.words:
            raise ValueError("CaptionTags: no tag words")
        self._index: dict[tuple[str, ...], int] = {}
        for i, word in enumerate(self.words):
            head, _, last = word.rpartition(" ")
            for form in (word, f"{head} {plural(last)}".strip()):
                self._index.setdefault(tuple(form.split()), i)
        self._longest = max(len(k) for k in self._index)

    def __len__(self) -> int:
        return len(self.words)

    def __repr__(self) -> str:
        return f"CaptionTags({len(self.words)} words)"

    @staticmethod
    def words_of(text: str) -> list[str]:
        """The lower-case words of ``text`` (letters and digits), as the tags are matched against them."""
        return re.findall(r"[a-z0-9]+", text.lower())

    def tags(self, text: str) -> set[int]:
        """Column indices of the tags that ``text`` mentions."""
        tokens = self.words_of(text)
        found: set[int] = set()
        for i in range(len(tokens)):
            for n in range(1, min(self._longest, len(tokens) - i) + 1):
                hit = self._index.get(tuple(tokens[i : i + n]))
                if hit is not None:
                    found.add(hit)
        return found

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        """(B, T) float32: 1 where row ``b``'s text mentions tag ``t``."""
        out = torch.zeros(len(texts), len(self.words))
        for row, text in enumerate(texts):
            for col in self.tags(text):
                out[row, col] = 1.0
        return out
