"""VQAv2 over the official files ([B3] sec. 3.1; [VQAv2]: Goyal et al. 2017).

Inputs are the official ``v2_OpenEnded_mscoco_{subtype}_questions.json``,
``v2_mscoco_{subtype}_annotations.json`` (absent for test splits) and a COCO image folder with files
``COCO_{subtype}_{image_id:012d}.jpg`` (``subtype`` from the questions file, e.g. ``train2014``).

Targets follow BEiT-3/ViLT: each human answer is normalized like the official evaluator
(``mmoe.metrics.vqa.normalize_answer``) and an answer given by k of the annotators gets the soft
score 0.3 / 0.6 / 0.9 / 1.0 for k = 1 / 2 / 3 / >= 4 (``vqa_score``); answers outside the vocabulary
are dropped. The vocabulary (answers seen >= 9 times in train+val, 3129 for VQAv2) is built by
``mmoe-vqa-vocab`` and read with ``load_answer_vocab``.

The ViLT/BEiT-3 split ("train+val minus 1000 val images; local val on those 1000") is
``holdout_image_keys``: the held-out images are the last ``n`` image ids of the val files in ascending
order (deterministic), or a seeded random sample.

A question whose image is missing or unreadable is reported with its question id and skipped when
``on_missing="skip"`` (training); with ``on_missing="error"`` (evaluation) it is an error that names it,
so no question silently leaves the score.

Image tags mined from the questions (``answer_tags``): with ``tag_words`` a training item also carries the
multi-hot ``tags`` of its image, the tag words (object names) that the image's own questions and answers say
are there. A question that names a tag and whose majority answer is not a negative ("no", "0", ...) says the
tagged object is in the image ("how many discs?" "two"; "what colour is the bus?" "red"), and a tag word in an
answer ("which shape is furthest left?" "wedge") is there too. This turns the answers into image-level
multi-label recognition targets (Joulin et al. 2016 sec. 3), a signal about the objects alone that the colour
and position words cannot crowd out (Pezeshki et al. 2021; docs/results/learning.md).
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image
from torch.utils.data import Dataset

from mmoe.data.grounded import CaptionTags
from mmoe.files import atomic_write_json
from mmoe.metrics.vqa import normalize_answer

__all__ = [
    "VQAFiles",
    "VQADataset",
    "vqa_score",
    "answer_scores",
    "build_answer_vocab",
    "load_answer_vocab",
    "save_answer_vocab",
    "holdout_image_keys",
    "coco_image_name",
    "load_image",
    "AnnotatedDataset",
    "NEGATIVE_ANSWERS",
    "answer_tags",
]

log = logging.getLogger(__name__)

OnMissing = Literal["skip", "error"]
ImageKey = tuple[str, int]  # (COCO subtype such as "val2014", image id)
# Majority answers that deny what the question names ("is there a dog?" "no"; "how many dogs?" "0").
NEGATIVE_ANSWERS: frozenset[str] = frozenset({"no", "0", "zero", "none", "nothing", "nobody", "neither"})


def answer_tags(questions: Iterable[tuple[Any, str, Sequence[str]]], tags: CaptionTags) -> dict[Any, set[int]]:
    """Per image, the ``tags`` columns that its questions and answers say are present (module docstring).

    Args:
        questions: ``(image key, question, human answers)`` triples.
        tags: the tag words (``mmoe.data.grounded.CaptionTags``).

    Returns:
        image key -> column indices; an image whose questions name no tag maps to an empty set.
    """
    out: dict[Any, set[int]] = {}
    for key, question, answers in questions:
        found = out.setdefault(key, set())
        counts = Counter(normalize_answer(a) for a in answers)
        if not counts:
            continue
        majority = counts.most_common(1)[0][0]
        if majority in NEGATIVE_ANSWERS:
            continue
        found |= tags.tags(f"{question} {majority}")
    return out


@dataclass
class VQAFiles:
    """One official VQA source: questions JSON, annotations JSON (None for test) and its COCO image folder."""

    questions: str
    annotations: str | None = None
    image_dir: str = ""


def coco_image_name(subtype: str, image_id: int) -> str:
    """Official COCO 2014/2015 file name, e.g. ``COCO_val2014_000000262148.jpg``."""
    return f"COCO_{subtype}_{int(image_id):012d}.jpg"


_SCORES = (0.0, 0.3, 0.6, 0.9)


def vqa_score(count: int) -> float:
    """BEiT-3/ViLT soft score of an answer given by ``count`` annotators: 0, 0.3, 0.6, 0.9, then 1.0."""
    return _SCORES[count] if count < len(_SCORES) else 1.0


def answer_scores(answers: Iterable[str]) -> dict[str, float]:
    """Normalized answer -> soft score for one question's human answers."""
    counts = Counter(normalize_answer(a) for a in answers)
    return {a: vqa_score(c) for a, c in counts.items()}


def build_answer_vocab(annotation_lists: Iterable[Sequence[dict[str, Any]]], min_count: int = 9) -> list[str]:
    """Answers (normalized) seen at least ``min_count`` times over all human answers of all questions.

    Order is deterministic: by count descending, then alphabetically. Empty answers are excluded.
    """
    counts: Counter[str] = Counter()
    for anns in annotation_lists:
        for ann in anns:
            for a in ann["answers"]:
                counts[normalize_answer(str(a["answer"]))] += 1
    keep = [(a, c) for a, c in counts.items() if c >= min_count and a != ""]
    keep.sort(key=lambda ac: (-ac[1], ac[0]))
    return [a for a, _ in keep]


def save_answer_vocab(path: str | Path, answers: Sequence[str], meta: dict[str, Any] | None = None) -> None:
    """Write ``{"answers": [...], "meta": {...}}`` atomically (the file travels with checkpoints)."""
    atomic_write_json(path, {"answers": list(answers), "meta": meta or {}}, indent=1)


def load_answer_vocab(path: str | Path) -> list[str]:
    """Read a vocabulary file (``{"answers": [...]}`` or a plain JSON list); checks there are no duplicates."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"answer vocabulary {path}: no such file (build it with mmoe-vqa-vocab)")
    data = json.loads(path.read_text(encoding="utf-8"))
    answers = data["answers"] if isinstance(data, dict) and "answers" in data else data
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
        raise ValueError(f"answer vocabulary {path}: expected a JSON list of strings or {{'answers': [...]}}")
    dup = [a for a, c in Counter(answers).items() if c > 1]
    if dup:
        raise ValueError(f"answer vocabulary {path}: duplicate answers {dup[:5]}")
    return answers


def _read_json(path: str, key: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"VQA file {p}: no such file")
    data = json.loads(p.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or key not in data:
        raise ValueError(f"VQA file {p}: expected a JSON object with a {key!r} list (official VQAv2 format)")
    return data[key], data


def _subtype(meta: dict[str, Any], path: str) -> str:
    sub = meta.get("data_subtype")
    if not sub:
        raise ValueError(f"VQA questions {path}: no 'data_subtype' (e.g. 'train2014'), needed for image names")
    return str(sub)


def holdout_image_keys(files: Sequence[VQAFiles], num_images: int = 1000, seed: int | None = None) -> set[ImageKey]:
    """Images held out of training for local validation (ViLT/BEiT-3 split).

    The last ``num_images`` distinct image ids (ascending) of ``files`` (normally the val2014 questions),
    or a random sample with ``seed``. Returns ``{(subtype, image_id)}``.
    """
    keys: set[ImageKey] = set()
    for f in files:
        questions, meta = _read_json(f.questions, "questions")
        sub = _subtype(meta, f.questions)
        keys.update((sub, int(q["image_id"])) for q in questions)
    ordered = sorted(keys, key=lambda k: (k[0], k[1]))
    if num_images > len(ordered):
        raise ValueError(f"holdout_image_keys: asked for {num_images} held-out images, the files have {len(ordered)}")
    if seed is None:
        return set(ordered[len(ordered) - num_images :])
    return set(random.Random(seed).sample(ordered, num_images))


def load_image(path: str) -> Image.Image:
    """Open and fully decode an RGB image (so that truncated files fail here, not later)."""
    with Image.open(path) as im:
        im.load()
        return im.convert("RGB")


class AnnotatedDataset(Dataset):
    """A map-style dataset whose ``items`` are read from annotation files up front (VQAv2, NLVR2).

    An item whose image is missing is dropped and reported in ``skipped`` (``on_missing="skip"``, training) or
    raises (``"error"``, evaluation). Subclasses name their items for the messages (``item_name``, e.g.
    ``"VQA question"``) and call ``_report_skipped()`` once the items are read.
    """

    item_name = "item"
    items_name = "items"

    def __init__(self, on_missing: OnMissing) -> None:
        if on_missing not in ("skip", "error"):
            raise ValueError(f"{type(self).__name__}: on_missing={on_missing!r}; expected 'skip' or 'error'")
        self.on_missing: OnMissing = on_missing
        self.skipped: list[tuple[Any, str]] = []  # (item id, reason)
        self.items: list[dict[str, Any]] = []

    def _missing(self, ident: Any, reason: str) -> None:
        if self.on_missing == "error":
            raise FileNotFoundError(f"{self.item_name} {ident}: {reason}")
        self.skipped.append((ident, reason))

    def _report_skipped(self) -> None:
        if self.skipped:
            preview = "; ".join(f"{i}: {r}" for i, r in self.skipped[:5])
            name = type(self).__name__
            log.warning("%s: skipped %d %s with missing images (%s)", name, len(self.skipped), self.items_name, preview)

    def __len__(self) -> int:
        return len(self.items)


class VQADataset(AnnotatedDataset):
    """Map-style VQAv2 dataset; items are dicts for ``VQACollate`` (mmoe.train.data.vqav2).

    Item keys: ``image`` (transformed), ``question`` (str), ``question_id`` (int) and, when the source
    has annotations and a vocabulary is given, ``labels`` (C,) float soft scores.

    Args:
        files: one or more ``VQAFiles`` (e.g. train2014 and val2014 for the ViLT split).
        answer_vocab: the answer list (index = class id); None for test/prediction.
        transform: PIL image -> tensor; None keeps the PIL image.
        include_images / exclude_images: keep only / drop these ``(subtype, image_id)`` images.
        on_missing: ``"skip"`` (report and drop; training) or ``"error"`` (evaluation).
        check_files: look for every image file at construction (cheap: one directory listing per folder).
        tag_words: the words of ``answer_tags``; each annotated item then also has ``tags`` (T,) float, the
            multi-hot of its image's mined tags. None: no tags.
    """

    item_name = "VQA question"
    items_name = "questions"

    def __init__(
        self,
        files: VQAFiles | Sequence[VQAFiles],
        *,
        answer_vocab: Sequence[str] | None = None,
        transform: Callable[[Image.Image], Any] | None = None,
        include_images: set[ImageKey] | None = None,
        exclude_images: set[ImageKey] | None = None,
        on_missing: OnMissing = "skip",
        check_files: bool = True,
        tag_words: Sequence[str] | None = None,
    ) -> None:
        super().__init__(on_missing)
        self.files = [files] if isinstance(files, VQAFiles) else list(files)
        self.answer_vocab = list(answer_vocab) if answer_vocab is not None else None
        self.answer_to_id = {a: i for i, a in enumerate(self.answer_vocab or [])}
        self.transform = transform
        for f in self.files:
            self.items.extend(self._read_source(f, include_images, exclude_images, check_files))
        self._report_skipped()
        self.caption_tags = CaptionTags(tag_words) if tag_words else None
        self.image_tags: dict[str, torch.Tensor] = {}  # image path -> (T,) multi-hot, built once per image
        if self.caption_tags is not None:
            triples = ((it["image_path"], it["question"], it["answers"]) for it in self.items if "answers" in it)
            for path, cols in answer_tags(triples, self.caption_tags).items():
                row = torch.zeros(len(self.caption_tags), dtype=torch.float32)
                row[sorted(cols)] = 1.0
                self.image_tags[path] = row
            if not self.image_tags:
                raise ValueError(
                    f"VQADataset(tag_words=...): no annotated questions in {[f.questions for f in self.files]} to "
                    "mine image tags from; tags need annotation files"
                )

    def _read_source(
        self,
        f: VQAFiles,
        include: set[ImageKey] | None,
        exclude: set[ImageKey] | None,
        check_files: bool,
    ) -> list[dict[str, Any]]:
        questions, meta = _read_json(f.questions, "questions")
        sub = _subtype(meta, f.questions)
        answers_by_qid: dict[int, dict[str, Any]] = {}
        if f.annotations:
            anns, _ = _read_json(f.annotations, "annotations")
            answers_by_qid = {int(a["question_id"]): a for a in anns}
        if not f.image_dir:
            raise ValueError(f"VQAFiles(questions={f.questions!r}): image_dir is empty; expected the COCO image folder")
        listing: set[str] | None = None
        if check_files:
            if not os.path.isdir(f.image_dir):
                raise FileNotFoundError(f"VQA image_dir {f.image_dir}: no such folder (for {f.questions})")
            listing = set(os.listdir(f.image_dir))
        out = []
        for q in questions:
            qid, image_id = int(q["question_id"]), int(q["image_id"])
            key = (sub, image_id)
            if (include is not None and key not in include) or (exclude is not None and key in exclude):
                continue
            name = coco_image_name(sub, image_id)
            path = os.path.join(f.image_dir, name)
            if listing is not None and name not in listing:
                self._missing(qid, f"image file {path} not found")
                continue
            item: dict[str, Any] = {"question_id": qid, "question": str(q["question"]), "image_path": path}
            if f.annotations:
                if qid not in answers_by_qid:
                    raise ValueError(f"VQA annotations {f.annotations}: no entry for question_id {qid}")
                item["answers"] = [str(a["answer"]) for a in answers_by_qid[qid]["answers"]]
            out.append(item)
        return out

    def targets(self, answers: Sequence[str]) -> torch.Tensor:
        """(C,) soft-score vector of one question (answers outside the vocabulary are dropped)."""
        labels = torch.zeros(len(self.answer_to_id), dtype=torch.float32)
        for a, s in answer_scores(answers).items():
            idx = self.answer_to_id.get(a)
            if idx is not None:
                labels[idx] = s
        return labels

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        item = self.items[index]
        try:
            image: Any = load_image(item["image_path"])
        except (OSError, ValueError) as e:
            reason = f"image {item['image_path']} unreadable ({type(e).__name__}: {e})"
            if self.on_missing == "error":
                raise RuntimeError(f"VQA question {item['question_id']}: {reason}") from e
            log.warning("VQADataset: question %d skipped: %s", item["question_id"], reason)
            return None  # dropped by the collate function
        if self.transform is not None:
            image = self.transform(image)
        out: dict[str, Any] = {"image": image, "question": item["question"], "question_id": item["question_id"]}
        if self.answer_vocab is not None and "answers" in item:
            out["labels"] = self.targets(item["answers"])
        if item["image_path"] in self.image_tags:
            out["tags"] = self.image_tags[item["image_path"]].clone()
        return out
