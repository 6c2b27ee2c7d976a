"""Shared helpers for the viz tests: routing records with a hand-set assignment and a stand-in backbone.

The stand-in backbone routes with hand-set "router weights": patch sub-token j of a patch whose mean
red value is r goes to expert (round(r * (E - 1)) + j) % E; text sub-token j of token id t goes to
expert (t + j) % E. So a test that paints patches knows exactly which expert each one must show.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from mmoe.moe import RoutingRecord


def make_record(expert_ids_BLhK: np.ndarray, num_experts: int, gates_BLhK: np.ndarray | None = None):
    """A RoutingRecord whose (S, K) rows are the given (B, L, h, K) assignment; -1 marks padding."""
    ids = np.asarray(expert_ids_BLhK, dtype=np.int64)
    b, seq, h, k = ids.shape
    if gates_BLhK is None:
        gates_BLhK = np.where(ids >= 0, np.linspace(0.9, 0.5, k)[None, None, None, :], 0.0)
    ids_t = torch.from_numpy(ids.reshape(b * seq * h, k))
    kept = ids_t >= 0
    counts = torch.bincount(ids_t[kept], minlength=num_experts)
    return RoutingRecord(
        expert_ids=ids_t,
        gates=torch.from_numpy(np.asarray(gates_BLhK, dtype=np.float32).reshape(b * seq * h, k)),
        kept=kept,
        counts=counts,
        dropped=torch.tensor(0),
        num_tokens=b * seq,
        num_heads=h,
        num_experts=num_experts,
        top_k=k,
        token_shape=(b, seq),
    )


def red_expert(red: float, head: int, num_experts: int) -> int:
    """The expert the stand-in backbone gives head `head` of a patch of mean red value `red`."""
    return (int(round(red * (num_experts - 1))) + head) % num_experts


class StandInBackbone(torch.nn.Module):
    """A tiny backbone honouring the forward-output contract of docs/interfaces.md sec. 2."""

    def __init__(
        self,
        *,
        img_size: int = 32,
        patch: int = 8,
        heads: int = 2,
        experts: int = 4,
        top_k: int = 2,
        layers: tuple[str, ...] = ("layer1", "layer3"),
        per_modality: bool = False,
    ) -> None:
        super().__init__()
        self.config = SimpleNamespace(
            img_size=img_size,
            patch_size=patch,
            image_mean=(0.5, 0.5, 0.5),
            image_std=(0.5, 0.5, 0.5),
            max_text_len=12,
            tokenizer="openclip",
            tokenizer_path=None,
        )
        self.h, self.e, self.k, self.layers, self.per_modality = heads, experts, top_k, layers, per_modality
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def _vision_ids(self, image: torch.Tensor) -> np.ndarray:
        b = image.shape[0]
        p = self.config.patch_size
        red = (image[:, 0] * 0.5 + 0.5).clamp(0, 1)  # de-normalize the red channel
        means = torch.nn.functional.avg_pool2d(red[:, None], p)[:, 0].flatten(1).numpy()  # (B, P)
        ids = np.zeros((b, 1 + means.shape[1], self.h, self.k), dtype=np.int64)
        for j in range(self.h):
            ids[:, 1:, j, 0] = [[red_expert(float(r), j, self.e) for r in row] for row in means]
            ids[:, 0, j, 0] = j % self.e  # CLS
        for kk in range(1, self.k):
            ids[..., kk] = (ids[..., 0] + kk) % self.e
        return ids

    def _text_ids(self, text: torch.Tensor, pad: torch.Tensor | None) -> np.ndarray:
        t = text.numpy()
        ids = np.stack([(t[..., None] + j + kk) % self.e for j in range(self.h) for kk in range(self.k)], -1)
        ids = ids.reshape(*t.shape, self.h, self.k)
        if pad is not None:
            ids[pad.numpy()] = -1
        return ids

    def forward(self, image=None, text=None, text_padding_mask=None, attn_mask=None, image_mask=None):
        parts, nv = [], 0
        grid = None
        vis = txt = None
        if image is not None:
            vis = self._vision_ids(image)
            nv = vis.shape[1]
            g = self.config.img_size // self.config.patch_size
            grid = (g, g)
            parts.append(vis)
        if text is not None:
            txt = self._text_ids(text, text_padding_mask)
            parts.append(txt)
        b = (image if image is not None else text).shape[0]
        routing = {}
        for name in self.layers:
            if self.per_modality:
                if vis is not None:
                    routing[f"{name}.vision"] = make_record(vis, self.e)
                if txt is not None:
                    routing[f"{name}.text"] = make_record(txt, self.e)
            else:
                routing[name] = make_record(np.concatenate(parts, 1), self.e)
        length = sum(p.shape[1] for p in parts)
        return SimpleNamespace(
            features=torch.zeros(b, length, 4) + self.dummy,
            num_vision_tokens=nv,
            grid_size=grid,
            routing=routing,
            aux_loss=torch.zeros(()),
        )


def test_make_record_round_trip():
    from mmoe.viz.records import record_to_tokens

    ids = np.arange(2 * 3 * 2 * 1).reshape(2, 3, 2, 1) % 5
    rec = make_record(ids, 5)
    back = record_to_tokens(rec)
    np.testing.assert_array_equal(back.expert_ids, ids)
    assert back.counts().tolist() == np.bincount(ids.ravel(), minlength=5).tolist()


def test_stand_in_backbone_assignment():
    model = StandInBackbone(img_size=16, patch=8, heads=2, experts=4, top_k=1)
    image = torch.full((1, 3, 16, 16), -1.0)  # red 0 everywhere
    image[0, 0, :8, 8:] = 1.0  # top-right patch red 1
    out = model(image=image)
    ids = out.routing["layer1"].expert_ids.view(1, 5, 2, 1)[0, 1:, :, 0]  # (4 patches, h)
    assert ids[:, 0].tolist() == [0, 3, 0, 0]
    assert ids[:, 1].tolist() == [1, 0, 1, 1]
