"""mmoe.model.heads: pooling, the unilm beit3 MLP shapes ([B3] sec. 3), BEiT-3 init, gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mmoe.model.heads import ClassificationHead, Pooler, pool_features

D, NV, NT = 16, 5, 4  # width, vision tokens (CLS + 4 patches), text tokens


def _linears(head: nn.Module) -> list[tuple[int, int]]:
    return [(m.in_features, m.out_features) for m in head.modules() if isinstance(m, nn.Linear)]


@pytest.mark.parametrize(
    ("pooling", "num_classes", "linears"),
    [
        ("image_cls", 7, [(D, D), (D, 2 * D), (2 * D, 7)]),  # pooler, then Linear(d,2d)-LN-GELU-Linear(2d,N)
        ("pair", 2, [(4 * D, 2 * D), (2 * D, 2)]),  # LN-Linear(4d,2d)-LN-GELU-Linear(2d,2)
        ("mean_patch", 10, [(D, 10)]),  # LN-Linear(d,N)
    ],
)
def test_head_shapes_and_gradients(pooling: str, num_classes: int, linears: list[tuple[int, int]]) -> None:
    torch.manual_seed(0)
    head = ClassificationHead(D, num_classes, pooling=pooling)
    assert _linears(head) == linears
    rows = 6 if pooling == "pair" else 3
    feats = torch.randn(rows, NV + NT, D, requires_grad=True)
    logits = head(feats, NV)
    assert logits.shape == (3, num_classes)
    assert torch.isfinite(logits).all()
    logits.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())


def test_pooling_reads_the_right_tokens() -> None:
    feats = torch.randn(4, NV + NT, D)
    assert torch.equal(pool_features(feats, NV, "image_cls"), feats[:, 0])
    assert torch.allclose(pool_features(feats, NV, "mean_patch"), feats[:, 1:NV].mean(1))
    pair = pool_features(feats, NV, "pair")  # rows 0,1 = img0 of examples 0,1; rows 2,3 = img1
    assert pair.shape == (2, 4 * D)
    expected0 = torch.cat([feats[0, 0], feats[0, NV], feats[2, 0], feats[2, NV]])
    assert torch.equal(pair[0], expected0)
    # Changing a text token other than the text CLS does not change the pair pooling.
    feats2 = feats.clone()
    feats2[:, NV + 1] += 1
    assert torch.equal(pool_features(feats2, NV, "pair"), pair)


def test_pooling_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="2B rows"):
        pool_features(torch.randn(3, NV + NT, D), NV, "pair")
    with pytest.raises(ValueError, match="no text tokens"):
        pool_features(torch.randn(2, NV, D), NV, "pair")
    with pytest.raises(ValueError, match="pooling"):
        ClassificationHead(D, 3, pooling="max")  # type: ignore[arg-type]


def test_init_like_beit3() -> None:
    torch.manual_seed(0)
    head = ClassificationHead(64, 1000, pooling="mean_patch", init_scale=0.001, norm_eps=1e-6)
    assert head.fc.weight.std().item() == pytest.approx(0.02 * 0.001, rel=0.1)
    assert head.fc.weight.abs().max().item() < 6 * 0.02 * 0.001  # timm-style trunc_normal_ (bounds +-2 absolute)
    assert torch.all(head.fc.bias == 0)
    vqa = ClassificationHead(64, 50, pooling="image_cls")
    assert vqa.mlp[0].weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert torch.all(vqa.mlp[1].weight == 1) and torch.all(vqa.mlp[1].bias == 0)
    pooler = Pooler(8)
    out = pooler(torch.randn(3, 8) * 100)
    assert out.abs().max() <= 1.0  # tanh


def test_hidden_mult_override() -> None:
    head = ClassificationHead(D, 3, pooling="image_cls", hidden_mult=None)
    assert _linears(head) == [(D, D), (D, 3)]
    head = ClassificationHead(D, 3, pooling="mean_patch", hidden_mult=1)
    assert _linears(head) == [(D, D), (D, 3)]


def test_image_text_cls_pooling_concats_both_cls_tokens() -> None:
    """VQA variant pooling: image CLS (token 0) and text CLS (first text token), 2D wide; errors without text."""
    torch.manual_seed(0)
    feats = torch.randn(3, NV + NT, D)
    pooled = pool_features(feats, NV, "image_text_cls")
    assert pooled.shape == (3, 2 * D)
    assert torch.equal(pooled[:, :D], feats[:, 0]) and torch.equal(pooled[:, D:], feats[:, NV])
    head = ClassificationHead(D, 7, pooling="image_text_cls")
    assert head(feats, NV).shape == (3, 7)
    # changing the text CLS changes the logits (the head reads it); other text tokens do not
    feats2 = feats.clone()
    feats2[:, NV + 1 :] += 1.0
    assert torch.equal(head(feats2, NV), head(feats, NV))
    feats2[:, NV] += 1.0
    assert not torch.allclose(head(feats2, NV), head(feats, NV))
    with pytest.raises(ValueError, match="image_text_cls"):
        pool_features(torch.randn(2, NV, D), NV, "image_text_cls")


def test_image_text_max_pooling_adds_the_patch_max() -> None:
    """image_text_max: image CLS, text CLS and the max over the patch tokens (not the CLS, not the text), 3D wide."""
    torch.manual_seed(0)
    feats = torch.randn(3, NV + NT, D)
    pooled = pool_features(feats, NV, "image_text_max")
    assert pooled.shape == (3, 3 * D)
    slow = torch.stack([torch.stack([feats[b, 1:NV, d].max() for d in range(D)]) for b in range(3)])
    assert torch.equal(pooled[:, 2 * D :], slow) and torch.equal(pooled[:, :D], feats[:, 0])
    feats2 = feats.clone()
    feats2[:, 0] += 100.0  # the image CLS is not a patch: the max part does not move
    assert torch.equal(pool_features(feats2, NV, "image_text_max")[:, 2 * D :], slow)
    head = ClassificationHead(D, 7, pooling="image_text_max")
    assert head(feats, NV).shape == (3, 7) and _linears(head)[0] == (3 * D, 2 * D)
    with pytest.raises(ValueError, match="image_text_max"):
        pool_features(torch.randn(2, NV, D), NV, "image_text_max")


def test_image_text_max_mean_pooling_adds_the_patch_mean() -> None:
    """image_text_max_mean: image_text_max, then the mean over the patch tokens (4D wide), which, unlike the max,
    grows with the number of patches that carry a feature."""
    torch.manual_seed(0)
    feats = torch.randn(3, NV + NT, D)
    pooled = pool_features(feats, NV, "image_text_max_mean")
    assert pooled.shape == (3, 4 * D)
    assert torch.equal(pooled[:, : 3 * D], pool_features(feats, NV, "image_text_max"))
    slow = torch.stack([sum(feats[b, p] for p in range(1, NV)) / (NV - 1) for b in range(3)])
    assert torch.allclose(pooled[:, 3 * D :], slow, atol=1e-6)
    one, two = torch.zeros(1, NV + NT, D), torch.zeros(1, NV + NT, D)
    one[0, 1, 0] = two[0, 1, 0] = two[0, 2, 0] = 1.0  # one and two patches carry the same feature
    p1, p2 = pool_features(one, NV, "image_text_max_mean"), pool_features(two, NV, "image_text_max_mean")
    assert p1[0, 2 * D] == p2[0, 2 * D] and p2[0, 3 * D] == 2 * p1[0, 3 * D] > 0
    head = ClassificationHead(D, 7, pooling="image_text_max_mean")
    assert head(feats, NV).shape == (3, 7) and _linears(head)[0] == (4 * D, 2 * D)
    with pytest.raises(ValueError, match="image_text_max_mean"):
        pool_features(torch.randn(2, NV, D), NV, "image_text_max_mean")
