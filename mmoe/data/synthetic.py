"""The synthetic "shapes world": a small, learnable stand-in for COCO / VQAv2 / NLVR2 / ImageNet.

Each scene holds 1-4 coloured shapes, each in its own cell of a 3x3 grid (so positions have names:
"top left", "center", ...), small or large, on a grey, lightly noisy background. From the scene
graph we write, in the official file formats (docs/interfaces.md section 6), so the real loaders
read it unchanged:

* COCO captions (5 per image) and COCO instances (boxes + polygon masks; categories = shapes),
* VQAv2 questions/annotations (colour, shape, count, position and yes/no questions; 10 answers each
  with a little annotator noise; ``question_type``/``answer_type``/``multiple_choice_answer``),
* NLVR2 JSONL statements over image pairs (one sentence per set of 4 pairs, labels balanced), so the
  consistency metric ([NLVR2], reported in [B3] sec. 3.1) is meaningful,
* an ImageFolder classification set (the shape of the single object in the image),
* a text-only corpus (descriptions of unrendered scenes, for masked language modeling).

Every answer and label is a function of what is drawn, so a tiny model can learn it on CPU in
minutes. Everything is seeded: the same ``seed`` gives byte-identical files (Python's
``random.Random`` with string seeds, numpy ``default_rng`` for noise, deterministic JSON order).
Shapes are rasterised from the same polygons that are written as segmentation masks, with 4x
supersampling for anti-aliased edges.
"""

from __future__ import annotations

import io
import json
import math
import os
import random
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from mmoe.data.shard_writer import (
    RawSample,
    StreamKind,
    iter_coco_captions,
    iter_image_folder,
    iter_text_files,
    write_shards,
)
from mmoe.files import atomic_write_bytes

__all__ = [
    "ALT_WORLD",
    "COLORS",
    "HOLDOUT_WORLD",
    "POSITIONS",
    "SHAPES",
    "SIZES",
    "SceneObject",
    "WORLD_VARIANTS",
    "WorldSpec",
    "caption_scene",
    "make_world",
    "render_scene",
    "sample_scene",
    "vqa_for_scene",
    "write_retrieval_split",
    "write_world_shards",
]

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "star")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (45, 85, 225),
    "yellow": (240, 215, 40),
    "purple": (145, 60, 190),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
}
SIZES: tuple[str, ...] = ("small", "large")
_SIZE_RADIUS = {"small": 0.24, "large": 0.40}
# Grid cell (row, col) -> short position name (VQA answers) and a caption phrase.
POSITIONS: dict[tuple[int, int], str] = {
    (0, 0): "top left",
    (0, 1): "top",
    (0, 2): "top right",
    (1, 0): "left",
    (1, 1): "center",
    (1, 2): "right",
    (2, 0): "bottom left",
    (2, 1): "bottom",
    (2, 2): "bottom right",
}
_PHRASES: dict[str, str] = {
    "top left": "in the top left corner",
    "top": "at the top",
    "top right": "in the top right corner",
    "left": "on the left",
    "center": "in the center",
    "right": "on the right",
    "bottom left": "in the bottom left corner",
    "bottom": "at the bottom",
    "bottom right": "in the bottom right corner",
}
NUMBER_WORDS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight")
OUTLINES: tuple[str, ...] = ("circle", "square", "diamond", "hexagon", "triangle", "cross", "star")


@dataclass(frozen=True)
class WorldSpec:
    """The words, colours, sizes and question set of one shapes world.

    Why: a recipe tuned on one world can learn that world's quirks. The second world (``"alt"``) shares no
    colour, shape word or size with the standard one, draws two outlines the standard world never shows,
    holds 1-3 objects, and asks four other question kinds in other wording (how many, can you see a, which
    colour is the named shape, which shape is furthest left), so a recipe can be judged on a world it was not
    tuned on (docs/results/learning.md). The third (``"holdout"``) asks the same four kinds in a third wording,
    with a third set of shape words, colours and sizes; it is kept for judging recipes once the other two
    have been used for tuning. Its sizes sit near the standard world's, not below them like ``alt``'s (whose
    smallest shapes are 8 px across in a 64-px image, where a disc and a hexagon are a few pixels apart).

    Attributes:
        name: the variant name (``mmoe-synthetic --variant``).
        shapes: shape word -> outline (one of ``OUTLINES``).
        colors: colour word -> base RGB.
        sizes: size word -> radius as a fraction of a grid cell.
        max_objects: objects per scene are drawn from 1..max_objects.
        questions: ``"standard"`` (colour, shape, count, position, yes/no), or ``"alt"`` / ``"holdout"`` (the
            four kinds above, in that world's wording).
    """

    name: str
    shapes: dict[str, str]
    colors: dict[str, tuple[int, int, int]]
    sizes: dict[str, float]
    max_objects: int
    questions: str

    @property
    def shape_words(self) -> tuple[str, ...]:
        return tuple(self.shapes)

    def obj_kwargs(self, shape: str) -> dict[str, str]:
        """``SceneObject`` geometry argument for a shape word ({} when the word names its outline)."""
        outline = self.shapes[shape]
        return {} if outline == shape else {"geometry": outline}


STANDARD_WORLD = WorldSpec(
    name="standard",
    shapes={s: s for s in SHAPES},
    colors=COLORS,
    sizes=_SIZE_RADIUS,
    max_objects=4,
    questions="standard",
)
ALT_WORLD = WorldSpec(
    name="alt",
    shapes={"disc": "circle", "diamond": "diamond", "hexagon": "hexagon", "wedge": "triangle", "plus": "cross"},
    colors={
        "cyan": (40, 200, 215),
        "magenta": (205, 45, 165),
        "brown": (125, 75, 35),
        "pink": (250, 165, 195),
        "lime": (160, 235, 60),
        "black": (25, 25, 30),
    },
    sizes={"tiny": 0.20, "big": 0.44},
    max_objects=3,
    questions="alt",
)
HOLDOUT_WORLD = WorldSpec(
    name="holdout",
    shapes={"ball": "circle", "block": "square", "tent": "triangle", "spark": "star", "gem": "diamond"},
    colors={
        "navy": (30, 45, 125),
        "gold": (225, 180, 45),
        "teal": (20, 130, 125),
        "crimson": (185, 20, 55),
        "olive": (125, 135, 30),
        "coral": (250, 125, 90),
    },
    sizes={"medium": 0.26, "huge": 0.42},
    max_objects=3,
    questions="holdout",
)
WORLD_VARIANTS: dict[str, WorldSpec] = {w.name: w for w in (STANDARD_WORLD, ALT_WORLD, HOLDOUT_WORLD)}
_SUPERSAMPLE = 4
_LICENSE = {
    "id": 1,
    "name": "CC0 1.0 (synthetic, generated by mmoe)",
    "url": "https://creativecommons.org/publicdomain/zero/1.0/",
}


@dataclass(frozen=True)
class SceneObject:
    """One shape in a scene; geometry in units of the image side (0..1), so any image size renders it."""

    shape: str
    color: str
    size: str
    row: int
    col: int
    cx: float
    cy: float
    radius: float
    rgb: tuple[int, int, int]
    geometry: str = ""  # outline to draw when the shape's word is not itself an outline name ("disc")

    @property
    def position(self) -> str:
        return POSITIONS[(self.row, self.col)]

    def polygon(self, image_size: int) -> list[tuple[float, float]]:
        """Outline in pixel coordinates (this polygon is both drawn and written as the COCO mask)."""
        s = float(image_size)
        cx, cy, r = self.cx * s, self.cy * s, self.radius * s
        kind = self.geometry or self.shape
        if kind == "circle":
            pts = [(math.cos(2 * math.pi * k / 32), math.sin(2 * math.pi * k / 32)) for k in range(32)]
        elif kind == "square":
            a = 0.85
            pts = [(-a, -a), (a, -a), (a, a), (-a, a)]
        elif kind == "diamond":
            pts = [(0.0, -1.0), (0.8, 0.0), (0.0, 1.0), (-0.8, 0.0)]
        elif kind == "hexagon":
            pts = [(math.cos(math.radians(30 + 60 * k)), math.sin(math.radians(30 + 60 * k))) for k in range(6)]
        elif kind == "triangle":
            pts = [(math.cos(math.radians(t)), math.sin(math.radians(t))) for t in (-90, 30, 150)]
            pts = [(x, y + 0.15) for x, y in pts]  # centre the triangle's bounding box vertically
        elif kind == "cross":
            w = 0.34
            pts = [
                (-w, -1),
                (w, -1),
                (w, -w),
                (1, -w),
                (1, w),
                (w, w),
                (w, 1),
                (-w, 1),
                (-w, w),
                (-1, w),
                (-1, -w),
                (-w, -w),
            ]
        elif kind == "star":
            pts = []
            for k in range(10):
                rad = 1.0 if k % 2 == 0 else 0.45
                t = math.radians(-90 + 36 * k)
                pts.append((rad * math.cos(t), rad * math.sin(t) + 0.05))
        else:
            raise ValueError(f"SceneObject.polygon: unknown outline {kind!r}; expected one of {OUTLINES}")
        return [(cx + r * x, cy + r * y) for x, y in pts]


def sample_scene(
    rng: random.Random,
    *,
    min_objects: int = 1,
    max_objects: int | None = None,
    shapes: Sequence[str] | None = None,
    spec: WorldSpec = STANDARD_WORLD,
) -> list[SceneObject]:
    """Random scene of ``spec``'s world: ``min..max`` objects (default max: the world's) in distinct grid
    cells. ``shapes`` fixes the objects' shapes."""
    top = spec.max_objects if max_objects is None else max_objects
    n = len(shapes) if shapes is not None else rng.randint(min_objects, top)
    cells = rng.sample(sorted(POSITIONS), n)
    cell = 1.0 / 3.0
    objs = []
    for i, (row, col) in enumerate(cells):
        size = rng.choice(tuple(spec.sizes))
        radius = spec.sizes[size] * cell
        jitter = 0.5 * cell - radius - 0.02 * cell  # keep every shape inside its own cell (no overlaps)
        cx = (col + 0.5) * cell + rng.uniform(-jitter, jitter)
        cy = (row + 0.5) * cell + rng.uniform(-jitter, jitter)
        color = rng.choice(sorted(spec.colors))
        base = spec.colors[color]
        rgb = tuple(int(min(255, max(0, c + rng.randint(-12, 12)))) for c in base)
        shape = shapes[i] if shapes is not None else rng.choice(spec.shape_words)
        geometry = spec.obj_kwargs(shape)
        objs.append(SceneObject(shape, color, size, row, col, cx, cy, radius, rgb, **geometry))  # type: ignore[arg-type]
    # Reading order (top to bottom, left to right) keeps captions and annotation ids stable.
    return sorted(objs, key=lambda o: (o.row, o.col))


def render_scene(objs: Sequence[SceneObject], image_size: int, rng: random.Random) -> Image.Image:
    """Rasterise a scene: grey background (random tone, optional light noise), anti-aliased shapes."""
    big = image_size * _SUPERSAMPLE
    tone = rng.randint(95, 150)
    tint = [rng.randint(-8, 8) for _ in range(3)]
    bg = tuple(tone + t for t in tint)
    img = Image.new("RGB", (big, big), bg)  # type: ignore[arg-type]
    draw = ImageDraw.Draw(img)
    for o in objs:
        draw.polygon([(x * _SUPERSAMPLE, y * _SUPERSAMPLE) for x, y in o.polygon(image_size)], fill=o.rgb)
    img = img.resize((image_size, image_size), Image.BOX)
    noise_std = rng.choice((0.0, 0.0, 3.0, 6.0))
    if noise_std > 0:
        nrng = np.random.default_rng(rng.getrandbits(63))
        arr = np.asarray(img, dtype=np.float32) + nrng.normal(0.0, noise_std, size=(image_size, image_size, 3))
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "RGB")
    return img


# ------------------------------------------------------------------------------------------------
# language
# ------------------------------------------------------------------------------------------------


def _plural(shape: str) -> str:
    return shape + "es" if shape.endswith("s") else shape + "s"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _np(o: SceneObject, *, size: bool = True) -> str:
    words = ([o.size] if size else []) + [o.color, o.shape]
    return f"{_article(words[0])} {' '.join(words)}"


def _relation(a: SceneObject, b: SceneObject) -> str:
    """Spatial relation of a to b from the grid cells (columns first, as people read left to right)."""
    if a.col != b.col:
        return "to the left of" if a.col < b.col else "to the right of"
    return "above" if a.row < b.row else "below"


def _count_phrase(objs: Sequence[SceneObject]) -> str:
    counts = Counter(o.shape for o in objs)
    parts = [f"{NUMBER_WORDS[c]} {s if c == 1 else _plural(s)}" for s, c in sorted(counts.items())]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _sentence(text: str) -> str:
    return text[0].upper() + text[1:] + "."


def caption_scene(objs: Sequence[SceneObject], rng: random.Random, num: int = 5) -> list[str]:
    """``num`` distinct captions (COCO style: capitalised, full stop) that are all true of the scene."""
    cands: list[str] = []
    listing = [_np(o, size=rng.random() < 0.7) for o in objs]
    cands.append(listing[0] if len(listing) == 1 else ", ".join(listing[:-1]) + " and " + listing[-1])
    cands.append(f"{_count_phrase(objs)} on a grey background")
    n = len(objs)
    cands.append(f"{NUMBER_WORDS[n]} {'shape' if n == 1 else 'shapes'}: {_count_phrase(objs)}")
    for o in objs:
        cands.append(f"{_np(o)} {_PHRASES[o.position]}")
    if n >= 2:
        pairs = [(a, b) for a in objs for b in objs if a is not b]
        for a, b in rng.sample(pairs, min(len(pairs), 3)):
            cands.append(f"{_np(a, size=rng.random() < 0.5)} {_relation(a, b)} {_np(b, size=rng.random() < 0.5)}")
    colors = sorted({o.color for o in objs})
    cands.append(f"shapes in {' and '.join(colors)}" if len(colors) > 1 else f"{colors[0]} shapes on grey")
    seen: list[str] = []
    for c in cands:
        if c not in seen:
            seen.append(c)
    first, rest = seen[0], seen[1:]
    rng.shuffle(rest)
    picked = [first, *rest][:num]
    while len(picked) < num:  # tiny scenes: repeat with a different wording rather than return fewer
        o = rng.choice(list(objs))
        picked.append(f"there is {_np(o)} {_PHRASES[o.position]}")
    return [_sentence(c) for c in picked]


# ------------------------------------------------------------------------------------------------
# VQA
# ------------------------------------------------------------------------------------------------


def _answer_space(spec: WorldSpec) -> dict[str, list[str]]:
    """Valid answers per kind of question (annotator noise draws from these)."""
    return {
        "color": sorted(spec.colors),
        "shape": list(spec.shape_words),
        "number": [str(i) for i in range(0, spec.max_objects + 1)],
        "position": sorted(set(POSITIONS.values())),
        "yes/no": ["yes", "no"],
    }


@dataclass(frozen=True)
class _Question:
    question: str
    answer: str
    question_type: str
    answer_type: str  # official: "yes/no" | "number" | "other"
    space: str  # which answer space annotator noise draws from


def vqa_for_scene(objs: Sequence[SceneObject], rng: random.Random, spec: WorldSpec = STANDARD_WORLD) -> list[_Question]:
    """Questions whose answers are determined by the scene: colour, shape, count, position and yes/no in the
    standard world; count, existence, colour of a named shape and the leftmost shape in the ``alt`` and
    ``holdout`` worlds."""
    if spec.questions in _FOUR_KIND_WORDING:
        return _four_kind_questions(objs, rng, spec)
    qs: list[_Question] = []
    shape_count = Counter(o.shape for o in objs)
    color_count = Counter(o.color for o in objs)
    pair_count = Counter((o.color, o.shape) for o in objs)
    unique_shape = [o for o in objs if shape_count[o.shape] == 1]
    unique_color = [o for o in objs if color_count[o.color] == 1]
    unique_pair = [o for o in objs if pair_count[(o.color, o.shape)] == 1]
    if unique_shape:
        o = rng.choice(unique_shape)
        qs.append(_Question(f"What color is the {o.shape}?", o.color, "what color is the", "other", "color"))
    if unique_color:
        o = rng.choice(unique_color)
        qs.append(_Question(f"What shape is the {o.color} object?", o.shape, "what shape is the", "other", "shape"))
    # counting: half the time a present shape, else any shape (answer may be 0)
    shape = rng.choice(sorted(shape_count)) if rng.random() < 0.5 else rng.choice(SHAPES)
    qs.append(
        _Question(f"How many {_plural(shape)} are there?", str(shape_count[shape]), "how many", "number", "number")
    )
    if rng.random() < 0.5:
        qs.append(_Question("How many shapes are there?", str(len(objs)), "how many", "number", "number"))
    else:
        color = rng.choice(sorted(color_count))
        q = f"How many {color} shapes are there?"
        qs.append(_Question(q, str(color_count[color]), "how many", "number", "number"))
    if unique_pair:
        o = rng.choice(unique_pair)
        qs.append(_Question(f"Where is the {o.color} {o.shape}?", o.position, "where is the", "other", "position"))
    # yes/no, balanced per image: one question whose answer is yes, one whose answer is no
    for want_yes in rng.sample([True, False], 2):
        kind = rng.randrange(3)
        if (kind == 1 and not unique_shape) or (kind == 2 and not unique_pair):
            kind = 0  # the referent would be ambiguous; ask about existence instead
        yes_no = "yes" if want_yes else "no"
        if kind == 0:
            if want_yes:
                o = rng.choice(list(objs))
                color, shape = o.color, o.shape
            else:
                absent = [(c, s) for c in sorted(COLORS) for s in SHAPES if (c, s) not in pair_count]
                color, shape = rng.choice(absent)
            qs.append(
                _Question(f"Is there {_article(color)} {color} {shape}?", yes_no, "is there a", "yes/no", "yes/no")
            )
        elif kind == 1:
            o = rng.choice(unique_shape)
            color = o.color if want_yes else rng.choice([c for c in sorted(COLORS) if c != o.color])
            qs.append(_Question(f"Is the {o.shape} {color}?", yes_no, "is the", "yes/no", "yes/no"))
        else:
            o = rng.choice(unique_pair)
            others = [p for p in sorted(set(POSITIONS.values())) if p != o.position]
            pos = o.position if want_yes else rng.choice(others)
            q = f"Is the {o.color} {o.shape} {_PHRASES[pos]}?"
            qs.append(_Question(q, yes_no, "is the", "yes/no", "yes/no"))
    return qs


@dataclass(frozen=True)
class _FourKindWording:
    """The wording of the four question kinds of the ``alt`` and ``holdout`` worlds (each its own)."""

    count: str  # formatted with the plural shape word
    count_all: str
    count_type: str
    presence: str  # formatted with article, colour and shape
    presence_type: str
    colour: str  # formatted with the shape word
    colour_type: str
    leftmost: str
    leftmost_type: str


_FOUR_KIND_WORDING: dict[str, _FourKindWording] = {
    "alt": _FourKindWording(
        count="How many {} can you see?",
        count_all="How many objects are in the picture?",
        count_type="how many",
        presence="Can you see {} {} {}?",
        presence_type="can you see a",
        colour="Which colour does the {} have?",
        colour_type="which colour does the",
        leftmost="Which shape is furthest to the left?",
        leftmost_type="which shape is furthest",
    ),
    "holdout": _FourKindWording(
        count="What number of {} are in the scene?",
        count_all="What number of things are in the scene?",
        count_type="what number of",
        presence="Does the scene contain {} {} {}?",
        presence_type="does the scene contain",
        colour="What is the colour of the {}?",
        colour_type="what is the colour",
        leftmost="Name the shape nearest the left edge.",
        leftmost_type="name the shape",
    ),
}


def _four_kind_questions(objs: Sequence[SceneObject], rng: random.Random, spec: WorldSpec) -> list[_Question]:
    """The four question kinds of the ``alt`` and ``holdout`` worlds (count, existence, colour of a named
    shape, leftmost shape), each world in its own wording."""
    w = _FOUR_KIND_WORDING[spec.questions]
    qs: list[_Question] = []
    shape_count = Counter(o.shape for o in objs)
    pair_count = Counter((o.color, o.shape) for o in objs)
    shape = rng.choice(sorted(shape_count)) if rng.random() < 0.6 else rng.choice(spec.shape_words)
    qs.append(_Question(w.count.format(_plural(shape)), str(shape_count[shape]), w.count_type, "number", "number"))
    if rng.random() < 0.5:
        qs.append(_Question(w.count_all, str(len(objs)), w.count_type, "number", "number"))
    for want_yes in rng.sample([True, False], 2):
        if want_yes:
            o = rng.choice(list(objs))
            color, shape = o.color, o.shape
        else:
            absent = [(c, s) for c in sorted(spec.colors) for s in spec.shape_words if (c, s) not in pair_count]
            color, shape = rng.choice(absent)
        q = w.presence.format(_article(color), color, shape)
        qs.append(_Question(q, "yes" if want_yes else "no", w.presence_type, "yes/no", "yes/no"))
    unique_shape = [o for o in objs if shape_count[o.shape] == 1]
    if unique_shape:
        o = rng.choice(unique_shape)
        qs.append(_Question(w.colour.format(o.shape), o.color, w.colour_type, "other", "color"))
    left = min(o.col for o in objs)
    leftmost = [o for o in objs if o.col == left]
    if len(objs) >= 2 and len(leftmost) == 1:
        qs.append(_Question(w.leftmost, leftmost[0].shape, w.leftmost_type, "other", "shape"))
    return qs


def _annotate(
    q: _Question, rng: random.Random, noise: float, spec: WorldSpec = STANDARD_WORLD
) -> tuple[list[dict[str, Any]], str]:
    """Ten annotator answers: the truth, each replaced with probability ``noise`` by another valid answer."""
    answers = []
    space = _answer_space(spec)[q.space]
    for k in range(10):
        ans, conf = q.answer, "yes"
        if rng.random() < noise:
            ans = rng.choice([a for a in space if a != q.answer])
            conf = "maybe"
        answers.append({"answer": ans, "answer_confidence": conf, "answer_id": k + 1})
    counts = Counter(a["answer"] for a in answers)
    top = max(counts.values())
    mc = q.answer if counts[q.answer] == top else sorted(a for a, c in counts.items() if c == top)[0]
    return answers, mc


# ------------------------------------------------------------------------------------------------
# NLVR2
# ------------------------------------------------------------------------------------------------

_Statement = tuple[str, Callable[[Sequence[SceneObject], Sequence[SceneObject]], bool]]


def _count(objs: Sequence[SceneObject], shape: str | None = None, color: str | None = None) -> int:
    return sum(1 for o in objs if (shape is None or o.shape == shape) and (color is None or o.color == color))


def _nlvr2_statement(rng: random.Random, spec: WorldSpec = STANDARD_WORLD) -> _Statement:
    """One sentence template with its truth function over (left objects, right objects)."""
    shape, color = rng.choice(spec.shape_words), rng.choice(sorted(spec.colors))
    kind = rng.randrange(8)
    if kind == 0:
        return (
            f"The left image contains more {_plural(shape)} than the right image.",
            lambda a, b: _count(a, shape) > _count(b, shape),
        )
    if kind == 1:
        return "There are more shapes in the right image than in the left image.", lambda a, b: len(b) > len(a)
    if kind == 2:
        return f"Both images contain at least one {shape}.", lambda a, b: _count(a, shape) > 0 and _count(b, shape) > 0
    if kind == 3:
        return (
            f"Each image contains {_article(color)} {color} object.",
            lambda a, b: _count(a, color=color) > 0 and _count(b, color=color) > 0,
        )
    if kind == 4:
        n = rng.randint(1, 3)
        word = NUMBER_WORDS[n]
        return (
            f"There are exactly {word} {shape if n == 1 else _plural(shape)} in total.",
            lambda a, b: _count(a, shape) + _count(b, shape) == n,
        )
    if kind == 5:
        n = rng.randint(1, spec.max_objects)
        return (
            f"One image contains exactly {NUMBER_WORDS[n]} {'shape' if n == 1 else 'shapes'}.",
            lambda a, b: (len(a) == n) != (len(b) == n),
        )
    if kind == 6:
        return f"The right image contains {_article(color)} {color} {shape}.", lambda a, b: _count(b, shape, color) > 0
    return (
        f"The left image has a {shape} but the right image does not.",
        lambda a, b: _count(a, shape) > 0 and _count(b, shape) == 0,
    )


# ------------------------------------------------------------------------------------------------
# writing
# ------------------------------------------------------------------------------------------------


def _atomic_bytes(path: Path, data: bytes) -> None:
    # no fsync: the world is regenerated from its seed, only a half-written file must never appear
    atomic_write_bytes(path, data, fsync=False)


def _atomic_json(path: Path, obj: Any) -> None:
    _atomic_bytes(path, json.dumps(obj, separators=(",", ":")).encode("utf-8"))


def _image_bytes(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "JPEG":
        img.save(buf, format="JPEG", quality=92, subsampling=0)
    else:
        img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def _polygon_stats(poly: Sequence[tuple[float, float]], image_size: int) -> tuple[list[float], float, list[float]]:
    xs = [min(max(x, 0.0), image_size) for x, _ in poly]
    ys = [min(max(y, 0.0), image_size) for _, y in poly]
    area = 0.5 * abs(sum(xs[i] * ys[i - 1] - xs[i - 1] * ys[i] for i in range(len(xs))))
    bbox = [round(min(xs), 2), round(min(ys), 2), round(max(xs) - min(xs), 2), round(max(ys) - min(ys), 2)]
    seg = [round(v, 2) for xy in zip(xs, ys) for v in xy]
    return bbox, round(area, 2), seg


SPLIT_ID_OFFSET = {"train": 0, "val": 1_000_000}


def _seed_prefix(seed: int, spec: WorldSpec) -> str:
    """String seed of the world's generators (the standard world's strings predate the variants)."""
    return f"mmoe-shapes-{seed}" if spec.name == "standard" else f"mmoe-shapes-{spec.name}-{seed}"


def _write_coco_vqa(
    out: Path, split: str, num: int, image_size: int, seed: int, noise: float, spec: WorldSpec
) -> dict[str, int]:
    rng = random.Random(f"{_seed_prefix(seed, spec)}-{split}-scenes")
    qrng = random.Random(f"{_seed_prefix(seed, spec)}-{split}-vqa")
    img_dir = out / "coco" / f"{split}2014"
    img_dir.mkdir(parents=True, exist_ok=True)
    info = {"description": "mmoe synthetic shapes world (COCO format)", "version": "1.0", "year": 2026, "seed": seed}
    images, caps, inst = [], [], []
    questions, annotations = [], []
    cap_id = inst_id = 1
    for i in range(num):
        image_id = SPLIT_ID_OFFSET[split] + i + 1
        objs = sample_scene(rng, spec=spec)
        img = render_scene(objs, image_size, rng)
        name = f"COCO_{split}2014_{image_id:012d}.jpg"
        _atomic_bytes(img_dir / name, _image_bytes(img, "JPEG"))
        images.append({"id": image_id, "file_name": name, "width": image_size, "height": image_size, "license": 1})
        for c in caption_scene(objs, rng):
            caps.append({"id": cap_id, "image_id": image_id, "caption": c})
            cap_id += 1
        for o in objs:
            bbox, area, seg = _polygon_stats(o.polygon(image_size), image_size)
            inst.append(
                {
                    "id": inst_id,
                    "image_id": image_id,
                    "category_id": spec.shape_words.index(o.shape) + 1,
                    "bbox": bbox,
                    "area": area,
                    "segmentation": [seg],
                    "iscrowd": 0,
                    "attributes": {"color": o.color, "size": o.size, "position": o.position},
                }
            )
            inst_id += 1
        for k, q in enumerate(vqa_for_scene(objs, qrng, spec)):
            qid = image_id * 1000 + k
            questions.append({"image_id": image_id, "question": q.question, "question_id": qid})
            answers, mc = _annotate(q, qrng, noise, spec)
            annotations.append(
                {
                    "question_type": q.question_type,
                    "multiple_choice_answer": mc,
                    "answers": answers,
                    "image_id": image_id,
                    "answer_type": q.answer_type,
                    "question_id": qid,
                }
            )
    cats = [{"id": k + 1, "name": s, "supercategory": "shape"} for k, s in enumerate(spec.shape_words)]
    ann_dir = out / "coco" / "annotations"
    base = {"info": info, "licenses": [_LICENSE], "images": images}
    _atomic_json(ann_dir / f"captions_{split}2014.json", {**base, "annotations": caps})
    _atomic_json(ann_dir / f"instances_{split}2014.json", {**base, "annotations": inst, "categories": cats})
    vqa_info = {"description": "mmoe synthetic shapes world (VQAv2 format)", "version": "2.0", "year": 2026}
    vqa_license = {"name": _LICENSE["name"], "url": _LICENSE["url"]}
    common = {"info": vqa_info, "license": vqa_license, "data_subtype": f"{split}2014", "data_type": "mscoco"}
    _atomic_json(
        out / "vqa" / f"v2_OpenEnded_mscoco_{split}2014_questions.json",
        {**common, "task_type": "Open-Ended", "questions": questions},
    )
    _atomic_json(out / "vqa" / f"v2_mscoco_{split}2014_annotations.json", {**common, "annotations": annotations})
    return {"images": len(images), "captions": len(caps), "instances": len(inst), "questions": len(questions)}


def _write_nlvr2(out: Path, split: str, num_sets: int, image_size: int, seed: int, spec: WorldSpec) -> dict[str, int]:
    rng = random.Random(f"{_seed_prefix(seed, spec)}-{split}-nlvr2")
    img_dir = out / "nlvr2" / "images" / split
    img_dir.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []
    n_true = 0
    for set_id in range(num_sets):
        while True:  # a sentence for which 2 true and 2 false pairs are found quickly
            sentence, truth = _nlvr2_statement(rng, spec)
            targets = rng.sample([True, True, False, False], 4)
            pairs = []
            for target in targets:
                for _ in range(60):
                    left, right = sample_scene(rng, spec=spec), sample_scene(rng, spec=spec)
                    if truth(left, right) == target:
                        pairs.append((left, right))
                        break
                else:
                    break
            if len(pairs) == 4:
                break
        for pair_id, ((left, right), target) in enumerate(zip(pairs, targets)):
            stem = f"{split}-{set_id}-{pair_id}"
            for side, objs in (("img0", left), ("img1", right)):
                img = render_scene(objs, image_size, rng)
                _atomic_bytes(img_dir / f"{stem}-{side}.png", _image_bytes(img, "PNG"))
            label = "True" if target else "False"
            n_true += int(target)
            rec = {
                "validation": {"0": label},
                "sentence": sentence,
                "left_url": f"synthetic://{stem}-img0.png",
                "writer": "0",
                "label": label,
                "right_url": f"synthetic://{stem}-img1.png",
                "synset": "shape",
                "query": "shapes",
                "identifier": f"{stem}-0",
                "extra_validations": {},
            }
            lines.append(json.dumps(rec, separators=(", ", ": ")))
    _atomic_bytes(out / "nlvr2" / f"{split}.json", ("\n".join(lines) + "\n").encode("utf-8"))
    return {"nlvr2_examples": len(lines), "nlvr2_true": n_true}


def _write_imagefolder(out: Path, split: str, num: int, image_size: int, seed: int, spec: WorldSpec) -> dict[str, int]:
    rng = random.Random(f"{_seed_prefix(seed, spec)}-{split}-imagenet")
    words = spec.shape_words
    for i in range(num):
        shape = words[i % len(words)]  # balanced classes
        objs = sample_scene(rng, shapes=[shape], spec=spec)
        img = render_scene(objs, image_size, rng)
        _atomic_bytes(out / "imagenet" / split / shape / f"{split}_{i:06d}.jpg", _image_bytes(img, "JPEG"))
    return {"imagenet_images": num}


def _write_text(out: Path, split: str, num: int, seed: int, spec: WorldSpec) -> dict[str, int]:
    rng = random.Random(f"{_seed_prefix(seed, spec)}-{split}-text")
    docs = []
    for _ in range(num):
        sents = []
        for _ in range(rng.randint(1, 3)):
            objs = sample_scene(rng, spec=spec)
            sents.extend(caption_scene(objs, rng, num=rng.randint(1, 2)))
        docs.append(" ".join(sents))
    _atomic_bytes(out / "text" / f"{split}.txt", ("\n".join(docs) + "\n").encode("utf-8"))
    return {"text_docs": num}


def write_world_shards(world_dir: str | os.PathLike[str], *, maxcount: int = 1000) -> dict[str, Any]:
    """Shards of a written shapes world: ``shards/{pair,image,text}/{split}-NNNNNN.tar`` per split.

    The pair stream comes from the COCO captions (all 5 captions of an image in ``key.json``), the image
    stream from the ImageFolder set, the text stream from the text corpus; each goes through
    ``mmoe.data.shard_writer.write_shards`` (validation, ``sizes.json``, ``{split}-skipped.json``).
    Returns the samples written per ``"{stream}/{split}"``.
    """
    root = Path(world_dir)
    out: dict[str, Any] = {}
    for split in ("train", "val"):
        ann = root / "coco" / "annotations" / f"captions_{split}2014.json"
        if not ann.exists():
            continue
        sources: dict[StreamKind, Iterator[RawSample]] = {
            "pair": iter_coco_captions(ann, root / "coco" / f"{split}2014"),
            "image": iter_image_folder(root / "imagenet" / split),
            "text": iter_text_files([root / "text" / f"{split}.txt"]),
        }
        for kind, samples in sources.items():
            rep = write_shards(samples, root / "shards" / kind, kind=kind, prefix=split, maxcount=maxcount)
            out[f"{kind}/{split}"] = rep.written
    return out


def write_retrieval_split(world_dir: str | os.PathLike[str]) -> dict[str, int]:
    """``retrieval/dataset_coco.json``: the world's COCO captions as a Karpathy split file ([Karpathy] layout).

    For image-text retrieval (``mmoe.data.retrieval``): the training scenes are split ``train``; of the validation
    scenes the first half is ``val`` and the rest (at least one) ``test``, so the test images are never seen in
    validation. Paths are ``filepath/filename`` under the world's ``coco`` folder. Returns the images per split.
    """
    root = Path(world_dir)
    images: list[dict[str, Any]] = []
    counts: dict[str, int] = {}
    sent_id = 0
    for source in ("train", "val"):
        data = json.loads((root / "coco" / "annotations" / f"captions_{source}2014.json").read_text())
        caps: dict[int, list[str]] = {}
        for ann in data["annotations"]:
            caps.setdefault(int(ann["image_id"]), []).append(str(ann["caption"]))
        num = len(data["images"])
        for k, img in enumerate(data["images"]):
            split = "train" if source == "train" else ("val" if k < num // 2 else "test")
            counts[split] = counts.get(split, 0) + 1
            imgid = len(images)
            sentences = []
            for raw in caps.get(int(img["id"]), []):
                tokens = "".join(c if c.isalnum() else " " for c in raw.lower()).split()
                sentences.append({"tokens": tokens, "raw": raw, "imgid": imgid, "sentid": sent_id})
                sent_id += 1
            images.append(
                {
                    "filepath": f"{source}2014",
                    "sentids": [x["sentid"] for x in sentences],
                    "filename": img["file_name"],
                    "imgid": imgid,
                    "split": split,
                    "sentences": sentences,
                    "cocoid": int(img["id"]),
                }
            )
    _atomic_json(root / "retrieval" / "dataset_coco.json", {"images": images, "dataset": "coco"})
    return counts


def make_world(
    out_dir: str | os.PathLike[str],
    *,
    num_train: int,
    num_val: int,
    image_size: int = 64,
    seed: int = 0,
    nlvr2_sets: tuple[int, int] | None = None,
    vqa_noise: float = 0.05,
    shards: bool = False,
    shard_maxcount: int = 1000,
    variant: str = "standard",
    progress: Callable[[str, int, int], object] | None = None,
) -> dict[str, Any]:
    """Write the whole shapes world under ``out_dir`` (layout: docs/interfaces.md section 6).

    Args:
        out_dir: target folder (created).
        num_train, num_val: scenes per split for COCO/VQA, ImageFolder images and text documents.
        image_size: side of every image in pixels.
        seed: the same seed gives byte-identical files.
        nlvr2_sets: (train, val) number of NLVR2 sets of 4 pairs; default ``ceil(num/4)`` each.
        vqa_noise: probability that one of the 10 VQA annotators gives another valid answer.
        shards: also write webdataset shards under ``shards/{pair,image,text}`` (``write_world_shards``).
        shard_maxcount: samples per shard when ``shards`` is set.
        variant: ``"standard"``, ``"alt"`` or ``"holdout"`` (``WORLD_VARIANTS``): the other worlds' own words,
            colours, sizes and questions (``WorldSpec``), for judging a recipe on a world it was not tuned on.
        progress: called as ``progress(stage, done, total)`` after each stage (a split's COCO/VQA, NLVR2,
            ImageFolder, text; the shards), for a command's progress bar; the library prints nothing.

    Returns:
        A summary dict of counts per split (also written to ``world.json``, with the world's shape, colour,
        position, size and number words, which ``pair_mask_words`` of the pretraining data can name).
    """
    if num_train < 1 or num_val < 1:
        raise ValueError(f"make_world: num_train and num_val must be >= 1, got {num_train} and {num_val}")
    if image_size < 16:
        raise ValueError(f"make_world: image_size must be >= 16 pixels, got {image_size}")
    if variant not in WORLD_VARIANTS:
        raise ValueError(f"make_world: variant={variant!r}, expected one of {sorted(WORLD_VARIANTS)}")
    world = WORLD_VARIANTS[variant]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts = {"train": num_train, "val": num_val}
    sets = dict(zip(("train", "val"), nlvr2_sets)) if nlvr2_sets else {k: -(-v // 4) for k, v in counts.items()}
    summary: dict[str, Any] = {
        "seed": seed,
        "image_size": image_size,
        "variant": world.name,
        "shapes": list(world.shape_words),
        "colors": sorted(world.colors),
        "positions": sorted(set(POSITIONS.values())),
        # with the three lists above: the caption words the image decides (a pair_mask_words file)
        "sizes": sorted(world.sizes),
        "numbers": list(NUMBER_WORDS[1 : world.max_objects + 1]),
        "splits": {},
    }
    done, total = 0, 4 * len(counts) + int(shards)

    def stage(name: str) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(name, done, total)

    for split, num in counts.items():
        stats = _write_coco_vqa(out, split, num, image_size, seed, vqa_noise, world)
        stage(f"{split} COCO/VQA")
        stats.update(_write_nlvr2(out, split, sets[split], image_size, seed, world))
        stage(f"{split} NLVR2")
        stats.update(_write_imagefolder(out, split, num, image_size, seed, world))
        stage(f"{split} ImageFolder")
        stats.update(_write_text(out, split, num, seed, world))
        stage(f"{split} text")
        summary["splits"][split] = stats
    summary["retrieval"] = write_retrieval_split(out)
    if shards:
        summary["shards"] = write_world_shards(out, maxcount=shard_maxcount)
        stage("shards")
    _atomic_bytes(out / "world.json", json.dumps(summary, indent=1).encode("utf-8"))
    return summary
