"""Multiway self-attention with Magneto sub-LN, SDPA, masks and a key/value cache.

Dimension legend: B batch, H attention heads, N query tokens, M key tokens (cached + new), Dh head width,
D width.

Layouts ([B3] sec. 2.1): `multiway=True` is the released BEiT-3's *decoupled* attention (q/k/v/out projections
and the sub-LN per modality; the softmax still runs over all tokens, so modalities fuse); `multiway=False`
is the paper's *shared* attention ([B3] sec. 2.1). Output: out(LN_inner(attn(x))) (Magneto sub-LN).
`qk_norm=True` adds a LayerNorm over each head's queries and keys before the dot product (Dehghani et al.
2023, ViT-22B sec. 3; timm's `qk_norm`): the logits then start at unit scale instead of ~0.05 under the
0.02-std initialisation, so attention leaves its uniform start far sooner. Off by default (BEiT-3 has none).
Masks are boolean, True = may attend, shaped (B, 1, N, M) so they broadcast over heads.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from mmoe.model.multiway import multiway_or_shared


class KVCache:
    """Keys and values of every layer for incremental decoding (docs/interfaces.md section 8).

    Tensors are (B, H, M, Dh) per layer; `padding` (B, M) bool marks cached keys that are padding
    (True = pad). The cache is an explicit argument of the forward, never module state.
    """

    def __init__(self, num_layers: int) -> None:
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.padding: torch.Tensor | None = None

    @property
    def length(self) -> int:
        """Number of cached tokens (0 when empty)."""
        return 0 if self.keys[0] is None else int(self.keys[0].shape[2])

    @property
    def batch_size(self) -> int | None:
        return None if self.keys[0] is None else int(self.keys[0].shape[0])

    def get(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        key = self.keys[layer]
        return None if key is None else (key, self.values[layer])  # type: ignore[return-value]

    def set(self, layer: int, key_BHMD: torch.Tensor, value_BHMD: torch.Tensor) -> None:
        self.keys[layer] = key_BHMD
        self.values[layer] = value_BHMD

    def reorder(self, index_B: torch.Tensor) -> KVCache:
        """Select / repeat batch rows in place (beam search); returns self for chaining."""
        for i, (key, value) in enumerate(zip(self.keys, self.values)):
            if key is not None:
                self.keys[i] = key.index_select(0, index_B.to(key.device))
                self.values[i] = value.index_select(0, index_B.to(value.device))  # type: ignore[union-attr]
        if self.padding is not None:
            self.padding = self.padding.index_select(0, index_B.to(self.padding.device))
        return self


def manual_attention(
    q_BHND: torch.Tensor,
    k_BHMD: torch.Tensor,
    v_BHMD: torch.Tensor,
    mask_B1NM: torch.Tensor | None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Reference attention: softmax(q k^T / sqrt(Dh)) v in float32, as torchscale's MultiheadAttention."""
    scores_BHNM = (q_BHND * q_BHND.shape[-1] ** -0.5) @ k_BHMD.transpose(-1, -2)
    if mask_B1NM is not None:
        scores_BHNM = scores_BHNM.masked_fill(~mask_B1NM, float("-inf"))
    # Half precision is upcast to float32 for the softmax; float32/float64 stay as they are.
    dtype = torch.float32 if scores_BHNM.element_size() < 4 else scores_BHNM.dtype
    probs_BHNM = F.softmax(scores_BHNM, dim=-1, dtype=dtype).type_as(scores_BHNM)
    probs_BHNM = F.dropout(probs_BHNM, p=dropout_p, training=dropout_p > 0)
    return probs_BHNM @ v_BHMD


class MultiwayAttention(nn.Module):
    """Self-attention over the concatenated vision+text sequence ([B3] sec. 2.1; torchscale MultiheadAttention)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        multiway: bool = True,
        subln: bool = True,
        eps: float = 1e-5,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        impl: str = "sdpa",
        qk_norm: bool = False,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"MultiwayAttention: dim {dim} not divisible by num_heads {num_heads}")
        if impl not in ("sdpa", "manual"):
            raise ValueError(f"MultiwayAttention.impl: expected 'sdpa' or 'manual', got {impl!r}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.impl = impl
        self.attn_drop = attn_drop
        self.q_proj = multiway_or_shared(lambda: nn.Linear(dim, dim, bias=qkv_bias), multiway)
        self.k_proj = multiway_or_shared(lambda: nn.Linear(dim, dim, bias=qkv_bias), multiway)
        self.v_proj = multiway_or_shared(lambda: nn.Linear(dim, dim, bias=qkv_bias), multiway)
        self.inner_norm = multiway_or_shared(lambda: nn.LayerNorm(dim, eps=eps), multiway) if subln else None
        self.out_proj = multiway_or_shared(lambda: nn.Linear(dim, dim), multiway)
        # One norm over the head width, shared by heads and modalities (the projections before it are per modality).
        self.q_norm = nn.LayerNorm(self.head_dim, eps=eps) if qk_norm else None
        self.k_norm = nn.LayerNorm(self.head_dim, eps=eps) if qk_norm else None
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(
        self,
        x_BND: torch.Tensor,
        num_vision: int,
        mask_B1NM: torch.Tensor | None = None,
        *,
        cache: KVCache | None = None,
        layer_index: int = 0,
        update_cache: bool = True,
    ) -> torch.Tensor:
        """Attend from the N tokens of `x_BND` to the cached keys (if any) and to themselves.

        `num_vision` counts the leading vision tokens of `x_BND` (0 when decoding text steps).
        With a `cache`, new keys/values are appended to it when `update_cache` is True.
        """
        heads = self.num_heads
        q_BHND = rearrange(self.q_proj(x_BND, num_vision), "b n (h d) -> b h n d", h=heads)
        k_BHND = rearrange(self.k_proj(x_BND, num_vision), "b n (h d) -> b h n d", h=heads)
        v_BHND = rearrange(self.v_proj(x_BND, num_vision), "b n (h d) -> b h n d", h=heads)
        if self.q_norm is not None and self.k_norm is not None:
            q_BHND, k_BHND = self.q_norm(q_BHND), self.k_norm(k_BHND)  # keys are cached normalised
        if cache is not None:
            past = cache.get(layer_index)
            if past is not None:
                k_BHND = torch.cat([past[0], k_BHND], dim=2)
                v_BHND = torch.cat([past[1], v_BHND], dim=2)
            if update_cache:
                cache.set(layer_index, k_BHND, v_BHND)
        dropout_p = self.attn_drop if self.training else 0.0
        if self.impl == "sdpa":
            o_BHND = F.scaled_dot_product_attention(q_BHND, k_BHND, v_BHND, attn_mask=mask_B1NM, dropout_p=dropout_p)
        else:
            o_BHND = manual_attention(q_BHND, k_BHND, v_BHND, mask_B1NM, dropout_p)
        o_BND = rearrange(o_BHND, "b h n d -> b n (h d)")
        if self.inner_norm is not None:
            o_BND = self.inner_norm(o_BND, num_vision)
        return self.proj_drop(self.out_proj(o_BND, num_vision))


def build_attention_mask(
    *,
    batch: int,
    num_queries: int,
    num_keys: int,
    key_padding_BM: torch.Tensor | None,
    attn_mask: torch.Tensor | None,
    device: torch.device,
) -> torch.Tensor | None:
    """Combine a key padding mask (True = pad) and an attention mask (True = may attend) into (B, 1, N, M)."""
    mask: torch.Tensor | None = None
    if attn_mask is not None:
        if attn_mask.dtype != torch.bool:
            raise ValueError(f"attn_mask: expected a bool tensor (True = may attend), got {attn_mask.dtype}")
        if attn_mask.shape[-2:] != (num_queries, num_keys) or attn_mask.ndim not in (2, 3):
            raise ValueError(
                f"attn_mask: expected shape ({num_queries}, {num_keys}) or (B, {num_queries}, {num_keys}) over the "
                f"concatenated [vision, text] sequence, got {tuple(attn_mask.shape)}"
            )
        if attn_mask.ndim == 3 and attn_mask.shape[0] not in (1, batch):
            raise ValueError(f"attn_mask: batch dimension {attn_mask.shape[0]} does not match batch {batch}")
        mask = attn_mask.to(device)
        mask = mask[None, None] if mask.ndim == 2 else mask[:, None]
    if key_padding_BM is not None:
        if key_padding_BM.shape != (batch, num_keys):
            raise ValueError(f"padding mask: expected shape {(batch, num_keys)}, got {tuple(key_padding_BM.shape)}")
        keep_B11M = ~key_padding_BM.to(device)[:, None, None, :]
        mask = keep_B11M if mask is None else mask & keep_B11M
    if mask is not None:
        mask = mask.expand(batch, 1, num_queries, num_keys)
    return mask


def causal_mask(num_queries: int, num_past: int, device: torch.device) -> torch.Tensor:
    """(N, past + N) True = may attend: every past key, and new keys up to and including the query itself."""
    new = torch.ones(num_queries, num_queries, dtype=torch.bool, device=device).tril()
    past = torch.ones(num_queries, num_past, dtype=torch.bool, device=device)
    return torch.cat([past, new], dim=1)


def rescale_(linear: nn.Linear, layer_id: int) -> None:
    """Divide an output projection by sqrt(2 * layer_id) ([BEiT] `fix_init_weight`, as BEiT-3)."""
    with torch.no_grad():
        linear.weight.div_(math.sqrt(2.0 * layer_id))
