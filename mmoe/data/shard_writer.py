"""The offline shard writer: sources -> validated samples -> webdataset tar shards (what ``mmoe-shards`` runs).

Pretraining ([B3] sec. 2.3) mixes three streams: image-only (masked image modeling), text-only (masked
language modeling) and image-text pairs (both). Each stream is a folder of tar shards in the webdataset
layout (``key.jpg`` + ``key.txt`` / ``key.json``), so the standard tooling (img2dataset, ``wds.WebDataset``)
reads and writes the same files; ``mmoe.data.shard_reader`` turns them into training batches.

* sources: COCO caption JSON + image folder, JSONL/TSV of (image path, caption), an image folder (optionally
  with ``.txt`` side-cars), plain text files (one document per line or paragraph);
* every sample is validated (the image decodes fully, the caption is non-empty); skipped items are reported
  per source file with the reason (``PREFIX-skipped.json``);
* a shard is written under a temporary name and renamed when complete, so a crash never leaves a half shard;
  ``sizes.json`` (shard name -> sample count, the open_clip convention) is replaced atomically
  (``mmoe.files``).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from PIL import Image

from mmoe.files import atomic_open, atomic_write_json

__all__ = [
    "RawSample",
    "ShardWriter",
    "SkipReport",
    "StreamKind",
    "iter_coco_captions",
    "iter_image_folder",
    "iter_pair_list",
    "iter_text_files",
    "read_sizes",
    "validate_image",
    "write_shards",
]

StreamKind = Literal["image", "text", "pair"]


@dataclass
class SkipReport:
    """What the writer skipped and why, grouped by source file (written to ``skipped.json``)."""

    items: dict[str, list[dict[str, str]]] = field(default_factory=dict)
    written: int = 0

    def skip(self, source: str | os.PathLike[str], item: str, reason: str) -> None:
        self.items.setdefault(str(source), []).append({"item": str(item), "reason": reason})

    @property
    def num_skipped(self) -> int:
        return sum(len(v) for v in self.items.values())

    def reasons(self) -> Counter[str]:
        """Skip counts by reason class (the reason without its parenthesised detail)."""
        return Counter(x["reason"].split(" (")[0] for v in self.items.values() for x in v)

    def summary(self) -> str:
        lines = [f"written {self.written} samples, skipped {self.num_skipped}"]
        for src, items in sorted(self.items.items()):
            lines.append(f"  {src}: skipped {len(items)}")
            for x in items[:20]:
                lines.append(f"    {x['item']}: {x['reason']}")
            if len(items) > 20:
                lines.append(f"    ... and {len(items) - 20} more (see skipped.json)")
        return "\n".join(lines)


def validate_image(data: bytes, *, max_side: int | None = None, quality: int = 92) -> tuple[bytes, str]:
    """Check that ``data`` decodes completely; return ``(bytes, extension)`` to store.

    The original bytes are kept when no resize is asked (no generation loss); with ``max_side`` a
    larger image is shrunk so its longer side is ``max_side`` and re-encoded as JPEG. Raises
    ``ValueError`` naming the problem (the writer turns it into a skip-report line).
    """
    if not data:
        raise ValueError("empty image file")
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = (im.format or "").upper()
            im.verify()
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # verify() misses truncated pixel data; load() does not
            w, h = im.size
            if w < 1 or h < 1:
                raise ValueError(f"image has size {w}x{h}")
            if max_side is not None and max(w, h) > max_side:
                scale = max_side / max(w, h)
                small = im.convert("RGB").resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)
                buf = io.BytesIO()
                small.save(buf, format="JPEG", quality=quality)
                return buf.getvalue(), "jpg"
    except ValueError:
        raise
    except Exception as e:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError...)
        raise ValueError(f"image failed to decode (PIL: {e})") from e
    ext = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}.get(fmt)
    if ext is None:  # other formats (GIF, BMP...) are re-encoded so readers only see jpg/png/webp
        with Image.open(io.BytesIO(data)) as im:
            buf = io.BytesIO()
            im.convert("RGB").save(buf, format="JPEG", quality=quality)
        return buf.getvalue(), "jpg"
    return data, ext


class _DroppedShard(Exception):
    """Ends an unfinished shard's ``atomic_open`` block so that its temporary file is removed."""


class ShardWriter:
    """Write samples to ``{out_dir}/{prefix}-%06d.tar``, never leaving a half shard.

    Each shard goes through ``mmoe.files.atomic_open`` (a hidden temporary name in ``out_dir``, renamed when the
    shard is full or the writer closes); on an exception the unfinished temporary file is removed, completed
    shards stay. Tar headers are fixed (mtime 0, fixed owner), so the same samples give byte-identical shards.
    ``sizes.json`` in ``out_dir`` is updated (merged with existing entries) on close.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        prefix: str = "train",
        *,
        maxcount: int = 1000,
        maxsize: float = 1e9,
        start_index: int = 0,
    ) -> None:
        if maxcount < 1:
            raise ValueError(f"ShardWriter: maxcount must be >= 1, got {maxcount}")
        if "/" in prefix or not prefix:
            raise ValueError(f"ShardWriter: prefix must be a plain file-name prefix, got {prefix!r}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.maxcount = int(maxcount)
        self.maxsize = float(maxsize)
        self.index = int(start_index)
        self.sizes: dict[str, int] = {}
        self._tar: Any = None
        self._file: contextlib.ExitStack | None = None  # holds the shard's atomic_open
        self._name = ""
        self._count = 0
        self._bytes = 0

    def _open(self) -> None:
        import webdataset as wds

        self._name = f"{self.prefix}-{self.index:06d}.tar"
        self._file = contextlib.ExitStack()
        f = self._file.enter_context(atomic_open(self.out_dir / self._name, "wb"))
        self._tar = wds.TarWriter(f, encoder=False, mtime=0.0, user="mmoe", group="mmoe")
        self._count = 0
        self._bytes = 0

    def _release(self, keep: bool) -> None:
        """End the tar stream; rename the shard into place (``keep``) or drop its temporary file."""
        self._tar.close()  # ends the tar stream; the file belongs to atomic_open
        file, self._tar, self._file = self._file, None, None
        assert file is not None
        if keep:
            file.close()
        else:  # atomic_open removes its temporary file when the block ends with an exception
            with contextlib.suppress(_DroppedShard):
                file.__exit__(_DroppedShard, _DroppedShard(), None)

    def _finish(self) -> None:
        if self._tar is None:
            return
        keep = self._count > 0
        self._release(keep)
        if keep:
            self.sizes[self._name] = self._count
            self.index += 1

    def write(self, key: str, sample: dict[str, bytes]) -> None:
        """Add one sample (``{"jpg": bytes, "txt": bytes, ...}``); ``key`` must not contain dots."""
        if "." in key or "/" in key:
            raise ValueError(f"ShardWriter.write: key {key!r} must not contain '.' or '/'")
        if self._tar is None:
            self._open()
        obj = {"__key__": key, **{k: (v.encode("utf-8") if isinstance(v, str) else v) for k, v in sample.items()}}
        self._tar.write(obj)
        self._count += 1
        self._bytes += sum(len(v) for k, v in obj.items() if k != "__key__")
        if self._count >= self.maxcount or self._bytes >= self.maxsize:
            self._finish()

    def close(self) -> dict[str, int]:
        """Finish the last shard and merge this writer's counts into ``sizes.json``."""
        self._finish()
        sizes_path = self.out_dir / "sizes.json"
        sizes = read_sizes(self.out_dir) if sizes_path.exists() else {}
        sizes.update(self.sizes)
        atomic_write_json(sizes_path, dict(sorted(sizes.items())), indent=1)
        return dict(self.sizes)

    def abort(self) -> None:
        """Drop the unfinished shard (completed ones are kept and listed by ``close``)."""
        if self._tar is not None:
            self._release(keep=False)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self.abort()
        self.close()


def read_sizes(shard_dir: str | os.PathLike[str]) -> dict[str, int]:
    """``sizes.json`` of a shard folder ({shard file name: sample count})."""
    path = Path(shard_dir) / "sizes.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"read_sizes: cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"read_sizes: {path} must hold a JSON object {{shard name: count}}")
    return {str(k): int(v) for k, v in data.items()}


# A raw sample from a source: (source file for the report, item name, key -> bytes or path thunk)
RawSample = tuple[str, str, dict[str, Any]]


def iter_coco_captions(ann_file: str | os.PathLike[str], image_dir: str | os.PathLike[str]) -> Iterator[RawSample]:
    """COCO caption annotations: one sample per image with all its captions (``json`` field).

    The stored json is ``{"captions": [...], "image_id": int, "file_name": str}``; the pair stream
    picks one caption at random per visit (as COCO has 5 per image).
    """
    ann_file = Path(ann_file)
    data = json.loads(ann_file.read_text())
    if "images" not in data or "annotations" not in data:
        raise ValueError(f"iter_coco_captions: {ann_file} lacks 'images'/'annotations' (not a COCO caption file)")
    caps: dict[int, list[str]] = {}
    for a in data["annotations"]:
        caps.setdefault(int(a["image_id"]), []).append(str(a.get("caption", "")))
    for img in sorted(data["images"], key=lambda x: int(x["id"])):
        path = Path(image_dir) / img["file_name"]
        yield (
            str(ann_file),
            img["file_name"],
            {"image": path, "captions": caps.get(int(img["id"]), []), "image_id": int(img["id"])},
        )


def iter_pair_list(
    list_file: str | os.PathLike[str],
    image_root: str | os.PathLike[str] | None = None,
    *,
    image_column: str | None = None,
    caption_column: str | None = None,
) -> Iterator[RawSample]:
    """JSONL (``{"image": path, "caption": text}``) or TSV/CSV (``image<TAB>caption``, header optional).

    Relative image paths are resolved against ``image_root`` (default: the list file's folder).
    Accepted JSON keys: image/image_path/path/filepath/file_name and caption/text.
    """
    list_file = Path(list_file)
    root = Path(image_root) if image_root is not None else list_file.parent
    img_keys = (image_column,) if image_column else ("image", "image_path", "path", "filepath", "file_name", "url")
    cap_keys = (caption_column,) if caption_column else ("caption", "text", "title")
    suffix = list_file.suffix.lower()

    def pick(row: dict[str, Any], keys: Sequence[str]) -> Any:
        for k in keys:
            if k in row:
                return row[k]
        return None

    with open(list_file, encoding="utf-8", newline="") as f:
        if suffix in (".jsonl", ".json"):
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                item = f"line {n}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    yield (str(list_file), item, {"error": f"bad JSON line ({e})"})
                    continue
                img, cap = pick(row, img_keys), pick(row, cap_keys)
                if img is None:
                    yield (str(list_file), item, {"error": f"no image key (expected one of {list(img_keys)})"})
                    continue
                yield (str(list_file), item, {"image": root / str(img), "captions": [str(cap or "")]})
        else:
            delim = "\t" if suffix in (".tsv", ".txt") else ","
            reader = csv.reader(f, delimiter=delim)
            header: list[str] | None = None
            for n, row in enumerate(reader, 1):
                if n == 1 and any(c.strip().lower() in img_keys + cap_keys for c in row):
                    header = [c.strip().lower() for c in row]
                    continue
                if not row:
                    continue
                if header is not None:
                    rec = dict(zip(header, row))
                    img, cap = pick(rec, img_keys), pick(rec, cap_keys)
                else:
                    img, cap = row[0], (row[1] if len(row) > 1 else "")
                if not img:
                    yield (str(list_file), f"line {n}", {"error": "empty image path"})
                    continue
                yield (str(list_file), f"line {n}", {"image": root / img, "captions": [cap or ""]})


def iter_image_folder(folder: str | os.PathLike[str], *, sidecar_captions: bool = False) -> Iterator[RawSample]:
    """Every file under ``folder`` (sorted, recursive); with ``sidecar_captions`` ``a.jpg`` pairs with ``a.txt``.

    Non-image files are passed on too (the writer reports them as undecodable), except the side-car
    ``.txt``/``.json`` files themselves.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"iter_image_folder: {folder} is not a folder")
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if path.suffix.lower() in (".txt", ".json") and sidecar_captions:
            continue
        rec: dict[str, Any] = {"image": path}
        if sidecar_captions:
            side = path.with_suffix(".txt")
            rec["captions"] = [side.read_text(encoding="utf-8")] if side.exists() else [""]
        yield (str(folder), str(path.relative_to(folder)), rec)


def iter_text_files(
    files: Sequence[str | os.PathLike[str]], *, unit: Literal["line", "paragraph"] = "line"
) -> Iterator[RawSample]:
    """Plain text: one document per line (default) or per blank-line separated paragraph."""
    for file in files:
        text = Path(file).read_text(encoding="utf-8", errors="replace")
        if unit == "line":
            docs = [(f"line {n}", line) for n, line in enumerate(text.split("\n"), 1)]
            docs = docs[:-1] if docs and not docs[-1][1] else docs  # the final newline
        else:
            docs = [(f"paragraph {n}", p) for n, p in enumerate(text.split("\n\n"), 1)]
        for item, doc in docs:
            yield (str(file), item, {"text": doc})


def write_shards(
    samples: Iterable[RawSample],
    out_dir: str | os.PathLike[str],
    *,
    kind: StreamKind,
    prefix: str = "train",
    maxcount: int = 1000,
    maxsize: float = 1e9,
    max_side: int | None = None,
    start_index: int = 0,
) -> SkipReport:
    """Validate ``samples`` (from the ``iter_*`` sources) and write them as shards of one stream kind.

    ``kind="pair"`` needs an image and a non-empty caption; ``"image"`` an image (captions ignored);
    ``"text"`` a non-empty text. Writes ``sizes.json`` and ``{prefix}-skipped.json`` in ``out_dir``.
    """
    if kind not in ("image", "text", "pair"):
        raise ValueError(f"write_shards: kind must be 'image', 'text' or 'pair', got {kind!r}")
    report = SkipReport()
    n = 0
    with ShardWriter(out_dir, prefix, maxcount=maxcount, maxsize=maxsize, start_index=start_index) as writer:
        for source, item, rec in samples:
            if "error" in rec:
                report.skip(source, item, rec["error"])
                continue
            out: dict[str, bytes] = {}
            if kind == "text":
                text = str(rec.get("text", "")).strip()
                if not text:
                    report.skip(source, item, "empty text")
                    continue
                out["txt"] = text.encode("utf-8")
            else:
                if kind == "pair":
                    caps = [c.strip() for c in rec.get("captions", []) if c and c.strip()]
                    if not caps:
                        report.skip(source, item, "empty caption")
                        continue
                path = rec.get("image")
                try:
                    data = Path(path).read_bytes()
                except OSError as e:
                    report.skip(source, item, f"image unreadable ({e.strerror or e})")
                    continue
                try:
                    img_bytes, ext = validate_image(data, max_side=max_side)
                except ValueError as e:
                    report.skip(source, item, str(e))
                    continue
                out[ext] = img_bytes
                if kind == "pair":
                    if len(caps) == 1 and "image_id" not in rec:
                        out["txt"] = caps[0].encode("utf-8")
                    else:
                        meta = {"captions": caps, "image_id": rec.get("image_id"), "file_name": item}
                        out["json"] = json.dumps(meta).encode("utf-8")
            writer.write(f"{n:09d}", out)
            n += 1
    report.written = n
    atomic_write_json(Path(out_dir) / f"{prefix}-skipped.json", {"written": n, "skipped": report.items}, indent=1)
    return report
