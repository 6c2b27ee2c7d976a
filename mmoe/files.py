"""File helpers every layer shares: atomic writes and the image file extensions.

A run that is killed (``kill -9``, a pre-empted node, a full disk) must never leave a truncated checkpoint,
shard index, result file or picture behind that a later run would read as complete. Every writer in mmoe
therefore writes to a temporary name in the target folder (the same file system, so the final rename is
atomic on POSIX), flushes it, and renames it over the target with ``os.replace``; on any error the
temporary file is removed and the previous target, if any, is untouched.

This module is a leaf: it imports nothing from mmoe, so ``mmoe.data``, ``mmoe.model``, ``mmoe.metrics``,
``mmoe.viz`` and ``mmoe.train`` may all use it.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

__all__ = [
    "IMAGE_EXTS",
    "atomic_open",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "atomic_torch_save",
    "is_image_file",
]

#: Image file extensions (lower case, with the dot) that the loaders, the shard writer and the
#: visualization tool accept. Webdataset sample keys use the same names without the dot.
IMAGE_EXTS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def is_image_file(path: str | Path) -> bool:
    """True when `path` has one of :data:`IMAGE_EXTS` (case-insensitive)."""
    return Path(path).suffix.lower() in IMAGE_EXTS


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb", *, fsync: bool = True) -> Iterator[IO[Any]]:
    """Open a temporary file next to `path` for writing; on a clean exit it replaces `path` atomically.

    The parent folder is created. With ``fsync`` (default) the data reach the disk before the rename, so a
    power loss cannot leave an empty file under the final name.
    """
    if "w" not in mode:
        raise ValueError(f"atomic_open: mode={mode!r} must be a write mode ('w', 'wb', 'wt')")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any], *, fsync: bool = True) -> Path:
    """Call ``write(f)`` on a binary temporary file and rename it over `path`; returns `path`."""
    with atomic_open(path, "wb", fsync=fsync) as f:
        write(f)
    return Path(path)


def atomic_write_bytes(path: str | Path, data: bytes, *, fsync: bool = True) -> Path:
    """Write `data` to `path` atomically."""
    return atomic_write(path, lambda f: f.write(data), fsync=fsync)


def atomic_write_text(path: str | Path, text: str, *, fsync: bool = True) -> Path:
    """Write `text` (UTF-8) to `path` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"), fsync=fsync)


def atomic_write_json(path: str | Path, obj: Any, *, indent: int | None = 2, fsync: bool = True, **kwargs: Any) -> Path:
    """``json.dump`` `obj` to `path` atomically (keyword arguments go to ``json.dumps``)."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, **kwargs) + "\n", fsync=fsync)


def atomic_torch_save(obj: Any, path: str | Path, *, fsync: bool = True) -> Path:
    """``torch.save`` `obj` to `path` atomically (checkpoints, model files, codebooks)."""
    import torch  # imported here so that the leaf stays importable without torch for pure-file users

    return atomic_write(path, lambda f: torch.save(obj, f), fsync=fsync)
