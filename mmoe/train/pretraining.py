"""BEiT-3 masked multimodal pretraining on one shared Multiway (MH-)MoE backbone ([B3] sec. 2.2).

BEiT-3 pretrains with a single objective, masked data modeling, on three kinds of data at once: masked language
modeling (MLM) on monomodal text and on the text of image-text pairs, and masked image modeling (MIM) on monomodal
images and on the images of pairs. One backbone serves every stream; each stream is a separate forward pass (its
own modality mix), and the losses are summed. [MH1] sec. 4.3 (Table 4) pretrains Dense / X-MoE / MH-MoE this way
and reports masked multimodal perplexity; nobody released the code, so this is our reading of the papers.

Image targets (``image_target``):

- ``"pixels"`` (default): the per-patch normalized pixels of the masked patches (MAE-style ``norm_pix``), MSE loss.
  Needs nothing outside this project. ``pixel_norm_eps`` is the variance added before the division: MAE's 1e-6
  makes a flat patch's sensor or JPEG noise a unit-variance target that nothing can predict, which is harmless on
  photographs (few flat patches) but not on images that are mostly flat background, where such patches are most
  of the loss and the patches with edges, which carry the shapes, a small part of it (docs/results/learning.md).
  BEiT-3 itself predicts BEiT v2 VQ-KD codes, which need that tokenizer.
- ``"codebook"``: discrete codes from a k-means codebook over normalized patch pixels (``mmoe.data.codebook``,
  built by ``mmoe-codebook``); cross-entropy over codes, so image perplexity ``exp(CE)`` can be reported
  next to text perplexity, as [MH1] Table 4's "masked multimodal perplexity".
- ``"vqkd"``: BEiT-3's own targets ([B3] sec. 2.2): the codes of the BEiT v2 VQ-KD visual tokenizer
  (``mmoe.model.vqkd``, the released file given as ``vqkd_checkpoint``), computed on the fly from each image or pair
  batch at the tokenizer's input size and normalization; cross-entropy over its 8192 codes, image perplexity
  logged as for the codebook. The tokenizer's code grid must be the backbone's patch grid (one code per patch).

Dimension legend: B batch, L text length, P patches per image, D width, V text vocabulary, K codebook size,
M masked positions (flattened over the batch), C pixel values per patch (= patch_size^2 * channels).

Batches (docs/interfaces.md section 4): ``{"image": sub, "text": sub, "pair": sub}``, any subset.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from mmoe.data.codebook import NORM_PIX_EPS, assign_codes, load_codebook, normalize_patches, patchify
from mmoe.data.grounded import CaptionTags, resolve_grounded_words
from mmoe.model.contrastive import (
    ContrastiveHead,
    RetrievalPooling,
    check_pooling,
    contrastive_loss,
    pool_embedding,
    sample_hard_negatives,
)
from mmoe.model.heads import ClassificationHead
from mmoe.model.vqkd import VQKDTokenizer, load_vqkd
from mmoe.moe.stats import DEFAULT_ACTIVATION_THRESHOLD, RoutingTally, log_metrics, summarize
from mmoe.train.base import TaskModule
from mmoe.train.optim import OptimConfig

__all__ = [
    "MaskedPretraining",
    "bag_of_words_loss",
    "routing_metrics",
    "tally_routing",
    "routing_tally_metrics",
    "STREAMS",
]

STREAMS = ("image", "text", "pair")


# ---------------------------------------------------------------------------------------------------------- routing
def routing_metrics(
    records_by_layer: Mapping[str, list[Any]], *, threshold: float | None = None, per_expert: bool = False
) -> dict[str, float]:
    """Per-layer routing statistics over one or more forward passes ([MH1] sec. 4.4 / Fig. 1).

    ``records_by_layer`` maps a layer key (``layer3``, ``layer3.vision``) to the RoutingRecords of that layer from
    several streams, pooled per layer by :func:`mmoe.moe.stats.summarize`; the keys are those of
    :func:`mmoe.moe.stats.log_metrics` (``None`` threshold: the stats' default).
    """
    th = DEFAULT_ACTIVATION_THRESHOLD if threshold is None else threshold
    pooled = {layer: summarize(records, threshold=th) for layer, records in records_by_layer.items() if records}
    return log_metrics(pooled, per_expert=per_expert)


def tally_routing(records_by_layer: Mapping[str, list[Any]], into: dict[str, Any] | None = None) -> dict[str, Any]:
    """Fold RoutingRecords into per-layer :class:`mmoe.moe.stats.RoutingTally` s (``into``, updated and returned).

    Validation keeps these instead of the records: the records of one batch hold ids and gates of every sub-token
    (gigabytes per thousand batches at base size), the tallies hold a few integers per expert.
    """
    tallies: dict[str, Any] = {} if into is None else into
    for layer, records in records_by_layer.items():
        for record in records:
            tallies.setdefault(layer, RoutingTally()).add(record)
    return tallies


def routing_tally_metrics(
    tallies: Mapping[str, RoutingTally], *, threshold: float | None = None, per_expert: bool = False
) -> dict[str, float]:
    """The metrics of :func:`routing_metrics` from per-layer tallies (the same values as from the records)."""
    th = DEFAULT_ACTIVATION_THRESHOLD if threshold is None else threshold
    done = {layer: tally.metrics(threshold=th) for layer, tally in tallies.items() if tally.counts is not None}
    return log_metrics(done, per_expert=per_expert)


def bag_of_words_loss(
    logits_BV: torch.Tensor, text_BL: torch.Tensor, padding_BL: torch.Tensor | None = None
) -> torch.Tensor:
    """Cross-entropy of a softmax over the vocabulary against each text's distinct words, uniform over them.

    The first token (bos) and the last real one (eos) of every row are left out, and so is padding (the rows are
    ``[bos] + pieces + [eos]``, ``mmoe.data.tokenizer``); a row with no word is left out of the mean. Joulin et
    al. 2016 (sec. 3.1) found this multi-class form as good as one binary loss per word, and it starts at
    ``log V`` like masked-word prediction, so the two weigh alike in a sum.
    """
    b, length = text_BL.shape
    real_BL = ~padding_BL if padding_BL is not None else torch.ones_like(text_BL, dtype=torch.bool)
    n_B = real_BL.sum(dim=1)
    pos_BL = torch.arange(length, device=text_BL.device).expand(b, length)
    word_BL = real_BL & (pos_BL > 0) & (pos_BL < (n_B - 1)[:, None])
    target_BV = torch.zeros_like(logits_BV).scatter_add_(1, text_BL, word_BL.to(logits_BV.dtype))
    target_BV = target_BV.clamp(max=1.0)
    words_B = target_BV.sum(dim=1)
    has_B = words_B > 0
    if not bool(has_B.any()):
        return logits_BV.sum() * 0.0
    target_BV = target_BV[has_B] / words_B[has_B, None]
    return -(target_BV * F.log_softmax(logits_BV[has_B], dim=-1)).sum(dim=1).mean()


# ---------------------------------------------------------------------------------------------------------- module
class MaskedPretraining(TaskModule):
    """Masked data modeling (MLM + MIM) over image, text and pair streams on one backbone ([B3] sec. 2.2).

    Args:
        backbone: registered model name (``configs/model/*.yaml``) or a model YAML path.
        backbone_overrides: fields of ``MultiwayConfig`` to override (``moe: {...}`` merges into the MoE block),
            e.g. ``{"drop_path": 0.1, "moe": {"z_loss_weight": 0.001}}``.
        init_from: an mmoe model file or one of our Lightning checkpoints to start the backbone from (position
            tables are resampled to this backbone's ``img_size``, as in fine-tuning).
        optim: AdamW + warm-up/cosine settings (:class:`mmoe.train.optim.OptimConfig`).
        image_target: ``"pixels"`` (normalized pixels, MSE), ``"codebook"`` (k-means codes, cross-entropy) or
            ``"vqkd"`` (VQ-KD tokenizer codes, cross-entropy; BEiT-3's targets).
        codebook: path of the codebook file (required for ``image_target="codebook"``).
        vqkd_checkpoint: path of the VQ-KD tokenizer file (required for ``image_target="vqkd"``; the released
            ``vqkd_encoder_base_decoder_3x768x12_clip``, datasets/vqkd/README.md).
        vqkd_config: fields of :class:`mmoe.model.vqkd.VQKDConfig` replacing the released base tokenizer's (another
            tokenizer size, e.g. a tiny one in tests); ``None`` = the released base.
        mlm_weight / mim_weight: weights of the text and image losses in the sum.
        aux_loss_scale: multiplies the backbone's aux loss, which already carries the MoE config's per-layer
            weights (load balance 0.01, z-loss ``moe.z_loss_weight``) summed over layers ([MH1] sec. 3.3).
        on_nonfinite: ``"raise"`` stops with an error naming the step and stream; ``"skip"`` skips the batch
            (single-process only: a skipped step on one DDP rank would desynchronize the gradient all-reduce).
        activation_threshold: load share above which an expert counts as activated (``None`` = mmoe.moe.stats's
            default); used for the ``moe/*/activation_ratio`` metrics.
        log_routing_every: compute training routing statistics every this many steps (0 = never).
        eval_grounding: at validation, also score pair-text MLM against mismatched images and log
            ``val/ppl_mlm_pair_mismatched`` and ``val/grounding_gain`` (how much the right image helps the text).
        itc_weight: weight of an image-text contrastive loss on the pair stream (0 = off, BEiT-3's masked data
            modeling alone): the unmasked image and text each alone through the backbone, CLS -> ``itc_head``
            (``mmoe.model.contrastive``), InfoNCE both ways over the pairs of all ranks ([VLMo] sec. 2.3). Logged as
            ``loss_itc_pair``; its projections are what zero-shot retrieval (``RetrievalTask``) starts from.
        itm_weight: weight of image-text matching on the pair stream (0 = off; needs ``itc_weight > 0``): each
            pair, its image with a hard negative text and its text with a hard negative image (drawn from the ITC
            similarities of the rank's batch) fused through the backbone, image CLS -> 2-way ``itm_head``
            ([VLMo] sec. 2.3, [ALBEF] sec. 3.2). Logged as ``loss_itm_pair``.
        itc_pooling: what ITC's projections read, as ``RetrievalTask(pooling=...)``: ``"cls"`` (BEiT-3) or
            ``"cls_max"`` (CLS + the max over the other tokens, ``mmoe.model.contrastive.pool_embedding``); zero-shot
            retrieval from this run must use the same.
        bow_weight: weight of a bag-of-words loss on the pair stream (0 = off): the unmasked pair image alone
            through the backbone, its CLS plus the max over its patch tokens -> ``bow_head`` -> a softmax over the
            vocabulary, cross-entropy against the caption's distinct words (bos, eos and padding left out), as
            Joulin et al. 2016 (sec. 3) learn visual features from the words that come with images. Why: a max
            over the patch tokens gives each object's token a direct path to the words that name it, with no
            attention to learn first, where masked-word prediction reads the object through attention that starts
            uniform (docs/results/learning.md). Logged as ``loss_bow_pair``; shares the image pass with ITC.
        tag_weight: weight of an object-tag loss on the pair stream (0 = off; needs ``tag_words``): the unmasked
            pair image alone through the backbone, CLS + the max over its patch tokens -> ``tag_head`` -> one binary
            cross-entropy per tag word against the data's ``tags`` (which of ``tag_words`` any of the pair's
            captions names; ``PretrainDataModule(pair_tag_words=...)``). Why: colour, count and position words are
            read off an image long before object words, and in a loss over all words they crowd the object words
            out ([Pezeshki21]'s gradient starvation; ``mmoe.data.grounded.CaptionTags``). On the synthetic worlds
            this loss alone teaches the tiny backbone its shapes within a few hundred steps
            (docs/results/learning.md). Logged as ``loss_tag_pair``.
        tag_words: the tag words, the same value as the data's ``pair_tag_words`` (its forms); the head has one
            output per word, so a run and its data must agree on them (checked in ``setup``, before the first step).
        pixel_norm_eps: variance floor of the per-patch normalization of ``image_target="pixels"`` (in the units
            of the normalized image; MAE: 1e-6). A patch whose pixel variance is well below it is a flat patch and
            its target shrinks towards 0 instead of becoming unit-variance noise (module docstring).
    """

    def __init__(
        self,
        backbone: str = "tiny_mhmoe",
        backbone_overrides: dict[str, Any] | None = None,
        init_from: str | None = None,
        optim: OptimConfig | None = None,
        image_target: Literal["pixels", "codebook", "vqkd"] = "pixels",
        codebook: str | None = None,
        vqkd_checkpoint: str | None = None,
        vqkd_config: dict[str, Any] | None = None,
        mlm_weight: float = 1.0,
        mim_weight: float = 1.0,
        aux_loss_scale: float = 1.0,
        on_nonfinite: Literal["raise", "skip"] = "raise",
        activation_threshold: float | None = None,
        log_routing_every: int = 1,
        eval_grounding: bool = True,
        itc_weight: float = 0.0,
        itm_weight: float = 0.0,
        itc_pooling: RetrievalPooling = "cls",
        pixel_norm_eps: float = NORM_PIX_EPS,
        bow_weight: float = 0.0,
        tag_weight: float = 0.0,
        tag_words: str | list[str] | None = None,
    ) -> None:
        check_pooling("MaskedPretraining", itc_pooling)
        if image_target not in ("pixels", "codebook", "vqkd"):
            raise ValueError(
                f"MaskedPretraining: image_target={image_target!r}, expected 'pixels', 'codebook' or 'vqkd'"
            )
        if image_target == "codebook" and not codebook:
            raise ValueError("MaskedPretraining: image_target='codebook' needs codebook=<path of a codebook file>")
        if image_target == "vqkd" and not vqkd_checkpoint:
            raise ValueError(
                "MaskedPretraining: image_target='vqkd' needs vqkd_checkpoint=<path of the VQ-KD tokenizer file>"
            )
        if on_nonfinite not in ("raise", "skip"):
            raise ValueError(f"MaskedPretraining: on_nonfinite={on_nonfinite!r}, expected 'raise' or 'skip'")
        weights = {"mlm_weight": mlm_weight, "mim_weight": mim_weight, "aux_loss_scale": aux_loss_scale}
        for name, value in {
            **weights,
            "itc_weight": itc_weight,
            "itm_weight": itm_weight,
            "bow_weight": bow_weight,
            "tag_weight": tag_weight,
        }.items():
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"MaskedPretraining: {name}={value!r} must be a finite number >= 0")
        if itm_weight > 0 and not itc_weight > 0:
            raise ValueError(
                "MaskedPretraining: itm_weight > 0 needs itc_weight > 0 (ITM's hard negatives come from ITC)"
            )
        self.tag_words = resolve_grounded_words(tag_words, key="MaskedPretraining: tag_words")
        if tag_weight > 0 and not self.tag_words:
            raise ValueError(
                "MaskedPretraining: tag_weight > 0 needs tag_words (the data's pair_tag_words, e.g. "
                "'default#coco_categories' or 'data/shapes/world.json#shapes')"
            )
        if not (math.isfinite(pixel_norm_eps) and pixel_norm_eps > 0):
            raise ValueError(f"MaskedPretraining: pixel_norm_eps={pixel_norm_eps!r} must be a finite number > 0")
        if pixel_norm_eps != NORM_PIX_EPS and image_target != "pixels":
            raise ValueError(
                f"MaskedPretraining: pixel_norm_eps applies to image_target='pixels' only, got image_target="
                f"{image_target!r} (a codebook's patches are normalized as it was built)"
            )
        if log_routing_every < 0:
            raise ValueError(f"MaskedPretraining: log_routing_every={log_routing_every} must be >= 0")
        super().__init__(optim=optim)
        self.image_target = image_target
        self.mlm_weight, self.mim_weight, self.aux_loss_scale = mlm_weight, mim_weight, aux_loss_scale
        self.on_nonfinite = on_nonfinite
        self.activation_threshold = activation_threshold
        self.log_routing_every = log_routing_every
        self.eval_grounding = eval_grounding
        self.pixel_norm_eps = float(pixel_norm_eps)

        self.init_backbone(backbone, backbone_overrides, init_from, fine_tune=False)
        cfg = self.backbone.config
        self.patch_size = cfg.patch_size
        dim = cfg.dim
        self.mlm_head = nn.Linear(dim, cfg.vocab_size)
        self.vqkd: VQKDTokenizer | None = None
        if image_target == "vqkd":
            self.centroids = None
            self.vqkd = self._load_vqkd(vqkd_checkpoint, vqkd_config)  # type: ignore[arg-type]
            self.mim_head = nn.Linear(dim, self.vqkd.num_codes)
        elif image_target == "codebook":
            centroids = load_codebook(codebook, patch_size=cfg.patch_size)  # type: ignore[arg-type]
            expected = cfg.patch_size * cfg.patch_size * cfg.in_chans
            if centroids.shape[1] != expected:
                raise ValueError(
                    f"MaskedPretraining: codebook {codebook} has vectors of {centroids.shape[1]} values, the "
                    f"backbone's patches have {expected}"
                )
            self.register_buffer("centroids", centroids, persistent=True)
            self.mim_head = nn.Linear(dim, centroids.shape[0])
        else:
            self.centroids = None
            self.mim_head = nn.Linear(dim, cfg.patch_size * cfg.patch_size * cfg.in_chans)
        for head in (self.mlm_head, self.mim_head):
            nn.init.trunc_normal_(head.weight, std=cfg.init_std)
            nn.init.zeros_(head.bias)
        self.itc_weight, self.itm_weight, self.itc_pooling = itc_weight, itm_weight, itc_pooling
        self.itc_head = ContrastiveHead(dim, init_std=cfg.init_std) if itc_weight > 0 else None
        self.itm_head = ClassificationHead(dim, 2, pooling="image_cls") if itm_weight > 0 else None
        self.bow_weight = bow_weight
        self.bow_head: nn.Linear | None = None
        if bow_weight > 0:
            self.bow_head = nn.Linear(dim, cfg.vocab_size)
            nn.init.trunc_normal_(self.bow_head.weight, std=cfg.init_std)
            nn.init.zeros_(self.bow_head.bias)
        self.tag_weight = tag_weight
        self.tag_head: nn.Linear | None = None
        if tag_weight > 0:
            self.tag_head = nn.Linear(dim, len(self.tag_words))
            nn.init.trunc_normal_(self.tag_head.weight, std=cfg.init_std)
            nn.init.zeros_(self.tag_head.bias)
        self._val_routing: dict[str, Any] = {}  # layer -> RoutingTally over the validation epoch
        self._val_sums: dict[str, list[float]] = {}
        self._last_counts: dict[str, int] = {}

    # ------------------------------------------------------------------ VQ-KD targets
    def _load_vqkd(self, path: str, overrides: dict[str, Any] | None) -> VQKDTokenizer:
        """The frozen tokenizer, refused unless its code grid is the backbone's patch grid (one code per patch)."""
        tokenizer = load_vqkd(path, overrides)
        cfg = self.backbone.config
        grid = (cfg.img_size // cfg.patch_size,) * 2
        if tokenizer.grid_size != grid:
            t = tokenizer.config
            raise ValueError(
                f"MaskedPretraining: the VQ-KD tokenizer {path} gives a {t.grid_size[0]}x{t.grid_size[1]} code grid "
                f"({t.img_size} px / patch {t.patch_size}), the backbone a {grid[0]}x{grid[1]} patch grid "
                f"({cfg.img_size} px / patch {cfg.patch_size}); they must match (BEiT-3: 224 / 16 = 14 for both)"
            )
        return tokenizer

    def _vqkd_codes(self, image_B3HW: torch.Tensor, mask_BP: torch.Tensor) -> torch.Tensor:
        """Codes (M,) of the masked patches; the batch is in the backbone's normalization and size."""
        assert self.vqkd is not None
        codes_BP = self.vqkd.codes_from(
            image_B3HW, mean=self.backbone.config.image_mean, std=self.backbone.config.image_std
        )
        if codes_BP.shape != mask_BP.shape:
            gh, gw = image_B3HW.shape[-2] // self.patch_size, image_B3HW.shape[-1] // self.patch_size
            raise ValueError(
                f"MaskedPretraining: this image batch has a {gh}x{gw} patch grid ({tuple(image_B3HW.shape[-2:])} px), "
                f"the VQ-KD tokenizer gives {self.vqkd.grid_size[0]}x{self.vqkd.grid_size[1]} codes per image"
            )
        return codes_BP[mask_BP]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        # The frozen tokenizer is rebuilt from vqkd_checkpoint (a hyper-parameter): 87M values
        # (base) not written into every checkpoint.
        if self.vqkd is not None and isinstance(checkpoint.get("state_dict"), dict):
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("vqkd.")}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if self.vqkd is not None and isinstance(checkpoint.get("state_dict"), dict):
            # Strict loading then finds the tokenizer's tensors: those just loaded from vqkd_checkpoint.
            checkpoint["state_dict"].update({f"vqkd.{k}": v for k, v in self.vqkd.state_dict().items()})

    # ------------------------------------------------------------------ losses
    def _mlm(self, text_feats_BLD: torch.Tensor, labels_BL: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Cross-entropy on masked text positions only ([B3] sec. 2.2); returns (loss, number of targets)."""
        sel = labels_BL != -100
        n = int(sel.sum())
        if n == 0:
            return text_feats_BLD.sum() * 0.0, 0
        logits_MV = self.mlm_head(text_feats_BLD[sel]).float()
        return F.cross_entropy(logits_MV, labels_BL[sel]), n

    def _mim(
        self, patch_feats_BPD: torch.Tensor, image_B3HW: torch.Tensor, mask_BP: torch.Tensor
    ) -> tuple[torch.Tensor, int]:
        """Loss on masked patches only: MSE to normalized pixels, or CE to codebook codes (module docstring)."""
        n = int(mask_BP.sum())
        if n == 0:
            return patch_feats_BPD.sum() * 0.0, 0
        if self.vqkd is not None:
            return F.cross_entropy(
                self.mim_head(patch_feats_BPD[mask_BP]).float(), self._vqkd_codes(image_B3HW, mask_BP)
            ), n
        patches_MC = patchify(image_B3HW, self.patch_size)[mask_BP]
        pred = self.mim_head(patch_feats_BPD[mask_BP]).float()
        if self.centroids is None:
            return F.mse_loss(pred, normalize_patches(patches_MC, eps=self.pixel_norm_eps)), n
        codes_M = assign_codes(normalize_patches(patches_MC), self.centroids)
        return F.cross_entropy(pred, codes_M), n

    def stream_losses(self, batch: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict]:
        """Forward every stream present; returns ({"mlm_text": ..., "mim_image": ..., ...}, aux_loss, routing).

        ``routing`` maps each MoE layer key to the list of its RoutingRecords (one per stream).
        """
        losses: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}
        routing: dict[str, list[Any]] = {}
        aux = None
        present = [s for s in STREAMS if s in batch and batch[s] is not None]
        unknown = sorted(set(batch) - set(STREAMS))
        if unknown or not present:
            raise KeyError(
                f"MaskedPretraining: batch keys {sorted(batch)}: expected a dict of streams among {list(STREAMS)} "
                "(docs/interfaces.md section 4)"
            )
        for stream in present:
            sub = batch[stream]
            image = sub.get("image") if stream != "text" else None
            text = sub.get("text") if stream != "image" else None
            if (stream != "text" and image is None) or (stream != "image" and text is None):
                raise KeyError(f"MaskedPretraining: stream {stream!r} lacks its image/text tensors; keys {sorted(sub)}")
            image_mask = sub.get("image_mask") if image is not None else None
            out = self.backbone(
                image=image,
                text=text,
                text_padding_mask=sub.get("text_padding_mask") if text is not None else None,
                image_mask=image_mask,
            )
            nv = out.num_vision_tokens
            if image is not None and image_mask is not None:
                losses[f"mim_{stream}"], counts[f"mim_{stream}"] = self._mim(
                    out.features[:, 1:nv], image, image_mask.bool()
                )
            if text is not None and sub.get("text_labels") is not None:
                losses[f"mlm_{stream}"], counts[f"mlm_{stream}"] = self._mlm(out.features[:, nv:], sub["text_labels"])
            if out.aux_loss is not None:
                aux = out.aux_loss if aux is None else aux + out.aux_loss
            for key, record in out.routing.items():
                routing.setdefault(key, []).append(record)
        if (self.itc_head is not None or self.bow_head is not None or self.tag_head is not None) and "pair" in present:
            extra, extra_aux = self._pair_image_losses(batch["pair"])
            losses.update(extra)
            counts.update({name: int(batch["pair"]["image"].shape[0]) for name in extra})
            aux = extra_aux if aux is None else aux + extra_aux
        if aux is None:
            aux = torch.zeros((), device=self.device)
        self._last_counts = counts
        return losses, aux, routing

    def _pair_image_losses(self, sub: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """ITC (and ITM), bag-of-words and tag losses of a pair sub-batch on its unmasked image and text; returns
        (losses, aux loss).

        The masked text is restored from ``text_labels``. The extra passes add their MoE aux loss, not their
        routing records: the routing statistics stay those of the masked-modeling streams, comparable across runs.
        """
        image, text, pad = sub["image"], sub["text"], sub.get("text_padding_mask")
        labels = sub.get("text_labels")
        clean = torch.where(labels != -100, labels, text) if labels is not None else text
        image_out = self.backbone(image=image)
        losses: dict[str, torch.Tensor] = {}
        if self.bow_head is not None:
            logits_BV = self.bow_head(pool_embedding(image_out.features, "cls_max")).float()
            losses["bow_pair"] = bag_of_words_loss(logits_BV, clean, pad)
        if self.tag_head is not None:
            losses["tag_pair"] = self._tag_loss(pool_embedding(image_out.features, "cls_max"), sub.get("tags"))
        if self.itc_head is None:
            aux = image_out.aux_loss if image_out.aux_loss is not None else image.new_zeros(())
            return losses, aux
        text_out = self.backbone(text=clean, text_padding_mask=pad)
        image_BE = self.itc_head.embed_image(pool_embedding(image_out.features, self.itc_pooling))  # type: ignore[union-attr]
        text_BE = self.itc_head.embed_text(pool_embedding(text_out.features, self.itc_pooling, pad))  # type: ignore[union-attr]
        itc, _, _ = contrastive_loss(image_BE, text_BE, self.itc_head.scale())  # type: ignore[union-attr]
        losses["itc_pair"] = itc
        outs = [image_out, text_out]
        b = image.shape[0]
        if self.itm_head is not None and b < 2:
            raise ValueError(
                f"MaskedPretraining: itm_weight > 0 needs at least 2 pair samples per batch and rank (got {b}): "
                "the hard negatives are the batch's other pairs; raise data.batch_size or data.pair_ratio"
            )
        if self.itm_head is not None:
            # drawn from a generator seeded by the batch and the step: reproducible on resume, global RNG untouched
            seed = (int(clean.sum()) * 1_000_003 + self.global_step) % (1 << 62)
            gen = torch.Generator(device=image.device).manual_seed(seed)
            neg_text, neg_image = sample_hard_negatives((image_BE @ text_BE.t()).detach(), generator=gen)
            fused = self.backbone(
                image=torch.cat([image, image, image[neg_image]]),
                text=torch.cat([clean, clean[neg_text], clean]),
                text_padding_mask=torch.cat([pad, pad[neg_text], pad]) if pad is not None else None,
            )
            logits_3B2 = self.itm_head(fused.features, fused.num_vision_tokens).float()
            target = torch.cat([torch.ones(b), torch.zeros(2 * b)]).long().to(image.device)
            losses["itm_pair"] = F.cross_entropy(logits_3B2, target)
            outs.append(fused)
        aux = sum((o.aux_loss for o in outs if o.aux_loss is not None), image_BE.new_zeros(()))
        return losses, aux

    def setup(self, stage: str) -> None:
        """Refuse, before the first step, a data module whose pair tags are other words than ``tag_words``."""
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if self.tag_head is None or dm is None or not hasattr(dm, "caption_tags"):
            return  # no tag loss, or data of another kind (its batches are checked in _tag_loss)
        tags = dm.caption_tags
        if tags is None or tags.words != CaptionTags(self.tag_words).words:
            raise ValueError(
                f"MaskedPretraining: model.tag_words {self.tag_words} but data.pair_tag_words gives "
                f"{None if tags is None else tags.words}: set both to the same words"
            )

    def _tag_loss(self, pooled_BD: torch.Tensor, tags_BT: torch.Tensor | None) -> torch.Tensor:
        """Mean binary cross-entropy of ``tag_head`` against the data's multi-hot ``tags`` (B, T)."""
        assert self.tag_head is not None
        n = len(self.tag_words)
        if tags_BT is None:
            raise ValueError(
                "MaskedPretraining: tag_weight > 0 but the pair batch has no 'tags': set the data's pair_tag_words "
                f"to the model's tag_words ({n} words)"
            )
        if tags_BT.shape[-1] != n:
            raise ValueError(
                f"MaskedPretraining: the pair batch has {tags_BT.shape[-1]} tags per sample, the model's tag_words "
                f"{n}: data.pair_tag_words and model.tag_words must name the same words"
            )
        logits_BT = self.tag_head(pooled_BD).float()
        return F.binary_cross_entropy_with_logits(logits_BT, tags_BT.to(logits_BT.dtype))

    def _has_perplexity(self, name: str) -> bool:
        """Cross-entropy losses over tokens or codes have a perplexity; MSE, ITC and ITM do not."""
        return name.startswith("mlm") or (name.startswith("mim") and self.image_target != "pixels")

    def _total(self, losses: dict[str, torch.Tensor], aux: torch.Tensor) -> torch.Tensor:
        total = aux.float() * self.aux_loss_scale
        weight = {
            "mlm": self.mlm_weight,
            "mim": self.mim_weight,
            "itc": self.itc_weight,
            "itm": self.itm_weight,
            "bow": self.bow_weight,
            "tag": self.tag_weight,
        }
        for name, value in losses.items():
            total = total + value * weight[name.split("_", 1)[0]]
        return total

    @staticmethod
    def _batch_size(batch: Mapping[str, Any]) -> int:
        n = 0
        for sub in batch.values():
            t = sub.get("image") if sub.get("image") is not None else sub.get("text")
            n += int(t.shape[0]) if isinstance(t, torch.Tensor) else 0
        return max(1, n)

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor | None:
        losses, aux, routing = self.stream_losses(batch)
        bad = [name for name, v in {**losses, "aux": aux}.items() if not torch.isfinite(v.detach()).all()]
        if bad:
            msg = (
                f"MaskedPretraining: non-finite loss at step {self.global_step} (batch {batch_idx}) in stream(s) "
                + ", ".join(f"{b}={float(losses.get(b, aux)):.4g}" for b in bad)
            )
            if self.on_nonfinite == "raise":
                raise FloatingPointError(msg + "; lower optim.lr or set on_nonfinite='skip' to skip such batches")
            rank_zero_warn(msg + "; batch skipped (on_nonfinite='skip')")
            return None
        total = self._total(losses, aux)
        bs = self._batch_size(batch)
        self.log("train/loss", total.detach(), prog_bar=True, batch_size=bs)
        self.log("train/aux_loss", aux.detach().float(), batch_size=bs)
        for name, value in losses.items():
            self.log(f"train/loss_{name}", value.detach(), batch_size=bs)
            if self._has_perplexity(name):
                self.log(f"train/ppl_{name}", torch.exp(value.detach().clamp(max=30.0)), batch_size=bs)
        if self.log_routing_every and self.global_step % self.log_routing_every == 0 and routing:
            for key, value in routing_metrics(routing, threshold=self.activation_threshold).items():
                self.log(f"train/moe/{key}", value, batch_size=bs)
        return total

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        losses, aux, routing = self.stream_losses(batch)
        total = self._total(losses, aux)
        bs = self._batch_size(batch)
        self.log("val/loss", total, batch_size=bs, sync_dist=True)
        for name, value in losses.items():
            self.log(f"val/loss_{name}", value, batch_size=bs, sync_dist=True)
        sums = {name: (float(value), self._last_counts[name]) for name, value in losses.items()}
        tally_routing(routing, into=self._val_routing)  # counts and sums only; the records are freed
        if self.eval_grounding and (mismatched := self._mismatched_pair_mlm(batch)) is not None:
            sums["mlm_pair_mismatched"] = (float(mismatched[0]), mismatched[1])
        for name, (value, count) in sums.items():
            acc = self._val_sums.setdefault(name, [0.0, 0.0])
            acc[0] += value * count
            acc[1] += count
        return total

    @torch.no_grad()
    def _mismatched_pair_mlm(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, int] | None:
        """Pair-text MLM with every caption shown the *next* example's image (same masks and targets).

        Why: a pair's masked caption words ("red", "two", "circle") can only be predicted beyond the text prior by
        looking at the image. ``ppl_mlm_pair_mismatched / ppl_mlm_pair`` (logged as ``val/grounding_gain``) is how
        much the matched image helps; ~1 means text and image are still separate, which is what made the
        300-step checkpoint a poor start for VQA/NLVR2 (docs/results/vl_synthetic.md).
        """
        sub = batch.get("pair")
        if not sub or sub.get("text_labels") is None or sub.get("image") is None or sub["image"].shape[0] < 2:
            return None
        image_mask = sub.get("image_mask")
        out = self.backbone(
            image=sub["image"].roll(1, dims=0),
            text=sub["text"],
            text_padding_mask=sub.get("text_padding_mask"),
            image_mask=image_mask.roll(1, dims=0) if image_mask is not None else None,
        )
        loss, n = self._mlm(out.features[:, out.num_vision_tokens :], sub["text_labels"])
        return (loss, n) if n else None

    def on_validation_epoch_start(self) -> None:
        self._val_routing = {}
        self._val_sums = {}

    def on_validation_epoch_end(self) -> None:
        # Perplexities are exp of the target-weighted mean CE over the whole set (summed over ranks); routing is
        # summarized over the whole evaluation set, the way [MH1] Fig. 1 measures the expert activation ratio.
        means: dict[str, float] = {}
        for name, (total, count) in sorted(self._val_sums.items()):
            if self._has_perplexity(name):
                sums = torch.tensor([total, count], dtype=torch.float64, device=self.device)
                sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
                mean = float(sums[0] / sums[1].clamp(min=1))
                self.log(f"val/ppl_{name}", math.exp(min(mean, 30.0)), sync_dist=False)
                means[name] = mean
        if "mlm_pair" in means and "mlm_pair_mismatched" in means:
            self.log(
                "val/grounding_gain",
                math.exp(min(means["mlm_pair_mismatched"] - means["mlm_pair"], 30.0)),
                sync_dist=False,
            )
        if self._val_routing:
            val_stats = routing_tally_metrics(self._val_routing, threshold=self.activation_threshold, per_expert=True)
            for key, value in val_stats.items():
                self.log(f"val/moe/{key}", value, sync_dist=False)
        self._val_routing, self._val_sums = {}, {}
