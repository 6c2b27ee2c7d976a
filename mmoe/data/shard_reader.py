"""The training-time shard reader: webdataset tar shards -> batches of the pretraining mixture.

Pretraining ([B3] sec. 2.3) mixes an image-only, a text-only and an image-text stream; each stream is a list
of tar shards in the webdataset layout (written by ``mmoe.data.shard_writer`` or any webdataset tool). The
reader is a pipeline of webdataset stages, per stream and per consumer (rank x DataLoader worker):

    shard list (``wds.SimpleShardList``, or ``wds.ResampledShards`` for training) -> this consumer's shards
    -> ``read_shard`` (``wds.gopen`` + webdataset's tar expansion and key grouping, with our error handler)
    -> ``wds.shuffle`` (training) -> decode, transform, mask -> collate -> ``with_epoch`` (batches per pass)

What is ours on top of webdataset:

* **URLs**: local paths with brace (``{000000..000009}``) and glob patterns, ``pipe:CMD`` (a command writing
  the shard to stdout, e.g. ``pipe:aws s3 cp s3://bucket/train-000000.tar -`` for S3) and ``http://`` /
  ``https://`` (read with ``curl`` by ``wds.gopen``). Braces expand everywhere, globs only for local paths.
* **Disjoint consumers**: a consumer ``rank * num_workers + worker`` reads every ``consumers``-th shard (the
  slices of ``wds.split_by_node`` and ``wds.split_by_worker``, with the rank given by the trainer and the
  worker's *role*, see resume below, instead of read from the environment); with fewer shards than
  consumers every consumer reads every shard and keeps its residue class of samples.
* **Equal batch counts per rank**: training resamples shards forever and a pass is a fixed number of
  batches; validation with a step count cycles its shards in order, so no rank waits in a collective.
* **Skip counters per reason**: unreadable shards and corrupt tails (``corrupt_shard``), unreadable tar
  members (``corrupt_member``), undecodable samples (``decode_error``), missing image or text
  (``missing_image``/``missing_text``) and empty texts (``empty_text``) are skipped and counted; the counts
  travel with each batch to the main process (``StreamLoader``).
* **Ratio mixing** of the streams (samples per batch, or batches by smooth weighted round-robin), the
  left/right caption swap on horizontal flips, BEiT-3 block-wise image masks and BERT-style text masks
  (optionally grounded words first, ``StreamConfig.grounded``).
* **Exact mid-epoch resume** (webdataset has no state dict): every stage is seeded from (seed, pass, rank,
  worker role), so a pass is a deterministic function of them; flips, captions, crops, masks and text
  windows come from per-sample seeds (pass seed, stream, ordinal); each batch reports the raw-sample cursors
  of its worker, and a checkpoint stores the cursors after the last batch the *trainer* consumed. A resumed
  pass replays the raw streams up to those cursors by reading tar members only (no decoding) and continues
  with the same batches (docs/interfaces.md section 5).
"""

from __future__ import annotations

import functools
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
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import braceexpand
import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_expander

from mmoe.data.grounded import CaptionTags, GroundedTokens
from mmoe.data.masking import BlockMaskGenerator, mask_tokens, random_token_range
from mmoe.data.resume import derive_seed, seeded_rng
from mmoe.data.shard_writer import StreamKind
from mmoe.data.tokenizer import Tokenizer
from mmoe.files import IMAGE_EXTS

log = logging.getLogger(__name__)

__all__ = [
    "IMAGE_KEYS",
    "READER_VERSION",
    "ShardStream",
    "SkipCounters",
    "StreamConfig",
    "StreamLoader",
    "expand_patterns",
    "read_shard",
    "swap_left_right",
]

#: Sample keys that hold an image: the image file extensions without the dot (``jpg`` first).
IMAGE_KEYS: tuple[str, ...] = tuple(ext.lstrip(".") for ext in IMAGE_EXTS)
#: Version of the pass layout (shard order, shuffle, seeds) stored with a mid-pass position; a position
#: written under another layout cannot be replayed exactly, so such a checkpoint starts the next pass.
READER_VERSION = 2
#: URL schemes the reader streams through ``wds.gopen``; anything else with a scheme is refused.
STREAM_SCHEMES: tuple[str, ...] = ("pipe:", "http://", "https://")
_BLOCK = 512  # tar block size
_GZIP_MAGIC = b"\x1f\x8b"


def _is_stream_url(url: str) -> bool:
    return url.startswith(STREAM_SCHEMES)


def expand_patterns(patterns: str | Sequence[str]) -> list[str]:
    """Shard URLs of ``patterns``: braces expanded everywhere, globs for local paths; sorted, de-duplicated.

    A local pattern matching no file is an error (a typo must not train on nothing); ``pipe:`` and http(s)
    URLs are not checked here (an unreachable one is counted as ``corrupt_shard`` when read). Other schemes
    (``s3://``, ``gs://``) are refused with the ``pipe:`` form to use instead.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    urls: list[str] = []
    for pat in patterns:
        pat = str(pat)
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]+://", pat) and not _is_stream_url(pat):
            raise ValueError(
                f"shard URL {pat!r}: only local paths, pipe:CMD and http(s):// are read; "
                f"for S3 use 'pipe:aws s3 cp s3://BUCKET/KEY -'"
            )
        found: list[str] = []
        for p in braceexpand.braceexpand(pat):
            if _is_stream_url(p):
                found.append(p)
                continue
            p = os.path.expanduser(p)
            hits = sorted(glob.glob(p)) if glob.has_magic(p) else ([p] if os.path.isfile(p) else [])
            found.extend(h for h in hits if not h.endswith(".tmp"))
        if not found:
            raise FileNotFoundError(f"shard pattern {pat!r} matches no file")
        urls.extend(found)
    return sorted(set(urls))


class SkipCounters:
    """Skip counters of one worker, by reason; ``take()`` returns and resets the increments since the last call."""

    def __init__(self) -> None:
        self._delta: Counter[str] = Counter()

    def add(self, reason: str, where: str, n: int = 1) -> None:
        self._delta[reason] += n
        log.debug("skipped sample (%s) at %s", reason, where)

    def take(self) -> dict[str, int]:
        out = dict(self._delta)
        self._delta.clear()
        return out


class _BlockStream:
    """A read-only stream that hands the tar parser at most one 512-byte tar block per ``read``.

    Python's tarfile (which webdataset's tar expansion uses) stops silently at an invalid header after the
    first member, so a shard with a garbage tail would pass for a short, complete one. Reads that never cross
    a block boundary leave the block the parser looked at last in ``block``: after a clean end it is the zero
    end-of-archive block (or nothing, at end of file), after a silent stop it is the rejected header.
    """

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.pos = 0
        self.head = b""
        self.block = b""
        self.eof = False

    def read(self, n: int | None = -1) -> bytes:
        want = _BLOCK - self.pos % _BLOCK
        if n is not None and 0 <= n < want:
            if n == 0:
                return b""
            want = n
        data = self.stream.read(want)
        self.eof = not data
        if data:
            self.block = data if self.pos % _BLOCK == 0 else self.block + data
            if not self.pos:
                self.head = data[:2]
            self.pos += len(data)
        return data

    def corrupt_tail(self) -> str | None:
        """After the parser stopped without an error: why the rest of the shard is not a tar end, or None."""
        if self.head == _GZIP_MAGIC:  # the blocks seen are compressed bytes; gzip checks its own stream
            return None
        if self.eof and self.pos % _BLOCK == 0:
            return None  # the parser reached the end of the file at a block boundary
        if self.block.strip(b"\0") or (not self.eof and self.stream.read(1 << 16).strip(b"\0")):
            return f"invalid tar header at byte {self.pos - len(self.block)}"
        return None

    def close(self) -> None:
        self.stream.close()


def read_shard(url: str, counters: SkipCounters) -> Iterator[dict[str, Any]]:
    """Samples of one shard (``{"__key__", "__url__", ext: bytes}``); read errors end the shard and are counted.

    The shard is opened with ``wds.gopen`` (local file, ``pipe:`` command or http(s) via curl) and expanded by
    webdataset's ``tar_file_expander`` and ``group_by_keys`` (the stages of ``wds.tarfile_to_samples``) with a
    handler that counts instead of raising: ``corrupt_member`` for a member that cannot be read,
    ``corrupt_shard`` for a shard that cannot be opened or parsed further, or whose tail is not a tar end.
    """
    failed = False

    def handler(exn: Exception) -> bool:
        nonlocal failed
        shard_level = bool(exn.args) and exn.args[-1] == url  # tar_file_expander appends (stream, url)
        failed |= shard_level
        detail = exn.args[0] if exn.args else ""
        counters.add("corrupt_shard" if shard_level else "corrupt_member", f"{url} ({type(exn).__name__}: {detail})")
        return True

    try:
        stream = _BlockStream(wds.gopen(url))
    except Exception as e:  # a missing file, a command that cannot start
        counters.add("corrupt_shard", f"{url} ({type(e).__name__}: {e})")
        return
    try:
        files = tar_file_expander([{"url": url, "stream": stream}], handler=handler)
        yield from group_by_keys(files, handler=handler)
        tail = None if failed else stream.corrupt_tail()
        if tail is not None:
            counters.add("corrupt_shard", f"{url} ({tail})")
            failed = True
    finally:
        try:
            stream.close()
        except Exception as e:  # a pipe's command that failed after its output (curl, aws)
            if not failed:
                counters.add("corrupt_shard", f"{url} ({type(e).__name__}: {e})")


def _no_worker_seed() -> int:
    """``worker_seed`` of ``wds.ResampledShards``: the pass seed already names the rank and the worker role."""
    return 0


_LEFT_RIGHT = re.compile(r"\b(left|right)(?=\b|most\b)", re.IGNORECASE)


def swap_left_right(text: str) -> str:
    """Swap "left" and "right" (keeping case): the caption of a horizontally flipped image."""

    def swap(m: re.Match[str]) -> str:
        word = m.group(1)
        new = "right" if word.lower() == "left" else "left"
        return new.upper() if word.isupper() else new.capitalize() if word[0].isupper() else new

    return _LEFT_RIGHT.sub(swap, text)


def _decode_image(sample: dict[str, Any]) -> Image.Image:
    for key in IMAGE_KEYS:
        if key in sample:
            img = Image.open(io.BytesIO(sample[key]))
            img.load()
            return img.convert("RGB")
    raise KeyError("no image field")


def _all_texts(sample: dict[str, Any]) -> str:
    """Every caption of a pair sample in one string (``key.json``'s ``captions``, or its one text), for tags."""
    if "txt" in sample:
        return sample["txt"].decode("utf-8")
    meta = json.loads(sample["json"].decode("utf-8"))
    caps = meta.get("captions") or [meta[k] for k in ("caption", "text") if k in meta]
    return " . ".join(c for c in caps if isinstance(c, str))


def _decode_text(sample: dict[str, Any], rng: random.Random) -> str:
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
        patterns: shard URLs or patterns (``expand_patterns``: local brace/glob patterns, each matching at
            least one file; ``pipe:CMD``; ``http(s)://``).
        text_mask_ratio: BERT masking ratio for text (0.15 text-only, 0.5 pairs in [B3]).
        grounded: token sequences to mask first (``mmoe.data.grounded.GroundedTokens``); None = uniform masking.
        grounded_share: share of a row's grounded tokens selected first (``mask_tokens(priority_share=...)``).
        image_mask: draw block-wise patch masks for the stream's images (MIM). False on a pair stream leaves its
            images whole: the pair then trains masked language modeling against the full image only, so a caption
            word is never asked about an object that the image mask has hidden.
        tags: on a pair stream, the tag words (``mmoe.data.grounded.CaptionTags``) whose mentions in all of a
            sample's captions become its ``tags`` (B, T) multi-hot target; None = no target.
    """

    kind: StreamKind
    patterns: list[str]
    text_mask_ratio: float = 0.15
    grounded: GroundedTokens | None = None
    grounded_share: float = 1.0
    image_mask: bool = True
    tags: CaptionTags | None = None

    def __post_init__(self) -> None:
        if self.tags is not None and self.kind != "pair":
            raise ValueError(f"StreamConfig: tags are read from pair captions; a {self.kind} stream has none")
        if self.grounded is not None and self.kind == "image":
            raise ValueError("StreamConfig: an image stream has no text to mask; grounded must be None")
        if not 0.0 <= self.grounded_share <= 1.0:
            raise ValueError(f"StreamConfig: grounded_share must be in [0, 1], got {self.grounded_share}")
        if not self.image_mask and self.kind == "image":
            raise ValueError("StreamConfig: an image stream trains only masked image modeling; image_mask must be True")


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
        """(shards, sample_modulo, sample_residue) for one consumer: whole shards when there are enough.

        Whole shards are the slice ``urls[consumer::consumers]`` that ``wds.split_by_node`` and
        ``wds.split_by_worker`` take one after the other; they read rank and worker from the environment,
        while here the rank is the trainer's and the worker is the role it plays in a resumed pass.
        """
        if len(urls) >= consumers:
            return list(itertools.islice(urls, consumer, None, consumers)), 1, 0
        return list(urls), consumers, consumer

    def _shard_samples(
        self,
        shards: Iterator[dict[str, Any]],
        *,
        name: str,
        urls: Sequence[str],
        modulo: int,
        residue: int,
        counters: SkipCounters,
    ) -> Iterator[dict[str, Any]]:
        """Pipeline stage: shard URLs -> this consumer's samples (its residue class of each shard's samples)."""
        empty_reads = 0
        for shard in shards:
            got = 0
            # residues count per shard, so every consumer agrees on them
            for index, sample in enumerate(read_shard(shard["url"], counters)):
                if index % modulo == residue:
                    got += 1
                    yield sample
            empty_reads = 0 if got else empty_reads + 1
            if self.train and empty_reads > 10 + 10 * len(urls):
                raise RuntimeError(
                    f"stream {name!r}: {empty_reads} shard reads in a row gave no sample for this consumer; "
                    f"shards {list(urls[:3])}{'...' if len(urls) > 3 else ''} are corrupt or empty"
                )

    def _samples(
        self, name: str, consumer: int, consumers: int, rng: random.Random, counters: SkipCounters
    ) -> Iterator[dict[str, Any]]:
        """Raw samples of one stream for one consumer, a ``wds.DataPipeline`` seeded by ``rng``.

        Training: ``wds.ResampledShards`` over the consumer's shards (with replacement, forever) and a
        ``wds.shuffle`` buffer. Validation: ``wds.SimpleShardList`` in order, once, or repeated when the pass
        has a fixed number of batches, so every rank yields exactly that many (unequal counts would hang DDP
        collectives); the repetition stops when a whole round gives no sample.
        """
        urls, modulo, residue = self.split_for_consumer(self.urls[name], consumer, consumers)
        expand = functools.partial(
            self._shard_samples, name=name, urls=urls, modulo=modulo, residue=residue, counters=counters
        )
        if not self.train:
            pipeline = wds.DataPipeline(wds.SimpleShardList(urls), expand)
            return iter(pipeline.repeat() if self.num_batches is not None else pipeline)
        shard_seed, shuffle_seed = rng.getrandbits(63), rng.getrandbits(63)
        return iter(
            wds.DataPipeline(
                wds.ResampledShards(urls, seed=shard_seed, deterministic=True, worker_seed=_no_worker_seed),
                expand,
                wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=random.Random(shuffle_seed)),
            )
        )

    # -- decoding -----------------------------------------------------------------------------
    def _decoded(
        self, name: str, samples: Iterator[dict[str, bytes]], seed: int, counters: SkipCounters, cursor: dict[str, int]
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
            where = f"{sample.get('__url__', '')}:{sample.get('__key__', '')}"
            out: dict[str, Any] = {"seed": sample_seed, "rng": rng}
            flipped = False
            if kind in ("image", "pair"):
                if not any(k in sample for k in IMAGE_KEYS):
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
                if self.streams[name].tags is not None:
                    out["tag_text"] = _all_texts(sample)  # object words: a flip changes none of them
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
            if self.streams[name].image_mask:
                masks = np.stack([self.mask_generator(np.random.default_rng(x["seed"])).reshape(-1) for x in items])
                batch["image_mask"] = torch.from_numpy(masks)
        if kind in ("text", "pair"):
            windows = [x["rng"] for x in items] if kind == "text" and self.train else None
            ids, pad = self._tokenize([x["text"] for x in items], windows)
            cfg = self.streams[name]
            priority = cfg.grounded(ids) if cfg.grounded is not None else None
            rows = [
                mask_tokens(
                    ids[i : i + 1],
                    pad[i : i + 1],
                    ratio=cfg.text_mask_ratio,
                    mask_id=self.tokenizer.mask_id,
                    special_ids=self.tokenizer.special_ids,
                    random_range=random_token_range(self.tokenizer),
                    generator=torch.Generator().manual_seed(x["seed"]),
                    priority=priority[i : i + 1] if priority is not None else None,
                    priority_share=cfg.grounded_share,
                )
                for i, x in enumerate(items)
            ]
            masked, labels = torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows])
            batch["text"], batch["text_padding_mask"], batch["text_labels"] = masked, pad, labels
            if cfg.tags is not None:
                batch["tags"] = cfg.tags([x["tag_text"] for x in items])
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
        args = (self._pass_seed(role), self.rank * num_workers + role, consumers)
        if not self.train:
            return self._generate(*args, limit, role, done, cursor)
        if limit is None or limit <= 0:
            return iter(())
        # the training stream is endless; ``with_epoch`` cuts this worker's share of the pass out of it
        endless = functools.partial(self._generate, *args, None, role, done, cursor)
        return iter(wds.DataPipeline(endless).with_epoch(limit))

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
        counters = SkipCounters()
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
                    "reader": READER_VERSION,
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
            elif int(state.get("reader", 1)) != READER_VERSION:
                log.warning(
                    "%s loader: the checkpoint stopped %d batches into pass %d of an older shard reader (layout %s, "
                    "this one is %d) whose shard order cannot be replayed, so it starts the next pass",
                    self.name,
                    consumed,
                    pass_,
                    state.get("reader", 1),
                    READER_VERSION,
                )
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
