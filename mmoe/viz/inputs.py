"""What `mmoe-viz` draws on: an image file, a folder of images, a webdataset shard, or a text alone.

A shard is read by the training data's reader (`mmoe.data.shard_reader.read_shard`: webdataset's ``gopen`` and
tar expansion), so a local ``.tar``, a ``pipe:`` command and an ``http(s)://`` URL all work, a sample is what
the training data sees, and a damaged member or shard is counted and reported instead of stopping the run.
The reader (and webdataset) is imported only when a shard is read: ``import mmoe.viz`` stays light.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from mmoe.files import IMAGE_EXTS, is_image_file

__all__ = ["TEXT_EXTS", "VizInput", "load_inputs"]

#: sample members read as a caption, in this order (before a ``.json`` member's captions)
TEXT_EXTS = ("txt", "text", "caption", "cap")
_URL_PREFIXES = ("pipe:", "http://", "https://")


@dataclass
class VizInput:
    """One input: an image (or None for text only) and an optional text; `source` names where it came from."""

    source: str
    image: Image.Image | None
    text: str | None = None


def _shard_inputs(url: str) -> Iterator[VizInput]:
    """The image samples of one webdataset shard, each with its caption (see `_shard_text`)."""
    from mmoe.data.shard_reader import SkipCounters, read_shard

    name = url.rsplit("/", 1)[-1] if not url.startswith("pipe:") else url
    counters = SkipCounters()
    for sample in read_shard(url, counters):
        key = sample["__key__"]
        img_ext = next((e for e in sample if not e.startswith("__") and is_image_file("x." + e)), None)
        if img_ext is None:
            continue
        try:
            image = Image.open(io.BytesIO(sample[img_ext])).convert("RGB")
        except Exception as exc:  # a broken sample should not stop the others
            print(f"visualize_experts: {url} sample {key}: image failed to decode ({exc}); skipped")
            continue
        yield VizInput(f"{name}:{key}", image, _shard_text(sample))
    for reason, n in counters.take().items():
        print(f"visualize_experts: {url}: {n} skipped ({reason})")


def _shard_text(parts: dict[str, Any]) -> str | None:
    """A sample's caption: a `.txt`-like member, else the first caption of a `.json` member
    (`{"captions": [...]}` or `{"caption"|"text": ...}`, as the shard writer stores them)."""
    for ext in TEXT_EXTS:
        if ext in parts:
            return parts[ext].decode("utf-8").strip() or None
    if "json" in parts:
        try:
            meta = json.loads(parts["json"].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return None
        if isinstance(meta, dict):
            caps = meta.get("captions") or [meta[k] for k in ("caption", "text") if k in meta]
            caps = [c.strip() for c in caps if isinstance(c, str) and c.strip()]
            return caps[0] if caps else None
    return None


def _is_shard(spec: str, p: Path) -> bool:
    return spec.startswith(_URL_PREFIXES) or (
        p.is_file() and (p.suffix == ".tar" or p.name.endswith((".tar.gz", ".tgz")))
    )


def load_inputs(path: str | Path | None, *, text: str | None = None, limit: int | None = None) -> list[VizInput]:
    """Read an image file, a folder of images (sorted, not recursive) or a webdataset shard.

    A shard is a local ``.tar`` (``.tar.gz``, ``.tgz``), a ``pipe:`` command or an ``http(s)://`` URL.
    `text`, when given, is paired with every image (a shard's own captions are used otherwise); with
    no `path`, `text` alone gives one text-only input.
    """
    if path is None:
        if text is None:
            raise ValueError("load_inputs: give an image path (--image) or a text (--text)")
        return [VizInput("text", None, text)]
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if is_image_file(f))
        if not files:
            raise FileNotFoundError(f"--image {p}: folder has no images with extensions {IMAGE_EXTS}")
        return [VizInput(str(f), Image.open(f).convert("RGB"), text) for f in files[: limit or None]]
    if _is_shard(str(path), p):
        items: list[VizInput] = []
        for item in _shard_inputs(str(path)):
            items.append(VizInput(item.source, item.image, text if text is not None else item.text))
            if limit and len(items) >= limit:
                break
        if not items:
            raise ValueError(f"--image {path}: shard holds no decodable image samples")
        return items
    if p.is_file():
        return [VizInput(str(p), Image.open(p).convert("RGB"), text)]
    raise FileNotFoundError(f"--image {p}: no such file or folder (expected an image, a folder or a .tar shard)")
