"""Caption generation: cache vs recompute token for token, beam search vs brute force, greedy vs beam-1."""

from __future__ import annotations

import itertools
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from mmoe.model.generation import (
    GenerationConfig,
    SpecialIds,
    beam_search,
    caption_attention_mask,
    generate,
    greedy_search,
)


# ---------------------------------------------------------------------------------------------------------------------
# A tiny stand-in backbone with the call signature of docs/interfaces.md sections 2 and 8 (image first, then text;
# attn_mask True = may attend; new_cache / text_start / update_cache / cache.reorder).
class _Cache:
    def __init__(self) -> None:
        self.keys: list[torch.Tensor | None] = []
        self.values: list[torch.Tensor | None] = []

    def reorder(self, index: torch.Tensor) -> None:
        self.keys = [k.index_select(0, index) for k in self.keys]
        self.values = [v.index_select(0, index) for v in self.values]


class TinyCausalBackbone(nn.Module):
    def __init__(self, vocab: int = 12, dim: int = 16, depth: int = 2, heads: int = 2, patch: int = 4, img: int = 8):
        super().__init__()
        self.config = SimpleNamespace(patch_size=patch, dim=dim)
        self.heads = heads
        self.patch = nn.Conv2d(3, dim, patch, patch)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.vpos = nn.Parameter(torch.randn(1, 1 + (img // patch) ** 2, dim))
        self.tok = nn.Embedding(vocab, dim)
        self.tpos = nn.Embedding(64, dim)
        self.qkv = nn.ModuleList(nn.Linear(dim, 3 * dim) for _ in range(depth))
        self.proj = nn.ModuleList(nn.Linear(dim, dim) for _ in range(depth))
        self.mlp = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim)) for _ in range(depth)
        )

    def new_cache(self) -> _Cache:
        return _Cache()

    def _attend(self, i: int, x: torch.Tensor, mask: torch.Tensor, cache: _Cache | None, update: bool) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv[i](x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if cache is not None and len(cache.keys) > i:
            k_all, v_all = torch.cat([cache.keys[i], k], 2), torch.cat([cache.values[i], v], 2)
        else:
            k_all, v_all = k, v
        if cache is not None and update:
            if len(cache.keys) > i:
                cache.keys[i], cache.values[i] = k_all, v_all
            else:
                cache.keys.append(k_all)
                cache.values.append(v_all)
        att = (q @ k_all.transpose(-1, -2)) / math.sqrt(d // self.heads)
        att = att.masked_fill(~mask, float("-inf")).softmax(-1)
        return self.proj[i]((att @ v_all).transpose(1, 2).reshape(b, n, d))

    def forward(
        self, image=None, text=None, text_padding_mask=None, attn_mask=None, cache=None, text_start=0, update_cache=True
    ):
        parts = []
        if image is not None:
            v = self.patch(image).flatten(2).transpose(1, 2)
            parts.append(torch.cat([self.cls.expand(v.shape[0], -1, -1), v], 1) + self.vpos)
        if text is not None:
            pos = torch.arange(text_start, text_start + text.shape[1])
            parts.append(self.tok(text) + self.tpos(pos))
        x = torch.cat(parts, 1)
        n = x.shape[1]
        if image is None and cache is not None:  # incremental: attend to everything cached plus causal new tokens
            past = cache.keys[0].shape[2]
            mask = torch.ones(n, past + n, dtype=torch.bool)
            mask[:, past:] = torch.ones(n, n, dtype=torch.bool).tril()
        else:
            mask = attn_mask if attn_mask is not None else torch.ones(n, n, dtype=torch.bool)
        for i in range(len(self.qkv)):
            x = x + self._attend(i, x, mask, cache, update_cache)
            x = x + self.mlp[i](x)
        return SimpleNamespace(features=x)


SPECIAL = SpecialIds(bos_id=0, eos_id=1, mask_id=2, pad_id=3)


def _model(seed: int, vocab: int = 12):
    torch.manual_seed(seed)
    backbone = TinyCausalBackbone(vocab=vocab).double().eval()
    head = nn.Linear(16, vocab).double()
    with torch.no_grad():
        head.weight.mul_(8.0)  # peaky distributions so that captions vary in length
    return backbone, head


def test_attention_mask_pattern():
    m = caption_attention_mask(3, 4)
    assert m[:3, :3].all() and not m[:3, 3:].any()  # image sees image only
    assert m[3:, :3].all()  # text sees the whole image
    assert torch.equal(m[3:, 3:], torch.ones(4, 4, dtype=torch.bool).tril())  # text causal


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cache_equals_recompute_token_for_token(seed):
    backbone, head = _model(seed)
    image = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    for kw in ({"strategy": "greedy"}, {"strategy": "beam", "num_beams": 3}):
        cfg_c = GenerationConfig(max_length=12, use_cache=True, **kw)
        cfg_r = GenerationConfig(max_length=12, use_cache=False, **kw)
        a = generate(backbone, head, image, special=SPECIAL, config=cfg_c)
        b = generate(backbone, head, image, special=SPECIAL, config=cfg_r)
        assert a.tokens == b.tokens
        assert a.scores == pytest.approx(b.scores, abs=1e-9)
        assert all(t not in SPECIAL.banned + (SPECIAL.eos_id,) for row in a.tokens for t in row)


def test_batch_generation_equals_one_by_one():
    backbone, head = _model(3)
    image = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    batch = beam_search(backbone, head, image, special=SPECIAL, max_length=10)
    for i in range(3):
        one = beam_search(backbone, head, image[i : i + 1], special=SPECIAL, max_length=10)
        assert one.tokens[0] == batch.tokens[i]


def test_beam_one_equals_greedy():
    backbone, head = _model(4)
    image = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    g = greedy_search(backbone, head, image, special=SPECIAL, max_length=10)
    b = beam_search(backbone, head, image, special=SPECIAL, num_beams=1, length_penalty=0.0, max_length=10)
    assert g.tokens == b.tokens


# ---------------------------------------------------------------------------------------------------------------------
# Beam search against exhaustive search on a Markov chain whose next-token law depends on the previous token only.
class _MarkovBackbone(nn.Module):
    """features = one-hot of the token before the [MASK] query, so ``head`` holds the transition logits."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.config = SimpleNamespace(patch_size=4)

    def new_cache(self):
        return SimpleNamespace(last=None, reorder=None)

    def forward(self, image=None, text=None, attn_mask=None, cache=None, text_start=0, update_cache=True, **_):
        if cache is None:  # recompute: text = prefix + [MASK]
            return SimpleNamespace(features=nn.functional.one_hot(text[:, -2:-1], self.vocab).double())
        if image is not None or update_cache:
            cache.last = text[:, -1:]
            cache.reorder = lambda index: setattr(cache, "last", cache.last.index_select(0, index))
            return SimpleNamespace(features=None)
        return SimpleNamespace(features=nn.functional.one_hot(cache.last, self.vocab).double())


def _brute_force(trans_logp: torch.Tensor, real: list[int], max_length: int, lp: float) -> float:
    best = -math.inf
    for n in range(0, max_length):
        for seq in itertools.product(real, repeat=n):
            prev, total = SPECIAL.bos_id, 0.0
            for t in seq:
                total += float(trans_logp[prev, t])
                prev = t
            if n < max_length - 1:  # finished with EOS
                best = max(best, (total + float(trans_logp[prev, SPECIAL.eos_id])) / (n + 1) ** lp)
            else:  # cut at max_length without EOS
                best = max(best, total / n**lp)
    return best


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_beam_search_matches_brute_force(seed, use_cache):
    torch.manual_seed(seed)
    vocab, max_length = 6, 5  # real tokens 4, 5 (+ EOS): 2**4 = 16 prefixes at most
    head = nn.Linear(vocab, vocab, bias=False).double()
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, vocab, dtype=torch.float64).mul(2.0))
    logits = head.weight.detach().T.clone()
    logits[:, list(SPECIAL.banned)] = -math.inf
    trans_logp = logits.log_softmax(-1)
    image = torch.zeros(1, 3, 4, 4)
    out = beam_search(
        _MarkovBackbone(vocab),
        head,
        image,
        special=SPECIAL,
        num_beams=16,
        length_penalty=0.0,
        max_length=max_length,
        use_cache=use_cache,
    )
    assert out.scores[0] == pytest.approx(_brute_force(trans_logp, [4, 5], max_length, 0.0), abs=1e-9)
    # narrow beams never beat the exhaustive optimum
    narrow = beam_search(
        _MarkovBackbone(vocab),
        head,
        image,
        special=SPECIAL,
        num_beams=2,
        length_penalty=0.0,
        max_length=max_length,
        use_cache=use_cache,
    )
    assert narrow.scores[0] <= out.scores[0] + 1e-9


def test_generation_config_checks():
    with pytest.raises(ValueError, match="strategy"):
        GenerationConfig(strategy="sample")
    with pytest.raises(ValueError, match="max_length"):
        GenerationConfig(max_length=1)


@pytest.mark.parametrize("name", ["tiny_mhmoe"])
def test_real_backbone_cache_equals_recompute(name):
    """The backbone's KVCache (docs/interfaces.md 8), MoE layers included, decodes exactly like re-encoding."""
    from mmoe.model import create_model

    torch.manual_seed(0)
    backbone = create_model(name).double().eval()
    head = nn.Linear(backbone.config.dim, backbone.config.vocab_size).double()
    special = SpecialIds(bos_id=49406, eos_id=49407, mask_id=49409, pad_id=49408)
    image = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    for kw in ({"strategy": "greedy"}, {"strategy": "beam", "num_beams": 2}):
        a = generate(backbone, head, image, special=special, config=GenerationConfig(max_length=6, **kw))
        b = generate(
            backbone, head, image, special=special, config=GenerationConfig(max_length=6, use_cache=False, **kw)
        )
        assert a.tokens == b.tokens and len(a.tokens[0]) > 0
        assert a.scores == pytest.approx(b.scores, abs=1e-8)
