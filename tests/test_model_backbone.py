"""Backbone behaviour: shapes, gradients, masks, checkpointing, save/load, timm contract (docs/interfaces.md 2)."""

from __future__ import annotations

import pytest
import torch

from mmoe.model import BackboneOutput, create_model, load_backbone_weights, load_model, save_model
from mmoe.model.attention import manual_attention
from mmoe.model.registry import get_config

SMALL = dict(depth=2)  # two blocks: one dense, one MoE (every 2nd) keep tests at seconds


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _inputs(batch: int = 2, length: int = 7, size: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, 3, size, size, generator=g)
    text = torch.randint(0, 49408, (batch, length), generator=g)
    pad = torch.zeros(batch, length, dtype=torch.bool)
    pad[-1, length - 3 :] = True
    return image, text, pad


@pytest.fixture(scope="module", params=["tiny", "tiny_smoe", "tiny_xmoe", "tiny_mhmoe"])
def model(request):
    torch.manual_seed(0)
    return create_model(request.param, **SMALL)


def test_forward_modalities_shapes(model):
    image, text, pad = _inputs()
    cfg = model.config
    g = 1 + cfg.num_patches
    out = model(image=image)
    assert isinstance(out, BackboneOutput)
    assert out.features.shape == (2, g, cfg.dim) and out.num_vision_tokens == g and out.grid_size == (8, 8)
    out = model(text=text, text_padding_mask=pad)
    assert out.features.shape == (2, 7, cfg.dim) and out.num_vision_tokens == 0 and out.grid_size is None
    out = model(image=image, text=text, text_padding_mask=pad)
    assert out.features.shape == (2, g + 7, cfg.dim)
    assert torch.isfinite(out.features).all()
    if cfg.moe is None:
        assert out.routing == {} and float(out.aux_loss) == 0.0
    else:
        assert list(out.routing) == ["layer1"]
        rec = out.routing["layer1"]
        h = cfg.moe.num_heads
        assert rec.expert_ids.shape == (2 * (g + 7) * h, cfg.moe.top_k)
        # padding sub-tokens are kept out of routing
        assert int((rec.expert_ids[:, 0] < 0).sum()) == 3 * h
        assert out.aux_loss.ndim == 0 and float(out.aux_loss.detach()) > 0


def test_every_parameter_gets_a_gradient(model):
    image, text, pad = _inputs()
    image_mask = torch.zeros(2, model.config.num_patches, dtype=torch.bool)
    image_mask[:, :10] = True
    model.zero_grad(set_to_none=True)
    out = model(image=image, text=text, text_padding_mask=pad, image_mask=image_mask)
    (out.features.square().mean() + out.aux_loss).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []
    model.zero_grad(set_to_none=True)


def test_padding_does_not_leak(model):
    """Changing pad ids or adding pad positions must not change the features of real tokens."""
    model.eval()
    image, text, pad = _inputs()
    with torch.no_grad():
        a = model(image=image, text=text, text_padding_mask=pad).features
        text2 = text.masked_fill(pad, 123)
        b = model(image=image, text=text2, text_padding_mask=pad).features
        longer = torch.cat([text, torch.full((2, 2), 49408)], 1)
        pad2 = torch.cat([pad, torch.ones(2, 2, dtype=torch.bool)], 1)
        c = model(image=image, text=longer, text_padding_mask=pad2).features
    keep = ~torch.cat([torch.zeros(2, 65, dtype=torch.bool), pad], 1)
    torch.testing.assert_close(a[keep], b[keep], atol=1e-5, rtol=0)
    torch.testing.assert_close(a[keep], c[:, : a.shape[1]][keep], atol=1e-5, rtol=0)
    model.train()


def test_grad_checkpointing_same_outputs_and_grads():
    torch.manual_seed(0)
    model = create_model("tiny_mhmoe", **SMALL)
    image, text, pad = _inputs()

    def run():
        model.zero_grad(set_to_none=True)
        out = model(image=image, text=text, text_padding_mask=pad)
        (out.features.square().mean() + out.aux_loss).backward()
        return out.features.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    f0, g0 = run()
    model.set_grad_checkpointing(True)
    f1, g1 = run()
    model.set_grad_checkpointing(False)
    torch.testing.assert_close(f0, f1, atol=1e-6, rtol=0)
    assert g0.keys() == g1.keys()
    for name in g0:
        torch.testing.assert_close(g0[name], g1[name], atol=1e-6, rtol=1e-5, msg=name)


def test_sdpa_matches_manual_attention_float64():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 4, 9, 16, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(3))
    mask = torch.rand(2, 1, 9, 9, generator=g) > 0.3
    mask[..., 0] = True
    ref = manual_attention(q, k, v, mask)
    fast = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(fast, ref, atol=1e-12, rtol=0)
    grads_ref = torch.autograd.grad(ref.sum(), (q, k, v))
    grads_fast = torch.autograd.grad(fast.sum(), (q, k, v))
    for a, b in zip(grads_ref, grads_fast):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_backbone_sdpa_vs_manual_impl():
    torch.manual_seed(0)
    fast = create_model("tiny", attn_impl="sdpa", **SMALL).double().eval()
    slow = create_model("tiny", attn_impl="manual", **SMALL).double().eval()
    slow.load_state_dict(fast.state_dict())
    image, text, pad = _inputs()
    n = 65 + 7
    allow = torch.ones(n, n, dtype=torch.bool)
    allow[:65, 65:] = False
    allow[65:, 65:] = torch.ones(7, 7, dtype=torch.bool).tril()
    args = dict(image=image.double(), text=text, text_padding_mask=pad, attn_mask=allow)
    torch.testing.assert_close(fast(**args).features, slow(**args).features, atol=1e-10, rtol=0)


def test_attn_mask_blocks_information_flow():
    """With image tokens blind to text (captioning mask), vision features do not depend on the text."""
    torch.manual_seed(0)
    model = create_model("tiny", **SMALL).eval()
    image, text, _ = _inputs()
    n = 65 + 7
    allow = torch.ones(n, n, dtype=torch.bool)
    allow[:65, 65:] = False
    with torch.no_grad():
        a = model(image=image, text=text, attn_mask=allow).features[:, :65]
        b = model(image=image, text=text.flip(1), attn_mask=allow).features[:, :65]
        c = model(image=image, text=text.flip(1)).features[:, :65]
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert (a - c).abs().max() > 1e-4


def test_image_mask_uses_mask_token():
    torch.manual_seed(0)
    model = create_model("tiny", **SMALL).eval()
    image, _, _ = _inputs()
    mask = torch.zeros(2, 64, dtype=torch.bool)
    mask[:, 5] = True
    with torch.no_grad():
        a = model(image=image, image_mask=mask).features
        image2 = image.clone()
        image2[:, :, 0:8, 40:48] = 7.0  # patch 5 = row 0, column 5
        b = model(image=image2, image_mask=mask).features
        c = model(image=image2).features
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert (a - c).abs().max() > 1e-3
    with pytest.raises(ValueError, match="image_mask"):
        model(image=image, image_mask=mask[:, :10])


def test_other_image_sizes_and_non_square():
    torch.manual_seed(0)
    model = create_model("tiny", **SMALL).eval()
    with torch.no_grad():
        out = model(image=torch.randn(1, 3, 48, 96))
    assert out.grid_size == (6, 12) and out.features.shape == (1, 1 + 72, 128) and out.num_vision_tokens == 73
    with pytest.raises(ValueError, match="patch_size"):
        model(image=torch.randn(1, 3, 50, 64))
    # resampling the stored table to the same grid is the identity
    same = model.vision_embed.position_table((8, 8))
    assert same is model.vision_embed.pos_embed


def test_input_errors_name_the_argument():
    model = create_model("tiny", **SMALL)
    with pytest.raises(ValueError, match="pass `image`, `text` or both"):
        model()
    with pytest.raises(ValueError, match="max_text_len"):
        model(text=torch.zeros(1, 40, dtype=torch.long))
    with pytest.raises(ValueError, match="text_padding_mask"):
        model(text=torch.zeros(1, 4, dtype=torch.long), text_padding_mask=torch.zeros(1, 4))
    with pytest.raises(ValueError, match="attn_mask"):
        model(text=torch.zeros(1, 4, dtype=torch.long), attn_mask=torch.ones(3, 3, dtype=torch.bool))


def test_save_load_round_trip_exact(tmp_path):
    torch.manual_seed(0)
    model = create_model("tiny_mhmoe", **SMALL).eval()
    path = tmp_path / "sub" / "m.pt"
    save_model(model, path)
    assert path.is_file() and not list(path.parent.glob(".*tmp"))
    again = load_model(path).eval()
    assert again.config == model.config
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), again.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    image, text, pad = _inputs()
    with torch.no_grad():
        assert torch.equal(
            model(image=image, text=text, text_padding_mask=pad).features,
            again(image=image, text=text, text_padding_mask=pad).features,
        )
    bigger = load_model(path, img_size=96)  # positions resampled to a 12 x 12 grid
    assert bigger.vision_embed.pos_embed.shape == (1, 145, 128)
    assert bigger(image=torch.randn(1, 3, 96, 96)).features.shape == (1, 145, 128)


def test_load_from_lightning_checkpoint(tmp_path):
    import dataclasses

    torch.manual_seed(0)
    model = create_model("tiny", **SMALL)
    ckpt = {
        "state_dict": {**{f"backbone.{k}": v for k, v in model.state_dict().items()}, "head.weight": torch.ones(3)},
        "mmoe_config": dataclasses.asdict(model.config),
        "epoch": 1,
    }
    path = tmp_path / "last.ckpt"
    torch.save(ckpt, path)
    again = load_model(path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    torch.save({"state_dict": {}}, tmp_path / "bad.ckpt")
    with pytest.raises(ValueError, match="mmoe-convert"):
        load_model(tmp_path / "bad.ckpt")
    missing, unexpected = load_backbone_weights(
        create_model("tiny", **SMALL), ckpt["state_dict"], strict=False, prefix="backbone."
    )
    assert missing == [] and unexpected == []
    with pytest.raises(ValueError, match="shape mismatch"):
        load_backbone_weights(create_model("tiny", depth=2, dim=64, ffn_dim=256), model.state_dict())


def test_create_model_init_from_resamples_and_rebuilds(tmp_path):
    """The one builder: name + init_from loads weights at another img_size; None + init_from rebuilds the file's."""
    torch.manual_seed(0)
    model = create_model("tiny_mhmoe", **SMALL)
    save_model(model, tmp_path / "m.pt")
    bigger = create_model("tiny_mhmoe", init_from=tmp_path / "m.pt", **{**SMALL, "img_size": 96})
    assert bigger.vision_embed.pos_embed.shape == (1, 145, 128)
    own = model.state_dict()
    assert all(torch.equal(v, own[k]) for k, v in bigger.state_dict().items() if k != "vision_embed.pos_embed")
    again = create_model(init_from=tmp_path / "m.pt")
    assert again.config == model.config
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    vision = create_model("tiny_mhmoe", init_from=tmp_path / "m.pt", modalities=["vision"], **SMALL)
    assert not vision.config.has_text
    with pytest.raises(ValueError, match="missing keys"):
        create_model("tiny_mhmoe", init_from=tmp_path / "m.pt", depth=4)
    with pytest.raises(ValueError, match="init_from"):
        create_model()


def test_timm_contract_layer_decay():
    from timm.models import group_parameters
    from timm.optim import param_groups_layer_decay

    model = create_model("tiny", **SMALL)
    nwd = model.no_weight_decay()
    names = dict(model.named_parameters())
    assert nwd <= set(names)
    depth = model.config.depth
    # layer ids ([BEiT] layer decay): embeddings 0, block i -> i + 1; the final norm joins the last block (timm's rule)
    ids = group_parameters(model, model.group_matcher(coarse=False), reverse=True)
    assert ids["vision_embed.patch_embed.proj.weight"] == ids["text_embed.token_embed.weight"] == 0
    assert ids["vision_embed.pos_embed"] == 0 and ids["blocks.0.attn.q_proj.vision.weight"] == 1
    assert ids[f"blocks.{depth - 1}.ffn.text.fc2.bias"] == depth and ids["norm.text.weight"] == depth
    groups = param_groups_layer_decay(model, weight_decay=0.05, no_weight_decay_list=nwd, layer_decay=0.5)
    scale_of = {}
    for group in groups:
        for p in group["params"]:
            scale_of[id(p)] = (group["lr_scale"], group["weight_decay"])
    assert scale_of[id(names["vision_embed.patch_embed.proj.weight"])][0] == pytest.approx(0.5**depth)
    assert scale_of[id(names["blocks.0.attn.q_proj.vision.weight"])][0] == pytest.approx(0.5 ** (depth - 1))
    assert scale_of[id(names["norm.vision.weight"])][0] == pytest.approx(1.0)
    assert scale_of[id(names["vision_embed.pos_embed"])][1] == 0.0
    assert scale_of[id(names["blocks.0.attn.q_proj.vision.weight"])][1] == 0.05
    feats = model.forward_features(torch.randn(1, 3, 64, 64))
    assert feats.shape == (1, 65, 128)
    assert model.group_matcher(coarse=True)["blocks"] == r"^blocks\.(\d+)"


def test_shared_attention_and_per_modality_pools():
    torch.manual_seed(0)
    model = create_model("tiny_mhmoe", attention="shared", moe={"pool": "per_modality"}, **SMALL)
    assert hasattr(model.blocks[0].attn.q_proj, "shared")
    image, text, pad = _inputs()
    out = model(image=image, text=text, text_padding_mask=pad)
    assert list(out.routing) == ["layer1.vision", "layer1.text"]
    assert out.routing["layer1.vision"].token_shape == (2, 65)
    (out.features.mean() + out.aux_loss).backward()
    assert all(p.grad is not None for p in model.parameters() if p is not model.vision_embed.mask_token)
    out = model(text=text)
    assert list(out.routing) == ["layer1.text"]


def test_vlffn_routes_fused_inputs():
    torch.manual_seed(0)
    model = create_model("tiny", vlffn_layers=1, **SMALL).eval()
    assert model.blocks[1].ffn.vl is not None and model.blocks[0].ffn.vl is None
    image, text, pad = _inputs()
    with torch.no_grad():
        before = model(image=image, text=text).features
        delta = torch.randn(128)  # not constant: the final LayerNorm would remove a constant shift
        model.blocks[1].ffn.vl.fc2.bias.add_(delta)
        after = model(image=image, text=text).features
        only_image = model(image=image).features
        model.blocks[1].ffn.vl.fc2.bias.sub_(delta)
        only_image_ref = model(image=image).features
    assert (before - after).abs().max() > 1e-3
    torch.testing.assert_close(only_image, only_image_ref, atol=1e-6, rtol=0)


def test_drop_path_is_stochastic_in_train_only():
    torch.manual_seed(0)
    model = create_model("tiny", drop_path=0.5, **SMALL)
    image, _, _ = _inputs()
    model.train()
    a, b = model(image=image).features, model(image=image).features
    assert (a - b).abs().max() > 0
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(image=image).features, model(image=image).features)


def test_init_follows_beit3_recipe():
    """BEiT-3 init: std-0.02 Linear weights, zero biases, unit norms; output projections of layer l / sqrt(2l)."""
    torch.manual_seed(0)
    model = create_model("tiny", depth=4, dim=256, ffn_dim=1024)
    blk0, blk3 = model.blocks[0], model.blocks[3]
    assert abs(blk0.attn.q_proj.vision.weight.std().item() - 0.02) < 2e-3
    assert abs(blk0.attn.out_proj.text.weight.std().item() - 0.02 / 2**0.5) < 2e-3
    assert abs(blk3.attn.out_proj.vision.weight.std().item() - 0.02 / 8**0.5) < 1e-3
    assert abs(blk3.ffn.text.fc2.weight.std().item() - 0.02 / 8**0.5) < 1e-3
    assert abs(blk3.ffn.text.fc1.weight.std().item() - 0.02) < 2e-3
    assert torch.count_nonzero(blk3.ffn.text.fc1.bias) == 0 and torch.all(blk3.norm1.vision.weight == 1)
    moe_model = create_model("tiny_mhmoe", depth=2)
    head = moe_model.blocks[1].moe.head[0].weight  # MH-MoE keeps its own Xavier init ([MH1], official code)
    bound = (6 / (128 + 128)) ** 0.5 / 2**0.5
    assert head.abs().max() <= bound + 1e-6 and head.abs().max() > 0.8 * bound


def test_conv_stem_shapes_receptive_field_and_errors():
    """The conv stem (Xiao et al. 2021) gives one token per 8-px patch that sees a 15-px window, not the image."""
    torch.manual_seed(0)
    model = create_model("tiny", patch_embed="conv", **SMALL).eval()
    stem = model.vision_embed.patch_embed
    assert sum(isinstance(m, torch.nn.Conv2d) for m in stem.modules()) == 4  # log2(8) 3x3 convs + the 1x1
    image = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        base = stem(image)
        assert base.shape == (2, 64, 128)
        near, far = image.clone(), image.clone()
        near[:, :, 0:8, 33:40] = 5.0  # patch (0, 4); token (0, 5) sees columns 33-47 (its patch and 7 px left)
        far[:, :, 0:8, 56:64] = 5.0  # patch (0, 7): only token (0, 7) sees it
        d_near = (stem(near) - base).abs().amax(dim=(0, 2))
        d_far = (stem(far) - base).abs().amax(dim=(0, 2))
    assert d_near[4] > 1e-3 and d_near[5] > 1e-3 and d_near[6] == 0
    assert d_far[5] == 0 and d_far[6] == 0 and d_far[7] > 1e-3
    out = model(image=torch.randn(1, 3, 48, 96), text=torch.randint(0, 100, (1, 4)))
    assert out.grid_size == (6, 12) and out.features.shape == (1, 73 + 4, 128)
    with pytest.raises(ValueError, match="patch_size"):
        get_config("tiny", patch_embed="conv", img_size=48, patch_size=12)
    with pytest.raises(ValueError, match="patch_embed"):
        get_config("tiny", patch_embed="resnet")


def test_conv_stem_extra_blocks_widen_the_view_not_the_grid():
    """`stem_blocks` adds 3x3 stride-1 blocks at the patch resolution: same 8x8 token grid, a token sees its
    neighbour patches (one block: one patch further each side)."""
    torch.manual_seed(0)
    model = create_model("tiny", patch_embed="conv", stem_blocks=1, **SMALL).eval()
    stem = model.vision_embed.patch_embed
    assert sum(isinstance(m, torch.nn.Conv2d) for m in stem.modules()) == 5
    image = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        base = stem(image)
        assert base.shape == (2, 64, 128)
        far = image.clone()
        far[:, :, 0:8, 56:64] = 5.0  # patch (0, 7): without the extra block only token (0, 7) sees it
        d_far = (stem(far) - base).abs().amax(dim=(0, 2))
    assert d_far[6] > 1e-3 and d_far[7] > 1e-3 and d_far[4] == 0
    with pytest.raises(ValueError, match="stem_blocks"):
        get_config("tiny", patch_embed="linear", stem_blocks=1)
    with pytest.raises(ValueError, match="stem_blocks"):
        get_config("tiny", patch_embed="conv", stem_blocks=-1)


def test_conv_stem_shortcut_adds_a_linear_patchify():
    """`stem_shortcut`: the tokens are the conv path plus a p x p stride-p linear patchify of the same image, so a
    token's mean colour reaches the blocks linearly; only with the conv stem."""
    torch.manual_seed(0)
    model = create_model("tiny", patch_embed="conv", stem_shortcut=True, **SMALL).eval()
    stem = model.vision_embed.patch_embed
    assert stem.shortcut is not None
    image = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        conv_only = stem.net(image).flatten(2).transpose(1, 2)
        patches = image.unfold(2, 8, 8).unfold(3, 8, 8).permute(0, 2, 3, 1, 4, 5).reshape(2, 64, 3 * 64)
        linear = patches @ stem.shortcut.weight.reshape(128, -1).T + stem.shortcut.bias
        assert torch.allclose(stem(image), conv_only + linear, atol=1e-5)
    assert create_model("tiny", patch_embed="conv", **SMALL).vision_embed.patch_embed.shortcut is None
    with pytest.raises(ValueError, match="stem_shortcut"):
        get_config("tiny", patch_embed="linear", stem_shortcut=True)


def test_qk_norm_normalises_each_heads_queries_and_keys():
    """`qk_norm`: the output equals out(LN_inner(softmax(LN(q) LN(k)^T / sqrt(Dh)) v)) computed by hand."""
    from mmoe.model.attention import MultiwayAttention

    torch.manual_seed(0)
    attn = MultiwayAttention(32, 4, multiway=True, qk_norm=True, impl="manual").double()
    with torch.no_grad():  # non-trivial affine parameters, so a forgotten norm or a swapped one shows
        for norm in (attn.q_norm, attn.k_norm):
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.2, 0.2)
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    out = attn(x, num_vision=5)

    def heads(t):
        return t.view(2, 9, 4, 8).transpose(1, 2)

    q = torch.cat([attn.q_proj.vision(x[:, :5]), attn.q_proj.text(x[:, 5:])], 1)
    k = torch.cat([attn.k_proj.vision(x[:, :5]), attn.k_proj.text(x[:, 5:])], 1)
    v = torch.cat([attn.v_proj.vision(x[:, :5]), attn.v_proj.text(x[:, 5:])], 1)
    qn = torch.nn.functional.layer_norm(heads(q), (8,), attn.q_norm.weight, attn.q_norm.bias)
    kn = torch.nn.functional.layer_norm(heads(k), (8,), attn.k_norm.weight, attn.k_norm.bias)
    o = (torch.softmax(qn @ kn.transpose(-1, -2) / 8**0.5, -1) @ heads(v)).transpose(1, 2).reshape(2, 9, 32)
    o = torch.cat([attn.inner_norm.vision(o[:, :5]), attn.inner_norm.text(o[:, 5:])], 1)
    ref = torch.cat([attn.out_proj.vision(o[:, :5]), attn.out_proj.text(o[:, 5:])], 1)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)


def test_qk_norm_switch_in_the_backbone():
    """Off by default (BEiT-3 has no such norm, so converted checkpoints keep their keys); on, every layer has it,
    sdpa equals the reference attention and every new parameter gets a gradient."""
    plain = create_model("tiny", **SMALL)
    assert not plain.config.qk_norm and not any("q_norm" in name for name, _ in plain.named_parameters())
    assert create_model("tiny_mhmoe", **SMALL).config.qk_norm  # the tiny comparison models have it on
    torch.manual_seed(0)
    fast = create_model("tiny_mhmoe", qk_norm=True, **SMALL).double()
    names = [name for name, _ in fast.named_parameters() if "q_norm" in name or "k_norm" in name]
    assert len(names) == 2 * 2 * SMALL["depth"]  # weight + bias of two norms per layer
    slow = create_model("tiny_mhmoe", qk_norm=True, attn_impl="manual", **SMALL).double()
    slow.load_state_dict(fast.state_dict())
    image, text, pad = _inputs()
    fast.eval(), slow.eval()
    args = dict(image=image.double(), text=text, text_padding_mask=pad)
    # float64; the MoE layers' sums in another order leave ~1e-8, a missing or misplaced norm would be O(1)
    torch.testing.assert_close(fast(**args).features, slow(**args).features, atol=1e-6, rtol=0)
    fast.train()
    fast(**args).features.square().mean().backward()
    params = dict(fast.named_parameters())
    for name in names:
        assert params[name].grad is not None and params[name].grad.abs().sum() > 0, name


def test_sincos_position_init():
    """`pos_embed_init: sincos` starts the patch positions at the 2-D table (row-major, columns in the first half),
    scaled; the CLS row keeps the normal init; the default stays BEiT-3's normal init; bad values are refused."""
    from mmoe.model.config import MultiwayConfig
    from mmoe.model.embed import sincos_2d

    table = sincos_2d((3, 4), 8)
    assert table.shape == (12, 8)
    # token 5 = row 1, column 1; token 4 = row 1, column 0: same row half, different column half
    torch.testing.assert_close(table[5, 4:], table[4, 4:])
    assert not torch.allclose(table[5, :4], table[4, :4])
    # token 1 = row 0, column 1; dim 8 -> two frequencies 1 and 1/100: sin(1), sin(0.01), cos(1), cos(0.01), then row 0
    expected = torch.tensor([1.0, 0.01])
    torch.testing.assert_close(table[1], torch.cat([expected.sin(), expected.cos(), torch.zeros(2), torch.ones(2)]))
    torch.manual_seed(0)
    model = create_model("tiny_mhmoe", pos_embed_init="sincos", pos_embed_scale=2.0, **SMALL)
    pos = model.vision_embed.pos_embed.detach()[0]
    torch.testing.assert_close(pos[1:], 2.0 * sincos_2d(model.vision_embed.grid_size, model.config.dim))
    assert 0 < pos[0].std() < 0.1
    plain = create_model("tiny", **SMALL).vision_embed.pos_embed.detach()
    assert plain.std() < 0.05
    with pytest.raises(ValueError, match="pos_embed_init"):
        MultiwayConfig(pos_embed_init="rope")
    with pytest.raises(ValueError, match="pos_embed_scale"):
        MultiwayConfig(pos_embed_scale=2.0)
