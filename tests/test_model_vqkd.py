"""mmoe.model.vqkd: the BEiT v2 VQ-KD tokenizer, its released key layout, codes, and refusals of wrong files."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import TINY_VQKD, random_vqkd_state, vqkd_release_layout, write_vqkd_file

from mmoe.model.vqkd import VQKDConfig, VQKDTokenizer, load_vqkd, load_vqkd_state_dict

pytestmark = pytest.mark.usefixtures("one_thread")

ENCODER_SIDE = ("encoder.", "encode_task_layer.", "quantize.")


def _tiny_file(tmp_path: Path, seed: int = 0) -> Path:
    return write_vqkd_file(tmp_path / f"vqkd_{seed}.pth", seed=seed)


def _state(tmp_path: Path) -> dict[str, torch.Tensor]:
    return torch.load(_tiny_file(tmp_path), weights_only=True)["model"]


def _images(n: int = 3, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_base_tokenizer_has_the_released_encoder_and_quantizer_keys() -> None:
    """The default config is vqkd_encoder_base_decoder_3x768x12_clip: same names and shapes as its encoder side."""
    release = vqkd_release_layout()
    with torch.device("meta"):
        tok = VQKDTokenizer()
    ours = {k: tuple(v.shape) for k, v in tok.state_dict().items()}
    assert ours == {k: v for k, v in release.items() if k.startswith(ENCODER_SIDE)}
    assert ours["quantize.embedding.weight"] == (8192, 32) and ours["encoder.pos_embed"] == (1, 197, 768)
    assert tok.grid_size == (14, 14) and tok.num_codes == 8192
    assert not any(p.requires_grad for p in tok.parameters())


def test_base_release_layout_loads_strictly_and_counts_the_decoder() -> None:
    """A state dict of every released key (meta tensors: no memory) loads; decoder-side keys skipped and counted."""
    release = vqkd_release_layout()
    with torch.device("meta"):
        tok = VQKDTokenizer()
        state = {k: torch.empty(shape) for k, shape in release.items()}
    skipped = load_vqkd_state_dict(tok, state)
    assert skipped == {
        "decoder.": sum(k.startswith("decoder.") for k in release),
        "decode_task_layer.": 4,
        "scaling_layer.": 2,
    }
    assert skipped["decoder."] == 4 + 3 * 13 + 2  # cls, pos, patch embed (2) + 3 blocks of 13 + fc_norm (2)


def test_tiny_file_loads_every_tensor_and_codes_are_deterministic(tmp_path: Path) -> None:
    path = _tiny_file(tmp_path)
    tok = load_vqkd(path, TINY_VQKD)
    file_state = torch.load(path, weights_only=True)["model"]
    for key, value in tok.state_dict().items():
        assert torch.equal(value, file_state[key]), key
    assert tok.skipped_keys == {"decoder.": 4 + 13 + 2, "scaling_layer.": 2, "decode_task_layer.": 4}
    x = _images()
    codes = tok.codes(x)
    assert codes.shape == (3, 16) and codes.dtype == torch.int64
    assert 0 <= int(codes.min()) and int(codes.max()) < 64
    assert len(codes.unique()) > 4  # random weights give varied codes, not one constant
    assert torch.equal(codes, tok.codes(x)) and torch.equal(codes, tok(x))
    assert torch.equal(codes, load_vqkd(path, VQKDConfig(**TINY_VQKD)).codes(x))  # a fresh load, same codes
    # other weights, other codes: the codes come from the file
    assert not torch.equal(codes, load_vqkd(_tiny_file(tmp_path, seed=1), TINY_VQKD).codes(x))


def test_state_dict_bare_or_under_model(tmp_path: Path) -> None:
    state = random_vqkd_state(vqkd_release_layout(**TINY_VQKD, decoder_depth=1), seed=0)
    torch.save(state, tmp_path / "bare.pth")
    x = _images()
    assert torch.equal(
        load_vqkd(tmp_path / "bare.pth", TINY_VQKD).codes(x), load_vqkd(_tiny_file(tmp_path), TINY_VQKD).codes(x)
    )


class _Opaque:
    """An object that ``torch.load(weights_only=True)`` does not know."""


def test_training_checkpoint_with_arguments_loads_and_other_objects_are_refused(tmp_path: Path) -> None:
    """BEiT v2's training script saves ``args`` (an argparse.Namespace) beside ``model``: still weights_only."""
    import argparse

    state = _state(tmp_path)
    torch.save({"model": state, "epoch": 99, "args": argparse.Namespace(lr=1e-4, model="vqkd")}, tmp_path / "t.pth")
    x = _images()
    assert torch.equal(
        load_vqkd(tmp_path / "t.pth", TINY_VQKD).codes(x), load_vqkd(_tiny_file(tmp_path), TINY_VQKD).codes(x)
    )
    torch.save({"model": state, "extra": _Opaque()}, tmp_path / "odd.pth")
    with pytest.raises(ValueError, match=r"odd\.pth: cannot be read with torch\.load\(weights_only=True\)"):
        load_vqkd(tmp_path / "odd.pth", TINY_VQKD)


def _reference_features(state: dict[str, torch.Tensor], x: torch.Tensor, cfg: VQKDConfig) -> torch.Tensor:
    """The tokenizer's features written out from the BEiT v2 code's equations, float64, explicit softmax attention."""
    s = {k: v.double() for k, v in state.items()}
    d, heads = cfg.dim, cfg.num_heads
    x = F.conv2d(
        x.double(), s["encoder.patch_embed.proj.weight"], s["encoder.patch_embed.proj.bias"], stride=cfg.patch_size
    )
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([s["encoder.cls_token"].expand(x.shape[0], -1, -1), x], 1) + s["encoder.pos_embed"]
    for i in range(cfg.depth):
        p = f"encoder.blocks.{i}."
        h = F.layer_norm(x, (d,), s[p + "norm1.weight"], s[p + "norm1.bias"], eps=1e-6)
        bias = torch.cat([s[p + "attn.q_bias"], torch.zeros(d, dtype=torch.float64), s[p + "attn.v_bias"]])
        qkv = (h @ s[p + "attn.qkv.weight"].t() + bias).reshape(x.shape[0], x.shape[1], 3, heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attn = ((q * (d // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
        out = (attn @ v).transpose(1, 2).reshape(x.shape[0], x.shape[1], d)
        x = x + out @ s[p + "attn.proj.weight"].t() + s[p + "attn.proj.bias"]
        h = F.layer_norm(x, (d,), s[p + "norm2.weight"], s[p + "norm2.bias"], eps=1e-6)
        h = F.gelu(h @ s[p + "mlp.fc1.weight"].t() + s[p + "mlp.fc1.bias"])
        x = x + h @ s[p + "mlp.fc2.weight"].t() + s[p + "mlp.fc2.bias"]
    x = F.layer_norm(x[:, 1:], (d,), s["encoder.fc_norm.weight"], s["encoder.fc_norm.bias"], eps=1e-6)
    x = torch.tanh(x @ s["encode_task_layer.0.weight"].t() + s["encode_task_layer.0.bias"])
    x = x @ s["encode_task_layer.2.weight"].t() + s["encode_task_layer.2.bias"]
    return x / x.norm(dim=-1, keepdim=True)


def test_features_match_a_slow_reference_and_lookup_is_nearest_code(tmp_path: Path) -> None:
    path = _tiny_file(tmp_path)
    tok = load_vqkd(path, TINY_VQKD)
    state = torch.load(path, weights_only=True)["model"]
    x = _images(seed=3)
    ref = _reference_features(state, x, tok.config)
    torch.testing.assert_close(tok.features(x).double(), ref, atol=1e-5, rtol=1e-5)
    # Nearest-code lookup: make codes 0..15 the features of image 0's 16 patches; each patch then has distance 0 to
    # its own code and the others are clearly farther (distinct random features), so no near-tie decides.
    feats = tok.features(x)
    book = tok.quantize.embedding.weight
    book[:16] = feats[0]
    assert tok.codes(x)[0].tolist() == list(range(16))
    # the lookup over all codes of the other images agrees with a brute-force cosine argmax where the margin is clear
    sims = feats[1:] @ F.normalize(book, dim=-1).t()
    top2 = sims.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 1e-4
    assert clear.float().mean() > 0.9
    assert torch.equal(tok.codes(x)[1:][clear], sims.argmax(-1)[clear])


def test_to_tokenizer_input_resizes_and_renormalizes() -> None:
    """A batch at another size and normalization is mapped back to pixels, resized and put in the tokenizer's."""
    cfg = VQKDConfig(**{**TINY_VQKD, "image_mean": (0.48, 0.46, 0.41), "image_std": (0.27, 0.26, 0.28)})
    tok = VQKDTokenizer(cfg)
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    batch = (pixels - 0.5) / 0.5
    got = tok.to_tokenizer_input(batch, mean=mean, std=std)
    small = F.interpolate(pixels, size=(16, 16), mode="bicubic", antialias=True).clamp(0, 1)
    want = (small - torch.tensor(cfg.image_mean).view(1, 3, 1, 1)) / torch.tensor(cfg.image_std).view(1, 3, 1, 1)
    assert got.shape == (2, 3, 16, 16)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # at the tokenizer's own size nothing is resized: only the normalization changes
    same = tok.to_tokenizer_input(batch[..., :16, :16], mean=mean, std=std)
    torch.testing.assert_close(same, (pixels[..., :16, :16] - tok.mean) / tok.std, atol=1e-5, rtol=1e-5)
    assert tok.codes_from(batch, mean=mean, std=std).shape == (2, 16)
    with pytest.raises(ValueError, match=r"expected images \(B, 3, 16, 16\).*codes_from"):
        tok.codes(batch)


def test_frozen_and_always_in_eval_mode() -> None:
    tok = VQKDTokenizer(VQKDConfig(**TINY_VQKD))
    outer = torch.nn.Sequential(tok, torch.nn.Linear(2, 2))
    outer.train()
    assert outer.training and not tok.training and not any(m.training for m in tok.modules())
    assert not any(p.requires_grad for p in tok.parameters())
    x = _images().requires_grad_(True)
    assert not tok.features(x).requires_grad


def test_wrong_layouts_are_refused_naming_the_first_mismatched_key(tmp_path: Path) -> None:
    # a tensor of another shape
    state = _state(tmp_path)
    state["encoder.blocks.1.mlp.fc1.weight"] = state["encoder.blocks.1.mlp.fc1.weight"].t().contiguous()
    torch.save({"model": state}, tmp_path / "shape.pth")
    with pytest.raises(
        ValueError, match=r"'encoder\.blocks\.1\.mlp\.fc1\.weight' has shape \(32, 64\), expected \(64, 32\)"
    ):
        load_vqkd(tmp_path / "shape.pth", TINY_VQKD)
    # a missing quantizer tensor
    state = _state(tmp_path)
    del state["quantize.embedding.initted"]
    torch.save({"model": state}, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match=r"'quantize\.embedding\.initted' \(expected shape \(1,\)\) is missing"):
        load_vqkd(tmp_path / "missing.pth", TINY_VQKD)
    # a key of another layout (a final norm the released encoder does not have)
    state = _state(tmp_path)
    state["encoder.norm.weight"] = torch.ones(32)
    torch.save({"model": state}, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match=r"unexpected key 'encoder\.norm\.weight' with shape \(32,\)"):
        load_vqkd(tmp_path / "extra.pth", TINY_VQKD)
    # the tiny file read as the released base tokenizer: the first key already differs
    with pytest.raises(ValueError, match=r"'encoder\.cls_token' has shape \(1, 1, 32\), expected \(1, 1, 768\)"):
        load_vqkd(_tiny_file(tmp_path))
    # a backbone checkpoint, not a tokenizer: the first expected key is missing, and the file's first key is named
    torch.save({"model": {"cls_token": torch.zeros(1, 1, 32)}}, tmp_path / "vit.pth")
    with pytest.raises(
        ValueError, match=r"'encoder\.cls_token'.*is missing; its first key is 'cls_token' \(1, 1, 32\)"
    ):
        load_vqkd(tmp_path / "vit.pth", TINY_VQKD)


def test_bad_paths_and_configs_are_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nothing\.pth does not exist"):
        load_vqkd(tmp_path / "nothing.pth")
    with pytest.raises(ValueError, match=r"unknown VQKDConfig keys \['width'\]"):
        load_vqkd(_tiny_file(tmp_path), {"width": 32})
    with pytest.raises(ValueError, match="VQKDConfig.num_heads"):
        VQKDConfig(dim=30, num_heads=4)
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(ValueError, match=r"list\.pth.*expected a state dict"):
        load_vqkd(tmp_path / "list.pth", TINY_VQKD)


def test_untrained_codes_are_spread_over_the_codebook(tmp_path: Path) -> None:
    """Sanity of the random tiny tokenizer the training tests use: codes spread out, so CE starts near log(K)."""
    tok = load_vqkd(_tiny_file(tmp_path), TINY_VQKD)
    codes = tok.codes(_images(n=16, seed=5))
    counts = torch.bincount(codes.flatten(), minlength=64).float()
    p = counts / counts.sum()
    entropy = float(-(p[p > 0] * p[p > 0].log()).sum())
    assert entropy > 0.5 * math.log(64)
