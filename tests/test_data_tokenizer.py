"""Tokenizers (docs/interfaces.md section 3) and image transforms."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from mmoe.data.tokenizer import build_tokenizer, tokenizer_from_spec
from mmoe.data.transforms import build_transform, denormalize


def test_openclip_ids_and_masks_from_lengths() -> None:
    tok = build_tokenizer("openclip", max_len=8)
    assert (tok.vocab_size, tok.pad_id, tok.mask_id, tok.bos_id, tok.eos_id) == (49410, 49408, 49409, 49406, 49407)
    ids, pad = tok(["a red circle", "hi!", "one two three four five six seven eight nine"])
    assert ids.shape == pad.shape == (3, 8) and ids.dtype == torch.long and pad.dtype == torch.bool
    lengths = (~pad).sum(1).tolist()
    assert lengths == [5, 4, 8]
    # BPE id 0 ("!") is a real token: the mask comes from lengths, never from ids == 0.
    ids0, pad0 = tok.pad([[tok.bos_id, 0, 0, tok.eos_id]])
    assert pad0[0].tolist() == [False] * 4 + [True] * 4 and ids0[0, 1].item() == 0
    assert (ids[pad] == tok.pad_id).all()
    assert ids[2, -1].item() == tok.eos_id  # truncation keeps eos
    assert tok.decode(ids[0]) == "a red circle"


def test_pad_to_longest_and_spec_roundtrip() -> None:
    tok = build_tokenizer("openclip", max_len=16, pad_to_max=False)
    ids, pad = tok(["a", "a red circle"])
    assert ids.shape == (2, 5) and pad[0].tolist() == [False, False, False, True, True]
    again = tokenizer_from_spec(tok.spec())
    assert again.mask_id == tok.mask_id and again.max_len == 16
    with pytest.raises(ValueError, match="mask_id"):
        tokenizer_from_spec({**tok.spec(), "mask_id": 5})
    # the form a backbone's tokenizer_spec takes (docs/interfaces.md section 2)
    model_spec = {
        "name": "openclip",
        "path": None,
        "vocab_size": 49410,
        "pad_id": 49408,
        "mask_id": 49409,
        "max_len": 20,
    }
    assert tokenizer_from_spec(model_spec).max_len == 20
    with pytest.raises(ValueError, match="unknown tokenizer"):
        build_tokenizer("bert")  # type: ignore[arg-type]


def test_sentencepiece_xlmr_ids(tmp_path) -> None:
    spm = pytest.importorskip("sentencepiece")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(["a red circle to the left of a blue square", "two green stars and a cross"] * 50))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tmp_path / "m"), vocab_size=28, model_type="unigram", minloglevel=2
    )
    tok = build_tokenizer("sentencepiece", path=str(tmp_path / "m.model"), max_len=12)
    assert (tok.bos_id, tok.pad_id, tok.eos_id) == (0, 1, 2)
    assert tok.mask_id == 28 + 1 and tok.vocab_size == 64010
    ids, pad = tok(["a red circle", "two green stars"])
    raw = tok._sp.encode("a red circle")
    assert ids[0, 1 : 1 + len(raw)].tolist() == [i + 1 for i in raw]  # fairseq offset
    assert ids[0, len(raw) + 1].item() == tok.eos_id and (ids[pad] == 1).all()
    assert tok.decode(ids[0]) == "a red circle"
    with pytest.raises(FileNotFoundError, match="nope.spm"):
        build_tokenizer("sentencepiece", path=str(tmp_path / "nope.spm"))


def test_transforms_shapes_and_normalization() -> None:
    img = Image.new("L", (50, 30), 255)  # greyscale input must become RGB
    for train in (True, False):
        x = build_transform(32, train=train, color_jitter=0.0)(img)
        assert x.shape == (3, 32, 32)
    x = build_transform(32, train=False)(Image.new("RGB", (40, 40), (255, 0, 128)))
    assert torch.allclose(x[:, 0, 0], torch.tensor([1.0, -1.0, 128 / 255 * 2 - 1]), atol=1e-2)
    assert torch.allclose(denormalize(x)[:, 5, 5], torch.tensor([1.0, 0.0, 128 / 255]), atol=1e-2)
    x = build_transform(32, train=False, eval_resize="center_crop", crop_pct=0.5)(Image.new("RGB", (64, 64)))
    assert x.shape == (3, 32, 32)
    with pytest.raises(ValueError, match="scale"):
        build_transform(32, train=True, scale=(0.0, 1.0))
