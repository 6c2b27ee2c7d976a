"""Incremental decoding with a key/value cache equals the full causal forward (docs/interfaces.md section 8)."""

from __future__ import annotations

import pytest
import torch

from mmoe.model import create_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _caption_mask(num_vision: int, num_text: int) -> torch.Tensor:
    """Image attends to image only; text attends to the image and causally to text ([B3] sec. 3.1, captioning)."""
    n = num_vision + num_text
    allow = torch.zeros(n, n, dtype=torch.bool)
    allow[:, :num_vision] = True
    allow[num_vision:, num_vision:] = torch.ones(num_text, num_text, dtype=torch.bool).tril()
    return allow


def _model_and_inputs(name: str, seed: int, text_len: int) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """A 2-layer model in eval mode, a (2, 3, 64, 64) image and (2, ``text_len``) token ids drawn from ``seed``."""
    torch.manual_seed(0)
    model = create_model(name, depth=2).eval()
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(2, 3, 64, 64, generator=g)
    text = torch.randint(0, 49408, (2, text_len), generator=g)
    return model, image, text


@pytest.mark.parametrize("name", ["tiny", "tiny_mhmoe"])
def test_cached_steps_equal_full_causal_forward(name):
    model, image, text = _model_and_inputs(name, seed=0, text_len=6)
    nv = 65
    with torch.no_grad():
        full = model(image=image, text=text, attn_mask=_caption_mask(nv, 6)).features
        cache = model.new_cache()
        first = model(image=image, text=text[:, :2], attn_mask=_caption_mask(nv, 2), cache=cache)
        assert cache.length == nv + 2
        torch.testing.assert_close(first.features, full[:, : nv + 2], atol=1e-5, rtol=0)
        for t in range(2, 6):
            # a peek (update_cache=False) must not change the cache, and gives the same answer
            peek = model(text=text[:, t : t + 1], cache=cache, text_start=t, update_cache=False).features
            assert cache.length == nv + t
            step = model(text=text[:, t : t + 1], cache=cache, text_start=t).features
            assert cache.length == nv + t + 1
            torch.testing.assert_close(peek, step, atol=0, rtol=0)
            torch.testing.assert_close(step[:, 0], full[:, nv + t], atol=1e-5, rtol=0)


def test_multi_token_step_is_causal_and_reorder_selects_rows():
    model, image, text = _model_and_inputs("tiny", seed=1, text_len=5)
    nv = 65
    with torch.no_grad():
        full = model(image=image, text=text, attn_mask=_caption_mask(nv, 5)).features
        cache = model.new_cache()
        model(image=image, text=text[:, :2], attn_mask=_caption_mask(nv, 2), cache=cache)
        two = model(text=text[:, 2:4], cache=cache, text_start=2).features  # two new tokens at once
        torch.testing.assert_close(two, full[:, nv + 2 : nv + 4], atol=1e-5, rtol=0)
        # beam search: swap and duplicate rows
        cache.reorder(torch.tensor([1, 1]))
        step = model(text=text[[1, 1], 4:5], cache=cache, text_start=4).features
        torch.testing.assert_close(step[:, 0], full[[1, 1], nv + 4], atol=1e-5, rtol=0)
        with pytest.raises(ValueError, match="image can only be given in the first call"):
            model(image=image, text=text[:, :1], cache=cache, text_start=5)
        with pytest.raises(ValueError, match="cache: holds batch 2"):
            model(text=text[:1, :1], cache=cache, text_start=5)


def test_prefix_padding_is_remembered():
    torch.manual_seed(0)
    model = create_model("tiny", depth=2).eval()
    g = torch.Generator().manual_seed(2)
    text = torch.randint(0, 49408, (2, 4), generator=g)
    pad = torch.tensor([[False, False, False, False], [False, False, True, True]])
    with torch.no_grad():
        cache = model.new_cache()
        model(text=text, text_padding_mask=pad, attn_mask=_caption_mask(0, 4), cache=cache)
        assert torch.equal(cache.padding, pad)
        a = model(text=text[:, :1], cache=cache, text_start=4, update_cache=False).features
        # the pad keys are ignored: changing their cached values changes nothing
        for i in range(len(cache.keys)):
            cache.keys[i][1, :, 2:] = 100.0
        b = model(text=text[:, :1], cache=cache, text_start=4, update_cache=False).features
    torch.testing.assert_close(a, b, atol=0, rtol=0)
