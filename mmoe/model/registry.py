"""Named model sizes are data: `configs/model/*.yaml` behind `create_model(name)` / `list_models()`.

The folder is package data (`mmoe.configs`, see `mmoe.resources`), so names resolve from any working directory
after a plain install, not only in a source checkout. A YAML file holds the fields of `MultiwayConfig` (with
`moe:` nested). `create_model` also takes a path to any such YAML, and keyword overrides (`moe={...}` merges
into the MoE block).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mmoe.model.backbone import MultiwayTransformer
from mmoe.model.config import MultiwayConfig
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


def create_model(
    name_or_yaml: str | Path | MultiwayConfig, *, device: str | torch.device | None = None, **overrides: Any
) -> MultiwayTransformer:
    """Build a `MultiwayTransformer` from a registered name, a YAML path or a config.

    `device="meta"` builds without allocating memory (used to check base/large shapes in tests).
    """
    config = get_config(name_or_yaml, **overrides)
    if device is None:
        return MultiwayTransformer(config)
    with torch.device(device):
        return MultiwayTransformer(config)
