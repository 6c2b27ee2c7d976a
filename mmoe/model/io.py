"""Saving and loading backbones (docs/interfaces.md section 2).

Two formats, both read by every loader here (and so by `create_model(init_from=...)`, `load_model`,
`from_pretrained` and the task modules' `init_from`):

- the model file: `{"format": "mmoe", "config": MultiwayConfig.to_dict(), "state_dict": ...}`, written atomically
  (`mmoe.files.atomic_torch_save`) and read with `torch.load(weights_only=True)`;
- the pretrained folder, as open_clip / timm / Hugging Face users share weights (`save_pretrained`): `config.json`
  (format, the `MultiwayConfig`, the tokenizer spec, timm's `pretrained_cfg`) and `model.safetensors` (the state
  dict; safetensors holds raw tensors only, so reading it runs no pickle), plus `tokenizer.model` when the config
  names a sentencepiece file, so the folder is complete on another machine.

Our Lightning checkpoints are read too: their module stored `checkpoint["mmoe_config"]` and keeps the backbone
under `backbone.`. The one builder every caller uses, `create_model(name | yaml | config, init_from=...)`, lives in
`mmoe.model.registry` and reads weights through the functions here.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmoe.files import atomic_torch_save, atomic_write, atomic_write_bytes, atomic_write_json
from mmoe.model.backbone import MultiwayTransformer
from mmoe.model.config import MultiwayConfig
from mmoe.model.embed import resample_vision_pos_embed

FORMAT = "mmoe"
PRETRAINED_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TOKENIZER_NAME = "tokenizer.model"
log = logging.getLogger(__name__)


def save_model(model: MultiwayTransformer, path: str | Path, *, extra: dict[str, Any] | None = None) -> None:
    """Write a backbone file: its config and state dict (plus optional `extra` metadata)."""
    payload: dict[str, Any] = {"format": FORMAT, "config": model.config.to_dict(), "state_dict": model.state_dict()}
    if extra:
        payload["extra"] = extra
    atomic_torch_save(payload, path)


def save_pretrained(model: MultiwayTransformer, path: str | Path, *, extra: dict[str, Any] | None = None) -> Path:
    """Write `model` as a pretrained folder (`config.json`, `model.safetensors`); returns the folder.

    Each file is written atomically and `config.json` last, so a folder with a `config.json` is complete. A
    sentencepiece tokenizer the config names is copied in as `tokenizer.model` (the config then names that file,
    relative to the folder). `extra` is free JSON metadata (e.g. where the weights were converted from).
    """
    from safetensors.torch import save as safetensors_bytes

    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"save_pretrained: {folder} exists and is not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict()
    spm = config.get("tokenizer_path")
    if spm and Path(spm).is_file():
        if Path(spm).resolve() != (folder / TOKENIZER_NAME).resolve():
            atomic_write(folder / TOKENIZER_NAME, lambda f: f.write(Path(spm).read_bytes()))
        config["tokenizer_path"] = TOKENIZER_NAME
    # safetensors wants contiguous tensors that do not share memory; a state dict of ours has no tied tensors.
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(folder / WEIGHTS_NAME, safetensors_bytes(state, metadata={"format": "pt"}))
    spec = dict(model.tokenizer_spec, path=config["tokenizer_path"])
    meta: dict[str, Any] = {
        "format": FORMAT,
        "format_version": PRETRAINED_VERSION,
        "architecture": type(model).__name__,
        "config": config,
        "tokenizer": spec,
        "pretrained_cfg": model.pretrained_cfg,
    }
    if extra:
        meta["extra"] = extra
    atomic_write_json(folder / CONFIG_NAME, meta)
    return folder


def read_pretrained(path: str | Path) -> dict[str, Any]:
    """A pretrained folder as the model-file mapping (`format`, `config`, `state_dict`, `extra`); no pickle.

    A relative `tokenizer_path` that names a file in the folder (what `save_pretrained` writes) is made absolute,
    so the tokenizer is found from any working directory.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(path)
    config_file, weights_file = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    for f in (config_file, weights_file):
        if not f.is_file():
            raise FileNotFoundError(
                f"from_pretrained: {folder} has no {f.name} (a save_pretrained folder holds "
                f"{CONFIG_NAME} and {WEIGHTS_NAME})"
            )
    try:
        meta = json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"from_pretrained: {config_file} is not valid JSON ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("config"), dict):
        raise ValueError(
            f"from_pretrained: {config_file} is not an mmoe config (expected 'format': {FORMAT!r} and a 'config' "
            "mapping); convert foreign weights with mmoe-convert"
        )
    if int(meta.get("format_version", 1)) > PRETRAINED_VERSION:
        raise ValueError(
            f"from_pretrained: {config_file} has format_version {meta['format_version']}; this mmoe reads up to "
            f"{PRETRAINED_VERSION}"
        )
    config = dict(meta["config"])
    spm = config.get("tokenizer_path")
    if spm and not Path(spm).is_absolute() and (folder / spm).is_file():
        config["tokenizer_path"] = str((folder / spm).resolve())
    try:
        state = load_file(weights_file, device="cpu")
    except (SafetensorError, OSError) as err:
        raise ValueError(f"from_pretrained: cannot read {weights_file} ({err})") from None
    return {"format": FORMAT, "config": config, "state_dict": state, "extra": meta.get("extra", {})}


def load_checkpoint_file(path: str | Path) -> Any:
    """The raw object of a checkpoint, read on CPU; a missing file is named.

    A file is read with ``torch.load(weights_only=True)``; a `save_pretrained` folder with :func:`read_pretrained`
    (returned in the model-file layout, so every parser here takes both).
    """
    path = Path(path)
    if path.is_dir():
        return read_pretrained(path)
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


def fit_classifier(model: nn.Module, state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Match the classifier (`head.*`, timm's `reset_classifier`) of `state` to `model`'s, as timm's loaders do.

    A checkpoint head that `model` lacks or that has another shape (another `num_classes`) is dropped, with a
    warning; returns the state and the `model` head keys that stay freshly initialised (allowed to be missing).
    """
    own = model.state_dict()
    mine = sorted(k for k in own if k.startswith("head."))
    theirs = [k for k in state if k.startswith("head.")]
    if theirs and any(k not in own or state[k].shape != own[k].shape for k in theirs):
        shapes = {k: tuple(state[k].shape) for k in theirs}
        log.warning("load_backbone_weights: checkpoint classifier %s does not fit the model's; not loaded", shapes)
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
        theirs = []
    return state, ([] if theirs else mine)


def load_backbone_weights(
    model: MultiwayTransformer, state_dict: dict[str, torch.Tensor], *, strict: bool = True, prefix: str | None = None
) -> tuple[list[str], list[str]]:
    """Load backbone weights into `model`, adapting position tables; returns (missing, unexpected) keys.

    `prefix` (e.g. "backbone.") selects and strips a sub-tree; by default a common "backbone." prefix is
    detected. With `strict=True` any missing or unexpected key raises, naming them. Into a vision-only backbone
    (`MultiwayConfig.modalities`), the text-branch tensors of a full checkpoint are skipped by name
    (:func:`drop_text_branch`) and their number is logged; they are not reported as unexpected. A classifier
    (`head.*`) of another `num_classes` is not loaded and a missing one stays fresh (:func:`fit_classifier`).
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
    state_dict, fresh_head = fit_classifier(model, state_dict)
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
    if strict and (set(missing) - set(fresh_head) or unexpected):
        raise ValueError(
            f"load_backbone_weights: missing keys {missing[:10]} ({len(missing)} total), "
            f"unexpected keys {unexpected[:10]} ({len(unexpected)} total)"
        )
    return missing, unexpected
