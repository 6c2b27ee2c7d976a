"""Image-text contrastive (ITC) head and loss, and the hard negatives of image-text matching (ITM).

Dimension legend: B rows on this rank, N = B x world size rows over all ranks, D backbone width, E embedding width.

Dual-encoder retrieval ([B3] sec. 3.1, unilm ``beit3`` ``BEiT3ForRetrieval``): the image alone and the text alone
each go through the Multiway backbone (their own branch), their CLS token (or, as an option for small models
trained from scratch, CLS plus the max over the other tokens: :func:`pool_embedding`) -> a bias-free linear
projection -> L2 normalisation. The similarity of image i and text j is ``scale * <v_i, t_j>`` with a learnable
temperature kept as a log logit scale, initialised to ``log(1 / 0.07)`` and clipped so that logits are never scaled
by more than 100 ([CLIP] sec. 2.5; BEiT-3 and [VLMo] take the same head).

The loss is InfoNCE in both directions (image -> text and text -> image cross-entropy, averaged). Under DDP the
negatives of a rank are the rows of every rank: embeddings are gathered with
``torch.distributed.nn.functional.all_gather``, whose backward sends each rank the gradient the others' losses put
on its rows. Each rank computes the loss of its own rows against all columns (open_clip's ``local_loss``); the
mean of these over ranks is the full-batch loss, and DDP's gradient mean is then exactly the full-batch gradient.

ITM ([VLMo] sec. 2.3, as [ALBEF] sec. 3.2): for each image a negative text and for each text a negative image,
drawn with probability ``softmax`` of the ITC similarities (the positive excluded), so the matching head learns on
the pairs the contrastive embedding finds hardest to tell apart.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ContrastiveHead",
    "RetrievalPooling",
    "check_pooling",
    "contrastive_loss",
    "gather_with_grad",
    "pool_embedding",
    "sample_hard_negatives",
]


RetrievalPooling = Literal["cls", "cls_max"]


def check_pooling(owner: str, pooling: str) -> None:
    """Refuse an unknown contrastive pooling, naming who was given it."""
    if pooling not in get_args(RetrievalPooling):
        raise ValueError(f"{owner}: pooling={pooling!r}; expected one of {list(get_args(RetrievalPooling))}")


def pool_embedding(
    features_BND: torch.Tensor, pooling: RetrievalPooling, padding_BN: torch.Tensor | None = None
) -> torch.Tensor:
    """One vector per example for the contrastive head: the CLS token, or CLS plus the max over the other tokens.

    Why ``"cls_max"``: a CLS read through attention that is still uniform averages a small object into the
    background, and trained from scratch it learns several times slower than a max over the patch tokens
    (docs/results/learning.md, docs/results/retrieval.md); the sum keeps the width D, so the identity start of
    zero-shot retrieval and the pretraining's ITC projections still apply. ``padding_BN`` (True = pad, text only)
    keeps padding out of the max; a text of one token keeps its CLS alone. BEiT-3 ([B3] sec. 3.1) uses ``"cls"``.
    """
    check_pooling("pool_embedding", pooling)
    cls_BD = features_BND[:, 0]
    if pooling == "cls" or features_BND.shape[1] < 2:
        return cls_BD
    rest_BND = features_BND[:, 1:]
    if padding_BN is None:
        return cls_BD + rest_BND.amax(dim=1)
    if padding_BN.shape != features_BND.shape[:2]:
        raise ValueError(
            f"pool_embedding: padding mask of shape {tuple(padding_BN.shape)} for features {tuple(features_BND.shape)}"
        )
    pad_BN1 = padding_BN[:, 1:, None]
    rest_max_BD = rest_BND.masked_fill(pad_BN1, torch.finfo(rest_BND.dtype).min).amax(dim=1)
    has_B1 = ~pad_BN1.all(dim=1)
    return cls_BD + torch.where(has_B1, rest_max_BD, torch.zeros_like(cls_BD))


class ContrastiveHead(nn.Module):
    """Per-modality projections of the CLS token to L2-normalised embeddings, and the learnable logit scale.

    Args:
        dim: backbone width D.
        embed_dim: embedding width E (default D; BEiT-3 keeps D).
        init_temperature: initial softmax temperature ([CLIP]: 0.07, i.e. logit scale 1 / 0.07).
        max_logit_scale: the clip on the scale ([CLIP]: 100).
        init_std: std of the truncated-normal projection weights (BEiT-3 heads: 0.02).
    """

    def __init__(
        self,
        dim: int,
        embed_dim: int | None = None,
        *,
        init_temperature: float = 0.07,
        max_logit_scale: float = 100.0,
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        if not 0.0 < init_temperature:
            raise ValueError(f"ContrastiveHead: init_temperature must be > 0, got {init_temperature}")
        if not 1.0 / init_temperature <= max_logit_scale:
            raise ValueError(
                f"ContrastiveHead: the initial logit scale 1/{init_temperature} exceeds "
                f"max_logit_scale={max_logit_scale}"
            )
        embed_dim = int(embed_dim or dim)
        self.image_proj = nn.Linear(dim, embed_dim, bias=False)
        self.text_proj = nn.Linear(dim, embed_dim, bias=False)
        for proj in (self.image_proj, self.text_proj):
            nn.init.trunc_normal_(proj.weight, std=init_std)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))
        self.max_log_scale = math.log(max_logit_scale)

    def embed_image(self, cls_BD: torch.Tensor) -> torch.Tensor:
        """Image CLS features (B, D) -> unit-norm embeddings (B, E)."""
        return F.normalize(self.image_proj(cls_BD).float(), dim=-1)

    def embed_text(self, cls_BD: torch.Tensor) -> torch.Tensor:
        """Text CLS features (B, D) -> unit-norm embeddings (B, E)."""
        return F.normalize(self.text_proj(cls_BD).float(), dim=-1)

    def scale(self) -> torch.Tensor:
        """``exp(logit_scale)`` clipped at ``max_logit_scale`` (no gradient past the clip, as [CLIP]'s clamp)."""
        return self.logit_scale.clamp(max=self.max_log_scale).exp()

    @torch.no_grad()
    def identity_(self) -> ContrastiveHead:
        """Set both projections to the identity (E = D): the embeddings are then the normalised CLS features.

        What zero-shot retrieval uses when a checkpoint has no ITC projections, and a neutral start for
        fine-tuning from it.
        """
        for proj in (self.image_proj, self.text_proj):
            if proj.weight.shape[0] != proj.weight.shape[1]:
                raise ValueError(
                    f"ContrastiveHead.identity_: needs embed_dim == dim, got a {tuple(proj.weight.shape)} projection"
                )
            proj.weight.copy_(torch.eye(proj.weight.shape[0], dtype=proj.weight.dtype))
        return self


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def gather_with_grad(x_BE: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Rows of every rank in rank order ``(N, E)``, differentiable, and this rank's offset in them.

    Every rank must hold the same number of rows (the training loaders drop incomplete batches). Without a
    process group it returns ``(x_BE, 0)``.
    """
    if not _distributed() or torch.distributed.get_world_size() == 1:
        return x_BE, 0
    from torch.distributed.nn.functional import all_gather

    parts = all_gather(x_BE.contiguous())
    return torch.cat(parts, dim=0), torch.distributed.get_rank() * x_BE.shape[0]


def contrastive_loss(
    image_BE: torch.Tensor, text_BE: torch.Tensor, logit_scale: torch.Tensor, *, gather: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Symmetric InfoNCE of this rank's B pairs against the N pairs of all ranks (module docstring).

    ``image_BE[i]`` and ``text_BE[i]`` are a matched pair; every other row of the gathered batch is a negative.
    Returns ``(loss, logits_per_image (B, N), labels (B,))``: the loss is the mean of the image -> text and
    text -> image cross-entropies over this rank's rows, ``labels[i]`` the column of row i's own pair.
    """
    if image_BE.shape != text_BE.shape or image_BE.dim() != 2:
        raise ValueError(
            f"contrastive_loss: image and text embeddings must both be (B, E), got {tuple(image_BE.shape)} and "
            f"{tuple(text_BE.shape)}"
        )
    if gather:
        all_image_NE, offset = gather_with_grad(image_BE)
        all_text_NE, _ = gather_with_grad(text_BE)
    else:
        all_image_NE, all_text_NE, offset = image_BE, text_BE, 0
    labels_B = torch.arange(image_BE.shape[0], device=image_BE.device) + offset
    logits_per_image_BN = logit_scale * image_BE @ all_text_NE.t()
    logits_per_text_BN = logit_scale * text_BE @ all_image_NE.t()
    loss = 0.5 * (F.cross_entropy(logits_per_image_BN, labels_B) + F.cross_entropy(logits_per_text_BN, labels_B))
    return loss, logits_per_image_BN, labels_B


@torch.no_grad()
def sample_hard_negatives(
    sim_BB: torch.Tensor, *, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """ITM hard negatives from the image-text similarities ``sim_BB[i, j]`` of a batch's B pairs (B >= 2).

    Returns ``(neg_text_of_image (B,), neg_image_of_text (B,))``: for image i a text j != i drawn with probability
    ``softmax_j(sim[i, j])``, and for text j an image i != j drawn with probability ``softmax_i(sim[i, j])``.
    """
    b = sim_BB.shape[0]
    if sim_BB.dim() != 2 or sim_BB.shape[1] != b or b < 2:
        raise ValueError(
            f"sample_hard_negatives: needs a square (B, B) similarity with B >= 2, got {tuple(sim_BB.shape)}"
        )
    eye = torch.eye(b, dtype=torch.bool, device=sim_BB.device)
    # softmax over the negatives only (the positive masked before, not after: a confident positive would otherwise
    # take all the mass and leave the negatives' weights at underflow)
    w_i2t = F.softmax(sim_BB.float().masked_fill(eye, float("-inf")), dim=1)
    w_t2i = F.softmax(sim_BB.float().t().masked_fill(eye, float("-inf")), dim=1)
    neg_text = torch.multinomial(w_i2t, 1, generator=generator).squeeze(1)
    neg_image = torch.multinomial(w_t2i, 1, generator=generator).squeeze(1)
    return neg_text, neg_image
