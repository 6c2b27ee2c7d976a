"""MaskedPretraining ([B3] sec. 2.2): per-stream losses, targets, codebook, non-finite handling, checkpoint config."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from mmoe.data.codebook import assign_codes, load_codebook, normalize_patches, patchify, save_codebook
from mmoe.train.pretraining import MaskedPretraining, bag_of_words_loss, routing_metrics

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


def test_pixel_norm_eps_shrinks_flat_patch_targets() -> None:
    """A flat patch with faint noise is a unit-variance target at MAE's eps and near 0 with a larger floor;
    a patch with an edge stays near unit variance under both."""
    g = torch.Generator().manual_seed(0)
    flat = 0.2 + 0.03 * torch.randn(1, 1, 192, generator=g)  # grey + noise, variance ~1e-3
    edge = torch.cat([torch.full((96,), -0.8), torch.full((96,), 0.6)]).view(1, 1, 192)  # variance 0.49
    for eps, flat_var_range in ((1e-6, (0.99, 1.01)), (0.05, (0.0, 0.03))):
        n_flat = normalize_patches(flat, eps=eps).var(-1, unbiased=False).item()
        n_edge = normalize_patches(edge, eps=eps).var(-1, unbiased=False).item()
        assert flat_var_range[0] <= n_flat <= flat_var_range[1], (eps, n_flat)
        assert n_edge > 0.9, (eps, n_edge)

    batch = _batch()
    losses = {}
    for eps in (1e-6, 0.05):
        torch.manual_seed(0)
        m = MaskedPretraining(backbone="tiny_dense", pixel_norm_eps=eps, optim={"lr": 1e-3, "total_steps": 5})
        image = batch["image"]
        feats = torch.randn(image["image"].shape[0], 64, m.backbone.config.dim)
        loss, n = m._mim(feats, image["image"], image["image_mask"])
        expected = torch.nn.functional.mse_loss(
            m.mim_head(feats[image["image_mask"]]),
            normalize_patches(patchify(image["image"], 8)[image["image_mask"]], eps=eps),
        )
        assert n == int(image["image_mask"].sum()) and torch.allclose(loss, expected)
        losses[eps] = float(loss)
    assert losses[1e-6] != losses[0.05]
    with pytest.raises(ValueError, match="pixel_norm_eps"):
        MaskedPretraining(backbone="tiny_dense", pixel_norm_eps=0.0)
    with pytest.raises(ValueError, match="pixel_norm_eps applies to image_target='pixels'"):
        MaskedPretraining(backbone="tiny_dense", image_target="codebook", codebook="x.pt", pixel_norm_eps=0.05)


def test_bag_of_words_loss_against_a_hand_computation() -> None:
    """bos, eos and padding are no words; repeated words count once; a row without words is left out."""
    v = 12
    text = torch.tensor([[10, 3, 5, 3, 11, 0], [10, 11, 0, 0, 0, 0], [10, 7, 11, 0, 0, 0]])
    pad = torch.tensor([[0, 0, 0, 0, 0, 1], [0, 0, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1]], dtype=torch.bool)
    logits = torch.randn(3, v, generator=torch.Generator().manual_seed(0))
    logp = torch.log_softmax(logits, dim=-1)
    expected = (-(logp[0, 3] + logp[0, 5]) / 2 - logp[2, 7]) / 2  # row 1 has only bos and eos
    assert torch.allclose(bag_of_words_loss(logits, text, pad), expected)
    none = bag_of_words_loss(logits[1:2].requires_grad_(), text[1:2], pad[1:2])
    assert float(none) == 0.0 and none.requires_grad


def test_bow_objective_trains_the_image_tokens_only_from_the_image() -> None:
    torch.manual_seed(0)
    m = MaskedPretraining(backbone="tiny_dense", bow_weight=1.0, optim={"lr": 1e-3, "total_steps": 5})
    batch = _batch(vocab=m.backbone.config.vocab_size - 2)
    losses, aux, _ = m.stream_losses(batch)
    assert "bow_pair" in losses and "itc_pair" not in losses
    assert abs(float(losses["bow_pair"]) - math.log(m.backbone.config.vocab_size)) < 1.0  # starts near log V
    m._total(losses, aux).backward()
    assert m.bow_head is not None and m.bow_head.weight.grad.abs().sum() > 0
    # the bag-of-words pass sees the image alone: no gradient reaches the text embedding
    m.zero_grad(set_to_none=True)
    m._pair_image_losses(batch["pair"])[0]["bow_pair"].backward()
    assert all(p.grad is None or not p.grad.any() for p in m.backbone.text_embed.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.backbone.vision_embed.parameters())
    with_itc = MaskedPretraining(backbone="tiny_dense", bow_weight=1.0, itc_weight=1.0)
    assert {"bow_pair", "itc_pair"} <= set(with_itc.stream_losses(batch)[0])
    with pytest.raises(ValueError, match="bow_weight"):
        MaskedPretraining(backbone="tiny_dense", bow_weight=-1.0)


def test_tag_objective_is_a_binary_loss_per_word_from_the_image_alone() -> None:
    torch.manual_seed(0)
    words = ["circle", "square", "star"]
    m = MaskedPretraining(backbone="tiny_dense", tag_weight=2.0, tag_words=words, optim={"lr": 1e-3, "total_steps": 5})
    batch = _batch(vocab=m.backbone.config.vocab_size - 2)
    tags = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    batch["pair"]["tags"] = tags
    losses, aux, _ = m.stream_losses(batch)
    assert "tag_pair" in losses and "bow_pair" not in losses and "itc_pair" not in losses
    assert abs(float(losses["tag_pair"]) - math.log(2.0)) < 0.1  # zero-mean head: every logit starts near 0
    # the same number by hand from the head's logits
    with torch.no_grad():
        from mmoe.model.contrastive import pool_embedding

        feats = m.backbone(image=batch["pair"]["image"]).features
        logits = m.tag_head(pool_embedding(feats, "cls_max"))  # type: ignore[misc]
        p = torch.sigmoid(logits)
        by_hand = -(tags * p.log() + (1 - tags) * (1 - p).log()).mean()
    assert torch.allclose(losses["tag_pair"], by_hand, atol=1e-5)
    total = m._total(losses, aux)
    others = sum(v for k, v in losses.items() if k != "tag_pair") + aux.float() * m.aux_loss_scale
    assert torch.allclose(total, others + 2.0 * losses["tag_pair"])
    m.zero_grad(set_to_none=True)
    m._pair_image_losses(batch["pair"])[0]["tag_pair"].backward()
    assert all(p.grad is None or not p.grad.any() for p in m.backbone.text_embed.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.backbone.vision_embed.parameters())
    # data and model must agree on the words; refused values
    del batch["pair"]["tags"]
    with pytest.raises(ValueError, match="no 'tags': set the data's pair_tag_words"):
        m.stream_losses(batch)
    batch["pair"]["tags"] = torch.zeros(2, 5)
    with pytest.raises(ValueError, match="5 tags per sample, the model's tag_words 3"):
        m.stream_losses(batch)
    with pytest.raises(ValueError, match="tag_weight > 0 needs tag_words"):
        MaskedPretraining(backbone="tiny_dense", tag_weight=1.0)
    with pytest.raises(ValueError, match="tag_weight"):
        MaskedPretraining(backbone="tiny_dense", tag_weight=-1.0, tag_words=words)


def test_tag_words_of_model_and_data_must_agree_before_training() -> None:
    from types import SimpleNamespace

    from mmoe.data.grounded import CaptionTags

    m = MaskedPretraining(backbone="tiny_dense", tag_weight=1.0, tag_words=["circle", "Square"])
    for good in (["circle", "square"], ["Circle", "square"]):
        m._trainer = SimpleNamespace(datamodule=SimpleNamespace(caption_tags=CaptionTags(good)))  # type: ignore[assignment]
        m.setup("fit")
    for bad in (CaptionTags(["square", "circle"]), CaptionTags(["circle"]), None):
        m._trainer = SimpleNamespace(datamodule=SimpleNamespace(caption_tags=bad))  # type: ignore[assignment]
        with pytest.raises(ValueError, match="model.tag_words .* but data.pair_tag_words gives"):
            m.setup("fit")
    m._trainer = None
