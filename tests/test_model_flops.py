"""The FLOPs formula of the backbone (`mmoe.model.flops`) against `torch.utils.flop_counter` on real forwards."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from mmoe.model import create_model
from mmoe.model.flops import forward_flops

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

# Manual attention and the per-expert loop: every product is an mm/bmm/conv the counter sees (the CPU SDPA kernel
# and torch._grouped_mm have no FLOP formula in the counter, which is why the count comes from the config).
COUNTABLE = dict(depth=2, attn_impl="manual", vocab_size=1000, pad_id=998, mask_id=999)
CASES = {
    "dense linear patchify": ("tiny", {"patch_embed": "linear"}),
    "dense conv stem + VL-FFN": ("tiny", {"patch_embed": "conv", "stem_blocks": 2, "vlffn_layers": 1}),
    "dense conv stem, 16-px patches from 48 channels": (
        "tiny",
        {"patch_embed": "conv", "patch_size": 16, "stem_width": 48, "stem_blocks": 1},
    ),
    "dense conv stem with the linear shortcut": ("tiny", {"patch_embed": "conv", "stem_shortcut": True}),
    "MH-MoE": ("tiny_mhmoe", {"moe": {"extra": {"expert_impl": "per_expert"}}}),
    "SMoE": ("tiny_smoe", {"moe": {"extra": {"expert_impl": "per_expert"}}}),
    "X-MoE": ("tiny_xmoe", {"moe": {"extra": {"expert_impl": "per_expert"}}}),
    "MH-MoE SwiGLU, no merge": (
        "tiny_mhmoe",
        {"moe": {"activation": "swiglu", "merge_layers": 0, "extra": {"expert_impl": "per_expert"}}},
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_forward_flops_match_the_flop_counter(case):
    name, overrides = CASES[case]
    model = create_model(name, **COUNTABLE, **overrides).eval()
    g = torch.Generator().manual_seed(0)
    image, text = torch.randn(3, 3, 64, 48, generator=g), torch.randint(0, 1000, (3, 5), generator=g)
    for args in ({"image": image, "text": text}, {"image": image}, {"text": text}):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(**args)
        image_size = (64, 48) if "image" in args else None
        expected = forward_flops(model.config, batch=3, image_size=image_size, text_len=5 if "text" in args else 0)
        assert counter.get_total_flops() == expected, sorted(args)


def test_forward_flops_scale_and_refuse_bad_shapes():
    cfg = create_model("tiny_mhmoe", device="meta").config
    one = forward_flops(cfg, image_size=64, text_len=8)
    assert forward_flops(cfg, batch=4, image_size=64, text_len=8) == 4 * one
    assert forward_flops(cfg, image_size=(64, 64), text_len=8) == one
    assert forward_flops(cfg, image_size=128) > 4 * forward_flops(cfg, image_size=64)  # attention is quadratic
    with pytest.raises(ValueError, match="image_size, text_len"):
        forward_flops(cfg)
    with pytest.raises(ValueError, match="text_len"):
        forward_flops(cfg, text_len=-1)
