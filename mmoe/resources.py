"""The YAML files mmoe ships: model sizes (``model/``) and recipes (``pretrain/``, ``finetune/``).

They live in the repository's top-level ``configs/`` folder, which is also the package ``mmoe.configs``
(pyproject maps ``mmoe.configs`` to ``configs/``): an editable install reads the repository's files, a wheel
carries the same files inside the package. One copy, found through ``importlib.resources`` either way, so
``create_model("tiny_mhmoe")`` and ``mmoe-recipes`` work from any directory after a plain ``pip install``.

A recipe is named by its path under that folder without the suffix: ``pretrain/tiny_mhmoe``. The spellings
``pretrain/tiny_mhmoe.yaml`` and ``configs/pretrain/tiny_mhmoe.yaml`` (how the README and the recipe headers
write them) name the same file.
"""

from __future__ import annotations

import difflib
from importlib import resources
from pathlib import Path

__all__ = ["RECIPE_KINDS", "config_root", "list_recipes", "recipe_path"]

RECIPE_KINDS = ("model", "pretrain", "finetune")


def config_root() -> Path:
    """The folder holding ``model/``, ``pretrain/`` and ``finetune/`` of the imported mmoe.

    A source checkout put on ``sys.path`` without being installed has no ``mmoe.configs`` package; its
    ``configs/`` next to ``mmoe/`` is the same folder, so it is used then.
    """
    try:
        root = resources.files("mmoe.configs")
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[1] / "configs"
    if not isinstance(root, Path):  # e.g. a zipped install: LightningCLI and yaml readers need real files
        raise RuntimeError(
            f"mmoe's shipped configs are not plain files ({root!r}); install mmoe unpacked (pip install mmoe)"
        )
    return root


def list_recipes(kind: str | None = None) -> list[str]:
    """Names (``kind/stem``) of the shipped YAML files, sorted; only those of ``kind`` when given."""
    if kind is not None and kind not in RECIPE_KINDS:
        raise ValueError(f"recipe kind {kind!r} is not one of {list(RECIPE_KINDS)}")
    root = config_root()
    kinds = RECIPE_KINDS if kind is None else (kind,)
    return sorted(f"{k}/{p.stem}" for k in kinds if (root / k).is_dir() for p in (root / k).glob("*.yaml"))


def _normalize(name: str) -> str:
    text = name.strip().replace("\\", "/")
    for prefix in ("./", "configs/"):
        if text.startswith(prefix):
            text = text[len(prefix) :]
    for suffix in (".yaml", ".yml"):
        if text.endswith(suffix):
            text = text[: -len(suffix)]
    return text


def recipe_path(name: str) -> Path:
    """The installed file of recipe ``name`` (``pretrain/tiny_mhmoe``, optionally with ``configs/`` / ``.yaml``).

    A bare stem (``imagenet_synthetic``) is accepted when exactly one kind has it. Unknown or ambiguous names
    raise ``KeyError`` naming the closest shipped recipes, so a typo is answered with what exists.
    """
    key = _normalize(name)
    known = list_recipes()
    if key in known:
        return config_root() / f"{key}.yaml"
    if "/" not in key:
        matches = [r for r in known if r.split("/", 1)[1] == key]
        if len(matches) == 1:
            return config_root() / f"{matches[0]}.yaml"
        if matches:
            raise KeyError(f"recipe {name!r} is ambiguous: {', '.join(matches)}; give the kind, e.g. {matches[0]}")
    close = difflib.get_close_matches(key, known, n=5, cutoff=0.5)
    hint = f"closest: {', '.join(close)}" if close else f"shipped: {', '.join(known)}"
    raise KeyError(f"unknown recipe {name!r} ({hint}); `mmoe-recipes list` shows them all")
