"""Block-wise image masking and BERT-style text masking ([B3] sec. 2.2; [BEiT]; [BERT])."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mmoe.data.masking import IGNORE_INDEX, BlockMaskGenerator, mask_tokens


def _largest_component(mask: np.ndarray) -> int:
    """Size of the largest 4-connected region of True cells."""
    seen = np.zeros_like(mask)
    best = 0
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        stack, size = [start], 0
        seen[start] = True
        while stack:
            r, c = stack.pop()
            size += 1
            for nr, nc in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
                if 0 <= nr < mask.shape[0] and 0 <= nc < mask.shape[1] and mask[nr, nc] and not seen[nr, nc]:
                    seen[nr, nc] = True
                    stack.append((nr, nc))
        best = max(best, size)
    return best


def test_block_masks_ratio_and_blocks() -> None:
    gen = BlockMaskGenerator(14, mask_ratio=0.4, min_num_patches=16, min_aspect=0.3)
    rng = np.random.default_rng(0)
    masks = np.stack([gen(rng) for _ in range(300)])
    assert masks.shape == (300, 14, 14) and masks.dtype == bool
    # exact count per image: round(0.4 * 196) = 78
    assert (masks.reshape(300, -1).sum(1) == 78).all()
    # masks come in blocks: the largest connected region is big on average, unlike random masks
    largest = [_largest_component(m) for m in masks]
    assert np.mean(largest) >= 30
    rand = np.zeros(196, dtype=bool)
    rand[rng.choice(196, 78, replace=False)] = True
    assert _largest_component(rand.reshape(14, 14)) < 30
    # every position gets masked sometimes (no fixed pattern); corners least, as blocks must fit inside
    freq = masks.mean(0)
    assert freq.min() > 0.01 and freq[5:9, 5:9].mean() > freq[0, 0]


def test_block_shapes_follow_aspect_and_min_area() -> None:
    gen = BlockMaskGenerator(14, mask_ratio=0.4, min_num_patches=16, min_aspect=0.3, exact=False)
    rng = np.random.default_rng(1)
    aspects, areas = [], []
    for _ in range(400):
        mask = np.zeros((14, 14), dtype=bool)
        added = gen._add_block(mask, 78, rng)
        if added:
            rows, cols = np.nonzero(mask)
            h, w = np.ptp(rows) + 1, np.ptp(cols) + 1
            assert h * w == added == mask.sum()  # one solid rectangle
            aspects.append(math.log(h / w))
            areas.append(added)
    assert len(areas) > 350 and min(areas) >= 9  # rounding of sqrt(16) sides can shave a little
    assert np.mean(np.array(areas) >= 16) > 0.8
    # log aspect symmetric around 0 within [log 0.3, log 1/0.3] (plus rounding slack)
    a = np.array(aspects)
    assert abs(a.mean()) < 0.15 and a.min() >= math.log(0.3) - 0.5 and a.max() <= -math.log(0.3) + 0.5
    assert a.std() > 0.4  # not all square


def test_small_grid_clamps_block_size() -> None:
    gen = BlockMaskGenerator(4, mask_ratio=0.4)  # 64 px / patch 16: 16 patches, 6 masked
    assert gen.min_num_patches == 6
    m = gen(np.random.default_rng(0))
    assert m.sum() == 6
    with pytest.raises(ValueError, match="mask_ratio"):
        BlockMaskGenerator(4, mask_ratio=1.5)


@pytest.mark.parametrize("ratio", [0.15, 0.5])
def test_text_masking_statistics(ratio: float) -> None:
    B, L, pad_id, mask_id, bos, eos = 400, 40, 99, 98, 96, 97
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, L + 1, (B,), generator=g)
    ids = torch.randint(0, 90, (B, L), generator=g)
    pad = torch.arange(L)[None] >= lengths[:, None]
    ids[:, 0] = bos
    ids[torch.arange(B), lengths - 1] = eos
    ids[pad] = pad_id
    masked, labels = mask_tokens(
        ids,
        pad,
        ratio=ratio,
        mask_id=mask_id,
        special_ids=(pad_id, bos, eos, mask_id),
        random_range=(0, 90),
        generator=g,
    )
    sel = labels != IGNORE_INDEX
    n_maskable = (lengths - 2).clamp(min=0)
    assert (sel.sum(1) == (n_maskable.float() * ratio).round().clamp(min=1)).all()
    assert not sel[pad].any() and not sel[:, 0].any() and not sel[torch.arange(B), lengths - 1].any()
    assert (labels[sel] == ids[sel]).all()
    assert (masked[~sel] == ids[~sel]).all()
    share_mask = (masked[sel] == mask_id).float().mean().item()
    share_same = (masked[sel] == ids[sel]).float().mean().item()
    assert 0.75 < share_mask < 0.85 and 0.06 < share_same < 0.16  # 10% kept + random hits of the same id
    assert ((masked[sel] != mask_id) & (masked[sel] != ids[sel])).float().mean().item() > 0.05
