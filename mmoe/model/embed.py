"""Vision and text embeddings of the Multiway Transformer ([B3] sec. 2.1 and its released code).

Dimension legend: B batch, P patches, G = 1 + P vision tokens (CLS first), L text tokens, D width.

BEiT-3 keeps learned absolute positions per modality in fairseq tables whose first two rows are never
used (indices start at 2). We store only the used rows: `pos_embed` (1, 1 + P, D) for vision and
(1, max_text_len, D) for text; the converter drops the two legacy rows (mmoe/model/convert.py).

Two patch embeddings (`MultiwayConfig.patch_embed`): BEiT-3's "linear" patchify (one p x p stride-p conv) and
"conv", the convolutional stem of Xiao et al. 2021 ("Early Convolutions Help Transformers See Better", sec. 3):
log2(p) 3x3 stride-2 convs with BatchNorm and ReLU, then a 1x1 conv to the width. Measured on the 64-px shapes
world (docs/results/vision_synthetic.md), a 4-layer ViT with the linear patchify stays at chance on 5-way shape
classification after 1000 steps (timm's ViT as well), while the conv stem reaches 90% in 1000 steps.
"""

from __future__ import annotations

import torch
from timm.layers import PatchEmbed, resample_abs_pos_embed
from torch import nn


def conv_stem_widths(patch_size: int, dim: int, width: int | None = None) -> list[int]:
    """Channels of the conv stem's log2(patch_size) stride-2 convs: from `width` (default dim / 2^(n-1)),
    doubling, capped at `dim` (also what `mmoe.model.flops` counts)."""
    n = patch_size.bit_length() - 1
    if patch_size < 2 or 1 << n != patch_size:
        raise ValueError(f"MultiwayConfig.patch_size: the conv stem needs a power of 2 >= 2, got {patch_size}")
    first = width if width is not None else max(dim >> (n - 1), 1)
    return [min(first << i, max(dim, first)) for i in range(n)]


def sincos_2d(grid: tuple[int, int], dim: int) -> torch.Tensor:
    """(gh * gw, dim) 2-D sine-cosine positions, row-major like the patch tokens (MAE, He et al. 2022, sec. 3).

    The first half of the channels encodes the column, the second half the row; within each half, sines then
    cosines of the coordinate times frequencies 1 / 10000^(i / (dim / 4)). Values lie in [-1, 1].
    """
    if dim % 4:
        raise ValueError(f"sincos_2d: dim must be divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(
        torch.arange(grid[0], dtype=torch.float64), torch.arange(grid[1], dtype=torch.float64), indexing="ij"
    )
    parts = []
    for coord in (cols.flatten(), rows.flatten()):
        angle = coord[:, None] * omega[None]
        parts += [angle.sin(), angle.cos()]
    return torch.cat(parts, dim=1).float()


class ConvStem(nn.Module):
    """Convolutional patch embedding (Xiao et al. 2021, sec. 3): (B, C, H, W) -> (B, H/p * W/p, D).

    n = log2(patch_size) blocks of 3x3 stride-2 conv (padding 1) -> BatchNorm -> ReLU whose widths double up to
    `dim` (dim / 2^(n-1), ..., dim; or from `width`, doubling, capped at `dim`), then `extra_blocks` 3x3 stride-1
    blocks at the patch resolution, then a 1x1 conv. Unlike the linear patchify, each token sees a window of
    2p - 1 pixels per side: its own patch plus the p - 1 pixels above and left of it (15 px for p = 8). The
    overlap gives the translation-robust local features a small ViT lacks. For masked image modeling it means
    a masked patch's pixels reach the tokens right of and below it; BEiT's blockwise masking keeps most masked
    patches next to other masked ones.
    """

    def __init__(
        self,
        *,
        patch_size: int,
        in_chans: int,
        dim: int,
        extra_blocks: int = 0,
        width: int | None = None,
        shortcut: bool = False,
    ) -> None:
        super().__init__()
        # A linear p x p patchify beside the conv path (``MultiwayConfig.stem_shortcut``): each token's mean colour
        # is a linear function of its pixels, so it reaches the blocks whatever the conv path learns to be
        # invariant to (a stem trained on shape words drops colour; docs/results/learning.md).
        self.shortcut = nn.Conv2d(in_chans, dim, patch_size, patch_size) if shortcut else None
        layers: list[nn.Module] = []
        prev = in_chans
        for w in conv_stem_widths(patch_size, dim, width):
            layers += [nn.Conv2d(prev, w, 3, 2, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            prev = w
        for _ in range(extra_blocks):  # stride 1 at the patch resolution: a wider view, same token grid
            layers += [nn.Conv2d(prev, prev, 3, 1, 1, bias=False), nn.BatchNorm2d(prev), nn.ReLU(inplace=True)]
        layers.append(nn.Conv2d(prev, dim, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, image_BCHW: torch.Tensor) -> torch.Tensor:
        x_BDhw = self.net(image_BCHW)
        if self.shortcut is not None:
            x_BDhw = x_BDhw + self.shortcut(image_BCHW)
        return x_BDhw.flatten(2).transpose(1, 2)


class VisionEmbed(nn.Module):
    """Conv patch embedding (timm `PatchEmbed`) + CLS + learned positions + BEiT mask token.

    `image_mask` (B, P) True replaces the patch embedding with the learned mask token before positions are
    added, as in BEiT masked image modeling ([B3] sec. 2.2). Images of another size (also non-square, as
    detection needs) get their position table resampled on the fly with timm's `resample_abs_pos_embed`.
    """

    def __init__(
        self,
        *,
        img_size: int,
        patch_size: int,
        in_chans: int,
        dim: int,
        kind: str = "linear",
        stem_blocks: int = 0,
        stem_width: int | None = None,
        stem_shortcut: bool = False,
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.patch_embed: nn.Module
        if kind == "linear":
            self.patch_embed = PatchEmbed(
                img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=dim, strict_img_size=False
            )
        elif kind == "conv":
            self.patch_embed = ConvStem(
                patch_size=patch_size,
                in_chans=in_chans,
                dim=dim,
                extra_blocks=stem_blocks,
                width=stem_width,
                shortcut=stem_shortcut,
            )
        else:
            raise ValueError(f"MultiwayConfig.patch_embed: expected 'linear' or 'conv', got {kind!r}")
        self.grid_size: tuple[int, int] = (img_size // patch_size, img_size // patch_size)
        num_patches = self.grid_size[0] * self.grid_size[1]
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + num_patches, dim))

    def feature_grid(self, height: int, width: int) -> tuple[int, int]:
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"VisionEmbed: image size {height}x{width} is not divisible by patch_size {self.patch_size}"
            )
        return height // self.patch_size, width // self.patch_size

    def position_table(self, grid: tuple[int, int]) -> torch.Tensor:
        """Position embeddings (1, 1 + gh*gw, D) for a patch grid, resampled when it differs from the stored one."""
        if tuple(grid) == self.grid_size:
            return self.pos_embed
        return resample_abs_pos_embed(self.pos_embed, new_size=list(grid), old_size=list(self.grid_size))

    def forward(
        self, image_B3HW: torch.Tensor, image_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, tuple[int, int]]:
        if image_B3HW.ndim != 4:
            raise ValueError(f"image: expected (B, C, H, W), got shape {tuple(image_B3HW.shape)}")
        grid = self.feature_grid(image_B3HW.shape[-2], image_B3HW.shape[-1])
        x_BPD = self.patch_embed(image_B3HW)
        batch, num_patches, _ = x_BPD.shape
        if image_mask is not None:
            if image_mask.shape != (batch, num_patches):
                raise ValueError(
                    f"image_mask: expected shape {(batch, num_patches)} (batch, patches), got {tuple(image_mask.shape)}"
                )
            w_BP1 = image_mask.unsqueeze(-1).to(x_BPD.dtype)
            x_BPD = x_BPD * (1 - w_BP1) + self.mask_token.to(x_BPD.dtype) * w_BP1
        x_BGD = torch.cat([self.cls_token.expand(batch, -1, -1).to(x_BPD.dtype), x_BPD], dim=1)
        return x_BGD + self.position_table(grid).to(x_BPD.dtype), grid


class TextEmbed(nn.Module):
    """Token embedding + learned absolute positions; positions start at `start` (incremental decoding)."""

    def __init__(self, *, vocab_size: int, max_len: int, dim: int) -> None:
        super().__init__()
        self.max_len = max_len
        self.token_embed = nn.Embedding(vocab_size, dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, max_len, dim))

    def forward(self, text_BL: torch.Tensor, start: int = 0) -> torch.Tensor:
        if text_BL.ndim != 2:
            raise ValueError(f"text: expected (B, L) token ids, got shape {tuple(text_BL.shape)}")
        length = text_BL.shape[1]
        if start < 0 or start + length > self.max_len:
            raise ValueError(
                f"text: positions {start}..{start + length - 1} exceed max_text_len {self.max_len} of the model"
            )
        if text_BL.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"text: expected int64 token ids, got {text_BL.dtype}")
        return self.token_embed(text_BL) + self.pos_embed[:, start : start + length]


def resample_vision_pos_embed(pos_embed: torch.Tensor, new_grid: tuple[int, int]) -> torch.Tensor:
    """Resample a stored (1, 1 + gh*gw, D) square table to `new_grid` (used when loading state dicts)."""
    num_patches = pos_embed.shape[1] - 1
    side = int(round(num_patches**0.5))
    if side * side != num_patches:
        raise ValueError(f"vision pos_embed: {num_patches} patch positions do not form a square grid")
    if (side, side) == tuple(new_grid):
        return pos_embed
    return resample_abs_pos_embed(pos_embed, new_size=list(new_grid), old_size=[side, side])
