"""BEiT-3 / timm import and sparse upcycling ([Upcycle]; docs/references.md, reference code).

Parity against torchscale's BEiT3 (installed as a test-only reference) at a tiny size with random weights.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import random_timm_vit

from mmoe.model import MultiwayTransformer, create_model, load_backbone_weights, load_model, save_model
from mmoe.model.convert import beit3_config_from_state_dict, convert_beit3_state_dict, convert_timm_vit_state_dict
from mmoe.model.upcycling import upcycle

with warnings.catch_warnings():  # torchscale imports timm.models.layers (deprecated alias)
    warnings.simplefilter("ignore", FutureWarning)
    torchscale = pytest.importorskip("torchscale")
    from torchscale.architecture.config import EncoderConfig
    from torchscale.model.BEiT3 import BEiT3


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _beit3_args(**kw) -> EncoderConfig:
    # the settings of unilm beit3 `_get_base_config`, at the requested size
    base = dict(multiway=True, layernorm_embedding=False, normalize_output=True, no_output_layer=True, vocab_size=64010)
    base.update(kw)
    return EncoderConfig(**base)


@pytest.fixture(scope="module")
def reference() -> BEiT3:
    torch.manual_seed(0)
    sizes = dict(encoder_embed_dim=64, encoder_attention_heads=4, encoder_ffn_embed_dim=128, encoder_layers=2)
    args = _beit3_args(img_size=32, patch_size=8, vocab_size=100, max_source_positions=20, **sizes)
    ref = BEiT3(args).eval()
    with torch.no_grad():  # random weights everywhere, LayerNorms and position rows included
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return ref


def _converted(ref: BEiT3) -> MultiwayTransformer:
    state = ref.state_dict()
    cfg = beit3_config_from_state_dict(state, num_heads=4, tokenizer_path="beit3.spm", mask_id=99)
    converted, unused = convert_beit3_state_dict(state)
    assert unused == []
    model = MultiwayTransformer(cfg).eval()
    load_backbone_weights(model, converted, strict=True)
    return model


def _inputs():
    g = torch.Generator().manual_seed(3)
    image = torch.randn(2, 3, 32, 32, generator=g)
    text = torch.randint(0, 100, (2, 7), generator=g)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[1, 4:] = True
    return image, text, pad


def test_beit3_parity_image_text_pairs(reference):
    model = _converted(reference)
    cfg = model.config
    assert (cfg.dim, cfg.depth, cfg.ffn_dim, cfg.img_size, cfg.patch_size, cfg.vocab_size, cfg.max_text_len) == (
        64,
        2,
        128,
        32,
        8,
        100,
        18,
    )
    image, text, pad = _inputs()
    n = 17 + 7
    allow = torch.ones(n, n, dtype=torch.bool)
    allow[:17, 17:] = False
    allow[17:, 17:] = torch.ones(7, 7, dtype=torch.bool).tril()
    image_mask = torch.rand(2, 16, generator=torch.Generator().manual_seed(4)) < 0.4
    cases = [
        (dict(visual_tokens=image), dict(image=image)),
        (dict(textual_tokens=text, text_padding_position=pad), dict(text=text, text_padding_mask=pad)),
        (
            dict(visual_tokens=image, textual_tokens=text, text_padding_position=pad),
            dict(image=image, text=text, text_padding_mask=pad),
        ),
        # torchscale's attn_mask is additive "blocked" (non-zero = masked); ours is True = may attend
        (
            dict(visual_tokens=image, textual_tokens=text, text_padding_position=pad, attn_mask=(~allow).float()),
            dict(image=image, text=text, text_padding_mask=pad, attn_mask=allow),
        ),
        (dict(visual_tokens=image, vision_masked_position=image_mask), dict(image=image, image_mask=image_mask)),
    ]
    with torch.no_grad():
        for ref_kwargs, our_kwargs in cases:
            expected = reference(**ref_kwargs)["encoder_out"]
            got = model(**our_kwargs).features
            assert got.shape == expected.shape
            assert (got - expected).abs().max() <= 1e-5, list(our_kwargs)


@pytest.mark.parametrize(
    ("name", "dim", "depth", "ffn", "heads"), [("base", 768, 12, 3072, 12), ("large", 1024, 24, 4096, 16)]
)
def test_beit3_name_mapping_base_large_on_meta(name, dim, depth, ffn, heads):
    """Right key set and shapes of a released-size checkpoint, built on the meta device (no download)."""
    args = _beit3_args(
        img_size=224,
        patch_size=16,
        encoder_embed_dim=dim,
        encoder_attention_heads=heads,
        encoder_ffn_embed_dim=ffn,
        encoder_layers=depth,
        max_source_positions=1024,
    )
    with torch.device("meta"):
        ref = BEiT3(args)
    # the unilm fine-tuning wrappers save {"model": {"beit3.<name>": ..., "head.weight": ...}}
    wrapped = {"model": {**{f"beit3.{k}": v for k, v in ref.state_dict().items()}, "head.weight": torch.empty(2, 2)}}
    cfg = beit3_config_from_state_dict(wrapped, model=name, tokenizer_path="beit3.spm", mask_id=64001)
    assert (cfg.dim, cfg.depth, cfg.ffn_dim, cfg.num_heads, cfg.vocab_size, cfg.max_text_len) == (
        dim,
        depth,
        ffn,
        heads,
        64010,
        1022,
    )
    assert cfg.tokenizer == "sentencepiece" and cfg.pad_id == 1 and cfg.mask_id == 64001
    assert beit3_config_from_state_dict(wrapped, tokenizer_path="beit3.spm", mask_id=64001).num_heads == heads
    converted, unused = convert_beit3_state_dict(wrapped)
    assert unused == []  # the head lives outside the "beit3." prefix and is dropped with it
    with torch.device("meta"):
        ours = MultiwayTransformer(cfg)
    own = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in converted.items()}
    assert got == own
    assert own["vision_embed.pos_embed"] == (1, 197, dim) and own["text_embed.token_embed.weight"] == (64010, dim)
    with pytest.raises(ValueError, match="dim=768 but model 'large'" if name == "base" else "dim=1024 but model"):
        beit3_config_from_state_dict(
            wrapped, model="large" if name == "base" else "base", tokenizer_path="x", mask_id=1
        )
    with pytest.raises(ValueError, match="sentencepiece"):
        beit3_config_from_state_dict(wrapped)


def _load_tool():
    from mmoe.cli import convert_checkpoint

    return convert_checkpoint


def test_convert_cli_beit3_with_sentencepiece(tmp_path, reference):
    spm = pytest.importorskip("sentencepiece")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(["a red circle next to a blue square", "the green triangle is above a star"] * 20))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "tok"), vocab_size=24, minloglevel=2)
    sp_path = tmp_path / "tok.model"
    ckpt = {"model": {f"beit3.{k}": v for k, v in reference.state_dict().items()}}
    ckpt["model"]["head.weight"] = torch.zeros(3, 64)
    src = tmp_path / "beit3_tiny.pth"
    torch.save(ckpt, src)
    out = tmp_path / "converted.pt"
    tool = _load_tool()
    assert tool.main(["--from", "beit3", str(src), str(out), "--num-heads", "4", "--tokenizer", str(sp_path)]) == 0
    model = load_model(out).eval()
    assert model.tokenizer_spec["name"] == "sentencepiece" and model.tokenizer_spec["path"] == str(sp_path)
    assert model.config.pad_id == 1 and model.config.mask_id == 25  # 24 pieces + fairseq offset
    from mmoe.data.tokenizer import tokenizer_from_spec  # the data side accepts the recorded spec

    tok = tokenizer_from_spec(model.tokenizer_spec)
    assert (tok.pad_id, tok.mask_id, tok.vocab_size) == (1, 25, 100)
    image, text, pad = _inputs()
    with torch.no_grad():
        expected = reference(visual_tokens=image, textual_tokens=text, text_padding_position=pad)["encoder_out"]
        got = model(image=image, text=text, text_padding_mask=pad).features
    assert (got - expected).abs().max() <= 1e-5
    with pytest.raises(SystemExit, match="does not exist"):
        tool.main(["--from", "beit3", str(tmp_path / "nope.pth"), str(out)])


def test_timm_vit_import_matches_timm(tmp_path):
    vit = random_timm_vit()
    model = create_model("tiny", depth=2, subln=False, layernorm_eps=1e-6).eval()
    converted = convert_timm_vit_state_dict(vit.state_dict(), model.config)
    missing, unexpected = load_backbone_weights(model, converted, strict=False)
    assert unexpected == []
    assert missing and all(k.startswith(("text_embed.", "vision_embed.mask_token")) or ".text." in k for k in missing)
    image = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(image), vit.forward_features(image), atol=1e-5, rtol=0)
    # the same through the CLI, with the target config as a YAML file and the weights under "model"
    yaml_path = tmp_path / "vit_target.yaml"
    model.config.to_yaml(yaml_path)
    torch.save({"model": vit.state_dict()}, tmp_path / "vit.pth")
    out = tmp_path / "vit_mmoe.pt"
    assert _load_tool().main(["--from", "timm", str(tmp_path / "vit.pth"), str(out), "--model", str(yaml_path)]) == 0
    again = load_model(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(again.forward_features(image), vit.forward_features(image), atol=1e-5, rtol=0)


def _perturbed_dense(**overrides) -> MultiwayTransformer:
    torch.manual_seed(0)
    dense = create_model("tiny", depth=2, **overrides).eval()
    with torch.no_grad():
        for p in dense.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return dense


def test_upcycled_replicas_match_dense_exactly():
    """h=1, every expert a copy, renormalized top-k gates: the MoE layer is the dense FFN (per token)."""
    dense = _perturbed_dense()
    g = torch.Generator().manual_seed(5)
    image = torch.randn(2, 3, 64, 64, generator=g)
    text = torch.randint(0, 49408, (2, 6), generator=g)
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[1, 4:] = True
    real = ~torch.cat([torch.zeros(2, 65, dtype=torch.bool), pad], 1)
    # h = 1 with full-width experts, renormalized gates and a pool per modality: upcycle's exact settings
    moe = dict(num_experts=4, expert_hidden=512, top_k=2, num_heads=1, head_layers=1, merge_layers=1)
    moe |= dict(renormalize_gates=True, pool="per_modality")
    per_modality = upcycle(dense, moe).eval()
    # exact=False keeps the shared pool: all copies of the V-FFN, so image-only inputs still match
    shared = upcycle(dense, {**moe, "pool": "shared"}, source="vision", exact=False).eval()
    with torch.no_grad():
        ref = dense(image=image, text=text, text_padding_mask=pad).features
        got = per_modality(image=image, text=text, text_padding_mask=pad).features
        torch.testing.assert_close(got[real], ref[real], atol=1e-5, rtol=0)
        torch.testing.assert_close(shared(image=image).features, dense(image=image).features, atol=1e-5, rtol=0)
    assert per_modality.config.moe.expert_inner_norm  # the dense FFN's sub-LN travels into the experts
    # not renormalized (raw top-2 probabilities sum below 1): the function differs, so the test can fail
    raw = upcycle(dense, {**moe, "renormalize_gates": False}, exact=False).eval()
    with torch.no_grad():
        assert (raw(image=image).features - dense(image=image).features).abs().max() > 1e-3


def test_upcycle_split_and_cli(tmp_path):
    dense = _perturbed_dense()
    path = tmp_path / "dense.pt"
    save_model(dense, path)
    tool = _load_tool()
    out = tmp_path / "mh.pt"
    assert tool.main(["--upcycle", "tiny_mhmoe", str(path), str(out), "--mode", "split"]) == 0
    model = load_model(out)
    assert model.config.moe.num_heads == 4 and model.config.depth == 2
    layer = model.blocks[1].moe
    c = 128 // 4
    ffn = dense.blocks[1].ffn
    # expert 5 -> sub-token block j = 1, hidden units starting at (5 // 4) * 192 = 192 of the alternate (text) FFN
    torch.testing.assert_close(layer.experts.w1[5], ffn.text.fc1.weight[192:384, c : 2 * c].T)
    torch.testing.assert_close(layer.head[0].weight, torch.eye(128))
    # non-MoE weights are copied
    torch.testing.assert_close(model.blocks[0].ffn.vision.fc1.weight, dense.blocks[0].ffn.vision.fc1.weight)
    out_f = model(image=torch.randn(1, 3, 64, 64), text=torch.randint(0, 100, (1, 4)))
    assert torch.isfinite(out_f.features).all() and "layer1" in out_f.routing
    with pytest.raises(ValueError, match="mode='split'"):
        upcycle(dense, dict(num_experts=4, expert_hidden=192, top_k=2, num_heads=4))
    with pytest.raises(ValueError, match="already has MoE"):
        upcycle(model, dict(num_experts=4, expert_hidden=512))


def test_patchify_weights_refuse_a_conv_stem_target():
    """BEiT-3 and timm ViTs have a linear patchify: a conv-stem config must not silently lose the patch weights."""
    from mmoe.model.registry import get_config

    conv = get_config("tiny_mhmoe")
    assert conv.patch_embed == "conv"
    with pytest.raises(ValueError, match="patch_embed"):
        convert_timm_vit_state_dict({"patch_embed.proj.weight": torch.zeros(128, 3, 8, 8)}, conv)
