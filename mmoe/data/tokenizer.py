"""Text tokenizers with explicit pad and mask ids (docs/interfaces.md section 3).

Two tokenizers share one call convention, ``ids, padding_mask = tok(texts)``:

* ``"openclip"`` (default): open_clip's lower-cased byte-level BPE (49408 ids; 49406 is the start
  token, 49407 the end token). open_clip pads with id 0, which is also a real token ("!"), so we add
  our own ``pad_id = 49408`` and ``mask_id = 49409`` (vocab 49410) and always derive the padding mask
  from the sequence lengths, never from ``ids == 0``.
* ``"sentencepiece"``: the XLM-R style wrapper BEiT-3 uses around ``beit3.spm`` ([B3] sec. 2.2;
  unilm ``beit3`` loads it with ``XLMRobertaTokenizer``). fairseq ids: ``<s>`` 0, ``<pad>`` 1,
  ``</s>`` 2, ``<unk>`` 3, then every sentencepiece piece ``i >= 3`` maps to ``i + 1`` (the fairseq
  offset), and ``<mask>`` is the first id after the pieces (``num_pieces + 1``). BEiT-3's text
  embedding has 64010 rows, so ``vocab_size`` defaults to ``max(64010, mask_id + 1)``; it can be set
  explicitly for other models.

Masked language modeling ([B3] sec. 2.2) needs the ids of pad/mask/bos/eos so that
special tokens are never masked and never predicted; ``special_ids`` returns them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Literal

import torch

__all__ = ["Tokenizer", "OpenClipTokenizer", "SentencePieceTokenizer", "build_tokenizer", "tokenizer_from_spec"]

TokenizerName = Literal["openclip", "sentencepiece"]


class Tokenizer:
    """Common base: turn a list of strings into ``(ids (B, L) int64, padding_mask (B, L) bool)``.

    Subclasses implement ``encode_one`` (ids without special tokens) and ``decode``. Every sequence
    is ``[bos] + pieces[: max_len - 2] + [eos]``; shorter ones are right-padded with ``pad_id``.
    ``pad_to_max`` (default True) pads every batch to ``max_len`` so that batches stack across
    steps and workers; with False a batch is padded to its longest row only.
    """

    name: str = "base"
    vocab_size: int
    pad_id: int
    mask_id: int
    bos_id: int
    eos_id: int

    def __init__(self, max_len: int, pad_to_max: bool = True) -> None:
        if max_len < 2:
            raise ValueError(f"build_tokenizer: max_len must be >= 2 (room for bos and eos), got {max_len}")
        self.max_len = int(max_len)
        self.pad_to_max = bool(pad_to_max)

    # -- to implement -------------------------------------------------------------------------
    def encode_one(self, text: str) -> list[int]:
        """Ids of ``text`` without bos/eos and without truncation."""
        raise NotImplementedError

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Text of one row; special tokens (pad/bos/eos/mask) are dropped."""
        raise NotImplementedError

    # -- shared -------------------------------------------------------------------------------
    @property
    def regular_id_range(self) -> tuple[int, int]:
        """Half-open range of ordinary token ids (random replacements in BERT-style masking)."""
        raise NotImplementedError

    @property
    def special_ids(self) -> tuple[int, ...]:
        """Ids that masking must never touch (pad, bos, eos, mask)."""
        return (self.pad_id, self.bos_id, self.eos_id, self.mask_id)

    def encode(self, text: str) -> list[int]:
        """``[bos] + ids + [eos]`` truncated to ``max_len`` (the eos is kept)."""
        body = self.encode_one(text)[: self.max_len - 2]
        return [self.bos_id, *body, self.eos_id]

    def __call__(self, texts: str | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(texts, str):
            texts = [texts]
        rows = [self.encode(t) for t in texts]
        return self.pad(rows)

    def pad(self, rows: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Stack id lists into ``(ids, padding_mask)``; the mask comes from the lengths (True = pad)."""
        lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
        width = self.max_len if self.pad_to_max else int(lengths.max().item()) if len(rows) else 0
        if len(rows) and int(lengths.max()) > width:
            raise ValueError(f"tokenizer.pad: a row has {int(lengths.max())} ids, more than max_len={width}")
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.as_tensor(list(r), dtype=torch.long)
        padding_mask = torch.arange(width)[None, :] >= lengths[:, None]
        return ids, padding_mask

    def spec(self) -> dict[str, Any]:
        """Plain-dict description (saved with models/checkpoints; ``tokenizer_from_spec`` rebuilds it)."""
        return {
            "name": self.name,
            "vocab_size": self.vocab_size,
            "pad_id": self.pad_id,
            "mask_id": self.mask_id,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "max_len": self.max_len,
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, max_len={self.max_len}, pad={self.pad_id})"


class OpenClipTokenizer(Tokenizer):
    """open_clip's BPE (offline: the merges file ships inside the open_clip wheel) with pad 49408, mask 49409."""

    name = "openclip"
    BPE_SIZE = 49408

    def __init__(self, max_len: int = 32, pad_to_max: bool = True) -> None:
        super().__init__(max_len, pad_to_max)
        from open_clip.tokenizer import SimpleTokenizer

        # context_length is irrelevant: we call encode() ourselves and do our own padding.
        self._bpe = SimpleTokenizer()
        if self._bpe.vocab_size != self.BPE_SIZE:
            raise RuntimeError(f"open_clip SimpleTokenizer has {self._bpe.vocab_size} ids, expected {self.BPE_SIZE}")
        self.bos_id = int(self._bpe.sot_token_id)
        self.eos_id = int(self._bpe.eot_token_id)
        self.pad_id = self.BPE_SIZE
        self.mask_id = self.BPE_SIZE + 1
        self.vocab_size = self.BPE_SIZE + 2

    @property
    def regular_id_range(self) -> tuple[int, int]:
        """Ids of ordinary BPE tokens (everything below the start/end tokens)."""
        return (0, self.bos_id)

    def encode_one(self, text: str) -> list[int]:
        return list(self._bpe.encode(text))

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        keep = [int(i) for i in ids if int(i) < self.BPE_SIZE and int(i) not in (self.bos_id, self.eos_id)]
        return self._bpe.decode(keep).strip()


class SentencePieceTokenizer(Tokenizer):
    """XLM-R/fairseq view of a sentencepiece model (BEiT-3's ``beit3.spm``), see the module docstring."""

    name = "sentencepiece"
    FAIRSEQ_OFFSET = 1
    BEIT3_VOCAB = 64010

    def __init__(self, path: str, max_len: int = 64, vocab_size: int | None = None, pad_to_max: bool = True) -> None:
        super().__init__(max_len, pad_to_max)
        if not path or not os.path.isfile(path):
            raise FileNotFoundError(
                f"build_tokenizer('sentencepiece'): path={path!r} is not a sentencepiece model file"
            )
        import sentencepiece as spm

        self.path = str(path)
        self._sp = spm.SentencePieceProcessor(model_file=self.path)
        self.num_pieces = int(self._sp.get_piece_size())
        self.bos_id, self.pad_id, self.eos_id, self.unk_id = 0, 1, 2, 3
        self.mask_id = self.num_pieces + self.FAIRSEQ_OFFSET
        default_vocab = max(self.BEIT3_VOCAB, self.mask_id + 1)
        self.vocab_size = int(vocab_size) if vocab_size is not None else default_vocab
        if self.vocab_size <= self.mask_id:
            raise ValueError(
                f"build_tokenizer('sentencepiece'): vocab_size={self.vocab_size} must exceed mask_id={self.mask_id}"
            )

    @property
    def regular_id_range(self) -> tuple[int, int]:
        """Ids of ordinary pieces: after <s>, <pad>, </s>, <unk> and before <mask>."""
        return (4, self.mask_id)

    def _to_fairseq(self, sp_id: int) -> int:
        # sentencepiece reserves 0/1/2 for <unk>/<s>/</s>; fairseq puts <s>,<pad>,</s>,<unk> first.
        return sp_id + self.FAIRSEQ_OFFSET if sp_id >= 3 else self.unk_id

    def encode_one(self, text: str) -> list[int]:
        return [self._to_fairseq(i) for i in self._sp.encode(text, out_type=int)]

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        sp_ids = [int(i) - self.FAIRSEQ_OFFSET for i in ids if 4 <= int(i) < self.mask_id]
        return self._sp.decode(sp_ids)

    def spec(self) -> dict[str, Any]:
        out = super().spec()
        out["path"] = self.path
        return out


def build_tokenizer(
    name: TokenizerName = "openclip",
    *,
    max_len: int = 32,
    path: str | None = None,
    vocab_size: int | None = None,
    pad_to_max: bool = True,
) -> Tokenizer:
    """Build a tokenizer by name (docs/interfaces.md section 3).

    Args:
        name: ``"openclip"`` (default, needs no file) or ``"sentencepiece"`` (needs ``path``).
        max_len: sequence length including bos and eos; longer texts are truncated (eos kept).
        path: sentencepiece model file (e.g. BEiT-3's ``beit3.spm``); only for ``"sentencepiece"``.
        vocab_size: sentencepiece only: embedding rows the model has (default 64010 as BEiT-3).
        pad_to_max: pad every batch to ``max_len`` (True) or to its longest row.
    """
    if name == "openclip":
        if path is not None:
            raise ValueError("build_tokenizer('openclip'): path is only used by the 'sentencepiece' tokenizer")
        if vocab_size is not None and int(vocab_size) != OpenClipTokenizer.BPE_SIZE + 2:
            raise ValueError(f"build_tokenizer('openclip'): vocab_size is fixed at 49410, got {vocab_size}")
        return OpenClipTokenizer(max_len=max_len, pad_to_max=pad_to_max)
    if name == "sentencepiece":
        if path is None:
            raise ValueError("build_tokenizer('sentencepiece'): path= (a .spm/.model file, e.g. beit3.spm) is required")
        return SentencePieceTokenizer(path, max_len=max_len, vocab_size=vocab_size, pad_to_max=pad_to_max)
    raise ValueError(f"build_tokenizer: unknown tokenizer name {name!r}; expected 'openclip' or 'sentencepiece'")


def tokenizer_from_spec(spec: dict[str, Any], *, max_len: int | None = None) -> Tokenizer:
    """Rebuild a tokenizer from ``Tokenizer.spec()`` (or a model's ``tokenizer_spec``) and check its ids match."""
    name = spec.get("name", "openclip")
    length = int(max_len if max_len is not None else spec.get("max_len", 32))
    tok = build_tokenizer(name, max_len=length, path=spec.get("path"), vocab_size=spec.get("vocab_size"))
    for key in ("vocab_size", "pad_id", "mask_id", "bos_id", "eos_id"):
        if key in spec and spec[key] is not None and int(spec[key]) != int(getattr(tok, key)):
            raise ValueError(
                f"tokenizer_from_spec: spec[{key!r}]={spec[key]} but the {name} tokenizer has {getattr(tok, key)}"
            )
    return tok
