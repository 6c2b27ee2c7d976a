"""Task heads over the Multiway Transformer's token features ([B3] sec. 3, unilm ``beit3``).

Dimension legend: B batch, N tokens (vision first: [CLS, patches...], then text), D model width,
C classes.

One ``ClassificationHead`` serves every classification fine-tuning task; only the pooling differs:

* ``"image_cls"`` (VQAv2): the fused input's image CLS -> ``Pooler`` (LN -> Linear(D, D) -> tanh)
  -> Linear(D, 2D) -> LN -> GELU -> Linear(2D, C).
* ``"pair"`` (NLVR2): the backbone runs on both images with the same sentence, stacked on the batch
  axis (first half = ``img0``, second half = ``img1``). Per image, concat(image CLS, text CLS) -> 2D;
  both images -> 4D; LN -> Linear(4D, 2D) -> LN -> GELU -> Linear(2D, C=2).
* ``"image_text_cls"`` (VQA variant, not in BEiT-3): concat(image CLS, text CLS) of the fused input -> 2D;
  LN -> Linear(2D, 2D) -> LN -> GELU -> Linear(2D, C). For small, briefly pretrained backbones whose image
  CLS has not yet learned to read the question (the synthetic-world recipes), the text CLS carries it.
* ``"image_text_max"`` (VQA variant, not in BEiT-3): concat(image CLS, text CLS, the max over the patch tokens)
  -> 3D, then as ``"image_text_cls"``. The max is a direct path from every patch's question-conditioned
  feature to the answer, as the max-pooled FiLM network has (Perez et al. 2018); trained from scratch on the
  shapes world, a CLS read out through attention that has yet to become selective learns several times slower
  (docs/results/learning.md).
* ``"image_text_max_mean"`` (VQA variant, not in BEiT-3): ``"image_text_max"`` plus the mean over the patch
  tokens -> 4D. With a fixed number of patches the mean is a sum up to a constant, so it can count the patches
  whose question-conditioned feature fires (how many of the named shape); a max cannot count.
* ``"mean_patch"`` (ImageNet): mean of the patch tokens (CLS excluded) -> LN -> Linear(D, C). BEiT-3
  scales the last layer's initial weights by ``init_scale = 0.001``.

Init as in BEiT-3's heads: Linear weights truncated normal (std 0.02), biases 0, LayerNorm 1/0; the
final Linear is then multiplied by ``init_scale``. No Lightning here (only ``mmoe.train`` imports it).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

__all__ = ["Pooler", "ClassificationHead", "Pooling", "pool_features"]

Pooling = Literal["image_cls", "image_text_cls", "image_text_max", "image_text_max_mean", "pair", "mean_patch"]

# unilm beit3 head shapes ([B3] sec. 3): hidden width multiplier (None = a single Linear), whether an input LN leads.
_DEFAULT_HIDDEN_MULT: dict[str, int | None] = {
    "image_cls": 2,
    "image_text_cls": 2,
    "image_text_max": 2,
    "image_text_max_mean": 2,
    "pair": 2,
    "mean_patch": None,
}
_IN_MULT: dict[str, int] = {
    "image_cls": 1,
    "image_text_cls": 2,
    "image_text_max": 3,
    "image_text_max_mean": 4,
    "pair": 4,
    "mean_patch": 1,
}


def _init_linear_ln(module: nn.Module, std: float = 0.02) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class Pooler(nn.Module):
    """BEiT-3 pooler: LN -> Linear(D, D_out) -> tanh on one token (unilm ``beit3`` ``Pooler``)."""

    def __init__(self, dim: int, out_dim: int | None = None, *, norm_eps: float = 1e-5) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.dense = nn.Linear(dim, out_dim or dim)
        self.activation = nn.Tanh()
        self.apply(_init_linear_ln)

    def forward(self, cls_BD: torch.Tensor) -> torch.Tensor:
        return self.activation(self.dense(self.norm(cls_BD)))


def pool_features(features_BND: torch.Tensor, num_vision_tokens: int, pooling: Pooling) -> torch.Tensor:
    """Token features -> one vector per example (before the MLP); see the module docstring.

    For ``"pair"`` the input holds 2B rows (both images of B examples) and the output has B rows of 4D.
    """
    if features_BND.dim() != 3:
        raise ValueError(f"pool_features: features must be (B, N, D), got shape {tuple(features_BND.shape)}")
    if num_vision_tokens < 1:
        raise ValueError(f"pool_features(pooling={pooling!r}): needs image tokens, got num_vision_tokens=0")
    if pooling == "image_cls":
        return features_BND[:, 0]
    if pooling == "mean_patch":
        if num_vision_tokens < 2:
            raise ValueError("pool_features('mean_patch'): no patch tokens (num_vision_tokens must be > 1)")
        return features_BND[:, 1:num_vision_tokens].mean(dim=1)
    if pooling == "image_text_cls":
        if features_BND.shape[1] <= num_vision_tokens:
            raise ValueError(
                "pool_features('image_text_cls'): no text tokens after the image tokens (need image + text input)"
            )
        return torch.cat([features_BND[:, 0], features_BND[:, num_vision_tokens]], dim=-1)
    if pooling in ("image_text_max", "image_text_max_mean"):
        if features_BND.shape[1] <= num_vision_tokens or num_vision_tokens < 2:
            raise ValueError(
                f"pool_features({pooling!r}): needs patch tokens and text tokens after them (image + text input)"
            )
        patches_BPD = features_BND[:, 1:num_vision_tokens]
        parts = [features_BND[:, 0], features_BND[:, num_vision_tokens], patches_BPD.amax(dim=1)]
        if pooling == "image_text_max_mean":
            parts.append(patches_BPD.mean(dim=1))
        return torch.cat(parts, dim=-1)
    if pooling == "pair":
        if features_BND.shape[1] <= num_vision_tokens:
            raise ValueError("pool_features('pair'): no text tokens after the image tokens (need image + text input)")
        if features_BND.shape[0] % 2:
            raise ValueError(
                f"pool_features('pair'): batch of {features_BND.shape[0]} rows; expected 2B rows (img0 rows, then img1)"
            )
        cls_2BD = torch.cat([features_BND[:, 0], features_BND[:, num_vision_tokens]], dim=-1)
        img0_BD, img1_BD = cls_2BD.chunk(2, dim=0)
        return torch.cat([img0_BD, img1_BD], dim=-1)
    raise ValueError(
        f"pool_features: unknown pooling {pooling!r}; expected 'image_cls', 'image_text_cls', 'image_text_max', "
        "'image_text_max_mean', 'pair' or 'mean_patch'"
    )


class ClassificationHead(nn.Module):
    """Pooling + MLP classifier ([B3] sec. 3): one class for the VQA, NLVR2 and ImageNet heads.

    Args:
        dim: backbone width D.
        num_classes: C (3129 answers for VQAv2, 2 for NLVR2, 1000 for ImageNet).
        pooling: ``"image_cls"``, ``"image_text_cls"``, ``"image_text_max"``, ``"image_text_max_mean"``,
            ``"pair"`` or ``"mean_patch"`` (module docstring).
        hidden_mult: MLP hidden width as a multiple of D; ``None`` = a single Linear; ``"auto"`` = the
            unilm beit3 shape for the pooling (2 for image_cls/image_text_cls/pair, None for mean_patch).
        norm_eps: LayerNorm epsilon (BEiT-3 uses 1e-5 for VQA/NLVR2, 1e-6 for ImageNet).
        init_scale: factor on the last Linear's initial weight and bias (BEiT-3 ImageNet: 0.001).
        dropout: dropout before the last Linear (0 in BEiT-3).
    """

    def __init__(
        self,
        dim: int,
        num_classes: int,
        *,
        pooling: Pooling = "image_cls",
        hidden_mult: int | None | Literal["auto"] = "auto",
        norm_eps: float = 1e-5,
        init_scale: float = 1.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if pooling not in _IN_MULT:
            raise ValueError(f"ClassificationHead: pooling={pooling!r}; expected one of {sorted(_IN_MULT)}")
        if num_classes < 1:
            raise ValueError(f"ClassificationHead: num_classes must be >= 1, got {num_classes}")
        if hidden_mult == "auto":
            hidden_mult = _DEFAULT_HIDDEN_MULT[pooling]
        self.dim, self.num_classes, self.pooling = int(dim), int(num_classes), pooling
        in_dim = _IN_MULT[pooling] * dim
        # VQA pools the image CLS through the BEiT-3 Pooler; NLVR2 normalizes its 4D concat; ImageNet its mean.
        self.pooler: nn.Module = Pooler(dim, norm_eps=norm_eps) if pooling == "image_cls" else nn.Identity()
        self.pre_norm: nn.Module = nn.Identity() if pooling == "image_cls" else nn.LayerNorm(in_dim, eps=norm_eps)
        if hidden_mult is None:
            self.mlp: nn.Module = nn.Identity()
            last_in = in_dim
        else:
            hidden = int(hidden_mult) * dim
            self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.LayerNorm(hidden, eps=norm_eps), nn.GELU())
            last_in = hidden
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(last_in, num_classes)
        self.apply(_init_linear_ln)
        with torch.no_grad():
            self.fc.weight.mul_(init_scale)
            self.fc.bias.mul_(init_scale)

    def forward(self, features_BND: torch.Tensor, num_vision_tokens: int) -> torch.Tensor:
        """``(B, N, D)`` (``(2B, N, D)`` for ``"pair"``) token features -> ``(B, C)`` logits."""
        x = pool_features(features_BND, num_vision_tokens, self.pooling)
        x = self.pre_norm(self.pooler(x))
        return self.fc(self.dropout(self.mlp(x)))
