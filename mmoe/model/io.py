"""Saving and loading backbones (docs/interfaces.md section 2).

File format: `{"format": "mmoe", "config": MultiwayConfig.to_dict(), "state_dict": ...}`, written atomically
(`mmoe.files.atomic_torch_save`) and read with `torch.load(weights_only=True)`. `load_model` also reads our
Lightning checkpoints, whose module stored `checkpoint["mmoe_config"]` and keeps the backbone under `backbone.`.
The one builder every caller uses, `create_model(name | yaml | config, init_from=...)`, lives in
`mmoe.model.registry` and reads weights through the functions here.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmoe.files import atomic_torch_save
from mmoe.model.backbone import MultiwayTransformer
from mmoe.model.config import MultiwayConfig
from mmoe.model.embed import resample_vision_pos_embed

FORMAT = "mmoe"
log = logging.getLogger(__name__)


def save_model(model: MultiwayTransformer, path: str | Path, *, extra: dict[str, Any] | None = None) -> None:
    """Write a backbone file: its config and state dict (plus optional `extra` metadata)."""
    payload: dict[str, Any] = {"format": FORMAT, "config": model.config.to_dict(), "state_dict": model.state_dict()}
    if extra:
        payload["extra"] = extra
    atomic_torch_save(payload, path)


def load_checkpoint_file(path: str | Path) -> Any:
    """The raw object of a checkpoint file, read on CPU with ``weights_only=True``; a missing file is named."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"load_model: {path} does not exist")
    return torch.load(path, map_location="cpu", weights_only=True)


def read_checkpoint(
    path: str | Path | Mapping[str, Any], *, name: str | None = None
) -> tuple[MultiwayConfig, dict[str, torch.Tensor]]:
    """Config and backbone state dict from an mmoe model file or one of our Lightning checkpoints.

    `path` may also be the already loaded checkpoint object (a mapping; `name` labels it in errors), for callers
    that need other weights of the same file and read it once.
    """
    if isinstance(path, Mapping):
        return parse_checkpoint(path, name or "<checkpoint>")
    return parse_checkpoint(load_checkpoint_file(path), path)


def parse_checkpoint(ckpt: Any, path: str | Path) -> tuple[MultiwayConfig, dict[str, torch.Tensor]]:
    """:func:`read_checkpoint` on an already loaded object (for callers that also need its other weights)."""
    if not isinstance(ckpt, Mapping):
        raise ValueError(f"load_model: {path} holds a {type(ckpt).__name__}, expected a dict")
    if ckpt.get("format") == FORMAT:
        return MultiwayConfig.from_dict(ckpt["config"], source=f"{path}:config"), ckpt["state_dict"]
    if "mmoe_config" in ckpt and "state_dict" in ckpt:
        config = MultiwayConfig.from_dict(dict(ckpt["mmoe_config"]), source=f"{path}:mmoe_config")
        prefix = "backbone."
        state = {k[len(prefix) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
        if not state:
            raise ValueError(f"load_model: {path} has 'mmoe_config' but no 'backbone.'-prefixed weights in state_dict")
        return config, state
    raise ValueError(
        f"load_model: {path} is neither an mmoe model file (format='mmoe') nor a Lightning checkpoint with "
        f"'mmoe_config'; keys found: {sorted(ckpt)[:10]}. Convert foreign checkpoints with mmoe-convert"
    )


def adapt_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fit position tables of `state` to `model`: resample the vision grid, cut or extend text positions.

    Tables of another width are left alone (the caller reports the shape mismatch).
    """
    state = dict(state)
    own = model.state_dict()

    def other_length(key: str) -> bool:  # a table of the same width whose length differs
        return (
            key in state
            and key in own
            and state[key].shape[-1] == own[key].shape[-1]
            and state[key].shape != own[key].shape
        )

    key = "vision_embed.pos_embed"
    if other_length(key):
        grid = model.vision_embed.grid_size  # type: ignore[union-attr]
        state[key] = resample_vision_pos_embed(state[key], grid)
    key = "text_embed.pos_embed"
    if other_length(key):
        src, dst = state[key], own[key].clone()
        rows = min(src.shape[1], dst.shape[1])
        dst[:, :rows] = src[:, :rows].to(dst.dtype)
        state[key] = dst
    return state


def is_text_branch_key(key: str) -> bool:
    """Whether a backbone state-dict key belongs to the text branch (absent from a vision-only backbone).

    By name: the text embedding (`text_embed.*`), the text copy of a multiway module or per-modality MoE pool
    (a `text` path component, e.g. `blocks.0.attn.q_proj.text.weight`, `norm.text.bias`,
    `blocks.1.moe.text.experts.w1`) and the VL-FFN (`blocks.N.ffn.vl.*`), which only runs on image-text input.
    """
    parts = key.split(".")
    return parts[0] == "text_embed" or "text" in parts[1:] or (len(parts) > 3 and parts[2:4] == ["ffn", "vl"])


def drop_text_branch(
    model: nn.Module, state_dict: dict[str, torch.Tensor], *, prefix: str = ""
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """For a vision-only `model`: `state_dict` without the text-branch keys it has no place for, and those keys.

    A full (vision + text) checkpoint, e.g. from pretraining, then loads into a vision-only backbone by name.
    Keys the model does have are never dropped; for a model with a text branch nothing is dropped. With
    `prefix` (e.g. "backbone." for a task's whole state dict) only keys under it are considered.
    """
    config = getattr(model, "config", None)
    if config is None or getattr(config, "has_text", True):
        return state_dict, []
    own = model.state_dict()
    n = len(prefix)
    skipped = sorted(k for k in state_dict if k.startswith(prefix) and k[n:] not in own and is_text_branch_key(k[n:]))
    gone = set(skipped)
    return {k: v for k, v in state_dict.items() if k not in gone}, skipped


def load_backbone_weights(
    model: MultiwayTransformer, state_dict: dict[str, torch.Tensor], *, strict: bool = True, prefix: str | None = None
) -> tuple[list[str], list[str]]:
    """Load backbone weights into `model`, adapting position tables; returns (missing, unexpected) keys.

    `prefix` (e.g. "backbone.") selects and strips a sub-tree; by default a common "backbone." prefix is
    detected. With `strict=True` any missing or unexpected key raises, naming them. Into a vision-only backbone
    (`MultiwayConfig.modalities`), the text-branch tensors of a full checkpoint are skipped by name
    (:func:`drop_text_branch`) and their number is logged; they are not reported as unexpected.
    """
    if prefix is None and state_dict and all(k.startswith("backbone.") for k in state_dict):
        prefix = "backbone."
    if prefix:
        state_dict = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    state_dict, skipped = drop_text_branch(model, state_dict)
    if skipped:
        log.warning(
            "load_backbone_weights: vision-only backbone, skipped %d text-branch tensors of the checkpoint (e.g. %s)",
            len(skipped),
            ", ".join(skipped[:3]),
        )
    state_dict = adapt_state_dict(model, state_dict)
    own = model.state_dict()
    bad_shapes = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state_dict.items()
        if k in own and v.shape != own[k].shape
    ]
    if bad_shapes:
        raise ValueError("load_backbone_weights: shape mismatch for " + "; ".join(bad_shapes[:10]))
    result = model.load_state_dict(state_dict, strict=False)
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if strict and (missing or unexpected):
        raise ValueError(
            f"load_backbone_weights: missing keys {missing[:10]} ({len(missing)} total), "
            f"unexpected keys {unexpected[:10]} ({len(unexpected)} total)"
        )
    return missing, unexpected
