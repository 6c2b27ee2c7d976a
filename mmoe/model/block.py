"""One Multiway Transformer block: sub-LN attention + multiway FFN or (MH-)MoE layer.

Dimension legend: B batch, L tokens (vision first), D width.

x = x + drop_path(attn(LN_1(x)));  x = x + drop_path(ffn(LN_2(x)))   (pre-LN with Magneto sub-LN inside,
[B3] released code). The FFN is a per-modality dense FFN, or every `moe.every`-th layer an `mmoe.moe.MHMoE` with one
expert pool shared by both modalities (default) or one per modality ([MH1] sec. 3, docs/interfaces.md 1).
The pre-FFN norm stays per modality in both cases.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.layers import DropPath
from torch import nn

from mmoe.model.attention import KVCache, MultiwayAttention
from mmoe.model.config import MoEConfig
from mmoe.model.multiway import MultiwayFFN, multiway_or_shared


def build_moe_layer(dim: int, moe: MoEConfig) -> nn.Module:
    """Build `mmoe.moe.MHMoE` from a `MoEConfig` (the only place that maps config keys to its kwargs)."""
    from mmoe.moe import MHMoE  # imported here so dense models never need the MoE package

    kwargs: dict[str, Any] = dict(
        top_k=moe.top_k,
        num_heads=moe.num_heads,
        expert_hidden=moe.expert_hidden,
        router=moe.router,
        activation=moe.activation,
        capacity_factor=moe.capacity_factor,
        head_layers=moe.head_layers,
        merge_layers=moe.merge_layers,
        renormalize_gates=moe.renormalize_gates,
        expert_inner_norm=moe.expert_inner_norm,
        aux_loss_weight=moe.aux_loss_weight,
        z_loss_weight=moe.z_loss_weight,
    )
    kwargs.update(moe.extra)
    return MHMoE(dim, moe.num_experts, **kwargs)


class MultiwayBlock(nn.Module):
    """A Multiway Transformer layer ([B3] sec. 2.1) whose FFN may be an MH-MoE layer ([MH1] sec. 3.2)."""

    def __init__(
        self,
        *,
        dim: int,
        num_heads: int,
        ffn_dim: int,
        multiway_attention: bool = True,
        subln: bool = True,
        eps: float = 1e-5,
        qkv_bias: bool = True,
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
        drop_path: float = 0.0,
        attn_impl: str = "sdpa",
        qk_norm: bool = False,
        vlffn: bool = False,
        moe: MoEConfig | None = None,
    ) -> None:
        super().__init__()
        self.norm1 = multiway_or_shared(lambda: nn.LayerNorm(dim, eps=eps), multiway_attention)
        self.attn = MultiwayAttention(
            dim,
            num_heads,
            multiway=multiway_attention,
            subln=subln,
            eps=eps,
            qkv_bias=qkv_bias,
            attn_drop=attn_dropout,
            proj_drop=dropout,
            qk_norm=qk_norm,
            impl=attn_impl,
        )
        self.norm2 = multiway_or_shared(lambda: nn.LayerNorm(dim, eps=eps), True)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.moe_pool = None if moe is None else moe.pool
        self.ffn: nn.Module | None = None
        self.moe: nn.Module | None = None
        if moe is None:
            self.ffn = MultiwayFFN(dim, ffn_dim, subln=subln, eps=eps, dropout=dropout, vl=vlffn)
        elif moe.pool == "shared":
            self.moe = build_moe_layer(dim, moe)
        else:
            self.moe = nn.ModuleDict({"vision": build_moe_layer(dim, moe), "text": build_moe_layer(dim, moe)})

    @property
    def is_moe(self) -> bool:
        return self.moe is not None

    def _moe_forward(
        self, h_BLD: torch.Tensor, num_vision: int, padding_BL: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        if self.moe_pool == "shared":
            out = self.moe(h_BLD, padding_mask=padding_BL)  # type: ignore[misc]
            return out.output, out.aux_loss, {"": out.routing}
        length = h_BLD.shape[1]
        parts: list[torch.Tensor] = []
        aux = h_BLD.new_zeros(())
        routing: dict[str, Any] = {}
        if num_vision > 0:
            out = self.moe["vision"](h_BLD[:, :num_vision])  # type: ignore[index]
            parts.append(out.output)
            aux = aux + out.aux_loss
            routing[".vision"] = out.routing
        if num_vision < length:
            if "text" not in self.moe:  # type: ignore[operator]
                raise ValueError("vision-only backbone (modalities=['vision']) got text tokens in its MoE layer")
            pad = None if padding_BL is None else padding_BL[:, num_vision:]
            out = self.moe["text"](h_BLD[:, num_vision:], padding_mask=pad)  # type: ignore[index]
            parts.append(out.output)
            aux = aux + out.aux_loss
            routing[".text"] = out.routing
        return torch.cat(parts, dim=1), aux, routing

    def forward(
        self,
        x_BLD: torch.Tensor,
        num_vision: int,
        mask_B1LM: torch.Tensor | None = None,
        padding_BL: torch.Tensor | None = None,
        cache: KVCache | None = None,
        layer_index: int = 0,
        update_cache: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, Any]]:
        """Returns (x, aux_loss or None for dense layers, routing records keyed by suffix)."""
        h_BLD = self.attn(
            self.norm1(x_BLD, num_vision),
            num_vision,
            mask_B1LM,
            cache=cache,
            layer_index=layer_index,
            update_cache=update_cache,
        )
        x_BLD = x_BLD + self.drop_path(h_BLD)
        h_BLD = self.norm2(x_BLD, num_vision)
        if self.moe is None:
            return x_BLD + self.drop_path(self.ffn(h_BLD, num_vision)), None, {}  # type: ignore[misc]
        h_BLD, aux, routing = self._moe_forward(h_BLD, num_vision, padding_BL)
        return x_BLD + self.drop_path(h_BLD), aux, routing
