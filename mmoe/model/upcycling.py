"""Sparse upcycling: start an (MH-)MoE model from a dense Multiway checkpoint (Komatsuzaki et al. 2023).

Every weight outside the MoE layers is copied; each MoE layer's experts start from that layer's dense FFNs:

- `mode="replicate"` (h = 1, expert width = dense FFN width): every expert is an exact copy of a dense FFN, and
  the upcycled model computes the dense model's features (up to float rounding, ~1e-6) on any input. That needs
  three MoE settings besides the copies, which `upcycle` sets (with a warning naming each change):
  `pool="per_modality"` (a shared pool sends text tokens to copies of the V-FFN and image patches to copies of
  the L-FFN, whatever `source` says for some of them), `renormalize_gates=True` (raw top-k probabilities sum to
  less than 1 and scale the FFN output down; renormalized, the gates of a token sum to 1 over identical experts,
  so the router's choice does not matter) and `capacity_factor=None` (a dropped assignment loses its FFN
  output). Head/merge layers (n <= 1) start at the identity. Settings that would change the architecture are
  refused instead, with the setting that makes the copy exact: `num_heads=1` and `expert_hidden=ffn_dim`
  (an MH-MoE expert sees one d/h slice of a token, so no copy of a dense FFN, which mixes all d features,
  computes it; [MH1] sec. 3), biased experts, the GELU activation and the reshape split. `exact=False` keeps
  the given settings: the experts are still copies, but the function is no longer the dense one.
- `mode="split"` (any h, [MH1] sec. 3 sub-token width d/h): expert e takes the diagonal block j = e mod h of the
  dense matrices (input features j*d/h..(j+1)*d/h) and the hidden units starting at (e // h) * F (wrapping), with
  identity head/merge layers. This is the block-diagonal part of the dense FFN, an initialization only: the
  upcycled MH-MoE does not compute the dense function.

Dimension legend: d width, C = d/h sub-token width, F expert width, F0 dense FFN width, E experts.
With a shared expert pool, `source` picks which dense FFN seeds expert e: "vision", "text" or "alternate"
(even experts from the V-FFN, odd from the L-FFN); per-modality pools copy their own modality's FFN.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from mmoe.model.backbone import MultiwayTransformer
from mmoe.model.config import MoEConfig, MultiwayConfig
from mmoe.model.io import load_backbone_weights
from mmoe.model.multiway import DenseFFN
from mmoe.model.registry import load_model

UpcycleMode = Literal["replicate", "split"]
UpcycleSource = Literal["alternate", "vision", "text"]


def upcycle(
    dense: MultiwayTransformer | str | Path,
    moe: MoEConfig | dict[str, Any],
    *,
    mode: UpcycleMode = "replicate",
    source: UpcycleSource = "alternate",
    exact: bool = True,
) -> MultiwayTransformer:
    """Return a new MoE model whose experts start from the FFNs of `dense` (a model or an mmoe file).

    With `mode="replicate"` and `exact=True` (the default, and what `mmoe-convert-checkpoint --upcycle` uses) the
    MoE settings are adjusted so the new model computes the dense one's features (see the module docstring).
    """
    if not isinstance(dense, MultiwayTransformer):
        dense = load_model(dense)
    if dense.config.moe is not None:
        raise ValueError("upcycle: the source model already has MoE layers; expected a dense model (moe: null)")
    if mode not in ("replicate", "split"):
        raise ValueError(f"upcycle: mode={mode!r}; expected 'replicate' or 'split'")
    if source not in ("alternate", "vision", "text"):
        raise ValueError(f"upcycle: source={source!r}; expected 'alternate', 'vision' or 'text'")
    moe_cfg = moe if isinstance(moe, MoEConfig) else MoEConfig(**moe)
    # Experts carry the dense FFN's sub-LN (BEiT-3 layout) so copies compute the same function.
    moe_cfg = dataclasses.replace(moe_cfg, expert_inner_norm=dense.config.subln)
    if moe_cfg.activation != "gelu":
        raise ValueError("upcycle: the dense FFN is GELU; expected moe.activation='gelu'")
    if dense.config.vlffn_layers:
        raise ValueError("upcycle: models with a VL-FFN are not supported (no expert counterpart)")
    if mode == "replicate":
        moe_cfg = replicate_settings(moe_cfg, ffn_dim=dense.config.ffn_dim, exact=exact)
    config: MultiwayConfig = dense.config.replace(moe=dataclasses.asdict(moe_cfg))
    d, h = config.dim, moe_cfg.num_heads
    if max(moe_cfg.head_layers, moe_cfg.merge_layers) > 1:
        raise ValueError("upcycle: head/merge layers deeper than 1 cannot start at the identity; use n <= 1")

    model = MultiwayTransformer(config)
    dense_state = dense.state_dict()
    missing, unexpected = load_backbone_weights(model, dense_state, strict=False)
    moe_layers = [i for i in range(config.depth) if config.is_moe_layer(i)]
    bad_missing = [k for k in missing if not any(k.startswith(f"blocks.{i}.moe.") for i in moe_layers)]
    bad_unexpected = [k for k in unexpected if not any(k.startswith(f"blocks.{i}.ffn.") for i in moe_layers)]
    if bad_missing or bad_unexpected:
        raise ValueError(
            f"upcycle: unexpected key mismatch: missing {bad_missing[:5]}, unexpected {bad_unexpected[:5]}"
        )

    for i in moe_layers:
        ffns = dense.blocks[i].ffn
        target = model.blocks[i].moe
        if moe_cfg.pool == "shared":
            order = {"alternate": ["vision", "text"], "vision": ["vision"], "text": ["text"]}[source]
            _fill(target, [getattr(ffns, order[e % len(order)]) for e in range(moe_cfg.num_experts)], mode, d, h)
        else:  # one pool per modality the model has (a vision-only backbone has no text pool)
            for modality, pool in target.items():
                _fill(pool, [getattr(ffns, modality)] * moe_cfg.num_experts, mode, d, h)
    return model


def replicate_settings(moe: MoEConfig, *, ffn_dim: int, exact: bool = True) -> MoEConfig:
    """The MoE settings under which replicated experts compute the dense FFN; refuses what a setting cannot fix.

    Returns `moe` with `pool="per_modality"`, `renormalize_gates=True` and `capacity_factor=None` (each change
    reported in one warning) when `exact`; unchanged otherwise. Raises ValueError, naming the setting that makes
    the copy exact, for the settings that change the experts' shape or function.
    """
    refused = []
    if moe.num_heads != 1:
        refused.append(
            f"num_heads=1 (got {moe.num_heads}: an MH-MoE expert sees a d/h slice of each token, so a copy of the "
            "dense FFN cannot compute it; mode='split' starts MH-MoE experts from its diagonal blocks, as an "
            "initialization only)"
        )
    if moe.expert_hidden != ffn_dim:
        refused.append(f"expert_hidden={ffn_dim} (the dense FFN width; got {moe.expert_hidden})")
    if moe.extra.get("expert_bias") is False:
        refused.append("experts with biases (got extra.expert_bias=False; the dense FFN has biases)")
    if moe.extra.get("split", "reshape") != "reshape":
        refused.append(f"split='reshape' (got extra.split={moe.extra['split']!r})")
    if refused:
        raise ValueError("upcycle(mode='replicate'): the experts can only be exact copies with " + "; ".join(refused))
    if not exact:
        return moe
    wanted = {"pool": "per_modality", "renormalize_gates": True, "capacity_factor": None}
    why = {
        "pool": "a shared pool routes text tokens to copies of the V-FFN and patches to copies of the L-FFN",
        "renormalize_gates": "raw top-k probabilities sum to less than 1 and scale the FFN output down",
        "capacity_factor": "a token over an expert's capacity would lose its FFN output",
    }
    changes = {k: v for k, v in wanted.items() if getattr(moe, k) != v}
    if changes:
        said = "; ".join(f"{k}={v!r} (was {getattr(moe, k)!r}: {why[k]})" for k, v in changes.items())
        warnings.warn(
            f"upcycle(mode='replicate'): set {said}, so the upcycled model computes the dense model's features; "
            "pass exact=False to keep the given settings",
            UserWarning,
            stacklevel=3,
        )
    return dataclasses.replace(moe, **changes)


def _identity_(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Linear):
            with torch.no_grad():
                m.weight.copy_(torch.eye(m.out_features, m.in_features))
                m.bias.zero_()


@torch.no_grad()
def _fill(layer: nn.Module, sources: list[DenseFFN], mode: UpcycleMode, d: int, h: int) -> None:
    experts = layer.experts
    _identity_(layer.head)
    _identity_(layer.merge)
    width, c = experts.hidden, d // h
    for e, ffn in enumerate(sources):
        w1_FD, b1_F = ffn.fc1.weight, ffn.fc1.bias
        w2_DF, b2_D = ffn.fc2.weight, ffn.fc2.bias
        norm = ffn.ffn_norm if isinstance(ffn.ffn_norm, nn.LayerNorm) else None
        if mode == "replicate":
            rows, cols = torch.arange(width), slice(0, d)
        else:
            start = (e // h) * width
            rows = (start + torch.arange(width)) % w1_FD.shape[0]
            j = e % h
            cols = slice(j * c, (j + 1) * c)
        experts.w1[e].copy_(w1_FD[rows][:, cols].T)
        experts.w2[e].copy_(w2_DF[cols][:, rows].T)
        if experts.b1 is not None:
            experts.b1[e].copy_(b1_F[rows])
            experts.b2[e].copy_(b2_D[cols])
        if experts.norm_weight is not None and norm is not None:
            experts.norm_weight[e].copy_(norm.weight[rows])
            experts.norm_bias[e].copy_(norm.bias[rows])
