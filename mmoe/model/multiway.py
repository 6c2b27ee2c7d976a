"""Per-modality ("multiway") building blocks ([B3] sec. 2.1).

Dimension legend: B batch, L tokens (vision first, then text), D width, F FFN width.

The multiway split is an argument (`num_vision`, the number of leading vision tokens), never module
state set before the call (the pattern avoided is torchscale's `set_split_position`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def split_apply(x_BLD: torch.Tensor, num_vision: int, vision: nn.Module, text: nn.Module | None) -> torch.Tensor:
    """Apply `vision` to the first `num_vision` tokens and `text` to the rest, then concatenate.

    `text=None` is the vision-only layout (`MultiwayConfig.modalities`); text tokens are then an error.
    """
    length = x_BLD.shape[1]
    if num_vision >= length:
        return vision(x_BLD)
    if text is None:
        raise ValueError(
            f"vision-only backbone (modalities=['vision']) got {length - num_vision} text tokens; build it with "
            "modalities ['vision', 'text'] to encode text"
        )
    if num_vision <= 0:
        return text(x_BLD)
    return torch.cat([vision(x_BLD[:, :num_vision]), text(x_BLD[:, num_vision:])], dim=1)


class Multiway(nn.Module):
    """Two copies of a token-wise module, one per modality (BEiT-3's A = vision, B = language).

    `text=None` keeps only the vision copy (vision-only backbone) under the same parameter names.
    """

    def __init__(self, vision: nn.Module, text: nn.Module | None) -> None:
        super().__init__()
        self.vision = vision
        self.text = text

    def forward(self, x_BLD: torch.Tensor, num_vision: int) -> torch.Tensor:
        return split_apply(x_BLD, num_vision, self.vision, self.text)


class Shared(nn.Module):
    """A token-wise module shared by both modalities, with the same call signature as `Multiway`."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.shared = module

    def forward(self, x_BLD: torch.Tensor, num_vision: int) -> torch.Tensor:
        return self.shared(x_BLD)


def multiway_or_shared(make: Callable[[], nn.Module], multiway: bool) -> nn.Module:
    """`Multiway(make(), make())` or `Shared(make())`: one call signature for both layouts."""
    return Multiway(make(), make()) if multiway else Shared(make())


class DenseFFN(nn.Module):
    """BEiT-3's FFN with Magneto sub-LN: fc2(LN(gelu(fc1(x)))) ([Magneto]; torchscale FeedForwardNetwork).

    GELU runs in float32 as in the reference, so half-precision runs match it.
    """

    def __init__(self, dim: int, hidden: int, *, subln: bool = True, eps: float = 1e-5, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.ffn_norm = nn.LayerNorm(hidden, eps=eps) if subln else nn.Identity()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x_BLD: torch.Tensor) -> torch.Tensor:
        h_BLF = self.fc1(x_BLD)
        h_BLF = F.gelu(h_BLF.float()).type_as(h_BLF)
        h_BLF = self.ffn_norm(self.drop(h_BLF))
        return self.drop(self.fc2(h_BLF))


class MultiwayFFN(nn.Module):
    """Modality-expert FFNs: V-FFN for vision tokens, L-FFN for text tokens, optional VL-FFN.

    The VL-FFN is the paper's vision-language expert in the top layers ([B3] sec. 2.1): when a sequence
    holds both modalities, all its tokens go through it; single-modality inputs keep V-FFN / L-FFN.
    The released BEiT-3 has no VL-FFN, so it is off unless `vl=True`. A vision-only backbone sets `text` and
    `vl` to None (`MultiwayTransformer`); text tokens are then an error.
    """

    def __init__(self, dim: int, hidden: int, *, subln: bool, eps: float, dropout: float, vl: bool = False) -> None:
        super().__init__()
        self.vision = DenseFFN(dim, hidden, subln=subln, eps=eps, dropout=dropout)
        self.text: DenseFFN | None = DenseFFN(dim, hidden, subln=subln, eps=eps, dropout=dropout)
        self.vl = DenseFFN(dim, hidden, subln=subln, eps=eps, dropout=dropout) if vl else None

    def forward(self, x_BLD: torch.Tensor, num_vision: int) -> torch.Tensor:
        if self.vl is not None and 0 < num_vision < x_BLD.shape[1]:
            return self.vl(x_BLD)
        return split_apply(x_BLD, num_vision, self.vision, self.text)
