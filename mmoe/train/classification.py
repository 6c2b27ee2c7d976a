"""Generic classification fine-tuning ([B3] sec. 3): one module for VQAv2, NLVR2 and ImageNet.

``ClassificationTask`` fine-tunes the Multiway Transformer with a ``mmoe.model.heads.ClassificationHead``
on VQAv2, NLVR2 or ImageNet; a recipe only chooses the pooling, the loss and which batch keys to read:

=========  ============  ===================================  ==========================================
task       pooling       loss                                 batch keys (docs/interfaces.md section 4)
=========  ============  ===================================  ==========================================
VQAv2      image_cls     ``soft_bce``: BCE-with-logits x C    image, text, text_padding_mask, labels (B,C)
                         on the 0.3/0.6/0.9/1.0 soft scores,  question_id
                         head lr x20
NLVR2      pair          ``ce`` (cross-entropy)               image, image2, text, text_padding_mask,
                                                              labels (B,), identifier
ImageNet   mean_patch    ``ce`` + label smoothing, optional   image, labels (B,) or (B, C) soft
                         timm Mixup/CutMix
=========  ============  ===================================  ==========================================

Validation logs ``val/loss`` and, per loss, ``val/vqa_score`` (the soft score of the arg-max answer, in
percent like the official evaluator: the training-time proxy of the official metric), ``val/acc`` /
``val/acc_top5`` and for NLVR2 ``val/consistency`` (fractions in [0, 1], as torchmetrics and the official
NLVR2 script report them).

With ``tag_weight > 0`` a linear head on the stem's patch tokens (the tokens entering the first block) also
predicts the image tags that ``VQADataModule(tag_words)`` mines from the training questions, as a max over the
patches of per-token logits (an object is there if one token shows it): one binary loss per object word, logged
as ``train/tag_loss``. Why: in a VQA world the colour, count and position answers are learned first and starve
the slower object-shape feature of gradient (Pezeshki et al. 2021); a loss about the objects alone, with a short
path to the stem, keeps that feature fed (docs/results/learning.md). It reads the stem only, never the question,
so it cannot answer from the text. ``predict`` (and ``test``) write the official submission files into ``results_dir``
(default ``<default_root_dir>/results``): VQA ``vqa_results.json`` (``[{"question_id", "answer"}]``) with the
answer vocabulary copied beside it as ``answer_vocab.json``; NLVR2 ``nlvr2_predictions.csv``
(``identifier,prediction``); otherwise ``predictions.json``. The answer vocabulary (``label_names``) is
stored in every checkpoint, so a fine-tuned checkpoint can predict without the original vocabulary file.

Backbone construction, optimizer and checkpoint keys are those of every task (:class:`mmoe.train.base.TaskModule`;
docs/interfaces.md section 7).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from mmoe.data.grounded import CaptionTags, resolve_grounded_words
from mmoe.data.vqa import load_answer_vocab, save_answer_vocab
from mmoe.files import atomic_write_json
from mmoe.metrics.nlvr2 import sentence_key, write_predictions_csv
from mmoe.model.backbone import BackboneOutput
from mmoe.model.heads import ClassificationHead, Pooling
from mmoe.train.base import TaskModule, gather_objects
from mmoe.train.optim import OptimConfig

__all__ = ["ClassificationTask"]

LossName = Literal["soft_bce", "ce"]
PredictFormat = Literal["vqa", "nlvr2", "labels"]


class TiedTagHead(torch.nn.Module):
    """Tag logits from the tag words' own text embeddings (``ClassificationTask(tag_tied=True)``).

    logit(token, word) = scale * <LN(token), e_word / |e_word|> + bias_word, with e_word the mean of the word's
    BPE rows of the backbone's token embedding, read at every call, so the gradient reaches those rows: the
    word's embedding moves towards the image tokens that show the object, a token-level version of the
    image-text alignment of contrastive pretraining ([CLIP] in docs/references.md).
    """

    def __init__(self, backbone: torch.nn.Module, words: list[str]) -> None:
        super().__init__()
        config = backbone.config
        if config.tokenizer != "openclip" or backbone.text_embed is None:
            raise ValueError(
                f"ClassificationTask(tag_tied=True): needs the open_clip tokenizer and a text branch, the backbone "
                f"has tokenizer={config.tokenizer!r}"
            )
        from mmoe.data.tokenizer import build_tokenizer

        tok = build_tokenizer("openclip", max_len=16)
        rows = [tok.encode_one(w) for w in words]
        width = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        weight = torch.zeros(len(rows), width)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            weight[i, : len(r)] = 1.0 / len(r)
        self.register_buffer("ids_TK", ids, persistent=False)
        self.register_buffer("weight_TK", weight, persistent=False)
        self.norm = torch.nn.LayerNorm(config.dim)
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.bias = torch.nn.Parameter(torch.zeros(len(rows)))
        self._embed = [backbone.text_embed.token_embed]  # a list: not registered twice as a submodule

    def forward(self, tokens_BPD: torch.Tensor) -> torch.Tensor:
        table = self._embed[0].weight
        words_TD = (table[self.ids_TK] * self.weight_TK.unsqueeze(-1).to(table.dtype)).sum(dim=1)
        words_TD = F.normalize(words_TD.float(), dim=-1).to(tokens_BPD.dtype)
        return self.scale * (self.norm(tokens_BPD) @ words_TD.T) + self.bias


class ClassificationTask(TaskModule):
    """Backbone + ``ClassificationHead`` trained with soft-target BCE or cross-entropy (module docstring).

    Args:
        backbone: registered model name or YAML path; ``None`` with ``init_from`` rebuilds the checkpoint's own.
        backbone_overrides: ``MultiwayConfig`` fields to change (e.g. ``{"drop_path": 0.1, "img_size": 480}``).
        init_from: an mmoe model file or one of our Lightning checkpoints (pretrained backbone weights;
            position tables are resampled to the new image size).
        num_classes: number of classes; may be omitted when ``label_vocab`` gives it (NLVR2: 2).
        label_vocab: answer/class-name file (``mmoe-vqa-vocab`` output or a JSON list); its
            names are stored in checkpoints and used to write predictions.
        pooling, hidden_mult, head_norm_eps, head_init_scale, head_dropout: ``ClassificationHead`` settings.
        loss: ``"soft_bce"`` (VQA: BCE-with-logits times the number of labels) or ``"ce"``.
        label_smoothing: cross-entropy label smoothing (ImageNet 0.1).
        mixup: timm ``Mixup`` keyword arguments (e.g. ``{"mixup_alpha": 0.8, "cutmix_alpha": 1.0}``) or None;
            ``num_classes`` and ``label_smoothing`` are filled in here.
        image_key, image2_key, text_key, label_key, id_key: which batch keys to read (``image2_key`` is
            required by the ``"pair"`` pooling; ``text_key=None`` for vision-only tasks).
        optim: optimizer/schedule (``mmoe.train.optim.OptimConfig`` keys).
        predict_format: ``"vqa"``, ``"nlvr2"`` or ``"labels"``: the results file predict/test write.
        results_dir: where results files go (default ``<trainer.default_root_dir>/results``).
        top_k: accuracies to report for ``"ce"`` (k <= num_classes are kept).
        tag_weight: weight of the image-tag loss (module docstring); 0 turns it off.
        tag_words: its words (``pair_mask_words`` syntax), the same as the data module's ``tag_words``.
        tag_channels: the tag head reads only the first ``tag_channels`` channels of the stem's tokens (None: all),
            so the other channels are left to the task loss alone.
        tag_tied: the tag head scores each token against the tag word's own text embedding (the mean of its
            tokens' rows, unit-normalised, times a learned scale, plus a per-word bias) instead of a free linear
            layer, so the loss pulls the question's "magenta" and "disc" towards the image tokens that show them
            (docs/results/learning.md). Needs the open_clip tokenizer and a text branch.
        tag_decay_steps: when set, the tag weight falls linearly from ``tag_weight`` at step 0 to 0 at this
            step and stays 0 after: the tags seed the object features early, the task loss alone has the rest of
            the schedule (docs/results/learning.md). None: a constant weight.
        task_start_step: the task loss joins at this optimizer step (before it, weight 0; still computed, so
            every parameter takes part in each DDP step). With ``tag_weight > 0`` the first steps train the
            stem on the image tags alone, so the object features are there before colour and position answers
            take the gradient (docs/results/learning.md). 0: from the first step.
    """

    def __init__(
        self,
        *,
        backbone: str | None = "tiny_mhmoe",
        backbone_overrides: dict[str, Any] | None = None,
        init_from: str | None = None,
        num_classes: int | None = None,
        label_vocab: str | None = None,
        pooling: Pooling = "image_cls",
        hidden_mult: int | None | Literal["auto"] = "auto",
        head_norm_eps: float = 1e-5,
        head_init_scale: float = 1.0,
        head_dropout: float = 0.0,
        loss: LossName = "ce",
        label_smoothing: float = 0.0,
        mixup: dict[str, Any] | None = None,
        image_key: str = "image",
        image2_key: str | None = None,
        text_key: str | None = "text",
        label_key: str = "labels",
        id_key: str | None = None,
        optim: OptimConfig | None = None,
        predict_format: PredictFormat = "labels",
        results_dir: str | None = None,
        top_k: list[int] | None = None,
        tag_weight: float = 0.0,
        tag_words: str | list[str] | None = None,
        tag_channels: int | None = None,
        tag_decay_steps: int | None = None,
        tag_tied: bool = False,
        task_start_step: int = 0,
    ) -> None:
        if loss not in ("soft_bce", "ce"):
            raise ValueError(f"ClassificationTask: loss={loss!r}; expected 'soft_bce' or 'ce'")
        if pooling == "pair" and not image2_key:
            raise ValueError("ClassificationTask: pooling='pair' (NLVR2) needs image2_key (e.g. 'image2')")
        if pooling in ("pair", "image_text_cls", "image_text_max", "image_text_max_mean") and not text_key:
            raise ValueError(
                f"ClassificationTask: pooling={pooling!r} needs text_key (image CLS and text CLS are pooled)"
            )
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"ClassificationTask: label_smoothing={label_smoothing} must be in [0, 1)")
        if mixup and loss != "ce":
            raise ValueError("ClassificationTask: mixup needs loss='ce' (soft-target cross-entropy)")
        if tag_weight < 0:
            raise ValueError(f"ClassificationTask: tag_weight={tag_weight} must be >= 0")
        words = resolve_grounded_words(tag_words, key="model.tag_words") if tag_words is not None else []
        if tag_weight > 0 and not words:
            raise ValueError("ClassificationTask: tag_weight > 0 needs tag_words (the words to mine as image tags)")
        if tag_channels is not None and tag_weight <= 0:
            raise ValueError(f"ClassificationTask: tag_channels={tag_channels} without tag_weight > 0 has no effect")
        if tag_tied and (tag_weight <= 0 or not text_key or tag_channels is not None):
            raise ValueError(
                "ClassificationTask: tag_tied needs tag_weight > 0, a text branch (text_key) and all channels "
                "(tag_channels null)"
            )
        if tag_decay_steps is not None and (tag_weight <= 0 or tag_decay_steps <= 0):
            raise ValueError(
                f"ClassificationTask: tag_decay_steps={tag_decay_steps} needs tag_weight > 0 and a positive step count"
            )
        if task_start_step < 0 or (task_start_step > 0 and tag_weight <= 0):
            raise ValueError(
                f"ClassificationTask: task_start_step={task_start_step} must be >= 0, and > 0 only with "
                "tag_weight > 0 (before it no loss but the tags trains the model)"
            )
        if tag_weight > 0 and pooling == "pair":
            raise ValueError("ClassificationTask: tag_weight > 0 is for one image per sample; pooling='pair' has two")

        names: list[str] | None = load_answer_vocab(label_vocab) if label_vocab else None
        if num_classes is None and names is None:
            raise ValueError("ClassificationTask: give num_classes or label_vocab (a file with the class names)")
        if num_classes is not None and names is not None and len(names) != num_classes:
            raise ValueError(
                f"ClassificationTask: num_classes={num_classes} but label_vocab {label_vocab} has {len(names)} entries"
            )
        super().__init__(optim=optim)
        self.label_names = names
        self.num_classes = int(num_classes if num_classes is not None else len(names))  # type: ignore[arg-type]
        # A vision-only task builds no text branch; a full checkpoint loads into it with the text tensors skipped.
        self.init_backbone(backbone, backbone_overrides, init_from, vision_only=not text_key)
        if text_key:
            self.backbone.freeze_unpaired_ffns_()  # every sequence is image + text: VL-FFN blocks skip V/L-FFN
        self.head = ClassificationHead(
            self.backbone.config.dim,
            self.num_classes,
            pooling=pooling,
            hidden_mult=hidden_mult,
            norm_eps=head_norm_eps,
            init_scale=head_init_scale,
            dropout=head_dropout,
        )
        self.tag_words = CaptionTags(words).words if words else []
        self.tag_head: torch.nn.Module | None = None
        if tag_weight > 0:
            dim = self.backbone.config.dim
            if tag_channels is not None:
                if not 0 < tag_channels <= dim:
                    raise ValueError(f"ClassificationTask: tag_channels={tag_channels} must be in [1, {dim}]")
                dim = tag_channels
            if tag_tied:
                self.tag_head = TiedTagHead(self.backbone, self.tag_words)
            else:
                self.tag_head = torch.nn.Sequential(torch.nn.LayerNorm(dim), torch.nn.Linear(dim, len(self.tag_words)))
        self.mixup_fn = None
        if mixup:
            from timm.data import Mixup

            self.mixup_fn = Mixup(**{**mixup, "label_smoothing": label_smoothing, "num_classes": self.num_classes})

        ks = sorted({int(k) for k in (top_k or [1, 5]) if 0 < int(k) <= self.num_classes}) or [1]
        self.top_k = ks
        if loss == "ce":
            self.val_acc = torch.nn.ModuleDict(
                {f"top{k}": MulticlassAccuracy(self.num_classes, top_k=k, average="micro") for k in ks}
            )
            self.test_acc = torch.nn.ModuleDict(
                {f"top{k}": MulticlassAccuracy(self.num_classes, top_k=k, average="micro") for k in ks}
            )
        self.val_score, self.test_score = MeanMetric(), MeanMetric()
        self._eval_rows: list[tuple[str, bool]] = []  # (identifier, correct) for NLVR2 consistency
        self._pred_rows: list[Any] = []

    # ------------------------------------------------------------------ forward
    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        """Logits (B, C) of one batch (docs/interfaces.md section 4 keys, chosen by the ``*_key`` arguments)."""
        return self.logits_and_aux(batch)[0]

    def logits_and_aux(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, C) and the backbone's MoE auxiliary loss (None for a dense backbone)."""
        logits, out = self._logits_and_output(batch)
        return logits, out.aux_loss

    def _logits_and_output(self, batch: dict[str, Any]) -> tuple[torch.Tensor, BackboneOutput]:
        hp = self.hparams
        image = batch[hp.image_key]
        text = padding = None
        if hp.text_key:
            text = batch[hp.text_key]
            padding = batch.get(f"{hp.text_key}_padding_mask")
        if hp.pooling == "pair":
            # Both images with the same sentence, stacked on the batch axis ([B3] NLVR2 head).
            image = torch.cat([image, batch[hp.image2_key]], dim=0)
            text = torch.cat([text, text], dim=0)
            padding = torch.cat([padding, padding], dim=0) if padding is not None else None
        out = self.backbone(image=image, text=text, text_padding_mask=padding)
        return self.head(out.features, out.num_vision_tokens), out

    def tag_weight_at(self, step: int) -> float:
        """The tag loss weight at optimizer step ``step`` (constant, or the linear decay of ``tag_decay_steps``)."""
        weight = float(self.hparams.tag_weight)
        decay = self.hparams.tag_decay_steps
        if decay is None:
            return weight
        return weight * max(0.0, 1.0 - step / decay)

    def task_weight_at(self, step: int) -> float:
        """The task loss weight at optimizer step ``step``: 0 before ``task_start_step``, 1 from it on."""
        return 0.0 if step < self.hparams.task_start_step else 1.0

    def _tag_loss(self, out: BackboneOutput, tags_BT: torch.Tensor | None) -> torch.Tensor:
        """BCE of the max over patches of per-token tag logits against the mined image tags (module docstring)."""
        assert self.tag_head is not None and out.embeddings is not None
        n = len(self.tag_words)
        if tags_BT is None:
            raise ValueError(
                "ClassificationTask: tag_weight > 0 but the training batch has no 'tags': set the data module's "
                f"tag_words to the model's tag_words ({n} words)"
            )
        if tags_BT.shape[-1] != n:
            raise ValueError(
                f"ClassificationTask: the batch has {tags_BT.shape[-1]} tags per sample, model.tag_words {n}: "
                "data.tag_words and model.tag_words must name the same words"
            )
        patches_BPD = out.embeddings[:, 1 : out.num_vision_tokens]  # drop the image CLS
        if self.hparams.tag_channels is not None:
            patches_BPD = patches_BPD[..., : self.hparams.tag_channels]
        logits_BT = self.tag_head(patches_BPD).float().amax(dim=1)
        return F.binary_cross_entropy_with_logits(logits_BT, tags_BT.to(logits_BT.dtype))

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.hparams.loss == "soft_bce":
            if labels.shape != logits.shape:
                raise ValueError(
                    f"ClassificationTask(loss='soft_bce'): labels {tuple(labels.shape)} must match logits "
                    f"{tuple(logits.shape)} (soft scores over the answer vocabulary)"
                )
            # BEiT-3/ViLT: mean BCE times the number of labels (= sum over answers, mean over the batch).
            return F.binary_cross_entropy_with_logits(logits.float(), labels.float()) * labels.shape[1]
        if labels.dim() == 2:  # soft targets (mixup/cutmix): soft cross-entropy
            return torch.sum(-labels.float() * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
        return F.cross_entropy(logits.float(), labels.long(), label_smoothing=self.hparams.label_smoothing)

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        if not batch:  # every image of the batch was unreadable (reported by the dataset): skip the step
            return None
        hp = self.hparams
        labels = batch[hp.label_key]
        if self.mixup_fn is not None:
            if labels.dim() != 1:
                raise ValueError("ClassificationTask: mixup expects hard labels (B,) from the data module")
            batch = dict(batch)
            batch[hp.image_key], labels = self.mixup_fn(batch[hp.image_key], labels)
        logits, out = self._logits_and_output(batch)
        task_loss = self._loss(logits, labels)
        aux = out.aux_loss if out.aux_loss is not None else logits.new_zeros(())
        loss = self.task_weight_at(self.global_step) * task_loss + aux
        bs = logits.shape[0]
        if self.tag_head is not None:
            # computed at weight 0 as well, so that every parameter takes part in each step (DDP)
            tag_loss = self._tag_loss(out, batch.get("tags"))
            loss = loss + self.tag_weight_at(self.global_step) * tag_loss
            self.log("train/tag_loss", tag_loss, batch_size=bs)
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        self.log("train/task_loss", task_loss, batch_size=bs)
        self.log("train/aux_loss", aux, batch_size=bs)
        return loss

    def _eval_step(self, batch: dict[str, Any], stage: str) -> torch.Tensor:
        hp = self.hparams
        logits = self(batch)
        labels = batch.get(hp.label_key)
        bs = logits.shape[0]
        if labels is None:
            return logits
        self.log(f"{stage}/loss", self._loss(logits, labels), batch_size=bs, sync_dist=True)
        pred = logits.argmax(dim=-1)
        if hp.loss == "soft_bce":
            score = self.val_score if stage == "val" else self.test_score
            score.update(100.0 * labels.float().gather(1, pred[:, None]).squeeze(1))
            self.log(f"{stage}/vqa_score", score, batch_size=bs, prog_bar=stage == "val")
        else:
            hard = labels.argmax(dim=-1) if labels.dim() == 2 else labels
            accs = self.val_acc if stage == "val" else self.test_acc
            for k in self.top_k:
                name = "acc" if k == 1 else f"acc_top{k}"
                accs[f"top{k}"].update(logits, hard)
                self.log(f"{stage}/{name}", accs[f"top{k}"], batch_size=bs, prog_bar=k == 1 and stage == "val")
            if hp.pooling == "pair" and hp.id_key and hp.id_key in batch:
                correct = (pred == hard).tolist()
                self._eval_rows.extend(zip([str(i) for i in batch[hp.id_key]], correct))
        return logits

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        if batch:
            self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        if batch:
            logits = self._eval_step(batch, "test")
            self._pred_rows.extend(self._rows(batch, logits))

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> list[Any]:
        if not batch:
            return []
        rows = self._rows(batch, self(batch))
        self._pred_rows.extend(rows)
        return rows

    def _log_consistency(self, stage: str) -> None:
        rows = gather_objects(self._eval_rows)
        self._eval_rows = []
        if not rows:
            return
        ok: dict[str, bool] = {}
        for ident, correct in rows:
            key = sentence_key(ident)
            ok[key] = ok.get(key, True) and bool(correct)
        # A fraction like the torchmetrics accuracies logged beside it (the official script's scale).
        self.log(f"{stage}/consistency", sum(ok.values()) / len(ok), rank_zero_only=True)

    def on_validation_epoch_start(self) -> None:
        self._eval_rows = []

    def on_validation_epoch_end(self) -> None:
        self._log_consistency("val")

    def on_test_epoch_start(self) -> None:
        self._eval_rows, self._pred_rows = [], []

    def on_test_epoch_end(self) -> None:
        self._log_consistency("test")
        self._write_results()

    def on_predict_epoch_start(self) -> None:
        self._pred_rows = []

    def on_predict_epoch_end(self) -> None:
        self._write_results()

    # ------------------------------------------------------------------ results files
    def _rows(self, batch: dict[str, Any], logits: torch.Tensor) -> list[Any]:
        hp = self.hparams
        pred = logits.argmax(dim=-1).tolist()
        ids = batch.get(hp.id_key) if hp.id_key else None
        if ids is None:
            if hp.predict_format != "labels":
                raise ValueError(
                    f"ClassificationTask(predict_format={hp.predict_format!r}): batch has no id key {hp.id_key!r}"
                )
            ids = [None] * len(pred)
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        if hp.predict_format == "vqa":
            if self.label_names is None:
                raise ValueError("ClassificationTask(predict_format='vqa'): no answer vocabulary (label_vocab)")
            return [{"question_id": int(q), "answer": self.label_names[p]} for q, p in zip(ids, pred)]
        if hp.predict_format == "nlvr2":
            return [(str(i), "True" if p == 1 else "False") for i, p in zip(ids, pred)]
        names = self.label_names
        return [{"id": i, "label": p, **({"name": names[p]} if names else {})} for i, p in zip(ids, pred)]

    def results_path(self) -> Path:
        """Folder of the results files (``results_dir`` or ``<default_root_dir>/results``)."""
        if self.hparams.results_dir:
            return Path(self.hparams.results_dir)
        root = self.trainer.default_root_dir if self._trainer is not None else "."
        return Path(root) / "results"

    def _write_results(self) -> None:
        rows = gather_objects(self._pred_rows)
        self._pred_rows = []
        if not rows or (self._trainer is not None and not self.trainer.is_global_zero):
            return
        out = self.results_path()
        out.mkdir(parents=True, exist_ok=True)
        fmt = self.hparams.predict_format
        if fmt == "nlvr2":
            write_predictions_csv(out / "nlvr2_predictions.csv", sorted(set(rows)))
            return
        if fmt == "vqa":
            seen: dict[int, dict[str, Any]] = {r["question_id"]: r for r in rows}  # DDP padding repeats some
            rows = [seen[q] for q in sorted(seen)]
            save_answer_vocab(out / "answer_vocab.json", self.label_names or [], {"source": "checkpoint"})
        atomic_write_json(out / ("vqa_results.json" if fmt == "vqa" else "predictions.json"), rows, indent=None)

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.label_names is not None:
            checkpoint["label_names"] = list(self.label_names)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        names = checkpoint.get("label_names")
        if names is not None:
            if len(names) != self.num_classes:
                raise ValueError(
                    f"ClassificationTask: checkpoint has {len(names)} label names, the head has {self.num_classes}"
                )
            self.label_names = list(names)

    def setup(self, stage: str) -> None:
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if self.tag_head is not None and stage == "fit":
            data_words = getattr(dm, "tag_words", None)
            if dm is not None and (not data_words or CaptionTags(data_words).words != self.tag_words):
                raise ValueError(
                    f"ClassificationTask: model.tag_words {self.tag_words} but the data module's tag_words are "
                    f"{data_words}: set both to the same words"
                )
        names = getattr(dm, "label_names", None)
        if names is not None and self.label_names is not None and list(names) != list(self.label_names):
            raise ValueError(
                "ClassificationTask: the data module's answer vocabulary differs from the model's "
                f"({len(names)} vs {len(self.label_names)} answers); use the same label_vocab file for both"
            )
