"""Masking for BEiT-3 masked data modeling ([B3] sec. 2.2).

* Images: block-wise masking as in BEiT ([B3] follows BEiT/BEiT v2): rectangles of at least
  ``min_num_patches`` patches with aspect ratio log-uniform in ``[min_aspect, 1/min_aspect]`` are
  added until the target ratio (40%) is reached; a block is accepted only if it adds new patches
  without overshooting the target. When no block fits any more (small grids), the remainder is
  filled with random single patches so that every image has exactly ``round(ratio * P)`` masked
  patches (``exact=True``), which keeps per-batch target counts constant.
* Text: BERT-style ([B3]: 15% of tokens for monomodal text, 50% for image-text pairs). Special
  tokens (bos/eos/pad/mask) are never selected; ``round(ratio * n)`` tokens (at least one) of a row
  with ``n`` maskable tokens are selected; of those 80% become ``mask_id``, 10% a random regular
  token and 10% stay unchanged. Labels hold the original id at selected positions, -100 elsewhere.
* Grounded text (an option of ``mask_tokens``, off by default): the same ``k`` positions per row, but a share of
  the row's *priority* tokens (words that name what the image shows: colours, counts, positions, objects;
  ``mmoe.data.grounded``) is selected first, so pair-text MLM cannot be solved from the text prior alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["BlockMaskGenerator", "IGNORE_INDEX", "mask_tokens", "random_token_range"]

IGNORE_INDEX = -100


class BlockMaskGenerator:
    """Block-wise patch masks on a ``(grid_h, grid_w)`` grid; call with a numpy Generator.

    Args:
        grid_size: patches per side (int) or ``(grid_h, grid_w)``.
        mask_ratio: share of patches to mask (0.4 in [B3]).
        min_num_patches: smallest block area (16 in BEiT); clamped to the target count for tiny grids.
        max_num_patches: largest block area (default: the target count).
        min_aspect: blocks have aspect ratio log-uniform in ``[min_aspect, max_aspect]``.
        max_aspect: default ``1 / min_aspect``.
        exact: top up with random single patches so the count is exactly ``round(mask_ratio * P)``.
    """

    def __init__(
        self,
        grid_size: int | Sequence[int],
        mask_ratio: float = 0.4,
        min_num_patches: int = 16,
        max_num_patches: int | None = None,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
        exact: bool = True,
    ) -> None:
        if isinstance(grid_size, int):
            grid_size = (grid_size, grid_size)
        self.height, self.width = (int(g) for g in grid_size)
        if self.height < 1 or self.width < 1:
            raise ValueError(f"BlockMaskGenerator: grid_size must be positive, got {grid_size}")
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"BlockMaskGenerator: mask_ratio must be in [0, 1), got {mask_ratio}")
        if min_aspect <= 0:
            raise ValueError(f"BlockMaskGenerator: min_aspect must be > 0, got {min_aspect}")
        self.num_patches = self.height * self.width
        self.num_masking_patches = int(round(mask_ratio * self.num_patches))
        self.min_num_patches = max(1, min(int(min_num_patches), self.num_masking_patches))
        self.max_num_patches = int(max_num_patches) if max_num_patches is not None else self.num_masking_patches
        max_aspect = max_aspect if max_aspect is not None else 1.0 / min_aspect
        self.log_aspect = (math.log(min_aspect), math.log(max_aspect))
        self.exact = exact

    def __repr__(self) -> str:
        return (
            f"BlockMaskGenerator(grid=({self.height}, {self.width}), masked={self.num_masking_patches}/"
            f"{self.num_patches}, min_block={self.min_num_patches})"
        )

    def _add_block(self, mask: np.ndarray, budget: int, rng: np.random.Generator) -> int:
        """Try (up to 10 times) to place one block adding between 1 and ``budget`` new patches."""
        for _ in range(10):
            target_area = rng.uniform(
                self.min_num_patches, max(self.min_num_patches, min(budget, self.max_num_patches))
            )
            aspect = math.exp(rng.uniform(*self.log_aspect))
            h = int(round(math.sqrt(target_area * aspect)))
            w = int(round(math.sqrt(target_area / aspect)))
            if not (0 < h <= self.height and 0 < w <= self.width):
                continue
            top = int(rng.integers(0, self.height - h + 1))
            left = int(rng.integers(0, self.width - w + 1))
            window = mask[top : top + h, left : left + w]
            new = h * w - int(window.sum())
            if 0 < new <= budget:
                window[...] = True
                return new
        return 0

    def __call__(self, rng: np.random.Generator) -> np.ndarray:
        """One mask, shape ``(grid_h, grid_w)`` bool, True = masked."""
        mask = np.zeros((self.height, self.width), dtype=bool)
        count = 0
        while count < self.num_masking_patches:
            added = self._add_block(mask, self.num_masking_patches - count, rng)
            if added == 0:
                break
            count += added
        if self.exact and count < self.num_masking_patches:
            free = np.flatnonzero(~mask.reshape(-1))
            extra = rng.choice(free, size=self.num_masking_patches - count, replace=False)
            mask.reshape(-1)[extra] = True
        return mask


def random_token_range(tokenizer: object) -> tuple[int, int]:
    """Half-open id range of regular (non-special) tokens used for the 10% random replacements."""
    rng = getattr(tokenizer, "regular_id_range", None)
    if rng is None:
        raise TypeError(
            f"random_token_range: {type(tokenizer).__name__} has no regular_id_range (see mmoe.data.tokenizer)"
        )
    return (int(rng[0]), int(rng[1]))


def mask_tokens(
    ids: torch.Tensor,
    padding_mask: torch.Tensor,
    *,
    ratio: float,
    mask_id: int,
    special_ids: Sequence[int],
    random_range: tuple[int, int],
    generator: torch.Generator | None = None,
    mask_prob: float = 0.8,
    random_prob: float = 0.1,
    priority: torch.Tensor | None = None,
    priority_share: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT-style masking of a ``(B, L)`` batch; returns ``(masked_ids, labels)``.

    Selection: every maskable token gets a uniform score and the ``k`` lowest are selected (``k`` from ``ratio``).
    With ``priority`` (grounded words), ``round(priority_share * g)`` of a row's ``g`` maskable priority tokens,
    picked at random among them (one more draw, after the others), have their score lowered by 1 so that they
    come first (at most ``k`` of them get selected); the rest of the ``k`` is filled uniformly from all remaining
    maskable tokens, priority ones included. ``k``, the 80/10/10 split and the uniform draws are unchanged, so
    ``priority=None`` (or a share of 0, or a row without priority tokens) gives exactly the uniform masks of the
    same generator.

    Why a share of the row's grounded tokens and not of ``k``: pair-text MLM in [B3] masks 50% of the caption,
    and in short captions ("a red circle on the left.") uniform masking mostly hits words the text predicts
    ("a", "on", "the", "."), so the image is rarely needed. Masking every grounded word (share 1.0) makes each of
    them a question about the image; a share below 1 keeps some of them visible, so the model also learns to
    bind a visible word to the image ("the ___ circle": which colour is the circle), as VQA asks it. The share
    of grounded tokens is what sets that trade-off, whatever the caption's length, which a share of ``k`` would
    not.

    Args:
        ids: (B, L) int64 token ids.
        padding_mask: (B, L) bool, True = pad (never selected).
        ratio: share of maskable tokens per row to select (rounded, at least one per non-empty row).
        mask_id: id written at ``mask_prob`` of the selected positions.
        special_ids: ids never selected (bos, eos, pad, mask).
        random_range: ``[low, high)`` ids for the ``random_prob`` random replacements.
        generator: torch RNG for reproducible masks.
        priority: optional (B, L) bool, True = a token to select first (``mmoe.data.grounded.GroundedTokens``).
        priority_share: share in ``[0, 1]`` of each row's priority tokens selected first (capped at ``k``).
    """
    if ids.shape != padding_mask.shape or ids.dim() != 2:
        raise ValueError(
            f"mask_tokens: ids {tuple(ids.shape)} and padding_mask {tuple(padding_mask.shape)} must be equal (B, L)"
        )
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"mask_tokens: ratio must be in (0, 1], got {ratio}")
    if priority is not None and (priority.shape != ids.shape or priority.dtype != torch.bool):
        raise ValueError(
            f"mask_tokens: priority must be a bool tensor of shape {tuple(ids.shape)}, "
            f"got {priority.dtype} {tuple(priority.shape)}"
        )
    if not 0.0 <= priority_share <= 1.0:
        raise ValueError(f"mask_tokens: priority_share must be in [0, 1], got {priority_share}")
    maskable = ~padding_mask
    for s in special_ids:
        maskable &= ids != int(s)
    n = maskable.sum(1)
    k = torch.where(n > 0, (n.float() * ratio).round().clamp(min=1).long(), torch.zeros_like(n))
    scores = torch.rand(ids.shape, generator=generator)
    action = torch.rand(ids.shape, generator=generator)
    rand_ids = torch.randint(int(random_range[0]), int(random_range[1]), ids.shape, generator=generator)
    if priority is not None:
        # Drawn after the uniform draws, so those are the same as without priority; and independent of ``scores``:
        # taking the quota by ``scores`` would leave the other priority tokens with the highest scores of the
        # row, and the uniform fill would then almost never take them.
        order = torch.rand(ids.shape, generator=generator)
        grounded = priority & maskable
        quota = (grounded.sum(1).float() * priority_share).round().long()
        grounded_ranks = torch.where(grounded, order, torch.full_like(order, 2.0)).argsort(1).argsort(1)
        first = grounded & (grounded_ranks < quota[:, None])
        scores = torch.where(first, scores - 1.0, scores)  # in [-1, 0): before every other maskable token
    scores[~maskable] = 2.0  # after every maskable token
    ranks = scores.argsort(1).argsort(1)
    selected = (ranks < k[:, None]) & maskable
    labels = torch.where(selected, ids, torch.full_like(ids, IGNORE_INDEX))
    to_mask = selected & (action < mask_prob)
    to_random = selected & (action >= mask_prob) & (action < mask_prob + random_prob)
    out = torch.where(to_mask, torch.full_like(ids, mask_id), ids)
    out = torch.where(to_random, rand_ids, out)
    return out, labels
