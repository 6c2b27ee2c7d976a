"""Image-text retrieval: a dual encoder on the Multiway backbone, contrastive fine-tuning, R@K evaluation.

Model ([B3] sec. 3.1; unilm ``beit3`` ``BEiT3ForRetrieval``): the image alone goes through the backbone (vision
branch), the text alone too (language branch); each CLS token (the image ``[CLS]``, the text's first token) ->
its projection -> L2 normalisation (:class:`mmoe.model.contrastive.ContrastiveHead`). Training minimises the
symmetric InfoNCE loss with a learnable temperature over the pairs of the whole (all-rank) batch
(:func:`mmoe.model.contrastive.contrastive_loss`), plus the MoE auxiliary loss of both passes ([MH1] sec. 3.3).

Evaluation (validation and ``mmoe test``) embeds every image and every caption of the split once, scores all
pairs by cosine similarity and reports ``{stage}/{i2t,t2i}_r{1,5,10}`` and ``{stage}/rsum``
(:func:`mmoe.metrics.retrieval.recall_at_k`); ``mmoe test`` also writes the scores file, ``scores`` (I, T) and
``text_to_image`` (T,), that ``python -m mmoe.metrics.retrieval --scores FILE`` reads.

Zero-shot retrieval is ``mmoe test`` with ``init_from`` a pretraining checkpoint and no fine-tuning: with the
pretraining's ITC projections (``itc_head.*``, ``MaskedPretraining(itc_weight > 0)``) when it has them, else the
normalised CLS features themselves (identity projections).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info

from mmoe.files import atomic_torch_save
from mmoe.metrics.retrieval import recall_at_k
from mmoe.model.contrastive import ContrastiveHead, RetrievalPooling, check_pooling, contrastive_loss, pool_embedding
from mmoe.model.multiway import MultiwayFFN
from mmoe.train.base import TaskModule, gather_objects
from mmoe.train.optim import OptimConfig

__all__ = ["RetrievalTask", "load_itc_head"]


def load_itc_head(
    head: ContrastiveHead, ckpt: Mapping[str, Any], *, source: str, pooling: RetrievalPooling = "cls"
) -> bool:
    """Load ``itc_head.*`` of a checkpoint (ours: pretraining with ITC, or retrieval) into ``head``.

    Returns whether it did; a checkpoint without them leaves ``head`` as it is. Projections trained on another
    pooling (the checkpoint's ``itc_pooling`` / ``pooling`` hyperparameter, ``"cls"`` when it has none) than
    ``pooling`` are refused: they would read features they never saw.
    """
    sd = ckpt.get("state_dict", ckpt)
    weights = {k[len("itc_head.") :]: v for k, v in sd.items() if isinstance(k, str) and k.startswith("itc_head.")}
    if not weights:
        return False
    hparams = ckpt.get("hyper_parameters") or {}
    theirs = hparams.get("itc_pooling", hparams.get("pooling", "cls"))
    if theirs != pooling:
        raise ValueError(
            f"RetrievalTask: {source} trained its ITC projections on pooling={theirs!r}, but this task pools "
            f"{pooling!r}; set model.init_args.pooling to {theirs!r}"
        )
    mine = head.state_dict()
    bad = {k: tuple(v.shape) for k, v in weights.items() if k not in mine or mine[k].shape != v.shape}
    if bad or set(weights) != set(mine):
        raise ValueError(
            f"RetrievalTask: {source} has ITC weights {sorted(weights)} that do not fit this head "
            f"{ {k: tuple(v.shape) for k, v in mine.items()} } (mismatched: {bad}); set embed_dim to theirs"
        )
    head.load_state_dict(weights)
    return True


class RetrievalTask(TaskModule):
    """Dual-encoder image-text retrieval over a Multiway Transformer (see the module docstring).

    Args:
        backbone: registered model name or YAML path (docs/interfaces.md section 7).
        backbone_overrides: config overrides, e.g. ``{"img_size": 384, "drop_path": 0.2}``.
        init_from: an mmoe model file or one of our Lightning checkpoints. Its ``itc_head`` (a pretraining run with
            ITC, or a retrieval run) initialises the projections; a checkpoint without one starts them at the
            identity (the normalised CLS features: zero-shot retrieval from plain masked pretraining).
        embed_dim: embedding width (default the backbone width; the identity start needs that).
        init_temperature: initial softmax temperature of the learnable logit scale ([CLIP]: 0.07).
        optim: optimizer + schedule (``mmoe.train.optim.OptimConfig``).
        scores_path: where ``mmoe test`` writes the scores file; default ``<log dir>/retrieval_scores_test.pt``.
        pooling: what the projections read: ``"cls"`` (BEiT-3) or ``"cls_max"`` (CLS + the max over the other
            tokens, see :func:`pool_embedding`; the tiny synthetic recipe's choice).
    """

    def __init__(
        self,
        backbone: str = "tiny_mhmoe",
        backbone_overrides: dict[str, Any] | None = None,
        init_from: str | None = None,
        embed_dim: int | None = None,
        init_temperature: float = 0.07,
        optim: OptimConfig | dict[str, Any] | None = None,
        scores_path: str | None = None,
        pooling: RetrievalPooling = "cls",
    ) -> None:
        super().__init__(
            optim=optim,
            default_optim=OptimConfig(lr=2e-4, weight_decay=0.05, layer_decay=0.65),
            hparams_ignore=("scores_path",),
        )
        check_pooling("RetrievalTask", pooling)
        self.pooling: RetrievalPooling = pooling
        ckpt = self.init_backbone(backbone, backbone_overrides, init_from)
        # Image alone and text alone never reach a VL-FFN ([B3] sec. 2.1): frozen, it is no trainable parameter
        # without a gradient (which plain DDP refuses); its weights stay for tasks that fuse the modalities.
        for module in self.backbone.modules():
            if isinstance(module, MultiwayFFN) and module.vl is not None:
                module.vl.requires_grad_(False)
        cfg = self.backbone.config
        self.itc_head = ContrastiveHead(cfg.dim, embed_dim, init_temperature=init_temperature, init_std=cfg.init_std)
        if ckpt is not None and not load_itc_head(self.itc_head, ckpt, source=str(init_from), pooling=pooling):
            self.itc_head.identity_()
            rank_zero_info(f"RetrievalTask: {init_from} has no ITC projections; starting from the normalised CLS")
        self.scores_path = scores_path
        self._rows: dict[str, list[tuple[int, torch.Tensor]]] = {"image": [], "text": []}
        self._text_image: list[tuple[int, int]] = []

    def setup(self, stage: str) -> None:
        """Refuse a data module whose tokenizer cannot feed this backbone (silent garbage otherwise)."""
        dm = self.trainer.datamodule if self._trainer is not None else None
        tok = getattr(dm, "tokenizer", None)
        cfg = self.backbone.config
        if tok is not None and (
            (tok.vocab_size, tok.pad_id) != (cfg.vocab_size, cfg.pad_id) or tok.max_len > cfg.max_text_len
        ):
            raise ValueError(
                f"RetrievalTask: data tokenizer (vocab {tok.vocab_size}, pad {tok.pad_id}, max_len {tok.max_len}) "
                f"does not fit the backbone (vocab {cfg.vocab_size}, pad {cfg.pad_id}, max_text_len "
                f"{cfg.max_text_len}); set data.tokenizer/tokenizer_path/max_text_len to the model's"
            )

    # ------------------------------------------------------------------ encoders
    def encode_image(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B,3,H,W) alone through the backbone -> (unit embeddings (B, E), MoE aux loss)."""
        out = self.backbone(image=image)
        aux = out.aux_loss if out.aux_loss is not None else out.features.new_zeros(())
        return self.itc_head.embed_image(pool_embedding(out.features, self.pooling)), aux

    def encode_text(self, text: torch.Tensor, padding_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Texts (B,L) alone through the backbone -> (unit embeddings (B, E) of the first token, MoE aux loss)."""
        out = self.backbone(text=text, text_padding_mask=padding_mask)
        aux = out.aux_loss if out.aux_loss is not None else out.features.new_zeros(())
        return self.itc_head.embed_text(pool_embedding(out.features, self.pooling, padding_mask)), aux

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        if not batch:
            return None
        image_BE, aux_image = self.encode_image(batch["image"])
        text_BE, aux_text = self.encode_text(batch["text"], batch["text_padding_mask"])
        scale = self.itc_head.scale()
        itc, logits_BN, labels_B = contrastive_loss(image_BE, text_BE, scale)
        aux = (aux_image + aux_text).float()
        loss = itc + aux
        bs = image_BE.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        self.log("train/loss_itc", itc, batch_size=bs)
        self.log("train/aux_loss", aux, batch_size=bs)
        self.log("train/logit_scale", scale.detach(), batch_size=bs)
        with torch.no_grad():  # share of this rank's images whose own caption scores highest in the whole batch
            self.log("train/acc_i2t", (logits_BN.argmax(1) == labels_B).float().mean(), batch_size=bs)
        return loss

    # ------------------------------------------------------------------ evaluation
    def _reset(self) -> None:
        self._rows = {"image": [], "text": []}
        self._text_image = []

    @torch.no_grad()
    def _embed_batch(self, batch: dict[str, Any]) -> None:
        image_BE, _ = self.encode_image(batch["image"])
        self._rows["image"].extend(zip(batch["image_index"].tolist(), image_BE.float().cpu()))
        if "text" in batch:
            text_TE, _ = self.encode_text(batch["text"], batch["text_padding_mask"])
            self._rows["text"].extend(zip(batch["text_index"].tolist(), text_TE.float().cpu()))
            self._text_image.extend(zip(batch["text_index"].tolist(), batch["text_image_index"].tolist()))

    def _scores(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """All ranks' embeddings -> (scores (I, T), text_to_image (T,)); rows a sampler repeated are kept once."""
        images = dict(gather_objects(self._rows["image"]))
        texts = dict(gather_objects(self._rows["text"]))
        owner = dict(gather_objects(self._text_image))
        self._reset()
        if not images or not texts:
            return None
        image_ids, text_ids = sorted(images), sorted(texts)
        if image_ids != list(range(len(image_ids))) or text_ids != list(range(len(text_ids))):
            raise RuntimeError(
                f"RetrievalTask: evaluation saw {len(image_ids)} images / {len(text_ids)} texts with gaps in their "
                "indices; run the whole split (no limit_val_batches / limit_test_batches below 1.0)"
            )
        image_IE = torch.stack([images[i] for i in image_ids])
        text_TE = torch.stack([texts[j] for j in text_ids])
        return image_IE @ text_TE.t(), torch.tensor([owner[j] for j in text_ids], dtype=torch.long)

    def _evaluate(self, stage: str) -> None:
        if self.trainer.sanity_checking:
            self._reset()
            return
        result = self._scores()
        if result is None:
            return
        scores, text_to_image = result
        for key, value in recall_at_k(scores, text_to_image).items():
            self.log(f"{stage}/{key}", value, sync_dist=False)  # every rank holds the same gathered matrix
        if stage == "test" and self.trainer.is_global_zero:
            path = self._scores_file()
            atomic_torch_save({"scores": scores, "text_to_image": text_to_image}, path)
            rank_zero_info(f"RetrievalTask: wrote {tuple(scores.shape)} scores to {path}")

    def _scores_file(self) -> Path:
        if self.scores_path:
            return Path(self.scores_path)
        return Path(self.trainer.log_dir or self.trainer.default_root_dir) / "retrieval_scores_test.pt"

    def on_validation_epoch_start(self) -> None:
        self._reset()

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._embed_batch(batch)

    def on_validation_epoch_end(self) -> None:
        self._evaluate("val")

    def on_test_epoch_start(self) -> None:
        self._reset()

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._embed_batch(batch)

    def on_test_epoch_end(self) -> None:
        self._evaluate("test")
