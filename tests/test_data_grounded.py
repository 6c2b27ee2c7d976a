"""Grounded-word masking of pair text: word lists, token sequences, priority selection and the data-module switch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import pretrain_data_args, shard_world

from mmoe.data.grounded import (
    CaptionTags,
    GroundedTokens,
    default_grounded_words,
    plural,
    resolve_grounded_words,
)
from mmoe.data.masking import IGNORE_INDEX, mask_tokens
from mmoe.data.shard_reader import StreamConfig
from mmoe.data.tokenizer import build_tokenizer
from mmoe.train.data.pretraining import PretrainDataModule

TOK = build_tokenizer("openclip", max_len=24)
SPECIALS = (60, 61, 62, 63)  # bos, eos, pad, mask of the hand-made batches


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    """4 rows of 12 ids: bos, regular ids < 50, eos, pads (lengths 12, 9, 5, 3)."""
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 50, (4, 12), generator=g)
    lengths = torch.tensor([12, 9, 5, 3])
    pad = torch.arange(12)[None] >= lengths[:, None]
    ids[:, 0] = 60
    ids[torch.arange(4), lengths - 1] = 61
    ids[pad] = 62
    return ids, pad


def _mask(ids: torch.Tensor, pad: torch.Tensor, seed: int = 3, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return mask_tokens(ids, pad, ratio=0.5, mask_id=63, special_ids=SPECIALS, random_range=(0, 50), generator=gen, **kw)


def test_without_priority_the_masks_are_the_uniform_ones() -> None:
    ids, pad = _batch()
    # recorded with mask_tokens before the priority option existed (same batch, generator seed 3)
    want_out = [
        [60, 42, 63, 63, 33, 47, 37, 29, 38, 11, 63, 61],
        [60, 63, 63, 63, 63, 22, 33, 18, 61, 62, 62, 62],
        [60, 63, 37, 27, 61, 62, 62, 62, 62, 62, 62, 62],
        [60, 63, 61, 62, 62, 62, 62, 62, 62, 62, 62, 62],
    ]
    n = IGNORE_INDEX
    want_labels = [
        [n, 42, 21, 36, n, 47, n, n, n, n, 8, n],
        [n, 17, 12, 30, 16, n, n, n, n, n, n, n],
        [n, 18, 43, n, n, n, n, n, n, n, n, n],
        [n, 27, n, n, n, n, n, n, n, n, n, n],
    ]
    out, labels = _mask(ids, pad)
    assert out.tolist() == want_out and labels.tolist() == want_labels
    # no priority token, or a share of 0: the same masks
    for kw in ({"priority": torch.zeros_like(pad)}, {"priority": ids < 25, "priority_share": 0.0}):
        o, la = _mask(ids, pad, **kw)
        assert torch.equal(o, out) and torch.equal(la, labels), kw


def test_priority_tokens_come_first_and_k_and_the_split_stay() -> None:
    B, L = 600, 30
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(6, L + 1, (B,), generator=g)
    ids = torch.randint(0, 50, (B, L), generator=g)
    pad = torch.arange(L)[None] >= lengths[:, None]
    ids[:, 0] = 60
    ids[torch.arange(B), lengths - 1] = 61
    ids[pad] = 62
    priority = (ids < 12) | (ids == 61)  # ~24% of the tokens; specials marked too, they must stay unselected
    maskable = ~pad & (ids < 50)
    grounded = priority & maskable
    g_count, n = grounded.sum(1), maskable.sum(1)
    k = (n.float() * 0.5).round().clamp(min=1).long()
    _, uniform = _mask(ids, pad, seed=5)
    out, labels = _mask(ids, pad, seed=5, priority=priority)
    sel = labels != IGNORE_INDEX
    assert (sel.sum(1) == k).all() and (sel.sum(1) == (uniform != IGNORE_INDEX).sum(1)).all()
    assert not (sel & ~maskable).any()
    # share 1: every grounded token when they fit in k, else k of them and nothing else
    hits = (sel & grounded).sum(1)
    assert (hits == torch.minimum(g_count, k)).all()
    # 80/10/10 unchanged
    assert (labels[sel] == ids[sel]).all() and (out[~sel] == ids[~sel]).all()
    share_mask = (out[sel] == 63).float().mean().item()
    assert 0.75 < share_mask < 0.85
    # share 0.5: at least half (rounded) of them first, the rest uniform; more of them than uniform masking takes
    _, half = _mask(ids, pad, seed=5, priority=priority, priority_share=0.5)
    half_hits = ((half != IGNORE_INDEX) & grounded).sum(1)
    assert (half_hits >= torch.minimum((g_count.float() * 0.5).round().long(), k)).all()
    uniform_hits = ((uniform != IGNORE_INDEX) & grounded).sum().item()
    # expected shares of the grounded tokens: uniform 0.5, share 0.5 about 0.7 (0.5 first, a share of the rest), 1.0
    assert uniform_hits < 0.8 * half_hits.sum().item() and half_hits.sum().item() < 0.85 * hits.sum().item()
    # the grounded tokens taken first are a uniform draw among them: each grounded position is hit as often
    first_slot = grounded & (torch.arange(L)[None] == 1)
    rate_first = ((half != IGNORE_INDEX) & first_slot).sum() / first_slot.sum()
    later = grounded & (torch.arange(L)[None] >= 2)
    rate_later = ((half != IGNORE_INDEX) & later).sum() / later.sum()
    assert abs(rate_first.item() - rate_later.item()) < 0.12


def test_priority_arguments_are_checked() -> None:
    ids, pad = _batch()
    with pytest.raises(ValueError, match="priority must be a bool tensor of shape"):
        _mask(ids, pad, priority=torch.zeros(4, 11, dtype=torch.bool))
    with pytest.raises(ValueError, match="priority must be a bool"):
        _mask(ids, pad, priority=torch.zeros(4, 12))
    with pytest.raises(ValueError, match="priority_share must be in"):
        _mask(ids, pad, priority=pad, priority_share=1.5)


def test_grounded_tokens_mark_whole_words_and_phrases() -> None:
    marker = GroundedTokens.from_words(TOK, ["red", "hexagon", "fire hydrant", "circle"])
    ids, _ = TOK(["Red hexagons and a fire hydrant.", "A fire near two circles, hex.", "RED CIRCLE"])
    marked = marker(ids)
    words = [[TOK.decode([i]) for i, m in zip(row, mrow) if m] for row, mrow in zip(ids.tolist(), marked.tolist())]
    assert words == [["red", "hex", "ag", "ons", "fire", "hydr", "ant"], ["circles"], ["red", "circle"]]
    # "hexagon" and "hydrant" are several BPE pieces: all of them count, and only as a whole
    assert len(TOK.encode_one("hexagon")) > 1 and len(TOK.encode_one("hydrant")) > 1
    assert not marker(torch.tensor([TOK.encode_one("fire hex")])).any()
    with pytest.raises(ValueError, match="no token sequence"):
        GroundedTokens([[]])


def test_plurals() -> None:
    assert [plural(w) for w in ("circle", "cross", "box", "lorry", "day")] == [
        "circles",
        "crosses",
        "boxes",
        "lorries",
        "days",
    ]


def test_word_lists(tmp_path: Path) -> None:
    default = default_grounded_words()
    for word in ("red", "two", "left", "above", "center", "small", "giraffe", "traffic light", "toothbrush"):
        assert word in default
    shipped = json.loads((Path(__file__).parents[1] / "mmoe/data/grounded_words.json").read_text())
    assert len(set(shipped["coco_categories"]) - {"people", "knives", "mice"}) == 80  # the COCO names, plural forms
    assert len(default) == len(set(default))
    world = tmp_path / "world.json"
    world.write_text(json.dumps({"seed": 0, "shapes": ["disc", "wedge"], "colors": ["lime"], "splits": {}}))
    words = tmp_path / "words.txt"
    words.write_text("# my words\nteapot\n  top   left  \n\n")
    got = resolve_grounded_words(["default", str(world), str(words), "tea cup"])
    assert got[: len(default)] == default
    assert got[len(default) :] == ["disc", "wedge", "teapot", "top left", "tea cup"]  # "lime" is in default
    assert resolve_grounded_words(None) == []
    assert resolve_grounded_words(str(world)) == ["disc", "wedge", "lime"]


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        ("defualt", ValueError, "pair_mask_words='defualt': expected null, 'default'"),
        ("nope/words.json", FileNotFoundError, "pair_mask_words: word file 'nope/words.json' does not exist"),
        ([], ValueError, "pair_mask_words: the list is empty"),
        (["red", 3], ValueError, "pair_mask_words: expected null, a string or a list of strings"),
        (["  "], ValueError, "holds no words"),
    ],
)
def test_bad_word_values_are_refused(value: object, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        resolve_grounded_words(value)  # type: ignore[arg-type]


def test_bad_word_files_are_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        resolve_grounded_words(str(bad))
    bad.write_text(json.dumps({"seed": 1}))
    with pytest.raises(ValueError, match="expected a JSON list of words"):
        resolve_grounded_words(str(bad))
    with pytest.raises(ValueError, match="an image stream has no text"):
        StreamConfig("image", ["x"], grounded=GroundedTokens([[1]]))
    with pytest.raises(ValueError, match="grounded_share must be in"):
        StreamConfig("pair", ["x"], grounded_share=-0.1)


# -- the data-module switch ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shard_world(tmp_path_factory, num_val=8)


def _dm(world: Path, **kw) -> PretrainDataModule:
    s = world / "shards"
    val = {f"val_{k}_shards": [str(s / k / "val-*.tar")] for k in ("text", "pair")}
    args = pretrain_data_args(world, **val, steps_per_epoch=4, shuffle_buffer=10, hflip=0.5, max_text_len=24)
    return PretrainDataModule(**{**args, **kw})


def _streams(loader, name: str) -> list[dict[str, torch.Tensor]]:
    return [b[name] for b in loader]


def _original(sub: dict[str, torch.Tensor]) -> torch.Tensor:
    """The ids before masking (labels where selected)."""
    return torch.where(sub["text_labels"] != IGNORE_INDEX, sub["text_labels"], sub["text"])


def test_world_json_names_the_grounded_words(world: Path) -> None:
    summary = json.loads((world / "world.json").read_text())
    assert summary["sizes"] == ["large", "small"] and summary["numbers"] == ["one", "two", "three", "four"]
    words = resolve_grounded_words(str(world / "world.json"))
    assert {"circle", "red", "top left", "small", "three"} <= set(words)


def test_training_pairs_mask_grounded_words_and_validation_stays_uniform(world: Path) -> None:
    words = ["default", str(world / "world.json")]
    off, on = _dm(world), _dm(world, pair_mask_words=words)
    marker = on.grounded_tokens
    assert off.grounded_tokens is None and marker is not None
    pairs_off, pairs_on = _streams(off.train_dataloader(), "pair"), _streams(on.train_dataloader(), "pair")
    grounded_off = grounded_on = total_grounded = 0
    for a, b in zip(pairs_off, pairs_on, strict=True):
        # same captions, flips and image masks; the same number of masked tokens per caption
        original = _original(a)
        assert torch.equal(original, _original(b))
        assert torch.equal(a["image_mask"], b["image_mask"]) and torch.equal(a["image"], b["image"])
        sel_a, sel_b = a["text_labels"] != IGNORE_INDEX, b["text_labels"] != IGNORE_INDEX
        assert torch.equal(sel_a.sum(1), sel_b.sum(1))
        g = marker(original)
        grounded_off += int((sel_a & g).sum())
        grounded_on += int((sel_b & g).sum())
        total_grounded += int((g & ~a["text_padding_mask"]).sum())
        # share 1: a caption's grounded tokens are all masked unless there are more than the mask count
        assert ((sel_b & g).sum(1) == torch.minimum(g.sum(1), sel_b.sum(1))).all()
    assert total_grounded > 0 and grounded_on > grounded_off
    # the text-only stream and every validation batch are the same with the option on
    for a, b in zip(_streams(off.train_dataloader(), "text"), _streams(on.train_dataloader(), "text")):
        assert torch.equal(a["text"], b["text"]) and torch.equal(a["text_labels"], b["text_labels"])
    val_off, val_on = list(off.val_dataloader()), list(on.val_dataloader())
    assert len(val_off) == len(val_on) > 0
    for a, b in zip(val_off, val_on):
        for name in ("text", "pair"):
            assert torch.equal(a[name]["text"], b[name]["text"])
            assert torch.equal(a[name]["text_labels"], b[name]["text_labels"])
    # a share below one takes fewer of them
    half = _dm(world, pair_mask_words=words, pair_grounded_share=0.5)
    pairs_half = _streams(half.train_dataloader(), "pair")
    grounded_half = sum(int(((p["text_labels"] != IGNORE_INDEX) & marker(_original(p))).sum()) for p in pairs_half)
    assert grounded_off < grounded_half < grounded_on


def test_bad_data_module_values_are_refused(world: Path) -> None:
    with pytest.raises(ValueError, match="PretrainDataModule: pair_grounded_share must be in"):
        _dm(world, pair_mask_words="default", pair_grounded_share=0.0)
    with pytest.raises(ValueError, match="PretrainDataModule: pair_grounded_share=0.5 needs pair_mask_words"):
        _dm(world, pair_grounded_share=0.5)
    with pytest.raises(ValueError, match="PretrainDataModule: pair_mask_words='colours'"):
        _dm(world, pair_mask_words="colours")
    with pytest.raises(FileNotFoundError, match="PretrainDataModule: pair_mask_words: word file"):
        _dm(world, pair_mask_words=[str(world / "nope.json")])


def test_cli_parses_the_option(tmp_path: Path, world: Path) -> None:
    from jsonargparse import ArgumentParser

    cfg = tmp_path / "data.yaml"
    cfg.write_text(
        "pair_shards: ['" + str(world / "shards/pair/train-*.tar") + "']\n"
        "batch_size: 4\nimage_size: 32\npatch_size: 8\nnum_workers: 0\nsteps_per_epoch: 2\n"
        f"pair_mask_words: [default, '{world / 'world.json'}', teapot]\npair_grounded_share: 0.75\n"
    )
    parser = ArgumentParser()
    parser.add_class_arguments(PretrainDataModule, "data")
    parsed = parser.parse_args(["--data", str(cfg)])
    init = parser.instantiate if hasattr(parser, "instantiate") else parser.instantiate_classes
    dm = init(parsed).data
    assert dm.hparams.pair_mask_words == ["default", str(world / "world.json"), "teapot"]
    assert dm.hparams.pair_grounded_share == 0.75
    assert dm.grounded_tokens is not None and len(list(dm.train_dataloader())) == 2
    parsed = parser.parse_args(["--data", str(cfg), "--data.pair_mask_words=default"])
    assert init(parsed).data.hparams.pair_mask_words == "default"


def test_sentencepiece_pieces_with_a_leading_space_and_capitals(tmp_path: Path) -> None:
    spm = pytest.importorskip("sentencepiece")
    corpus = tmp_path / "corpus.txt"
    lines = ["Red circle on the left.", "a red circle to the left of a blue square", "Two blue squares on the right."]
    corpus.write_text("\n".join(lines * 50))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tmp_path / "m"), vocab_size=30, model_type="unigram", minloglevel=2
    )
    tok = build_tokenizer("sentencepiece", path=str(tmp_path / "m.model"), max_len=32)
    marker = GroundedTokens.from_words(tok, ["red", "circle", "left", "square", "two"])
    ids, _ = tok(["Red circle on the left.", "Two blue squares and a red circle"])
    marked = marker(ids)
    for row, mrow, want in zip(
        ids.tolist(), marked.tolist(), (["Red", "circle", "left"], ["Two", "squares", "red", "circle"])
    ):
        # marked pieces kept, the others blanked: what is left reads as the grounded words, each whole
        text = "".join(tok._sp.id_to_piece(i - tok.FAIRSEQ_OFFSET) if m else " " for i, m in zip(row, mrow))
        assert text.replace("\u2581", " ").split() == want


def test_pair_images_can_stay_whole_in_training_and_keep_their_masks_in_validation(world: Path) -> None:
    from mmoe.train.pretraining import MaskedPretraining

    masked, whole = _dm(world), _dm(world, pair_image_mask=False)
    pairs_masked, pairs_whole = _streams(masked.train_dataloader(), "pair"), _streams(whole.train_dataloader(), "pair")
    for a, b in zip(pairs_masked, pairs_whole, strict=True):
        # the same images and captions; only the pair images' patch masks are gone
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["text_labels"], b["text_labels"])
        assert a["image_mask"].any() and "image_mask" not in b
    for a, b in zip(_streams(masked.train_dataloader(), "image"), _streams(whole.train_dataloader(), "image")):
        assert torch.equal(a["image_mask"], b["image_mask"])  # the image stream keeps masked image modeling
    for a, b in zip(masked.val_dataloader(), whole.val_dataloader(), strict=True):
        assert torch.equal(a["pair"]["image_mask"], b["pair"]["image_mask"])  # grounding_gain is measured alike
    # the pair stream then trains text only: no pair MIM term, every other loss present
    m = MaskedPretraining(backbone_overrides={"depth": 2, "img_size": 32}, eval_grounding=False)
    batch = next(iter(whole.train_dataloader()))
    losses, _, _ = m.stream_losses(batch)
    assert set(losses) == {"mlm_text", "mlm_pair", "mim_image"}
    assert all(torch.isfinite(v) for v in losses.values())
    with pytest.raises(ValueError, match="image_mask must be True"):
        StreamConfig("image", ["x"], image_mask=False)


def test_caption_tags_mark_whole_words_plurals_and_phrases() -> None:
    tags = CaptionTags(["circle", "Fire Hydrant", "cross", "bus"])
    assert len(tags) == 4 and tags.words == ["circle", "fire hydrant", "cross", "bus"]
    target = tags(["Two circles and a red cross.", "A fire hydrant by the buses", "semicircle, crossing", ""])
    assert target.dtype == torch.float32 and target.shape == (4, 4)
    assert target.tolist() == [[1, 0, 1, 0], [0, 1, 0, 1], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert tags.tags("a hydrant") == set()  # a phrase counts only whole
    with pytest.raises(ValueError, match="CaptionTags: no tag words"):
        CaptionTags([" "])


def test_one_word_group_of_a_file_or_of_the_shipped_list(world: Path) -> None:
    shapes = resolve_grounded_words(str(world / "world.json") + "#shapes")
    assert shapes == json.loads((world / "world.json").read_text())["shapes"]
    coco = resolve_grounded_words("default#coco_categories")
    assert {"person", "bicycle", "toothbrush"} <= set(coco) and "red" not in coco
    with pytest.raises(ValueError, match="no word group 'shape'; its groups are"):
        resolve_grounded_words(str(world / "world.json") + "#shape")
    with pytest.raises(ValueError, match="no word group 'colour'"):
        resolve_grounded_words(["default#colour"])


def test_pairs_carry_the_tags_of_all_their_captions(world: Path) -> None:
    spec = str(world / "world.json") + "#shapes"
    off, on = _dm(world), _dm(world, pair_tag_words=spec)
    assert off.caption_tags is None and on.caption_tags is not None
    shapes = resolve_grounded_words(spec)
    coco = json.loads((world / "coco" / "annotations" / "instances_train2014.json").read_text())
    cats = {c["id"]: c["name"] for c in coco["categories"]}
    for a, b in zip(_streams(off.train_dataloader(), "pair"), _streams(on.train_dataloader(), "pair"), strict=True):
        assert "tags" not in a and torch.equal(a["text"], b["text"])  # the rest of the batch is unchanged
        assert b["tags"].shape == (a["text"].shape[0], len(shapes))
        assert ((b["tags"] == 0) | (b["tags"] == 1)).all() and (b["tags"].sum(1) >= 1).all()
    assert set(cats.values()) <= set(shapes)
    for batch in on.val_dataloader():
        assert batch["pair"]["tags"].shape[1] == len(shapes) and "tags" not in batch["text"]
    with pytest.raises(ValueError, match="pair_tag_words needs pair_shards"):
        PretrainDataModule(image_shards=[str(world / "shards/image/train-*.tar")], pair_tag_words=spec)
    with pytest.raises(ValueError, match="tags are read from pair captions"):
        StreamConfig("text", ["x"], tags=on.caption_tags)
