"""MaskedPretraining ([B3] sec. 2.2): per-stream losses, targets, codebook, non-finite handling, checkpoint config."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from mmoe.data.codebook import assign_codes, load_codebook, normalize_patches, patchify, save_codebook
from mmoe.train.pretraining import MaskedPretraining, routing_metrics

B, L = 2, 10


def _batch(seed: int = 0, *, img: int = 64, patches: int = 64, vocab: int = 1000) -> dict:
    g = torch.Generator().manual_seed(seed)

    def text_sub(ratio: float) -> dict:
        ids = torch.randint(0, vocab, (B, L), generator=g)
        pad = torch.zeros(B, L, dtype=torch.bool)
        pad[1, -3:] = True
        sel = (torch.rand(B, L, generator=g) < ratio) & ~pad
        sel[0, 0] = True
        return {"text": ids, "text_padding_mask": pad, "text_labels": torch.where(sel, ids, -100)}

    def image_sub() -> dict:
        mask = torch.rand(B, patches, generator=g) < 0.4
        mask[:, 0] = True
        return {"image": torch.randn(B, 3, img, img, generator=g), "image_mask": mask}

    return {"image": image_sub(), "text": text_sub(0.15), "pair": {**image_sub(), **text_sub(0.5)}}


def test_patchify_order_and_normalization() -> None:
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    p = patchify(x, 2)
    assert p.shape == (2, 4, 12)
    # patch 1 is the top-right 2x2 block; values are (p1 p2 c) ordered
    assert p[0, 1, :3].tolist() == [x[0, 0, 0, 2].item(), x[0, 1, 0, 2].item(), x[0, 2, 0, 2].item()]
    n = normalize_patches(p)
    assert torch.allclose(n.mean(-1), torch.zeros(2, 4), atol=1e-5)
    assert torch.allclose(n.var(-1, unbiased=False), torch.ones(2, 4), atol=1e-3)
    with pytest.raises(ValueError, match="patch_size=3"):
        patchify(x, 3)


def test_streams_losses_and_gradients() -> None:
    torch.manual_seed(0)
    m = MaskedPretraining(backbone="tiny_mhmoe", optim={"lr": 1e-3, "total_steps": 10})
    losses, aux, routing = m.stream_losses(_batch())
    assert set(losses) == {"mim_image", "mlm_text", "mim_pair", "mlm_pair"}
    for name, v in losses.items():
        assert math.isfinite(float(v.detach())), name
    # untrained MLM loss is near log(vocab); normalized-pixel MSE of a random predictor is near 1
    assert abs(float(losses["mlm_text"].detach()) - math.log(m.backbone.config.vocab_size)) < 1.5
    assert 0.5 < float(losses["mim_image"]) < 2.0
    assert float(aux) > 0 and set(routing) == {"layer1", "layer3"} and len(routing["layer1"]) == 3
    total = m._total(losses, aux)
    total.backward()
    assert m.mlm_head.weight.grad is not None and m.mim_head.weight.grad.abs().sum() > 0
    assert m.backbone.vision_embed.mask_token.grad is not None  # masked patches went through the mask token


def test_routing_metrics_keys_and_ranges() -> None:
    m = MaskedPretraining(backbone="tiny_mhmoe", optim={"lr": 1e-3, "total_steps": 10})
    with torch.no_grad():
        _, _, routing = m.stream_losses(_batch())
    stats = routing_metrics(routing)
    for layer in ("layer1", "layer3"):
        assert 0.0 < stats[f"{layer}/activation_ratio"] <= 1.0
        assert 1.0 <= stats[f"{layer}/diversity"] <= m.backbone.config.moe.num_heads
        assert stats[f"{layer}/dropped_share"] == 0.0  # dropless by default
        assert 1 / 8 <= stats[f"{layer}/load_max"] <= 1.0


def test_codebook_targets_give_image_perplexity(tmp_path: Path) -> None:
    torch.manual_seed(0)
    centroids = normalize_patches(torch.randn(16, 8 * 8 * 3))
    path = tmp_path / "cb.pt"
    save_codebook(path, centroids, patch_size=8, source="test")
    assert torch.equal(load_codebook(path, patch_size=8), centroids)
    with pytest.raises(ValueError, match="patch_size"):
        load_codebook(path, patch_size=16)
    # nearest-centroid assignment returns the centroid's own index
    assert assign_codes(centroids, centroids).tolist() == list(range(16))
    m = MaskedPretraining(
        backbone="tiny_dense", image_target="codebook", codebook=str(path), optim={"lr": 1e-3, "total_steps": 5}
    )
    losses, _, _ = m.stream_losses(_batch())
    assert abs(float(losses["mim_image"]) - math.log(16)) < 1.0  # CE of an untrained head over 16 codes
    with pytest.raises(ValueError, match="codebook"):
        MaskedPretraining(backbone="tiny_dense", image_target="codebook")


def test_nonfinite_loss_names_step_and_stream() -> None:
    m = MaskedPretraining(backbone="tiny_dense", optim={"lr": 1e-3, "total_steps": 5})
    batch = _batch()
    batch["image"]["image"][0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"step 0 .*mim_image"):
        m.training_step(batch, 0)
    skip = MaskedPretraining(backbone="tiny_dense", on_nonfinite="skip", optim={"lr": 1e-3, "total_steps": 5})
    assert skip.training_step(batch, 0) is None


def test_checkpoint_carries_backbone_config() -> None:
    m = MaskedPretraining(backbone="tiny_smoe", backbone_overrides={"depth": 2})
    ckpt: dict = {}
    m.on_save_checkpoint(ckpt)
    assert ckpt["mmoe_config"]["depth"] == 2 and ckpt["mmoe_config"]["moe"]["num_experts"] == 8
    with pytest.raises(ValueError, match="on_nonfinite"):
        MaskedPretraining(backbone="tiny_dense", on_nonfinite="ignore")  # type: ignore[arg-type]


def test_init_from_at_another_image_size(tmp_path: Path) -> None:
    """Pretraining starts from a checkpoint of another img_size: the position table is resampled, as in fine-tuning."""
    from mmoe.model import create_model, save_model

    save_model(create_model("tiny_dense", depth=2), tmp_path / "m.pt")
    m = MaskedPretraining(
        backbone="tiny_dense", backbone_overrides={"depth": 2, "img_size": 32}, init_from=str(tmp_path / "m.pt")
    )
    assert m.backbone.config.img_size == 32 and m.backbone.vision_embed.pos_embed.shape[1] == 1 + 16
    losses, _, _ = m.stream_losses(_batch(img=32, patches=16))
    assert all(torch.isfinite(v) for v in losses.values())


def test_mismatched_pair_mlm_measures_image_use() -> None:
    """The grounding diagnostic scores the same masked captions against the next example's image."""
    torch.manual_seed(0)
    m = MaskedPretraining(backbone="tiny_mhmoe", optim={"lr": 1e-3, "total_steps": 10}).eval()
    batch = _batch(3)
    with torch.no_grad():
        matched, _, _ = m.stream_losses(batch)
        loss, n = m._mismatched_pair_mlm(batch)
    assert n == int((batch["pair"]["text_labels"] != -100).sum())
    assert not torch.allclose(loss, matched["mlm_pair"])  # a different image changes the text predictions
    # identical images in the batch: rolling them changes nothing, so mismatched == matched
    same = dict(batch)
    same["pair"] = dict(batch["pair"])
    same["pair"]["image"] = batch["pair"]["image"][:1].expand_as(batch["pair"]["image"]).clone()
    same["pair"]["image_mask"] = batch["pair"]["image_mask"][:1].expand_as(batch["pair"]["image_mask"]).clone()
    with torch.no_grad():
        matched_same, _, _ = m.stream_losses(same)
        loss_same, _ = m._mismatched_pair_mlm(same)
    torch.testing.assert_close(loss_same, matched_same["mlm_pair"])
    # a single pair has no other image to borrow, and the diagnostic can be switched off
    one = {"pair": {k: v[:1] for k, v in batch["pair"].items()}}
    assert m._mismatched_pair_mlm(one) is None
    assert MaskedPretraining(backbone="tiny_mhmoe", eval_grounding=False).eval_grounding is False
