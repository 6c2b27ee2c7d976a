"""Config dataclasses, YAML round trip and the registry of named sizes (docs/interfaces.md section 2)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mmoe.model import MoEConfig, MultiwayConfig, create_model, get_config, list_models
from mmoe.model.registry import CONFIG_DIR

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


EXPECTED = {
    "tiny",
    "tiny_dense",
    "tiny_smoe",
    "tiny_xmoe",
    "tiny_mhmoe",
    "base",
    "large",
    "base_dense",
    "base_smoe",
    "base_xmoe",
    "base_mhmoe",
    "base_smoe_32e",
    "base_mhmoe_32e",
}


def test_registry_lists_every_shipped_yaml():
    names = list_models()
    assert EXPECTED <= set(names)
    assert names == sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_registered_size_builds(name):
    cfg = get_config(name)
    tiny = name.startswith("tiny")
    model = create_model(name, device=None if tiny else "meta")
    assert model.config == cfg
    n_blocks_moe = sum(blk.is_moe for blk in model.blocks)
    if cfg.moe is None:
        assert n_blocks_moe == 0
    else:
        assert n_blocks_moe == cfg.depth // cfg.moe.every
    if tiny:
        out = model(image=torch.randn(1, 3, cfg.img_size, cfg.img_size), text=torch.randint(0, 100, (1, 5)))
        assert out.features.shape == (1, 1 + cfg.num_patches + 5, cfg.dim)
        assert torch.isfinite(out.features).all()


def test_sizes_match_spec():
    base, large, tiny = get_config("base"), get_config("large"), get_config("tiny")
    assert (base.depth, base.dim, base.ffn_dim, base.num_heads, base.patch_size) == (12, 768, 3072, 12, 16)
    assert (large.depth, large.dim, large.ffn_dim, large.num_heads, large.patch_size) == (24, 1024, 4096, 16, 16)
    assert (tiny.img_size, tiny.patch_size, tiny.dim, tiny.depth, tiny.num_heads, tiny.ffn_dim) == (
        64,
        8,
        128,
        4,
        4,
        512,
    )
    assert (tiny.max_text_len, tiny.vocab_size, tiny.pad_id, tiny.mask_id) == (32, 49410, 49408, 49409)
    assert tiny.image_mean == (0.5, 0.5, 0.5) and tiny.image_std == (0.5, 0.5, 0.5)
    assert get_config("base_mhmoe_32e").moe.num_experts == 32 and get_config("base_mhmoe_32e").moe.num_heads == 4
    assert get_config("base_smoe_32e").moe.num_experts == 32
    for name in ("base_smoe", "base_xmoe", "base_mhmoe"):
        assert get_config(name).moe.num_experts == 8


def _active_ffn_macs(cfg: MultiwayConfig) -> int:
    """Multiply-adds per token of one FFN / MoE layer from mmoe.moe.parity ([MH2] sec. 2); dense = E=1, k=1."""
    from mmoe.moe.parity import moe_cost

    if cfg.moe is None:
        return moe_cost(cfg.dim, 1, 1, cfg.ffn_dim, activation="gelu").flops_per_token
    m = cfg.moe
    shape = dict(num_heads=m.num_heads, activation=m.activation, head_layers=m.head_layers, merge_layers=m.merge_layers)
    return moe_cost(cfg.dim, m.num_experts, m.top_k, m.expert_hidden, **shape).flops_per_token


@pytest.mark.parametrize("prefix", ["tiny", "base"])
def test_shipped_variants_have_equal_active_flops(prefix):
    from mmoe.moe.parity import match_mhmoe

    dense_cfg = get_config(f"{prefix}_dense")
    dense = _active_ffn_macs(dense_cfg)
    assert dense == 2 * dense_cfg.dim * dense_cfg.ffn_dim
    for variant in ("smoe", "xmoe", "mhmoe"):
        assert _active_ffn_macs(get_config(f"{prefix}_{variant}")) == dense, variant
    assert _active_ffn_macs(get_config("base_mhmoe_32e")) == _active_ffn_macs(get_config("base_smoe_32e"))
    mh = get_config(f"{prefix}_mhmoe").moe
    match = match_mhmoe(dense_cfg.dim, dense_cfg.ffn_dim, 8, mh.num_heads, top_k=mh.top_k, activation="gelu")
    assert match.mhmoe.expert_hidden == mh.expert_hidden and match.flops_ratio == 1.0


def test_yaml_round_trip(tmp_path):
    cfg = get_config("tiny_mhmoe", drop_path=0.1, moe={"num_experts": 6})
    assert cfg.moe.num_experts == 6 and cfg.moe.num_heads == 4 and cfg.drop_path == 0.1
    path = tmp_path / "m.yaml"
    cfg.to_yaml(path)
    again = MultiwayConfig.from_yaml(path)
    assert again == cfg
    assert MultiwayConfig.from_dict(dataclasses.asdict(cfg)) == cfg
    model = create_model(path)
    assert model.config == cfg


def test_overrides_drop_moe_and_keep_fields():
    cfg = get_config("tiny_smoe", moe=None)
    assert cfg.moe is None
    cfg = get_config("tiny", moe={"num_experts": 4, "expert_hidden": 64})
    assert cfg.moe == MoEConfig(num_experts=4, expert_hidden=64)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"num_heads": 3}, "num_heads"),
        ({"attention": "fused"}, "attention"),
        ({"drop_path": 1.5}, "drop_path"),
        ({"img_size": 65}, "img_size"),
        ({"pad_id": 50000}, "pad_id"),
        ({"tokenizer": "sentencepiece"}, "tokenizer_path"),
        ({"moe": {"num_experts": 2, "expert_hidden": 8, "top_k": 3}}, "top_k"),
        ({"moe": {"num_experts": 2, "expert_hidden": 8, "router": "hash"}}, "router"),
        ({"moe": {"num_experts": 2, "expert_hidden": 8, "num_heads": 3}}, "num_heads"),
        ({"vlffn_layers": 1, "moe": {"num_experts": 2, "expert_hidden": 8}}, "vlffn_layers"),
        ({"colour": "red"}, "unknown MultiwayConfig keys"),
    ],
)
def test_config_checks_name_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        get_config("tiny", **overrides)


def test_keyword_only_and_unknown_name():
    with pytest.raises(TypeError):
        MultiwayConfig(64)  # type: ignore[misc]
    with pytest.raises(KeyError, match="unknown model 'nope'"):
        create_model("nope")
    with pytest.raises(FileNotFoundError):
        create_model("/does/not/exist.yaml")


@pytest.mark.parametrize("prefix", ["tiny", "base"])
def test_parity_variant_matches_smoe_in_flops_and_parameters(prefix):
    """``{prefix}_mhmoe_parity``: [MH2] sec. 2 matching, equal active FLOPs and parameters within 3% of the SMoE."""
    with torch.device("meta"):
        counts = {
            v: sum(p.numel() for p in create_model(f"{prefix}_{v}").parameters())
            for v in ("smoe", "xmoe", "mhmoe", "mhmoe_parity")
        }
    assert _active_ffn_macs(get_config(f"{prefix}_mhmoe_parity")) == _active_ffn_macs(get_config(f"{prefix}_dense"))
    assert abs(counts["mhmoe_parity"] / counts["smoe"] - 1) < 0.03
    assert abs(counts["xmoe"] / counts["smoe"] - 1) < 0.03
    assert counts["mhmoe"] / counts["smoe"] < 0.97  # the FLOPs-only twin is not parameter-matched
