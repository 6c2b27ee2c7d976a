"""mmoe.train.optim: parameter groups (layer decay, no-decay set, head lr) and the warm-up + cosine schedule."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mmoe.train.optim import (
    OptimConfig,
    build_optimizer,
    configure_optimizers,
    cosine_with_warmup,
    lr_factor,
    numbered_layer_ids,
    param_groups,
)


class _Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc = nn.Linear(d, d)


class _Backbone(nn.Module):
    """Stand-in with the timm backbone contract: embeddings (id 0), blocks (i + 1), final norm (last)."""

    def __init__(self, d: int = 8, depth: int = 3) -> None:
        super().__init__()
        self.text_embed = nn.Embedding(10, d)
        self.pos_embed = nn.Parameter(torch.zeros(1, 4, d))
        self.patch_embed = nn.Linear(d, d)
        self.blocks = nn.ModuleList(_Block(d) for _ in range(depth))
        self.norm = nn.LayerNorm(d)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"}

    def group_matcher(self, coarse: bool = False) -> dict:
        return {
            "stem": r"^text_embed|pos_embed|patch_embed",
            "blocks": [(r"^blocks\.(\d+)", None), (r"^norm", (99999,))],
        }


class _Module(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = _Backbone()
        self.head = nn.Linear(8, 3)
        self.tied = nn.Linear(8, 10, bias=False)
        self.tied.weight = self.backbone.text_embed.weight  # tied: must be optimized once


def _group_of(groups: list[dict], p: torch.Tensor) -> dict:
    hits = [g for g in groups if any(q is p for q in g["params"])]
    assert len(hits) == 1, f"parameter in {len(hits)} groups"
    return hits[0]


def test_layer_decay_and_no_decay_sets() -> None:
    m = _Module()
    groups = param_groups(m, lr=1.0, weight_decay=0.05, layer_decay=0.5, head_lr_mult=10.0)
    # every trainable parameter exactly once
    all_ids = [id(p) for g in groups for p in g["params"]]
    assert len(all_ids) == len(set(all_ids)) == len(list(m.parameters()))
    depth = 3  # lr * decay^(L + 1 - id): embeddings id 0, block i id i+1, final norm L + 1
    assert _group_of(groups, m.backbone.patch_embed.weight)["lr"] == pytest.approx(0.5 ** (depth + 1))
    for i, blk in enumerate(m.backbone.blocks):
        g = _group_of(groups, blk.fc.weight)
        assert g["lr"] == pytest.approx(0.5 ** (depth - i))
        assert g["weight_decay"] == 0.05
        assert _group_of(groups, blk.fc.bias)["weight_decay"] == 0.0
        assert _group_of(groups, blk.norm.weight)["weight_decay"] == 0.0
    # timm's (99999,) tag puts the final norm with the last block
    assert _group_of(groups, m.backbone.norm.weight)["lr"] == pytest.approx(0.5)
    # embeddings: no decay
    assert _group_of(groups, m.backbone.text_embed.weight)["weight_decay"] == 0.0
    assert _group_of(groups, m.backbone.pos_embed)["weight_decay"] == 0.0
    # heads: lr * head_lr_mult, decay on matrices only
    assert _group_of(groups, m.head.weight)["lr"] == pytest.approx(10.0)
    assert _group_of(groups, m.head.weight)["weight_decay"] == 0.05
    assert _group_of(groups, m.head.bias)["weight_decay"] == 0.0


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="layer_decay"):
        param_groups(_Module(), lr=1e-3, weight_decay=0.05, layer_decay=1.5)
    with pytest.raises(ValueError, match="betas"):
        build_optimizer(_Module(), lr=1e-3, betas=(0.9, 1.2))
    with pytest.raises(ValueError, match="warmup_steps"):
        OptimConfig(warmup_steps=-1)


def test_schedule_warmup_then_cosine() -> None:
    assert lr_factor(0, warmup_steps=4, total_steps=20) == pytest.approx(0.25)
    assert lr_factor(3, warmup_steps=4, total_steps=20) == pytest.approx(1.0)
    assert lr_factor(12, warmup_steps=4, total_steps=20) == pytest.approx(0.5)  # cosine midpoint
    assert lr_factor(20, warmup_steps=4, total_steps=20, min_lr_ratio=0.1) == pytest.approx(0.1)
    assert lr_factor(500, warmup_steps=4, total_steps=20, min_lr_ratio=0.1) == pytest.approx(0.1)
    m = _Module()
    opt = build_optimizer(m, lr=2.0, layer_decay=0.5)
    sched = cosine_with_warmup(opt, warmup_steps=2, total_steps=10)
    top = next(g for g in opt.param_groups if g["lr_scale"] == 1.0)
    seen = []
    for _ in range(10):
        seen.append(top["lr"])
        opt.step()
        sched.step()
    expected = [2.0 * lr_factor(s, warmup_steps=2, total_steps=10) for s in range(10)]
    assert seen == pytest.approx(expected)
    assert math.isclose(seen[1], 2.0)


def test_configure_optimizers_dict() -> None:
    out = configure_optimizers(_Module(), {"lr": 1e-3, "total_steps": 5, "warmup_steps": 1})
    assert isinstance(out["optimizer"], torch.optim.AdamW)
    assert out["lr_scheduler"]["interval"] == "step"
    with pytest.raises(ValueError, match="total_steps"):
        configure_optimizers(_Module(), OptimConfig())  # no trainer, no total_steps


def test_fused_adamw_is_the_same_update() -> None:
    """``optim.fused`` switches to torch's one-kernel AdamW: same groups, the same parameters after a few steps."""
    torch.manual_seed(0)
    plain_mod, fused_mod = _Module(), _Module()
    fused_mod.load_state_dict(plain_mod.state_dict())
    plain = build_optimizer(plain_mod, lr=1e-2, weight_decay=0.05, layer_decay=0.8, head_lr_mult=3.0)
    fused = build_optimizer(fused_mod, lr=1e-2, weight_decay=0.05, layer_decay=0.8, head_lr_mult=3.0, fused=True)
    assert fused.defaults["fused"] and not plain.defaults.get("fused")
    x = torch.randn(6, 8)
    for _ in range(3):
        for mod, opt in ((plain_mod, plain), (fused_mod, fused)):
            opt.zero_grad()
            mod.head(mod.backbone.patch_embed(x)).square().mean().backward()
            opt.step()
    for (name, a), (_, b) in zip(plain_mod.named_parameters(), fused_mod.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert configure_optimizers(_Module(), {"lr": 1e-3, "total_steps": 5, "fused": True})["optimizer"].defaults["fused"]


class _NoMatcher(nn.Module):
    """A backbone without ``group_matcher``: embedding, three numbered blocks, a final norm."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.blocks = nn.Sequential(*(nn.Linear(8, 8) for _ in range(3)))
        self.norm = nn.LayerNorm(8)


def test_backbone_without_group_matcher_is_grouped_by_block_number() -> None:
    ids = numbered_layer_ids(_NoMatcher())
    assert ids == {
        "embed.weight": 0,
        "embed.bias": 0,
        **{f"blocks.{i}.{k}": i + 1 for i in range(3) for k in ("weight", "bias")},
        "norm.weight": 3,  # the final norm joins the last block, as in the backbone's own matcher
        "norm.bias": 3,
    }
    model = nn.Module()
    model.backbone = _NoMatcher()
    model.head = nn.Linear(8, 2)
    groups = param_groups(model, lr=1.0, weight_decay=0.05, layer_decay=0.5)
    assert _group_of(groups, model.backbone.embed.weight)["lr"] == 0.5**4
    assert _group_of(groups, model.backbone.blocks[2].weight)["lr"] == 0.5
    assert _group_of(groups, model.head.weight)["lr"] == 1.0
    # no numbered modules: one backbone group below the heads
    assert set(numbered_layer_ids(nn.Linear(3, 3)).values()) == {0}


def test_stem_lr_mult_scales_only_the_conv_stem() -> None:
    from mmoe.model.registry import create_model

    class Task(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = create_model("tiny_mhmoe", depth=2)
            self.head = torch.nn.Linear(128, 3)

    m = Task()
    base = param_groups(m, lr=1.0, weight_decay=0.05, layer_decay=0.5)
    groups = param_groups(m, lr=1.0, weight_decay=0.05, layer_decay=0.5, stem_lr_mult=4.0)
    stem = dict(m.backbone.vision_embed.patch_embed.named_parameters())
    assert stem
    for name, p in m.named_parameters():
        want = _group_of(base, p)["lr"] * (
            4.0 if name.removeprefix("backbone.vision_embed.patch_embed.") in stem else 1.0
        )
        assert _group_of(groups, p)["lr"] == pytest.approx(want), name
    assert {g["name"] for g in groups} >= {"backbone.stem_decay", "backbone.stem_no_decay"}
    with pytest.raises(ValueError, match="stem_lr_mult"):
        param_groups(m, lr=1.0, weight_decay=0.0, stem_lr_mult=0.0)


@pytest.mark.parametrize("precision", ["bf16-mixed", "32-true"])
def test_fused_adamw_clips_under_bf16_autocast(tmp_path, precision: str) -> None:
    """Lightning's mixed-precision plugin refuses to clip a fused optimizer's gradients (an fp16-scaler guard);
    bf16 has no scaler, so a base recipe (bf16-mixed, fused AdamW, clipping) must train and clip."""
    import lightning

    from mmoe.train.pretraining import MaskedPretraining
    from tests.test_train_pretrain import _batch

    clip = 1e-3  # far below the gradient norm of a fresh model: clipping must act
    norms: list[float] = []

    class Probe(lightning.Callback):
        def on_train_start(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule) -> None:
            opt = trainer.optimizers[0]
            assert opt.defaults["fused"] is True

            def after_step(optimizer: torch.optim.Optimizer, *_: object) -> None:
                grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
                norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))

            opt.register_step_post_hook(after_step)

    torch.manual_seed(0)
    m = MaskedPretraining(backbone="tiny_mhmoe", optim={"lr": 1e-3, "total_steps": 2, "fused": True})
    loader = torch.utils.data.DataLoader([_batch(0), _batch(1)], batch_size=None)
    trainer = lightning.Trainer(
        accelerator="cpu", precision=precision, gradient_clip_val=clip, max_steps=2, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[Probe()],
        default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(m, train_dataloaders=loader)
    assert len(norms) == 2 and all(n <= clip * 1.01 for n in norms), norms
