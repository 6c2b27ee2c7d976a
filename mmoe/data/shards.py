"""webdataset shards for BEiT-3 masked data modeling: writing, validation and the streaming pipeline.

Pretraining ([B3] sec. 2.3, SPEC.md 6) mixes three streams: image-only (masked image modeling),
text-only (masked language modeling) and image-text pairs (both). Each stream reads tar shards in
the webdataset layout (``key.jpg`` + ``key.txt`` / ``key.json``), so the standard tooling
(img2dataset, ``wds.WebDataset``) reads and writes the same files.

Writing (``mmoe-shards`` is a thin CLI over this module):
    * sources: COCO caption JSON + image folder, JSONL/TSV of (image path, caption), an image folder
      (optionally with ``.txt`` side-cars), plain text files (one document per line or paragraph);
    * every sample is validated (the image decodes fully, the caption is non-empty); skipped items
      are reported per source file with the reason (``skipped.json``);
    * a shard is written under a temporary name and renamed when complete, so a crash never leaves a
      half shard; ``sizes.json`` (shard name -> sample count, the open_clip convention) is updated
      atomically.

Reading (``ShardStream``, an ``IterableDataset`` that yields whole batches):
    * shards are split explicitly over ``rank * num_workers + worker`` consumers (disjoint); when
      there are fewer shards than consumers every consumer reads every shard but keeps only its
      residue class of samples, which is still disjoint;
    * training resamples shards with replacement forever (seeded per seed/iteration/rank/worker), and
      an epoch is a fixed number of steps; validation reads each shard once in order;
    * shuffle buffer, decode, timm transforms, tokenizer, block-wise image masks and BERT-style text
      masks, collation to the batch keys of docs/interfaces.md section 4;
    * unreadable shards, corrupt tar members, undecodable images and empty texts are skipped and
      counted; the counts travel with each batch to the main process (see ``StreamLoader``);
    * exact mid-epoch resume: flips, captions, crops, masks and text windows come from per-sample seeds
      (pass seed, stream, ordinal), each batch reports the raw-sample cursors of its worker, and a checkpoint
      stores the cursors after the last batch the *trainer* consumed; a resumed pass advances the raw streams
      to those cursors by reading tar members only (no decoding) and continues with the same batches.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import itertools
import json
import logging
import math
import os
import random
import re
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mmoe.data.masking import BlockMaskGenerator, mask_tokens, random_token_range
from mmoe.data.resume import derive_seed, seeded_rng
from mmoe.data.tokenizer import Tokenizer

log = logging.getLogger(__name__)

__all__ = [
    "IMAGE_EXTS",
    "ShardStream",
    "ShardWriter",
    "SkipReport",
    "StreamConfig",
    "StreamLoader",
    "expand_patterns",
    "iter_coco_captions",
    "iter_image_folder",
    "iter_pair_list",
    "iter_text_files",
    "read_sizes",
    "swap_left_right",
    "validate_image",
    "write_shards",
    "write_world_shards",
]

IMAGE_EXTS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
TEXT_EXTS: tuple[str, ...] = ("txt", "json")
StreamKind = Literal["image", "text", "pair"]

# ================================================================================================
# writing
# ================================================================================================


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


class ShardWriter:
    """Write samples to ``{out_dir}/{prefix}-%06d.tar``, never leaving a half shard.

    Each shard is written as ``NAME.tar.tmp`` and renamed when it is full or the writer closes; on an
    exception the unfinished temp file is removed, completed shards stay. Tar headers are fixed
    (mtime 0, fixed owner), so the same samples give byte-identical shards. ``sizes.json`` in
    ``out_dir`` is updated (merged with existing entries) on close.
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
        self._tmp: Path | None = None
        self._name = ""
        self._count = 0
        self._bytes = 0

    def _open(self) -> None:
        import webdataset as wds

        self._name = f"{self.prefix}-{self.index:06d}.tar"
        self._tmp = self.out_dir / (self._name + ".tmp")
        self._tar = wds.TarWriter(str(self._tmp), encoder=False, mtime=0.0, user="mmoe", group="mmoe")
        self._count = 0
        self._bytes = 0

    def _finish(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        assert self._tmp is not None
        if self._count:
            os.replace(self._tmp, self.out_dir / self._name)
            self.sizes[self._name] = self._count
            self.index += 1
        else:
            self._tmp.unlink(missing_ok=True)
        self._tar = None
        self._tmp = None

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
        tmp = sizes_path.with_name("sizes.json.tmp")
        tmp.write_text(json.dumps(dict(sorted(sizes.items())), indent=1))
        os.replace(tmp, sizes_path)
        return dict(self.sizes)

    def abort(self) -> None:
        """Drop the unfinished shard (completed ones are kept and listed by ``close``)."""
        if self._tar is not None:
            self._tar.close()
            assert self._tmp is not None
            self._tmp.unlink(missing_ok=True)
            self._tar = None

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
    skipped_path = Path(out_dir) / f"{prefix}-skipped.json"
    tmp = skipped_path.with_name(skipped_path.name + ".tmp")
    tmp.write_text(json.dumps({"written": n, "skipped": report.items}, indent=1))
    os.replace(tmp, skipped_path)
    return report


def write_world_shards(world_dir: str | os.PathLike[str], *, maxcount: int = 1000) -> dict[str, Any]:
    """Shards for a synthetic shapes world (docs/interfaces.md section 6): pair/image/text per split."""
    root = Path(world_dir)
    out: dict[str, Any] = {}
    for split in ("train", "val"):
        ann = root / "coco" / "annotations" / f"captions_{split}2014.json"
        if not ann.exists():
            continue
        rep = write_shards(
            iter_coco_captions(ann, root / "coco" / f"{split}2014"),
            root / "shards" / "pair",
            kind="pair",
            prefix=split,
            maxcount=maxcount,
        )
        out[f"pair/{split}"] = rep.written
        rep = write_shards(
            iter_image_folder(root / "imagenet" / split),
            root / "shards" / "image",
            kind="image",
            prefix=split,
            maxcount=maxcount,
        )
        out[f"image/{split}"] = rep.written
        rep = write_shards(
            iter_text_files([root / "text" / f"{split}.txt"]),
            root / "shards" / "text",
            kind="text",
            prefix=split,
            maxcount=maxcount,
        )
        out[f"text/{split}"] = rep.written
    return out


# ================================================================================================
# reading
# ================================================================================================


def expand_patterns(patterns: str | Sequence[str]) -> list[str]:
    """Brace-expand (``{000000..000009}``) and glob each pattern; a pattern matching nothing is an error.

    Returns the sorted, de-duplicated list of shard files.
    """
    import braceexpand

    if isinstance(patterns, str):
        patterns = [patterns]
    urls: list[str] = []
    for pat in patterns:
        found: list[str] = []
        for p in braceexpand.braceexpand(str(pat)):
            p = os.path.expanduser(p)
            hits = sorted(glob.glob(p)) if glob.has_magic(p) else ([p] if os.path.isfile(p) else [])
            found.extend(h for h in hits if not h.endswith(".tmp"))
        if not found:
            raise FileNotFoundError(f"shard pattern {pat!r} matches no file")
        urls.extend(found)
    return sorted(set(urls))


class _Counters:
    """Skip counters of one worker; ``take()`` returns and resets the increments since the last call."""

    def __init__(self) -> None:
        self._delta: Counter[str] = Counter()

    def add(self, reason: str, where: str, n: int = 1) -> None:
        self._delta[reason] += n
        log.debug("skipped sample (%s) at %s", reason, where)

    def take(self) -> dict[str, int]:
        out = dict(self._delta)
        self._delta.clear()
        return out


def _iter_tar(url: str, counters: _Counters) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Samples of one tar shard, grouped by key; read errors end the shard and are counted.

    Python's tarfile stops silently at an invalid header after the first member, so after the last
    member the rest of an uncompressed file is checked: anything but zero padding is a corrupt tail.
    """
    current_key: str | None = None
    current: dict[str, bytes] = {}
    try:
        with open(url, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                base = os.path.basename(member.name)
                if "." not in base:
                    continue
                prefix = os.path.dirname(member.name)
                key, ext = base.split(".", 1)
                key = f"{prefix}/{key}" if prefix else key
                try:
                    fh = tar.extractfile(member)
                    data = fh.read() if fh is not None else b""
                except (tarfile.TarError, OSError) as e:
                    counters.add("corrupt_member", f"{url}:{member.name} ({e})")
                    continue
                if key != current_key:
                    if current_key is not None:
                        yield current_key, current
                    current_key, current = key, {}
                current[ext.lower()] = data
            f.seek(0)
            compressed = f.read(2) == b"\x1f\x8b"
            if not compressed:
                f.seek(tar.offset)
                if f.read(1 << 16).strip(b"\0"):
                    counters.add("corrupt_shard", f"{url} (invalid tar header at byte {tar.offset})")
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        counters.add("corrupt_shard", f"{url} ({type(e).__name__}: {e})")
    if current_key is not None:
        yield current_key, current


_LEFT_RIGHT = re.compile(r"\b(left|right)(?=\b|most\b)", re.IGNORECASE)


def swap_left_right(text: str) -> str:
    """Swap "left" and "right" (keeping case): the caption of a horizontally flipped image."""

    def swap(m: re.Match[str]) -> str:
        word = m.group(1)
        new = "right" if word.lower() == "left" else "left"
        return new.upper() if word.isupper() else new.capitalize() if word[0].isupper() else new

    return _LEFT_RIGHT.sub(swap, text)


def _decode_image(sample: dict[str, bytes]) -> Image.Image:
    for ext in IMAGE_EXTS:
        if ext in sample:
            img = Image.open(io.BytesIO(sample[ext]))
            img.load()
            return img.convert("RGB")
    raise KeyError("no image field")


def _decode_text(sample: dict[str, bytes], rng: random.Random) -> str:
    if "txt" in sample:
        return sample["txt"].decode("utf-8").strip()
    if "json" in sample:
        meta = json.loads(sample["json"].decode("utf-8"))
        caps = meta.get("captions") or ([meta[k] for k in ("caption", "text") if k in meta][:1])
        caps = [c for c in caps if isinstance(c, str) and c.strip()]
        return rng.choice(caps).strip() if caps else ""
    raise KeyError("no text field")


@dataclass
class StreamConfig:
    """One stream of the pretraining mixture.

    Attributes:
        kind: ``"image"`` (MIM), ``"text"`` (MLM) or ``"pair"`` (both).
        patterns: shard patterns (brace/glob), each must match at least one file.
        text_mask_ratio: BERT masking ratio for text (0.15 text-only, 0.5 pairs in [B3]).
    """

    kind: StreamKind
    patterns: list[str]
    text_mask_ratio: float = 0.15


class ShardStream(IterableDataset):
    """Batches of a pretraining mixture (docs/interfaces.md section 4), split over ranks and workers.

    Yields ``(batch, skipped, position)`` where ``batch`` is ``{stream_name: sub_batch}``, ``skipped`` the
    skip counts since the previous batch of this worker and ``position`` the worker's role and raw-sample
    cursors after the batch; ``StreamLoader`` strips and accumulates them (and checkpoints the positions).
    Every random choice about a sample is drawn from a seed of (pass seed, stream, ordinal), none from the
    global generators, so a pass is a deterministic function of (seed, pass, rank, worker) and can be resumed
    after any number of batches (``resume``, set by ``StreamLoader``).

    Args:
        streams: ``{name: StreamConfig}``; names are the batch keys (``"image"``, ``"text"``, ``"pair"``).
        batch_size: samples per yielded batch (all streams together in ``"mixed"`` mode).
        ratios: relative share of each stream (``"mixed"``: samples per batch; ``"alternate"``: batches).
        mode: ``"mixed"`` (every batch holds every stream) or ``"alternate"`` (one stream per batch).
        image_transform: PIL -> (3, H, W) tensor.
        tokenizer: an ``mmoe.data.tokenizer.Tokenizer``.
        mask_generator: block-wise patch masks (``BlockMaskGenerator``).
        train: resample shards forever and shuffle (True) or read shards in order (False): once, or
            cyclically when ``num_batches`` is set so that every rank yields the same number of batches.
        num_batches: batches per pass over all workers of this rank (required when ``train``).
        rank, world_size: the trainer's data-parallel position.
        seed: base seed; a pass uses ``(seed, iteration, rank, worker)``.
        shuffle_buffer: samples held for shuffling (train only).
        hflip: horizontal flip probability applied here, after ``image_transform`` (train only; give the
            transform no flip of its own). In pairs a flip swaps the words "left" and "right" in the
            text so that captions stay true of the flipped image.
    """

    def __init__(
        self,
        streams: dict[str, StreamConfig],
        *,
        batch_size: int,
        image_transform: Callable[[Image.Image], torch.Tensor],
        tokenizer: Tokenizer,
        mask_generator: BlockMaskGenerator,
        ratios: dict[str, float] | None = None,
        mode: Literal["mixed", "alternate"] = "mixed",
        train: bool = True,
        num_batches: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        hflip: float = 0.0,
    ) -> None:
        super().__init__()
        if not streams:
            raise ValueError("ShardStream: at least one stream is needed")
        if mode not in ("mixed", "alternate"):
            raise ValueError(f"ShardStream: mode must be 'mixed' or 'alternate', got {mode!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"ShardStream: rank={rank} must be in [0, world_size={world_size})")
        if train and (num_batches is None or num_batches < 1):
            raise ValueError(f"ShardStream: train=True needs num_batches >= 1, got {num_batches}")
        self.streams = dict(streams)
        self.urls = {name: expand_patterns(cfg.patterns) for name, cfg in self.streams.items()}
        ratios = {k: float(v) for k, v in (ratios or {}).items() if k in self.streams}
        self.ratios = {name: ratios.get(name, 1.0) for name in self.streams}
        if any(v <= 0 for v in self.ratios.values()):
            raise ValueError(f"ShardStream: ratios must be > 0, got {self.ratios}")
        self.batch_size = int(batch_size)
        self.mode = mode
        self.sub_batch = self._split_batch() if mode == "mixed" else {n: self.batch_size for n in self.streams}
        self.image_transform = image_transform
        self.tokenizer = tokenizer
        self.mask_generator = mask_generator
        self.train = train
        self.num_batches = num_batches
        self.rank, self.world_size = int(rank), int(world_size)
        self.seed = int(seed)
        self.shuffle_buffer = int(shuffle_buffer)
        if not 0.0 <= hflip <= 1.0:
            raise ValueError(f"ShardStream: hflip must be a probability, got {hflip}")
        self.hflip = float(hflip) if train else 0.0
        self.iteration = 0  # bumped by StreamLoader before every pass; makes every pass a fresh stream
        # (batches of this pass already consumed, {role: raw cursors} or None): set by StreamLoader around iter()
        self.resume: tuple[int, dict[str, dict[str, int]] | None] | None = None

    def _split_batch(self) -> dict[str, int]:
        """Samples per stream in a mixed batch: proportional to the ratios, at least one each."""
        names = list(self.streams)
        if self.batch_size < len(names):
            raise ValueError(
                f"ShardStream: batch_size={self.batch_size} is smaller than the {len(names)} mixed streams"
            )
        total = sum(self.ratios.values())
        raw = {n: self.batch_size * self.ratios[n] / total for n in names}
        sizes = {n: max(1, int(math.floor(raw[n]))) for n in names}
        # hand out the remainder by largest fractional part (stable order)
        for n in sorted(names, key=lambda n: raw[n] - math.floor(raw[n]), reverse=True):
            if sum(sizes.values()) >= self.batch_size:
                break
            sizes[n] += 1
        while sum(sizes.values()) > self.batch_size:
            n = max(sizes, key=lambda k: sizes[k])
            sizes[n] -= 1
        return sizes

    # -- consumers ------------------------------------------------------------------------------
    def _consumer(self) -> tuple[int, int, int, int]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return self.rank * num_workers + worker, self.world_size * num_workers, worker, num_workers

    @staticmethod
    def split_for_consumer(urls: Sequence[str], consumer: int, consumers: int) -> tuple[list[str], int, int]:
        """(shards, sample_modulo, sample_residue) for one consumer: whole shards when there are enough."""
        if len(urls) >= consumers:
            return list(urls[consumer::consumers]), 1, 0
        return list(urls), consumers, consumer

    def _samples(
        self, name: str, consumer: int, consumers: int, rng: random.Random, counters: _Counters
    ) -> Iterator[dict[str, bytes]]:
        urls, modulo, residue = self.split_for_consumer(self.urls[name], consumer, consumers)
        index = 0

        def read(url: str) -> Iterator[dict[str, bytes]]:
            nonlocal index
            for key, sample in _iter_tar(url, counters):
                index += 1
                if (index - 1) % modulo == residue:
                    yield {"__key__": key.encode(), "__url__": url.encode(), **sample}  # type: ignore[dict-item]

        if not self.train:
            # With a fixed number of validation batches the shards are cycled in order, so every rank
            # yields exactly that many batches (unequal counts would hang DDP collectives).
            while True:
                got = 0
                for url in urls:
                    index = 0  # residues are per shard so every consumer agrees on them
                    for sample in read(url):
                        got += 1
                        yield sample
                if self.num_batches is None or not got:
                    return
        buffer: list[dict[str, bytes]] = []
        empty_reads = 0
        while True:
            index = 0
            got = 0
            for sample in read(rng.choice(urls)):
                got += 1
                buffer.append(sample)
                if len(buffer) >= self.shuffle_buffer:
                    j = rng.randrange(len(buffer))
                    buffer[j], buffer[-1] = buffer[-1], buffer[j]
                    yield buffer.pop()
            empty_reads = 0 if got else empty_reads + 1
            if empty_reads > 10 + 10 * len(urls):
                raise RuntimeError(
                    f"stream {name!r}: {empty_reads} shard reads in a row gave no sample for this consumer; "
                    f"shards {urls[:3]}{'...' if len(urls) > 3 else ''} are corrupt or empty"
                )

    # -- decoding -----------------------------------------------------------------------------
    def _decoded(
        self, name: str, samples: Iterator[dict[str, bytes]], seed: int, counters: _Counters, cursor: dict[str, int]
    ) -> Iterator[dict[str, Any]]:
        """Decode raw samples; ``cursor[name]`` counts the raw samples taken (also the ones that fail).

        Every random choice about a sample (flip, caption, crop, image mask, text window and text mask) is drawn
        from its own seed, a function of the pass seed, the stream and the sample's ordinal in this consumer's raw
        stream, so a resumed pass that skipped the raw samples before a cursor builds the same batches.
        """
        kind = self.streams[name].kind
        for sample in samples:
            ordinal = cursor[name]
            cursor[name] = ordinal + 1
            sample_seed = derive_seed(seed, name, ordinal)
            rng = random.Random(sample_seed)
            where = f"{sample.get('__url__', b'').decode()}:{sample.get('__key__', b'').decode()}"
            out: dict[str, Any] = {"seed": sample_seed, "rng": rng}
            flipped = False
            if kind in ("image", "pair"):
                if not any(e in sample for e in IMAGE_EXTS):
                    counters.add("missing_image", where)
                    continue
                try:
                    with seeded_rng(sample_seed):  # timm/torchvision transforms draw from the global generators
                        image = self.image_transform(_decode_image(sample))
                except Exception as e:  # PIL errors vary; never let one sample stop training
                    counters.add("decode_error", f"{where} ({type(e).__name__}: {e})")
                    continue
                if self.hflip and rng.random() < self.hflip:
                    image, flipped = image.flip(-1), True
                out["image"] = image
            if kind in ("text", "pair"):
                try:
                    text = _decode_text(sample, rng)
                except KeyError:
                    counters.add("missing_text", where)
                    continue
                except (UnicodeDecodeError, json.JSONDecodeError) as e:
                    counters.add("decode_error", f"{where} ({type(e).__name__})")
                    continue
                if not text:
                    counters.add("empty_text", where)
                    continue
                out["text"] = swap_left_right(text) if flipped else text
            yield out

    def _tokenize(self, texts: list[str], rngs: list[random.Random] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenize; with ``rngs`` a document longer than ``max_len`` yields a random window of it (text-only
        training), so long documents are not always cut to their first sentence."""
        tok = self.tokenizer
        if rngs is None:
            return tok(texts)
        room = tok.max_len - 2
        rows = []
        for text, rng in zip(texts, rngs):
            body = tok.encode_one(text)
            start = rng.randrange(len(body) - room + 1) if len(body) > room else 0
            rows.append([tok.bos_id, *body[start : start + room], tok.eos_id])
        return tok.pad(rows)

    def _collate(self, name: str, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        kind = self.streams[name].kind
        batch: dict[str, torch.Tensor] = {}
        if kind in ("image", "pair"):
            batch["image"] = torch.stack([x["image"] for x in items])
            masks = np.stack([self.mask_generator(np.random.default_rng(x["seed"])).reshape(-1) for x in items])
            batch["image_mask"] = torch.from_numpy(masks)
        if kind in ("text", "pair"):
            windows = [x["rng"] for x in items] if kind == "text" and self.train else None
            ids, pad = self._tokenize([x["text"] for x in items], windows)
            rows = [
                mask_tokens(
                    ids[i : i + 1],
                    pad[i : i + 1],
                    ratio=self.streams[name].text_mask_ratio,
                    mask_id=self.tokenizer.mask_id,
                    special_ids=self.tokenizer.special_ids,
                    random_range=random_token_range(self.tokenizer),
                    generator=torch.Generator().manual_seed(x["seed"]),
                )
                for i, x in enumerate(items)
            ]
            masked, labels = torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows])
            batch["text"], batch["text_padding_mask"], batch["text_labels"] = masked, pad, labels
        return batch

    # -- iteration ----------------------------------------------------------------------------
    def _pass_seed(self, worker: int) -> int:
        # train passes differ by iteration (resume => fresh stream); validation is the same every time
        it = self.iteration if self.train else 0
        digest = hashlib.sha256(f"mmoe-shards/{self.seed}/{it}/{self.rank}/{worker}".encode()).digest()
        return int.from_bytes(digest[:8], "little") >> 1

    def batches_for_worker(self, worker: int, num_workers: int, total: int | None = None) -> int | None:
        """Train: this worker's share of ``total`` batches (default ``num_batches``; the DataLoader interleaves
        workers, so batch ``i`` of a pass comes from worker ``i % num_workers``)."""
        total = self.num_batches if total is None else total
        if total is None:
            return None
        return total // num_workers + int(worker < total % num_workers)

    def __iter__(self) -> Iterator[tuple[dict[str, dict[str, torch.Tensor]], dict[str, int], dict[str, Any]]]:
        # Not a generator itself: the pass seed and the resume point are fixed when iter() is called (before
        # StreamLoader bumps ``iteration``), both in the main process and in freshly started workers.
        _, consumers, worker, num_workers = self._consumer()
        skip, cursors = self.resume if (self.resume is not None and self.train) else (0, None)
        # A pass resumed after ``skip`` batches: the DataLoader asks its workers in turn from worker 0, while batch
        # ``skip`` of the pass came from worker ``skip % num_workers``, so worker ``w`` plays the part ("role") of
        # the original worker ``(w + skip) % num_workers``: same shards, seeds and batches, in the same order.
        role = (worker + skip) % num_workers
        limit = self.batches_for_worker(role, num_workers)
        done = self.batches_for_worker(role, num_workers, skip) or 0
        if limit is not None:
            limit -= done
        cursor = None if cursors is None else cursors.get(str(role))
        return self._generate(
            self._pass_seed(role), self.rank * num_workers + role, consumers, limit, role, done, cursor
        )

    def _pick(self, credit: dict[str, float]) -> list[str]:
        """Streams of the next batch: all (mixed) or one by smooth weighted round-robin (alternate)."""
        names = list(self.streams)
        if self.mode == "mixed":
            return names
        for n in names:
            credit[n] += self.ratios[n]
        pick = max(names, key=lambda n: credit[n])
        credit[pick] -= sum(self.ratios.values())
        return [pick]

    def _generate(
        self,
        seed: int,
        consumer: int,
        consumers: int,
        limit: int | None,
        role: int = 0,
        done: int = 0,
        cursor: dict[str, int] | None = None,
    ) -> Iterator[tuple[dict[str, dict[str, torch.Tensor]], dict[str, int], dict[str, Any]]]:
        """Batches of one consumer, after ``done`` batches of the pass that an earlier run already consumed.

        With ``cursor`` (raw samples per stream that those batches took) the raw streams are advanced without
        decoding anything (tar reads only); without it the ``done`` batches are built and dropped. Either way the
        next batch is the one the uninterrupted pass would have produced. Each batch comes with its skip counts
        and ``{"role", "cursor"}`` (for ``StreamLoader.state_dict``).
        """
        rng = random.Random(seed)
        counters = _Counters()
        position = dict.fromkeys(self.streams, 0)
        raws = {
            name: self._samples(name, consumer, consumers, random.Random(rng.getrandbits(64)), counters)
            for name in self.streams
        }
        credit = dict.fromkeys(self.streams, 0.0)  # smooth weighted round-robin for "alternate"
        replay = done
        if done and cursor is not None:
            for name, n in cursor.items():
                if name in raws and n > 0:
                    position[name] = sum(1 for _ in itertools.islice(raws[name], int(n)))
            for _ in range(done):
                self._pick(credit)
            counters.take()  # counted by the run that consumed those batches
            replay = 0
        its = {name: self._decoded(name, raws[name], seed, counters, position) for name in self.streams}
        produced = 0
        while limit is None or produced < limit:
            batch: dict[str, dict[str, torch.Tensor]] = {}
            exhausted = False
            for name in self._pick(credit):
                items = list(itertools.islice(its[name], self.sub_batch[name]))
                if items:
                    batch[name] = self._collate(name, items)
                exhausted |= len(items) < self.sub_batch[name]  # only validation streams end
            if batch:
                if replay:
                    replay -= 1
                    counters.take()
                else:
                    produced += 1
                    yield batch, counters.take(), {"role": role, "cursor": dict(position)}
            if exhausted:
                return

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("ShardStream: validation length is unknown (set num_batches)")
        return int(self.num_batches)


@dataclass
class _BatchRecord:
    """What one yielded training batch took: the consumer role, raw cursors after it, samples and skips."""

    role: int
    cursor: dict[str, int]
    samples: Counter[str]
    skipped: Counter[str]


class StreamLoader(DataLoader):
    """DataLoader over a ``ShardStream``: bumps the pass counter, strips and accumulates skip counts.

    ``samples_seen`` (per stream), ``batches_seen`` and ``skipped`` (per reason, cumulative) live in
    the main process, so they are correct for any ``num_workers``; ``epoch_skipped`` holds the last
    finished pass. Worker seeds come from a private generator, so a pass does not consume the global torch RNG.

    ``state_dict``/``load_state_dict`` carry the pass, the batches of it consumed, the raw-sample cursors of each
    worker after its last consumed batch, and the counters as of that batch. "Consumed" is what the training loop
    took (``progress``, set by the data module to ``mmoe.data.resume.fit_progress``), not what was produced:
    Lightning and the workers prefetch ahead, and those batches must come again after a resume. Loading a state
    of a finished pass starts the next pass; one of an unfinished pass continues it exactly (same worker count
    and world size; otherwise the next pass starts, with a warning).
    """

    def __init__(
        self, dataset: ShardStream, *, num_workers: int = 0, pin_memory: bool = False, name: str = "train"
    ) -> None:
        super().__init__(
            dataset,
            batch_size=None,
            num_workers=num_workers,
            pin_memory=pin_memory,
            persistent_workers=False,
            prefetch_factor=2 if num_workers > 0 else None,
            generator=torch.Generator().manual_seed(derive_seed(dataset.seed, "workers", dataset.rank)),
        )
        self.name = name
        self.samples_seen: Counter[str] = Counter()
        self.batches_seen = 0
        self.skipped: Counter[str] = Counter()
        self.epoch_skipped: dict[str, int] = {}
        self.progress: Callable[[], tuple[int, float] | None] | None = None
        self._pass: int | None = None  # pass index of the current (or last) pass
        self._skip = 0  # batches of it consumed before this process resumed it
        self._start_cursors: dict[str, dict[str, int]] = {}  # role -> cursors at the resume point
        self._records: list[_BatchRecord] = []  # batches yielded in this pass
        self._resume: tuple[int, dict[str, dict[str, int]] | None] | None = None
        self._loaded: dict[str, Any] | None = None  # state loaded and not yet iterated

    def __iter__(self) -> Iterator[dict[str, dict[str, torch.Tensor]]]:  # type: ignore[override]
        ds: ShardStream = self.dataset  # type: ignore[assignment]
        resume, self._resume, self._loaded = self._resume, None, None
        ds.resume = resume
        try:
            it = super().__iter__()  # workers are forked/pickled now, with the current iteration and resume point
        finally:
            ds.resume = None
        self._pass = ds.iteration
        ds.iteration += 1
        self._skip = resume[0] if resume else 0
        self._start_cursors = dict(resume[1] or {}) if resume else {}
        self._records = []
        this_pass: Counter[str] = Counter()
        for batch, skipped, meta in it:
            this_pass.update(skipped)
            self.skipped.update(skipped)
            self.batches_seen += 1
            samples: Counter[str] = Counter()
            for name, sub in batch.items():
                ref = sub["image"] if "image" in sub else sub["text"]
                samples[name] += int(ref.shape[0])
            self.samples_seen.update(samples)
            self._records.append(_BatchRecord(int(meta["role"]), dict(meta["cursor"]), samples, Counter(skipped)))
            yield batch
        self.epoch_skipped = dict(this_pass)
        if this_pass:
            log.warning("%s data pass %d: skipped %s", self.name, ds.iteration - 1, dict(this_pass))

    def state_dict(self) -> dict[str, Any]:
        ds: ShardStream = self.dataset  # type: ignore[assignment]
        if self._loaded is not None:
            return dict(self._loaded)
        state: dict[str, Any] = {"seed": ds.seed, "iteration": ds.iteration}
        samples, skipped, batches = Counter(self.samples_seen), Counter(self.skipped), self.batches_seen
        if self._pass is not None:
            yielded = self._skip + len(self._records)
            got = self.progress() if self.progress is not None else None
            consumed, per_pass = got if got is not None else (yielded, float(len(self)))
            consumed = max(self._skip, min(int(consumed), yielded))
            mine = self._records[: consumed - self._skip]
            for rec in self._records[consumed - self._skip :]:  # prefetched, not trained on: they come again
                samples.subtract(rec.samples)
                skipped.subtract(rec.skipped)
                batches -= 1
            cursors = dict(self._start_cursors)
            for rec in mine:
                cursors[str(rec.role)] = rec.cursor
            state.update(
                {
                    "pass": self._pass,
                    "consumed": consumed,
                    "pass_batches": int(per_pass) if math.isfinite(per_pass) else len(self),
                    "num_workers": self.num_workers,
                    "world_size": ds.world_size,
                    "cursors": {str(ds.rank): cursors},
                }
            )
        state.update(
            {
                "samples_seen": {k: v for k, v in samples.items() if v},
                "batches_seen": batches,
                "skipped": {k: v for k, v in skipped.items() if v},
            }
        )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ds: ShardStream = self.dataset  # type: ignore[assignment]
        if int(state.get("seed", ds.seed)) != ds.seed:
            log.warning(
                "%s loader: checkpoint seed %s differs from configured seed %s; using the checkpoint's",
                self.name,
                state["seed"],
                ds.seed,
            )
            ds.seed = int(state["seed"])
        ds.iteration = int(state.get("iteration", 0))
        self.samples_seen = Counter({k: int(v) for k, v in state.get("samples_seen", {}).items()})
        self.batches_seen = int(state.get("batches_seen", 0))
        self.skipped = Counter({k: int(v) for k, v in state.get("skipped", {}).items()})
        self._resume = None
        if state.get("pass") is not None:  # checkpoints from before mid-pass resume only have ``iteration``
            pass_, consumed = int(state["pass"]), int(state.get("consumed", 0))
            if consumed >= int(state.get("pass_batches", ds.num_batches or 0)):
                ds.iteration = pass_ + 1
            elif int(state.get("num_workers", -1)) != self.num_workers or int(state.get("world_size", -1)) != (
                ds.world_size
            ):
                log.warning(
                    "%s loader: the checkpoint stopped %d batches into pass %d with num_workers=%s, world_size=%s; "
                    "this run has %d, %d, so it cannot continue that pass exactly and starts the next one",
                    self.name,
                    consumed,
                    pass_,
                    state.get("num_workers"),
                    state.get("world_size"),
                    self.num_workers,
                    ds.world_size,
                )
                ds.iteration = pass_ + 1
            else:
                ds.iteration = pass_
                # Only rank 0's checkpoint is written: other ranks have no cursors and rebuild the consumed
                # batches instead of skipping raw samples (slower, same result).
                cursors = state.get("cursors", {}).get(str(ds.rank))
                self._resume = (consumed, {str(k): dict(v) for k, v in cursors.items()} if cursors else None)
        self._loaded = dict(state)
