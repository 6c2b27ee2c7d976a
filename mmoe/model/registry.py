"""The one backbone builder, `create_model`, and the named model sizes behind it (`list_models`).

Named sizes are data: `configs/model/*.yaml`. The folder is package data (`mmoe.configs`, see `mmoe.resources`),
so names resolve from any working directory after a plain install, not only in a source checkout. A YAML file
holds the fields of `MultiwayConfig` (with `moe:` nested). `create_model` takes a name, a path to any such YAML
or a config, keyword overrides (`moe={...}` merges into the MoE block) and, like open_clip's
`create_model(pretrained=...)`, the weights to start from (`init_from`). Every LightningModule of `mmoe.train`,
the visualization tool and the command-line tools build their backbone through it, so a checkpoint loads the
same way everywhere: position tables resampled to the target `img_size`, the text branch of a full checkpoint
skipped by name for a vision-only target (`modalities: [vision]`), any other missing or unexpected key refused.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from mmoe.model.backbone import MultiwayTransformer
from mmoe.model.config import MultiwayConfig
from mmoe.model.io import load_backbone_weights, read_checkpoint
from mmoe.resources import config_root

CONFIG_DIR = config_root() / "model"


def list_models() -> list[str]:
    """Names of the registered sizes (the stems of configs/model/*.yaml), sorted."""
    if not CONFIG_DIR.is_dir():
        return []
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def get_config(name_or_yaml: str | Path | MultiwayConfig, **overrides: Any) -> MultiwayConfig:
    """Resolve a registered name, a YAML path, or a config object, then apply `overrides`."""
    if isinstance(name_or_yaml, MultiwayConfig):
        config = name_or_yaml
    else:
        text = str(name_or_yaml)
        path = Path(text)
        if text.endswith((".yaml", ".yml")) or path.is_file():
            if not path.is_file():
                raise FileNotFoundError(f"create_model: model YAML {text} does not exist")
        else:
            path = CONFIG_DIR / f"{text}.yaml"
            if not path.is_file():
                raise KeyError(f"create_model: unknown model {text!r}; registered: {list_models()} (in {CONFIG_DIR})")
        config = MultiwayConfig.from_yaml(path)
    return config.replace(**overrides) if overrides else config


#: What ``init_from`` accepts: a path of an mmoe model file, of a ``save_pretrained`` folder or of one of our
#: Lightning checkpoints, or such a checkpoint already loaded (``mmoe.model.io.load_checkpoint_file``; a caller
#: that also needs the file's other weights reads it once).
InitFrom = str | os.PathLike[str] | Mapping[str, Any]


def create_model(
    name_or_yaml: str | Path | MultiwayConfig | None = None,
    *,
    init_from: InitFrom | None = None,
    device: str | torch.device | None = None,
    strict: bool = True,
    **overrides: Any,
) -> MultiwayTransformer:
    """Build a `MultiwayTransformer`, optionally starting from saved weights.

    Args:
        name_or_yaml: a registered name (`list_models()`), a model YAML path or a `MultiwayConfig`. ``None`` with
            `init_from` rebuilds the checkpoint's own configuration (what `mmoe.model.load_model` does).
        init_from: an mmoe model file, a ``save_pretrained`` folder (``config.json`` + ``model.safetensors``), one
            of our Lightning checkpoints (backbone under ``backbone.``, config in ``mmoe_config``) or such a
            checkpoint already loaded. Its backbone weights are loaded into the new
            model with :func:`mmoe.model.io.load_backbone_weights`: vision and text position tables are resampled
            to the new `img_size` / `max_text_len`; into a vision-only model the text-branch tensors are skipped
            by name (their number is logged); other missing/unexpected keys raise when `strict`.
        device: ``"meta"`` builds without allocating memory (used to check base/large shapes in tests); not
            with `init_from`.
        strict: refuse missing or unexpected backbone keys of `init_from` (naming them).
        overrides: `MultiwayConfig` fields to change, e.g. ``img_size=384``, ``drop_path=0.1``,
            ``modalities=["vision"]``, ``moe={"z_loss_weight": 0.001}``.
    """
    if name_or_yaml is None:
        if init_from is None:
            raise ValueError("create_model: give a model name, YAML or config, or init_from= to rebuild a checkpoint")
        config, state = read_checkpoint(init_from)
        if overrides:
            config = config.replace(**overrides)
    else:
        config = get_config(name_or_yaml, **overrides)
        state = None
    if init_from is not None and device is not None:
        raise ValueError(f"create_model: init_from cannot be combined with device={device!r}")
    if device is None:
        model = MultiwayTransformer(config)
    else:
        with torch.device(device):
            return MultiwayTransformer(config)
    if init_from is not None:
        if state is None:
            _, state = read_checkpoint(init_from)
        load_backbone_weights(model, state, strict=strict)
    return model


def load_model(path: InitFrom, *, strict: bool = True, **overrides: Any) -> MultiwayTransformer:
    """Rebuild the backbone saved in `path` with its own configuration (``create_model(None, init_from=path)``).

    `overrides` change the config (e.g. ``img_size=384``, ``drop_path=0.1``); position tables are resampled
    when the image size changes.
    """
    return create_model(None, init_from=path, strict=strict, **overrides)


def from_pretrained(path: str | os.PathLike[str], *, strict: bool = True, **overrides: Any) -> MultiwayTransformer:
    """Rebuild the backbone of a ``save_pretrained`` folder, offline and without unpickling anything.

    ``config.json`` gives the `MultiwayConfig` (classifier included), ``model.safetensors`` the weights, loaded
    exactly (bit for bit). `overrides` change the config as in :func:`load_model` (position tables resampled).
    Model files and Lightning checkpoints of ours are read too (then through ``torch.load(weights_only=True)``).
    """
    return load_model(path, strict=strict, **overrides)
