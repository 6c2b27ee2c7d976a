"""COCO captioning with BEiT-3-style masked fine-tuning (the data: ``mmoe.train.data.coco_captioning``).

Training ([B3] sec. 3.1; unilm ``beit3`` ``BEiT3ForCaptioning``): image + ``[BOS] caption [EOS]`` go
through the Multiway Transformer under the captioning mask (text attends causally to text and fully to the image,
the image does not attend to text); 60-70% of the caption tokens after BOS are replaced by [MASK] and predicted by
a linear LM head with label smoothing 0.1. Optionally, after ``drop_worst_after`` steps the worst
``drop_worst_ratio`` (20%) of the token losses of each batch are dropped (BEiT-3's ``--drop_worst_after 12000``).
The MoE auxiliary loss of the backbone is added to the task loss ([MH1] sec. 3.3).

Evaluation and prediction decode with :mod:`mmoe.model.generation` (beam 3, length penalty 0.6, max 32, k/v cache)
and score with :mod:`mmoe.metrics.captions` (BLEU-1..4, ROUGE-L, CIDEr-D). ``mmoe predict`` writes the official
results format ``[{"image_id", "caption"}]``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmoe.data.tokenizer import build_tokenizer
from mmoe.files import atomic_write_json
from mmoe.metrics.captions import score_captions
from mmoe.model.generation import GenerationConfig, SpecialIds, caption_attention_mask, generate, num_vision_tokens
from mmoe.train.base import TaskModule, gather_objects
from mmoe.train.optim import OptimConfig

__all__ = ["CaptioningTask", "masked_caption_loss", "write_results"]


def masked_caption_loss(
    logits_MV: torch.Tensor,
    labels_M: torch.Tensor,
    *,
    label_smoothing: float = 0.1,
    drop_worst_ratio: float = 0.0,
) -> torch.Tensor:
    """Mean cross-entropy over the M masked tokens, optionally without the worst ``drop_worst_ratio`` share.

    Dropping the hardest 20% of token losses late in training is BEiT-3's captioning trick against noisy captions
    (unilm ``beit3`` ``CaptioningHandler``: ``drop_worst_ratio=0.2`` after ``drop_worst_after`` steps).
    """
    loss_M = F.cross_entropy(logits_MV.float(), labels_M, label_smoothing=label_smoothing, reduction="none")
    if drop_worst_ratio > 0.0 and loss_M.numel() > 1:
        keep = loss_M.numel() - int(loss_M.numel() * drop_worst_ratio)
        loss_M = loss_M.topk(max(keep, 1), largest=False).values
    return loss_M.mean()


def write_results(captions: dict[int, str], path: str | Path) -> Path:
    """Write ``{image_id: caption}`` in the official results format ``[{"image_id", "caption"}]`` (atomically)."""
    return atomic_write_json(path, [{"image_id": int(k), "caption": v} for k, v in sorted(captions.items())], indent=1)


class CaptioningTask(TaskModule):
    """BEiT-3-style masked captioning over a Multiway Transformer (see the module docstring).

    Args:
        backbone: registered model name or YAML path (docs/interfaces.md section 7).
        backbone_overrides: config overrides, e.g. ``{"img_size": 384, "drop_path": 0.1}``.
        init_from: an mmoe model file or one of our Lightning checkpoints (pretraining or captioning) whose
            backbone weights initialize this one; the LM head comes from a captioning checkpoint's ``lm_head`` or a
            pretraining checkpoint's ``mlm_head`` when present.
        label_smoothing: on the masked-token cross-entropy ([B3]: 0.1).
        drop_worst_ratio, drop_worst_after: drop this share of the worst token losses from step
            ``drop_worst_after`` on (``None`` = never; BEiT-3: 0.2 after 12000 steps).
        generation: decoding for validation/test/predict (beam 3, length penalty 0.6, max 32, cache).
        val_generate: decode and score captions at validation (else only the masked loss is logged).
        optim: optimizer + schedule (``mmoe.train.optim.OptimConfig``).
        results_path: where ``test``/``predict`` write their captions; default ``<log dir>/captions_<stage>.json``.
    """

    def __init__(
        self,
        backbone: str = "tiny_mhmoe",
        backbone_overrides: dict[str, Any] | None = None,
        init_from: str | None = None,
        label_smoothing: float = 0.1,
        drop_worst_ratio: float = 0.2,
        drop_worst_after: int | None = None,
        generation: GenerationConfig | dict[str, Any] | None = None,
        val_generate: bool = True,
        optim: OptimConfig | dict[str, Any] | None = None,
        results_path: str | None = None,
    ) -> None:
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"CaptioningTask: label_smoothing must be in [0, 1), got {label_smoothing}")
        if not 0.0 <= drop_worst_ratio < 1.0:
            raise ValueError(f"CaptioningTask: drop_worst_ratio must be in [0, 1), got {drop_worst_ratio}")
        if drop_worst_after is not None and drop_worst_after < 0:
            raise ValueError(f"CaptioningTask: drop_worst_after must be >= 0 or null, got {drop_worst_after}")
        if isinstance(generation, dict):  # from a checkpoint's hyper_parameters or a plain dict
            generation = GenerationConfig(**generation)
        # Decoding settings and the results path are left out of the hyper-parameters: `mmoe predict/test
        # --ckpt_path` would otherwise replace their command-line values with the training run's.
        super().__init__(
            optim=optim,
            default_optim=OptimConfig(lr=4e-5, weight_decay=0.05),
            hparams_ignore=("generation", "val_generate", "results_path"),
        )
        self.generation = generation or GenerationConfig()
        ckpt = self.init_backbone(backbone, backbone_overrides, init_from)
        self.backbone.freeze_unpaired_ffns_()  # training sequences are image + text: VL-FFN blocks skip V/L-FFN
        cfg = self.backbone.config
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size)
        nn.init.trunc_normal_(self.lm_head.weight, std=0.02)
        nn.init.zeros_(self.lm_head.bias)
        self.label_smoothing = label_smoothing
        self.drop_worst_ratio = drop_worst_ratio
        self.drop_worst_after = drop_worst_after
        self.val_generate = val_generate
        self.results_path = results_path
        self.tokenizer = build_tokenizer(cfg.tokenizer, max_len=cfg.max_text_len, path=cfg.tokenizer_path)
        if (self.tokenizer.pad_id, self.tokenizer.mask_id) != (cfg.pad_id, cfg.mask_id):
            raise ValueError(
                f"CaptioningTask: backbone {backbone!r} expects pad/mask ids {(cfg.pad_id, cfg.mask_id)}, its "
                f"{cfg.tokenizer} tokenizer has {(self.tokenizer.pad_id, self.tokenizer.mask_id)}"
            )
        self.special = SpecialIds.from_tokenizer(self.tokenizer)
        self._predictions: dict[int, str] = {}
        if ckpt is not None:
            self._init_lm_head(ckpt)

    # ------------------------------------------------------------------ weights
    def _init_lm_head(self, ckpt: Mapping[str, Any]) -> None:
        sd = ckpt.get("state_dict", {})
        # A captioning checkpoint has `lm_head.`; a MaskedPretraining one has `mlm_head.`, the same masked-token
        # predictor over the same vocabulary, so it is a better start than a random head.
        for prefix in ("lm_head.", "mlm_head."):
            head = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
            if head and all(head[k].shape == v.shape for k, v in self.lm_head.state_dict().items() if k in head):
                self.lm_head.load_state_dict(head)
                break

    def setup(self, stage: str) -> None:
        """Refuse a data module whose tokenizer disagrees with the backbone's (silent garbage otherwise)."""
        dm = self.trainer.datamodule if self._trainer is not None else None
        tok = getattr(dm, "tokenizer", None)
        if tok is None:
            return
        keys = ("vocab_size", "pad_id", "mask_id", "bos_id", "eos_id")
        mine, theirs = [getattr(self.tokenizer, k) for k in keys], [getattr(tok, k) for k in keys]
        if mine != theirs:
            raise ValueError(
                f"CaptioningTask: data.tokenizer ids {dict(zip(keys, theirs))} differ from the backbone's "
                f"{dict(zip(keys, mine))}; set data.tokenizer/tokenizer_path to the model's tokenizer"
            )
        if tok.max_len > self.backbone.config.max_text_len:
            raise ValueError(
                f"CaptioningTask: data.max_text_len={tok.max_len} exceeds the backbone's max_text_len="
                f"{self.backbone.config.max_text_len}"
            )

    # ------------------------------------------------------------------ forward
    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Masked-caption logits: returns ``(logits (M, V) at masked positions, labels (M,), aux_loss)``."""
        image, text = batch["image"], batch["text"]
        nv = num_vision_tokens(self.backbone, image)
        out = self.backbone(
            image=image,
            text=text,
            text_padding_mask=batch["text_padding_mask"],
            attn_mask=caption_attention_mask(nv, text.shape[1], image.device),
        )
        labels_BL = batch["text_labels"]
        chosen = labels_BL != -100
        feats_MD = out.features[:, nv:][chosen]  # the LM head runs only where a token is predicted
        aux = out.aux_loss if out.aux_loss is not None else feats_MD.new_zeros(())
        return self.lm_head(feats_MD), labels_BL[chosen], aux

    def _loss(self, batch: dict[str, Any], stage: str) -> torch.Tensor:
        logits, labels, aux = self(batch)
        drop = (
            self.drop_worst_ratio
            if (stage == "train" and self.drop_worst_after is not None and self.global_step >= self.drop_worst_after)
            else 0.0
        )
        cap = masked_caption_loss(logits, labels, label_smoothing=self.label_smoothing, drop_worst_ratio=drop)
        loss = cap + aux
        bs = batch["image"].shape[0]
        sync = stage != "train"
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=bs, sync_dist=sync)
        self.log(f"{stage}/loss_caption", cap, batch_size=bs, sync_dist=sync)
        self.log(f"{stage}/aux_loss", aux, batch_size=bs, sync_dist=sync)
        with torch.no_grad():
            acc = (logits.argmax(-1) == labels).float().mean() if labels.numel() else cap.new_zeros(())
        self.log(f"{stage}/masked_acc", acc, batch_size=bs, sync_dist=sync)
        return loss

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self._loss(batch, "train")

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def caption(self, image: torch.Tensor, config: GenerationConfig | None = None) -> list[str]:
        """Caption a batch of normalized images (B, 3, H, W)."""
        out = generate(self.backbone, self.lm_head, image, special=self.special, config=config or self.generation)
        return [self.tokenizer.decode(t) for t in out.tokens]

    def _collect(self, batch: dict[str, Any]) -> None:
        for i, c in zip(batch["image_id"].tolist(), self.caption(batch["image"])):
            self._predictions[int(i)] = c

    def on_validation_epoch_start(self) -> None:
        self._predictions = {}

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        if "text" in batch:
            self._loss(batch, "val")
        if self.val_generate:
            self._collect(batch)

    def on_validation_epoch_end(self) -> None:
        self._score("val")

    def on_test_epoch_start(self) -> None:
        self._predictions = {}

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        if "text" in batch:
            self._loss(batch, "test")
        self._collect(batch)

    def on_test_epoch_end(self) -> None:
        self._score("test")

    def _score(self, stage: str) -> None:
        if self.trainer.sanity_checking or not self._predictions:
            return
        preds = dict(gather_objects(list(self._predictions.items())))
        self._predictions = {}
        dm = self.trainer.datamodule
        refs = dm.references(stage) if dm is not None and hasattr(dm, "references") else {}
        if self.trainer.is_global_zero:
            path = self._results_file(stage)
            write_results(preds, path)
        preds = {k: v for k, v in preds.items() if refs.get(k)}
        if not preds:
            return
        scores = score_captions(refs, preds, tokenizer="python", meteor=False)
        for key in ("Bleu_1", "Bleu_4", "ROUGE_L", "CIDEr"):
            self.log(f"{stage}/{key}", float(scores[key]), rank_zero_only=True)

    def _results_file(self, stage: str) -> Path:
        if self.results_path and stage in ("test", "predict"):
            return Path(self.results_path)
        root = Path(self.trainer.log_dir or self.trainer.default_root_dir)
        suffix = f"_step{self.global_step:07d}" if stage == "val" else ""
        return root / f"captions_{stage}{suffix}.json"

    def on_predict_epoch_start(self) -> None:
        self._predictions = {}

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> list[dict[str, Any]]:
        caps = self.caption(batch["image"])
        ids = batch["image_id"].tolist()
        for i, c in zip(ids, caps):
            self._predictions[int(i)] = c
        return [{"image_id": int(i), "caption": c} for i, c in zip(ids, caps)]

    def on_predict_epoch_end(self) -> None:
        preds = dict(gather_objects(list(self._predictions.items())))
        self._predictions = {}
        if self.trainer.is_global_zero:
            path = write_results(preds, self._results_file("predict"))
            print(f"mmoe predict: wrote {len(preds)} captions to {path}")
