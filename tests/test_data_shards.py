"""webdataset shards: writing with validation, bad-sample handling, rank splitting, resume, pipe: and http URLs."""

from __future__ import annotations

import contextlib
import functools
import http.server
import io
import json
import tarfile
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from helpers import SAMPLES
from PIL import Image

from mmoe.data.masking import IGNORE_INDEX, BlockMaskGenerator
from mmoe.data.shard_reader import ShardStream, StreamConfig, StreamLoader, expand_patterns
from mmoe.data.shard_writer import (
    ShardWriter,
    iter_coco_captions,
    iter_image_folder,
    iter_pair_list,
    iter_text_files,
    read_sizes,
    write_shards,
)
from mmoe.data.tokenizer import build_tokenizer
from mmoe.data.transforms import build_transform

TOK = build_tokenizer("openclip", max_len=12)


def _jpeg(color: tuple[int, int, int] = (200, 30, 30), size: int = 24) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="JPEG")
    return buf.getvalue()


def _stream(streams: dict[str, StreamConfig], **kw) -> ShardStream:
    args = dict(
        batch_size=4,
        image_transform=build_transform(16, train=False),
        tokenizer=TOK,
        mask_generator=BlockMaskGenerator(4, min_num_patches=2),
        shuffle_buffer=8,
    )
    args.update(kw)
    return ShardStream(streams, **args)


def _texts(batch: dict[str, torch.Tensor]) -> list[str]:
    """Undo text masking with the labels and decode."""
    ids = torch.where(batch["text_labels"] != IGNORE_INDEX, batch["text_labels"], batch["text"])
    return [TOK.decode(row) for row in ids]


def _text_shards(tmp_path: Path, n_docs: int = 40, per_shard: int = 5) -> Path:
    src = tmp_path / "docs.txt"
    src.write_text("\n".join(f"document {i}" for i in range(n_docs)) + "\n")
    write_shards(iter_text_files([src]), tmp_path / "text", kind="text", maxcount=per_shard)
    return tmp_path / "text"


def test_pair_shards_from_real_coco_samples(tmp_path: Path) -> None:
    ann = SAMPLES / "coco/annotations/captions_val2017.json"
    if not ann.exists():
        pytest.skip("datasets/samples not present")
    rep = write_shards(iter_coco_captions(ann, SAMPLES / "coco/val2017"), tmp_path, kind="pair", maxcount=4)
    assert rep.written == 10 and rep.num_skipped == 0
    assert read_sizes(tmp_path) == {"train-000000.tar": 4, "train-000001.tar": 4, "train-000002.tar": 2}
    import webdataset as wds  # our shards are plain webdataset shards

    sample = next(iter(wds.WebDataset(str(tmp_path / "train-000000.tar"), shardshuffle=False)))
    meta = json.loads(sample["json"])
    assert len(meta["captions"]) == 5 and sample["jpg"][:2] == b"\xff\xd8"
    ds = _stream({"pair": StreamConfig("pair", [str(tmp_path / "train-*.tar")], 0.5)}, train=False)
    batches = [b for b, *_ in ds]
    assert sum(b["pair"]["image"].shape[0] for b in batches) == 10
    assert batches[0]["pair"]["image_mask"].shape == (4, 16)


def test_writer_reports_bad_samples_per_file(tmp_path: Path) -> None:
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    (imgs / "good.jpg").write_bytes(_jpeg())
    (imgs / "truncated.jpg").write_bytes(_jpeg(size=64)[:300])
    (imgs / "notes.jpg").write_bytes(b"this is not an image")
    (imgs / "empty.jpg").write_bytes(_jpeg())
    lst = tmp_path / "pairs.jsonl"
    rows = [
        {"image": "imgs/good.jpg", "caption": "a red square"},
        {"image": "imgs/truncated.jpg", "caption": "cut off"},
        {"image": "imgs/notes.jpg", "caption": "text file"},
        {"image": "imgs/empty.jpg", "caption": "   "},
        {"image": "imgs/missing.jpg", "caption": "gone"},
    ]
    lst.write_text("\n".join(json.dumps(r) for r in rows) + "\n{broken json\n")
    rep = write_shards(iter_pair_list(lst), tmp_path / "out", kind="pair")
    assert rep.written == 1 and rep.num_skipped == 5
    reasons = {x["item"]: x["reason"] for x in rep.items[str(lst)]}
    assert "decode" in reasons["line 2"] and "decode" in reasons["line 3"]
    assert reasons["line 4"] == "empty caption" and "unreadable" in reasons["line 5"]
    assert "bad JSON" in reasons["line 6"]
    saved = json.loads((tmp_path / "out/train-skipped.json").read_text())
    assert saved["written"] == 1 and len(saved["skipped"][str(lst)]) == 5
    # TSV with header, and an image folder (the text file is reported as undecodable)
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text("caption\timage\na red square\timgs/good.jpg\n\timgs/good.jpg\n")
    assert write_shards(iter_pair_list(tsv), tmp_path / "tsv", kind="pair").written == 1
    rep = write_shards(iter_image_folder(imgs), tmp_path / "img", kind="image")
    assert rep.written == 2 and rep.reasons() == Counter({"image failed to decode": 2})


def test_never_a_half_shard(tmp_path: Path) -> None:
    def samples():
        for i in range(7):
            yield ("src", f"doc {i}", {"text": f"doc {i}"})
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        write_shards(samples(), tmp_path, kind="text", maxcount=3)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["sizes.json", "train-000000.tar", "train-000001.tar"]  # no .tmp, no partial third shard
    assert read_sizes(tmp_path) == {"train-000000.tar": 3, "train-000001.tar": 3}
    # same samples -> byte-identical shards (fixed tar headers)
    w = ShardWriter(tmp_path / "again", maxcount=3)
    for i in range(3):
        w.write(f"{i:09d}", {"txt": f"doc {i}"})
    w.close()
    assert (tmp_path / "again/train-000000.tar").read_bytes() == (tmp_path / "train-000000.tar").read_bytes()


@contextlib.contextmanager
def _http_server(folder: Path) -> Iterator[str]:
    """A file server for ``folder`` on 127.0.0.1 (a free port), in a thread, shut down on exit; yields its URL."""
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.timeout = 10
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (the base class's name)
        pass


@contextlib.contextmanager
def _shard_urls(folder: Path, names: str, source: str) -> Iterator[str]:
    """The URL pattern of ``folder/names`` read as a local file, through ``pipe:cat`` or from a local HTTP server."""
    if source == "local":
        yield str(folder / names)
    elif source == "pipe":
        yield f"pipe:cat {folder / names}"
    else:
        with _http_server(folder) as base:
            yield f"{base}/{names}"


@pytest.mark.parametrize("source", ["local", "pipe", "http"])
def test_reader_skips_and_counts_corrupt_samples(tmp_path: Path, source: str) -> None:
    good = _jpeg()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for key, ext, data in [
            ("a", "jpg", good),
            ("a", "txt", b"a red square"),
            ("b", "jpg", _jpeg(size=64)[:200]),  # truncated JPEG
            ("b", "txt", b"cut"),
            ("c", "jpg", good),
            ("c", "txt", b"   "),  # empty caption
            ("d", "jpg", b"GIF89a not really"),  # a non-image file
            ("d", "txt", b"fake"),
            ("e", "txt", b"caption without image"),
            ("f", "jpg", good),
            ("f", "txt", b"another red square"),
        ]:
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (tmp_path / "bad-000000.tar").write_bytes(buf.getvalue())
    # a corrupt tar: a valid member followed by garbage where the next header should be
    buf2 = io.BytesIO()
    with tarfile.open(fileobj=buf2, mode="w") as tar:
        for ext, data in (("jpg", good), ("txt", b"first of a broken shard")):
            info = tarfile.TarInfo(f"g.{ext}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    raw = buf2.getvalue()
    cut = 512 + ((len(good) + 511) // 512) * 512  # end of the jpg member
    (tmp_path / "bad-000001.tar").write_bytes(raw[:cut] + b"\x13" * 700)
    (tmp_path / "bad-000002.tar").write_bytes(b"not a tar at all" * 10)
    # a shard cut off in the middle of a member's data (an interrupted copy)
    buf3 = io.BytesIO()
    with tarfile.open(fileobj=buf3, mode="w") as tar:
        for key, ext, data in [("h", "jpg", good), ("h", "txt", b"complete before the cut"), ("i", "jpg", good)]:
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    raw3 = buf3.getvalue()
    with tarfile.open(fileobj=io.BytesIO(raw3)) as tar:
        cut = tar.getmember("i.jpg").offset_data + len(good) // 2
    (tmp_path / "bad-000003.tar").write_bytes(raw3[:cut])
    with _shard_urls(tmp_path, "bad-{000000..000003}.tar", source) as urls:
        ds = _stream({"pair": StreamConfig("pair", [urls], 0.5)}, train=False, batch_size=8)
        loader = StreamLoader(ds, num_workers=0)
        batches = list(loader)
    texts = [t for b in batches for t in _texts(b["pair"])]
    assert sorted(texts) == ["a red square", "another red square", "complete before the cut"]
    sk = loader.skipped
    assert sk["decode_error"] == 2 and sk["empty_text"] == 1 and sk["missing_image"] == 1
    assert sk["corrupt_shard"] == 3 and sk["missing_text"] == 1  # g.jpg alone before the garbage
    assert loader.epoch_skipped == dict(sk)


def test_pattern_matching_nothing_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "x-000000.tar").write_bytes(b"")
    assert expand_patterns([str(tmp_path / "x-{000000..000000}.tar")]) == [str(tmp_path / "x-000000.tar")]
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        expand_patterns([str(tmp_path / "x-*.tar"), str(tmp_path / "nothing-here-*.tar")])
    # streamed URLs: braces expand, globs and existence are not checked; other schemes name the pipe: form
    assert expand_patterns("pipe:cat /d/x-{0..1}.tar") == ["pipe:cat /d/x-0.tar", "pipe:cat /d/x-1.tar"]
    assert expand_patterns(["https://h/x-{0..1}*.tar"]) == ["https://h/x-0*.tar", "https://h/x-1*.tar"]
    with pytest.raises(ValueError, match="pipe:aws s3 cp"):
        expand_patterns("s3://bucket/x-{0..1}.tar")


@pytest.mark.parametrize("source", ["pipe", "http"])
def test_streamed_shards_read_like_local_ones(tmp_path: Path, source: str) -> None:
    """``pipe:`` and http shards give the batches local files give, in training too (2 workers, 2 ranks)."""
    shards = _text_shards(tmp_path)
    (shards / "sizes.json").unlink()  # served folders need no index
    local = {"text": StreamConfig("text", [str(shards / "train-{000000..000007}.tar")], 0.15)}
    with _shard_urls(shards, "train-{000000..000007}.tar", source) as urls:
        streamed = {"text": StreamConfig("text", [urls], 0.15)}
        for kw in ({"train": False, "rank": 1, "world_size": 2}, {"train": True, "num_batches": 4, "seed": 5}):
            want = [_texts(b["text"]) for b in StreamLoader(_stream(local, **kw), num_workers=2)]
            got = [_texts(b["text"]) for b in StreamLoader(_stream(streamed, **kw), num_workers=2)]
            assert got == want and len(want) >= 3
        missing = urls.replace("train-{000000..000007}", "train-{000000,999999}")
        loader = StreamLoader(_stream({"text": StreamConfig("text", [missing], 0.15)}, train=False))
        assert sum(b["text"]["text"].shape[0] for b in loader) == 5  # the missing shard is counted, not fatal
        assert loader.skipped == {"corrupt_shard": 1}


@pytest.mark.parametrize("per_shard", [5, 40])  # 8 shards (split by shard) or 1 shard (split by sample)
def test_two_ranks_see_disjoint_data(tmp_path: Path, per_shard: int) -> None:
    shards = _text_shards(tmp_path, per_shard=per_shard)
    cfg = {"text": StreamConfig("text", [str(shards / "train-*.tar")], 0.15)}
    seen = {}
    for rank in (0, 1):
        ds = _stream(cfg, train=False, rank=rank, world_size=2)
        seen[rank] = {t for b, *_ in ds for t in _texts(b["text"])}
    assert seen[0].isdisjoint(seen[1]) and len(seen[0] | seen[1]) == 40
    train_seen = {}
    for rank in (0, 1):
        ds = _stream(cfg, train=True, rank=rank, world_size=2, num_batches=15)
        train_seen[rank] = {t for b, *_ in ds for t in _texts(b["text"])}
    assert train_seen[0].isdisjoint(train_seen[1])
    assert len(train_seen[0]) >= 15 and len(train_seen[1]) >= 15  # resampling covers most of each half
    urls = [f"s{i}" for i in range(8)]
    parts = [ShardStream.split_for_consumer(urls, c, 4)[0] for c in range(4)]
    assert sorted(u for p in parts for u in p) == urls and all(len(p) == 2 for p in parts)


def test_resume_gives_a_fresh_stream_and_workers(tmp_path: Path) -> None:
    shards = _text_shards(tmp_path)
    cfg = {"text": StreamConfig("text", [str(shards / "train-*.tar")], 0.15)}
    loader = StreamLoader(_stream(cfg, num_batches=4, seed=7), num_workers=0)
    first = [_texts(b["text"]) for b in loader]
    again = [_texts(b["text"]) for b in StreamLoader(_stream(cfg, num_batches=4, seed=7))]
    assert first == again  # same seed, same pass -> same stream
    state = loader.state_dict()
    assert state["iteration"] == 1 and state["samples_seen"] == {"text": 16} and state["seed"] == 7
    resumed = StreamLoader(_stream(cfg, num_batches=4, seed=7))
    resumed.load_state_dict(state)
    second = [_texts(b["text"]) for b in resumed]
    assert second != first and resumed.state_dict()["samples_seen"] == {"text": 32}
    # two workers: each makes half of the batches, all of them complete
    multi = StreamLoader(_stream(cfg, num_batches=5, seed=7), num_workers=2)
    batches = list(multi)
    assert len(batches) == len(multi) == 5 and all(b["text"]["text"].shape == (4, 12) for b in batches)


def test_flip_swaps_left_and_right_in_pair_captions(tmp_path: Path) -> None:
    img = Image.new("RGB", (16, 16), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 8, 16))  # red on the left half
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    w = ShardWriter(tmp_path)
    w.write("000000000", {"png": buf.getvalue(), "txt": "red on the left and blue on the right"})
    w.close()
    cfg = {"pair": StreamConfig("pair", [str(tmp_path / "train-*.tar")], 0.5)}
    for hflip, caption, red_side in ((1.0, "red on the right and blue on the left", -1), (0.0, None, 0)):
        ds = _stream(cfg, train=True, num_batches=1, batch_size=2, shuffle_buffer=1, hflip=hflip)
        sub = next(iter(ds))[0]["pair"]
        assert sub["image"][0, 0, 8, red_side] > 0.9 and sub["image"][0, 2, 8, red_side] < -0.9
        expected = caption or "red on the left and blue on the right"
        assert _texts(sub)[0] == expected


def test_validation_with_fixed_steps_is_equal_on_every_rank(tmp_path: Path) -> None:
    shards = _text_shards(tmp_path, n_docs=10, per_shard=3)  # 4 shards: ranks get 6 and 4 samples
    cfg = {"text": StreamConfig("text", [str(shards / "train-*.tar")], 0.15)}
    counts = [len(list(_stream(cfg, train=False, rank=r, world_size=2, num_batches=3))) for r in (0, 1)]
    assert counts == [3, 3]
    once = [len(list(_stream(cfg, train=False, rank=r, world_size=2))) for r in (0, 1)]
    assert once == [2, 1]  # without a step count each sample is read once (6 -> 4 + 2, 4 -> 4)


def test_long_documents_give_random_windows(tmp_path: Path) -> None:
    words = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa"
    doc = words + " quebec romeo sierra tango uniform victor whiskey xray yankee zulu red green blue yellow"
    src = tmp_path / "long.txt"
    src.write_text(doc + "\n")
    write_shards(iter_text_files([src]), tmp_path / "text", kind="text")
    cfg = {"text": StreamConfig("text", [str(tmp_path / "text/train-*.tar")], 0.15)}
    texts = [t for b, *_ in _stream(cfg, train=True, num_batches=3, shuffle_buffer=1) for t in _texts(b["text"])]
    assert len(texts) == 12 and all(t in doc for t in texts)  # contiguous windows of the document
    assert len(set(texts)) > 3 and any(not t.startswith("alpha ") for t in texts)
    val = next(iter(_stream(cfg, train=False)))[0]["text"]
    assert _texts(val)[0] in doc and doc.startswith(_texts(val)[0])  # evaluation: always the start


def test_make_shards_cli(tmp_path: Path) -> None:
    from mmoe.cli import make_shards as tool

    (tmp_path / "a.txt").write_text("first document\n\nsecond\n")
    rep = tool.run(["text", "--files", str(tmp_path / "a.txt"), "--out", str(tmp_path / "t"), "--prefix", "wiki"])
    assert rep.written == 2 and rep.items == {str(tmp_path / "a.txt"): [{"item": "line 2", "reason": "empty text"}]}
    assert read_sizes(tmp_path / "t") == {"wiki-000000.tar": 2}
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    (imgs / "x.jpg").write_bytes(_jpeg(size=40))
    (imgs / "x.txt").write_text("a red square")
    rep = tool.run(["images", "--folder", str(imgs), "--sidecar", "--out", str(tmp_path / "p"), "--max-side", "16"])
    assert rep.written == 1
    import webdataset as wds

    sample = next(iter(wds.WebDataset(str(tmp_path / "p/train-000000.tar"), shardshuffle=False)))
    assert sample["txt"] == b"a red square" and Image.open(io.BytesIO(sample["jpg"])).size == (16, 16)
