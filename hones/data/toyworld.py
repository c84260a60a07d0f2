"""The toy world: a procedurally generated multimodal dataset in the real formats.

Scenes of 1-4 coloured shapes (circle, square, triangle, star; never blue, the OCR box's
colour) on a plain or lightly noisy background; on ~80% of the images an uppercase word
(from :data:`WORDS`) on a small plate, whose box is the OCR annotation; plates are aligned
to an ``image_size / 8`` px grid (the toy models' patch size), see :func:`_place_plate`. Every image has
one VQA question (colour of a shape, shape of a colour, count, yes/no existence,
left/right position) with 10 human-like answers, 5 captions (of 8 templates) and the OCR
text. The out-of-distribution sets use other scene statistics and are written in their
real release formats, so the real loaders read them:

- GQA (``gqa/questions.json``): 2-4 shapes, relational/compositional questions;
- TextVQA (``textvqa/textvqa.json``): a larger word on a coloured sign, no blue box,
  questions about the word;
- Flickr30k (``flickr30k/flickr_annotations_30k.csv``): 2-5 mostly small shapes on
  striped/checked/gradient backgrounds, captions in another style ("There is ... in the
  picture.").

Image ``k`` of split ``s`` comes from its own random stream seeded by ``(seed, s, k)``,
and its id is ``base(s) + k``: any subset regenerates identically. The blue OCR box is not
in the images: the OCR task view draws it, as for real COCO.

CLI: ``python -m hones.data.toyworld --out DIR --seed 0 --image-size 64 --n-train 4000
--n-discovery 300 --n-dev 200 --n-test 300 --n-ood 300 [--force]``
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; generate worlds one at a time there
    fcntl = None  # type: ignore[assignment]

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from hones.data.rng import stable_seed
from hones.data.tasks import task_prompt

VERSION = 2  # 2: text plates aligned to the patch grid
COCO_SPLITS = ("train", "discovery", "dev", "test")
OOD_SETS = ("gqa", "textvqa", "flickr30k")
ID_BASE = {"train": 1_000_000, "discovery": 2_000_000, "dev": 3_000_000, "test": 4_000_000,
           "gqa": 5_000_000, "textvqa": 6_000_000, "flickr30k": 7_000_000}  # fmt: skip
MAX_PER_SPLIT = 999_999

SHAPES = ("circle", "square", "triangle", "star")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 185, 60),
    "yellow": (240, 220, 40),
    "purple": (150, 60, 205),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
}
COCO_BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "gray": (118, 118, 118),
    "dark": (46, 46, 56),
    "brown": (112, 84, 60),
    "slate": (78, 84, 96),
}
FLICKR_BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "navy": (28, 38, 92),
    "teal": (18, 92, 92),
    "maroon": (92, 24, 36),
    "black": (14, 14, 14),
}
FLICKR_TEXTURES = ("striped", "checkered", "shaded")
WORDS = (
    "CAT", "DOG", "SUN", "MAP", "BUS", "CAR", "TOY", "BOX", "PEN", "CUP",
    "HAT", "KEY", "BED", "EGG", "FOX", "OWL", "PIG", "COW", "ICE", "JAM",
    "PARK", "STOP", "SHOP", "OPEN", "EXIT", "SALE", "CAFE", "BANK", "TAXI", "MILK",
    "BOOK", "FISH", "LAMP", "DOOR", "FARM", "HOTEL", "PIZZA", "MUSIC", "BREAD", "TRAIN",
)  # fmt: skip
# Plates: (fill, text colour). COCO plates are neutral; TextVQA signs are coloured.
COCO_PLATES = (((250, 250, 250), (0, 0, 0)), ((250, 240, 190), (0, 0, 0)), ((10, 10, 10), (255, 255, 255)))
SIGN_PLATES = (((200, 30, 30), (255, 255, 255)), ((20, 130, 50), (255, 255, 255)),
               ((250, 250, 250), (0, 0, 0)), ((245, 215, 40), (0, 0, 0)))  # fmt: skip
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six")
COLOR_VARIANTS = {
    "red": ("dark red", "pink", "orange"),
    "green": ("light green", "dark green", "lime"),
    "yellow": ("gold", "light yellow", "orange"),
    "purple": ("violet", "pink", "magenta"),
    "orange": ("red", "yellow", "dark orange"),
    "white": ("gray", "silver", "light gray"),
}
SHAPE_VARIANTS = {
    "circle": ("round", "ball", "oval"),
    "square": ("box", "rectangle", "block"),
    "triangle": ("pyramid", "arrow"),
    "star": ("starfish", "asterisk"),
}
TEXTVQA_QUESTIONS = (
    "what does the sign say?",
    "what word is written on the sign?",
    "what is written in the image?",
    "what text is shown here?",
)
PLATE_GRID_CELLS = 8  # text plates are aligned to a grid of image_size / 8 px (see _place_plate)
N_CAPTIONS = 5


@dataclass(frozen=True)
class ToyWorldConfig:
    """Sizes and seed of a toy world (``n_ood`` images per OOD set)."""

    seed: int = 0
    image_size: int = 64
    n_train: int = 4000
    n_discovery: int = 300
    n_dev: int = 200
    n_test: int = 300
    n_ood: int = 300
    word_prob: float = 0.8

    def __post_init__(self) -> None:
        if not 64 <= self.image_size <= 256:
            raise ValueError(f"image_size must be in [64, 256], got {self.image_size}")
        for name in ("n_train", "n_discovery", "n_dev", "n_test", "n_ood"):
            value = getattr(self, name)
            if not 0 <= value <= MAX_PER_SPLIT:
                raise ValueError(f"{name} must be in [0, {MAX_PER_SPLIT}], got {value}")

    def count(self, split: str) -> int:
        """Number of images of ``split`` (a COCO split or an OOD set)."""
        return self.n_ood if split in OOD_SETS else getattr(self, f"n_{split}")


# --------------------------------------------------------------------------- scenes


@dataclass(frozen=True)
class ToyObject:
    """One shape: centre ``(cx, cy)`` and radius ``r`` in pixels."""

    shape: str
    color: str
    size: str  # "small" | "large"
    cx: float
    cy: float
    r: float

    def phrase(self, sized: bool = False) -> str:
        """``a red circle`` / ``a small red circle``."""
        words = f"{self.size} {self.color} {self.shape}" if sized else f"{self.color} {self.shape}"
        return f"{article(words)} {words}"

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass
class Scene:
    """Everything drawn in one image; ``objects`` are sorted left to right."""

    size: int
    background: str
    background_rgb: tuple[int, int, int]
    texture: str  # "plain" | "noisy" | "striped" | "checkered" | "shaded"
    objects: list[ToyObject] = field(default_factory=list)
    word: str | None = None
    plate: tuple[int, int, int, int] | None = None  # [x, y, w, h] of the text plate = OCR bbox
    plate_colors: tuple[tuple[int, int, int], tuple[int, int, int]] | None = None
    font_size: int = 0


def article(words: str) -> str:
    """``a`` or ``an`` for ``words``."""
    return "an" if words[:1] in "aeiou" else "a"


def join_and(parts: Sequence[str]) -> str:
    """``x``, ``x and y``, ``x, y and z``."""
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


@lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _place_plate(rng: random.Random, scene: Scene, word: str, font_scale: float) -> None:
    size = scene.size
    font_size = max(8, round(font_scale * size))
    left, top, right, bottom = _font(font_size).getbbox(word)
    pad = max(2, size // 32)
    w, h = (right - left) + 2 * pad, (bottom - top) + 2 * pad
    margin = max(2, size // 32)
    grid = size // PLATE_GRID_CELLS
    # the plate's corner lies on a grid of size/8 px: the toy models' 8-px patches then see
    # each word drawn the same way wherever it is, which is what lets a tiny ViT trained
    # for minutes learn to read (scripts/ocr_probe.py: at 300 OCR-only steps the dev loss
    # is 0.48 on the grid and has levelled off at 1.24 off it; chance is 1.84)
    xs = [x for x in range(0, size - w - margin + 1, grid) if x >= margin] or [margin]
    ys = [y for y in range(0, size - h - margin + 1, grid) if y >= margin] or [margin]
    x, y = rng.choice(xs), rng.choice(ys)
    scene.word, scene.plate, scene.font_size = word, (x, y, w, h), font_size


def _fits(scene: Scene, cx: float, cy: float, r: float, x_gap: bool) -> bool:
    gap = max(2.0, scene.size / 32)
    for other in scene.objects:
        if math.hypot(cx - other.cx, cy - other.cy) < r + other.r + gap:
            return False
        if x_gap and abs(cx - other.cx) < 0.6 * (r + other.r):
            return False
    if scene.plate is not None:
        x, y, w, h = scene.plate
        nearest_x, nearest_y = min(max(cx, x), x + w), min(max(cy, y), y + h)
        if math.hypot(cx - nearest_x, cy - nearest_y) < r + gap:
            return False
    return True


def _place_objects(
    rng: random.Random, scene: Scene, n_objects: int, p_large: float, x_gap: bool = False
) -> None:
    """Add up to ``n_objects`` non-overlapping objects with distinct (colour, shape) pairs."""
    size = scene.size
    pairs = rng.sample([(c, s) for c in COLORS for s in SHAPES], n_objects)
    for color, shape in pairs:
        placed = False
        for size_name in ("large", "small") if rng.random() < p_large else ("small",):
            r = (0.14 if size_name == "large" else 0.09) * size * rng.uniform(0.92, 1.08)
            for _ in range(60):
                cx, cy = rng.uniform(r + 1, size - r - 1), rng.uniform(r + 1, size - r - 1)
                if _fits(scene, cx, cy, r, x_gap):
                    scene.objects.append(ToyObject(shape, color, size_name, round(cx, 2), round(cy, 2), round(r, 2)))
                    placed = True
                    break
            if placed:
                break
    scene.objects.sort(key=lambda o: o.cx)


def _populate(
    rng: random.Random, scene: Scene, n_objects: int, p_large: float, minimum: int, x_gap: bool = False
) -> None:
    """:func:`_place_objects`, retried with small shapes until at least ``minimum`` fit."""
    _place_objects(rng, scene, n_objects, p_large, x_gap)
    while len(scene.objects) < minimum:
        scene.objects.clear()
        _place_objects(rng, scene, n_objects, 0.0, x_gap)


def sample_scene(kind: str, rng: random.Random, image_size: int, word_prob: float = 0.8) -> Scene:
    """Draw a scene for ``kind`` in {"coco", "gqa", "textvqa", "flickr30k"} from ``rng``."""
    if kind == "flickr30k":
        name = rng.choice(sorted(FLICKR_BACKGROUNDS))
        scene = Scene(image_size, name, FLICKR_BACKGROUNDS[name], rng.choice(FLICKR_TEXTURES))
        _populate(rng, scene, rng.randint(2, 5), p_large=0.3, minimum=2)
        return scene
    name = rng.choice(sorted(COCO_BACKGROUNDS))
    scene = Scene(image_size, name, COCO_BACKGROUNDS[name], "noisy" if rng.random() < 0.5 else "plain")
    if kind == "coco":
        if rng.random() < word_prob:
            _place_plate(rng, scene, rng.choice(WORDS), 0.17)
            scene.plate_colors = rng.choice(COCO_PLATES)
        _populate(rng, scene, rng.choices((1, 2, 3, 4), weights=(25, 30, 25, 20))[0], p_large=0.5, minimum=1)
    elif kind == "gqa":
        _populate(rng, scene, rng.randint(2, 4), p_large=0.5, minimum=2, x_gap=True)
    elif kind == "textvqa":
        _place_plate(rng, scene, rng.choice(WORDS), 0.22)
        scene.plate_colors = rng.choice(SIGN_PLATES)
        _populate(rng, scene, rng.randint(0, 2), p_large=0.0, minimum=0)
    else:
        raise ValueError(f"unknown scene kind {kind!r}")
    return scene


def _background(scene: Scene, noise_seed: int) -> Image.Image:
    size = scene.size
    base = np.empty((size, size, 3), dtype=np.float32)
    base[:] = scene.background_rgb
    yy, xx = np.mgrid[0:size, 0:size]
    if scene.texture == "noisy":
        base += np.random.default_rng(noise_seed).normal(0.0, 6.0, size=(size, size, 1)).astype(np.float32)
    elif scene.texture == "striped":
        base += np.where((xx + yy) // max(2, size // 16) % 2 == 0, 22.0, -10.0)[..., None]
    elif scene.texture == "checkered":
        cell = max(2, size // 8)
        base += np.where((xx // cell + yy // cell) % 2 == 0, 20.0, -12.0)[..., None]
    elif scene.texture == "shaded":
        base *= (0.55 + 0.9 * yy / size)[..., None]
    return Image.fromarray(np.clip(base, 0, 255).round().astype(np.uint8), "RGB")


def _shape_points(obj: ToyObject) -> list[tuple[float, float]]:
    cx, cy, r = obj.cx, obj.cy, obj.r
    if obj.shape == "triangle":
        return [(cx, cy - r), (cx - 0.95 * r, cy + 0.8 * r), (cx + 0.95 * r, cy + 0.8 * r)]
    points = []
    for k in range(10):  # star: 5 outer + 5 inner corners
        angle = -math.pi / 2 + k * math.pi / 5
        radius = r if k % 2 == 0 else 0.45 * r
        points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return points


def render_scene(scene: Scene, noise_seed: int = 0) -> Image.Image:
    """Draw ``scene`` (background, shapes, text plate) as an RGB image."""
    img = _background(scene, noise_seed)
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        rgb = COLORS[obj.color]
        if obj.shape == "circle":
            draw.ellipse([obj.cx - obj.r, obj.cy - obj.r, obj.cx + obj.r, obj.cy + obj.r], fill=rgb)
        elif obj.shape == "square":
            half = 0.85 * obj.r
            draw.rectangle([obj.cx - half, obj.cy - half, obj.cx + half, obj.cy + half], fill=rgb)
        else:
            draw.polygon(_shape_points(obj), fill=rgb)
    if scene.word is not None and scene.plate is not None and scene.plate_colors is not None:
        x, y, w, h = scene.plate
        fill, ink = scene.plate_colors
        draw.rectangle([x, y, x + w - 1, y + h - 1], fill=fill)
        font = _font(scene.font_size)
        left, top, _, _ = font.getbbox(scene.word)
        pad = max(2, scene.size // 32)
        draw.text((x + pad - left, y + pad - top), scene.word, font=font, fill=ink)
    return img


# --------------------------------------------------------------------------- language


def _human_answers(rng: random.Random, answer: str, variants: Sequence[str]) -> list[str]:
    """10 answers: 6-10 copies of ``answer``, the rest drawn from ``variants``."""
    n_correct = rng.randint(6, 10)
    answers = [answer] * n_correct + [rng.choice(variants) for _ in range(10 - n_correct)]
    rng.shuffle(answers)
    return answers


def _count_variants(n: int) -> list[str]:
    return [str(n + 1), NUMBER_WORDS[n]] + ([str(n - 1)] if n > 1 else [])


def _coco_question(rng: random.Random, scene: Scene) -> dict[str, Any]:
    """One VQA question of a valid type: color, shape, count, exist or position."""
    objects, size = scene.objects, scene.size
    shape_counts = {s: sum(o.shape == s for o in objects) for s in SHAPES}
    color_counts = {c: sum(o.color == c for o in objects) for c in COLORS}
    by_shape = [o for o in objects if shape_counts[o.shape] == 1]
    by_color = [o for o in objects if color_counts[o.color] == 1]
    sided = [o for o in objects if abs(o.cx - size / 2) >= 0.12 * size]
    kinds = ["count", "exist"] + (["color"] if by_shape else []) + (["shape"] if by_color else [])
    kinds += ["position"] if sided else []
    kind = rng.choice(kinds)
    if kind == "color":
        obj = rng.choice(by_shape)
        question, answer, variants = f"What color is the {obj.shape}?", obj.color, COLOR_VARIANTS[obj.color]
        qtype, atype = "what color is the", "other"
    elif kind == "shape":
        obj = rng.choice(by_color)
        question, answer, variants = f"What shape is the {obj.color} object?", obj.shape, SHAPE_VARIANTS[obj.shape]
        qtype, atype = "what shape is the", "other"
    elif kind == "count":
        mode = rng.choice(("all", "color", "shape"))
        if mode == "all":
            n, question = len(objects), "How many shapes are there?"
        elif mode == "color":
            color = rng.choice([c for c in COLORS if color_counts[c]])
            n, question = color_counts[color], f"How many {color} shapes are there?"
        else:
            shape = rng.choice([s for s in SHAPES if shape_counts[s]])
            n, question = shape_counts[shape], f"How many {shape}s are there?"
        answer, variants, qtype, atype = str(n), _count_variants(n), "how many", "number"
    elif kind == "exist":
        present = {(o.color, o.shape) for o in objects}
        if rng.random() < 0.5:
            obj = rng.choice(objects)
            color, shape, answer = obj.color, obj.shape, "yes"
        else:
            near = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present
                    and (color_counts[c] or shape_counts[s])]  # fmt: skip
            color, shape = rng.choice(near)
            answer = "no"
        question, variants = f"Is there {article(color)} {color} {shape}?", ("no" if answer == "yes" else "yes",)
        qtype, atype = "is there a", "yes/no"
    else:
        obj = rng.choice(sided)
        answer = "left" if obj.cx < size / 2 else "right"
        other = "right" if answer == "left" else "left"
        question = f"Is the {obj.name} on the left or on the right?"
        variants, qtype, atype = (other, f"{answer} side", f"on the {answer}"), "is the", "other"
    return {
        "question": question,
        "answer": answer,
        "all_answers": _human_answers(rng, answer, list(variants)),
        "question_type": qtype,
        "answer_type": atype,
    }


def _coco_captions(rng: random.Random, scene: Scene) -> list[str]:
    """5 of the 8 COCO-style caption templates."""
    objects = scene.objects
    n, bg = len(objects), scene.background
    objs = join_and([o.phrase() for o in objects])
    sized = join_and([o.phrase(sized=True) for o in objects])
    noun = "shape" if n == 1 else "shapes"
    templates = [
        f"{objs[0].upper()}{objs[1:]} on {article(bg)} {bg} background.",
        f"A picture of {objs}.",
        f"{NUMBER_WORDS[n].capitalize()} {noun}: {objs}.",
        f"An image showing {sized}.",
        f"{article(bg).capitalize()} {bg} background with {objs}.",
        f"Simple {noun}: {sized}.",
        (f"{objs[0].upper()}{objs[1:]} next to a sign that says {scene.word}." if scene.word
         else f"{objs[0].upper()}{objs[1:]} in front of {article(bg)} {bg} wall."),
        f"A drawing of {objs} from left to right." if n > 1 else f"A drawing of {objs}.",
    ]  # fmt: skip
    return rng.sample(templates, N_CAPTIONS)


def _flickr_captions(rng: random.Random, scene: Scene) -> list[str]:
    """5 of the 6 Flickr-style caption templates."""
    objects = scene.objects
    n, bg, texture = len(objects), scene.background, scene.texture
    objs = join_and([o.phrase() for o in objects])
    sized = join_and([o.phrase(sized=True) for o in objects])
    templates = [
        f"There is {objs} in the picture.",
        f"In this picture we can see {objs}.",
        f"The picture shows {NUMBER_WORDS[n]} objects on a {texture} {bg} background.",
        f"We can see {sized} in this image.",
        f"This image contains {objs} on a {texture} background.",
        f"Several shapes are visible, including {objs}.",
    ]
    return rng.sample(templates, N_CAPTIONS)


def _left_of(a: ToyObject, b: ToyObject) -> bool:
    return a.cx < b.cx


def _gqa_questions(rng: random.Random, scene: Scene) -> list[dict[str, Any]]:
    """Up to 2 relational / compositional questions of distinct types."""
    objects = scene.objects
    questions: dict[str, dict[str, Any]] = {}
    a, b = rng.sample(objects, 2)
    relation = rng.choice(("left", "right"))
    truth = _left_of(a, b) if relation == "left" else _left_of(b, a)
    actual = "left" if _left_of(a, b) else "right"
    questions["relVerify"] = _gqa(
        f"Is the {a.name} to the {relation} of the {b.name}?",
        "yes" if truth else "no",
        f"{'Yes' if truth else 'No'}, the {a.name} is to the {actual} of the {b.name}.",
        "verify", "rel",
    )  # fmt: skip
    anchors = []
    for anchor in objects:
        for side in ("left", "right"):
            others = [o for o in objects if o is not anchor and (_left_of(o, anchor) == (side == "left"))]
            if len(others) == 1:
                anchors.append((anchor, side, others[0]))
    if anchors:
        anchor, side, target = rng.choice(anchors)
        if rng.random() < 0.5:
            questions["relColor"] = _gqa(
                f"What color is the shape to the {side} of the {anchor.name}?", target.color,
                f"The shape is {target.color}.", "query", "attr",
            )  # fmt: skip
        else:
            questions["relShape"] = _gqa(
                f"What shape is to the {side} of the {anchor.name}?", target.shape,
                f"The shape is {article(target.shape)} {target.shape}.", "query", "rel",
            )  # fmt: skip
    first = rng.choice(objects)
    present = {(o.color, o.shape) for o in objects}
    if rng.random() < 0.5:
        second = rng.choice([o for o in objects if o is not first])
        pair, both = (second.color, second.shape), True
    else:
        pair, both = rng.choice([(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]), False
    second_name = f"{pair[0]} {pair[1]}"
    questions["twoAnd"] = _gqa(
        f"Are there both {first.phrase()} and {article(pair[0])} {second_name} in the image?",
        "yes" if both else "no",
        f"Yes, there are both {first.phrase()} and {article(pair[0])} {second_name}." if both
        else f"No, there is {first.phrase()} but no {second_name}.",
        "logical", "obj",
    )  # fmt: skip
    unique = [o for o in objects if sum(p.shape == o.shape for p in objects) == 1]
    if len(unique) >= 2:
        x, y = rng.sample(unique, 2)
        same = x.color == y.color
        questions["sameColor"] = _gqa(
            f"Do the {x.shape} and the {y.shape} have the same color?",
            "yes" if same else "no",
            f"Yes, both the {x.shape} and the {y.shape} are {x.color}." if same
            else f"No, the {x.shape} is {x.color} and the {y.shape} is {y.color}.",
            "compare", "attr",
        )  # fmt: skip
    chosen = rng.sample(sorted(questions), min(2, len(questions)))
    return [dict(questions[name], types=dict(questions[name]["types"], detailed=name)) for name in chosen]


def _gqa(question: str, answer: str, full: str, structural: str, semantic: str) -> dict[str, Any]:
    return {"question": question, "answer": answer, "fullAnswer": full, "isBalanced": True,
            "types": {"structural": structural, "semantic": semantic}}  # fmt: skip


def _misspell(rng: random.Random, word: str) -> str:
    k = rng.randrange(len(word))
    return word[:k] + word[k + 1 :] if len(word) > 3 else word + word[-1]


# --------------------------------------------------------------------------- items


def _rng(config: ToyWorldConfig, split: str, index: int) -> random.Random:
    return random.Random(stable_seed(config.seed, split, index, "toyworld"))


def _noise_seed(config: ToyWorldConfig, split: str, index: int) -> int:
    return stable_seed(config.seed, split, index, "texture")


def image_id(split: str, index: int) -> int:
    """The toy image id of image ``index`` of ``split``."""
    if not 0 <= index <= MAX_PER_SPLIT:
        raise ValueError(f"index {index} out of range")
    return ID_BASE[split] + index


def coco_file_name(toy_id: int) -> str:
    return f"TOY_{toy_id:012d}.png"


def coco_item(
    split: str, index: int, config: ToyWorldConfig, render: bool = True
) -> tuple[Image.Image | None, dict[str, Any]]:
    """Image ``index`` of COCO split ``split`` and its unified-COCO record."""
    if split not in COCO_SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {COCO_SPLITS}")
    rng = _rng(config, split, index)
    scene = sample_scene("coco", rng, config.image_size, config.word_prob)
    toy_id = image_id(split, index)
    captions = [{"caption_id": toy_id * 10 + j, "caption": c} for j, c in enumerate(_coco_captions(rng, scene))]
    ocr = None
    if scene.word is not None and scene.plate is not None:
        x, y, w, h = scene.plate
        ocr = {"ocr_id": toy_id, "bbox": [x, y, w, h], "class": "machine printed", "language": "english",
               "legibility": "legible", "text": scene.word, "area": w * h,
               "mask": [x, y, x + w, y, x + w, y + h, x, y + h]}  # fmt: skip
    name = coco_file_name(toy_id)
    record = {
        "image_id": toy_id,
        "image_info": {"file_name": name, "id": toy_id, "height": scene.size, "width": scene.size},
        "image_path": f"images/{name}",
        "vqa": {"question_id": toy_id * 1000, **_coco_question(rng, scene)},
        "captions": captions,
        "ocr": ocr,
        "retrieval": [dict(c) for c in captions],
    }
    return (render_scene(scene, _noise_seed(config, split, index)) if render else None), record


def gqa_item(
    index: int, config: ToyWorldConfig, render: bool = True
) -> tuple[Image.Image | None, str, dict[str, dict[str, Any]]]:
    """GQA image ``index``: the image, its ``imageId`` and its questions ``{qid: question}``."""
    rng = _rng(config, "gqa", index)
    scene = sample_scene("gqa", rng, config.image_size)
    toy_id = image_id("gqa", index)
    questions = {}
    for j, question in enumerate(_gqa_questions(rng, scene)):
        qid = str(toy_id * 10 + j)
        questions[qid] = {"imageId": str(toy_id), **question, "equivalent": [qid], "entailed": []}
    return (render_scene(scene, _noise_seed(config, "gqa", index)) if render else None), str(toy_id), questions


def textvqa_item(
    index: int, config: ToyWorldConfig, render: bool = True
) -> tuple[Image.Image | None, dict[str, Any]]:
    """TextVQA image ``index`` (a word on a sign, no box) and its release-format question."""
    rng = _rng(config, "textvqa", index)
    scene = sample_scene("textvqa", rng, config.image_size)
    assert scene.word is not None
    word = scene.word.lower()
    question = rng.choice(TEXTVQA_QUESTIONS)
    variants = [_misspell(rng, word), f"the word {word}", f"{word} sign"]
    toy_id = image_id("textvqa", index)
    row = {
        "question": question,
        "image_id": f"{toy_id:016x}",
        "image_classes": ["Sign"],
        "flickr_original_url": "",
        "flickr_300k_url": "",
        "image_width": scene.size,
        "image_height": scene.size,
        "answers": _human_answers(rng, word, variants),
        "question_tokens": question.rstrip("?").split(),
        "question_id": toy_id,
        "set_name": "val",
    }
    return (render_scene(scene, _noise_seed(config, "textvqa", index)) if render else None), row


def flickr_item(
    index: int, config: ToyWorldConfig, render: bool = True
) -> tuple[Image.Image | None, dict[str, Any]]:
    """Flickr30k image ``index`` and its CSV row (``raw``/``sentids`` JSON-encoded)."""
    rng = _rng(config, "flickr30k", index)
    scene = sample_scene("flickr30k", rng, config.image_size)
    toy_id = image_id("flickr30k", index)
    captions = _flickr_captions(rng, scene)
    row = {
        "raw": json.dumps(captions),
        "sentids": json.dumps([toy_id * 10 + j for j in range(len(captions))]),
        "split": "test",
        "filename": f"{toy_id}.png",
        "img_id": toy_id,
    }
    return (render_scene(scene, _noise_seed(config, "flickr30k", index)) if render else None), row


# --------------------------------------------------------------------------- writing


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename it over ``path``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _png_bytes(img: Image.Image) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()


def _write_json(path: Path, obj: Any) -> None:
    _write_atomic(path, json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))


def _write_csv(path: Path, rows: list[dict[str, Any]], columns: Sequence[str]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    _write_atomic(path, buffer.getvalue().encode("utf-8"))


OWNED_ENTRIES = ("coco", "splits", "gqa", "textvqa", "flickr30k", "toyworld.json")
LOCK_NAME = ".toyworld.lock"  # held by ensure_world; not part of the world


def _prepare_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"toyworld: {out} exists and is not a directory")
    if out.is_dir() and any(entry.name != LOCK_NAME for entry in out.iterdir()):
        if not force:
            raise FileExistsError(f"toyworld: output directory {out} is not empty; pass --force to overwrite it")
        for name in OWNED_ENTRIES:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    for sub in ("coco/images", "splits", "gqa/images", "textvqa/images", "flickr30k/images"):
        (out / sub).mkdir(parents=True, exist_ok=True)


def generate_world(
    out_dir: str | os.PathLike[str], config: ToyWorldConfig = ToyWorldConfig(), force: bool = False
) -> dict[str, Any]:
    """Write a toy world under ``out_dir``; returns (and writes as ``toyworld.json``) its manifest.

    Layout: ``coco/unified.json`` + ``coco/images/``, ``splits/{train,discovery,dev,test}.json``
    (image-disjoint id lists), ``gqa/questions.json`` + ``gqa/images/``,
    ``textvqa/textvqa.json`` + ``textvqa/images/``,
    ``flickr30k/flickr_annotations_30k.csv`` + ``flickr30k/images/``.
    """
    out = Path(out_dir)
    _prepare_out(out, force)
    coco_records = []
    for split in COCO_SPLITS:
        ids = []
        for index in range(config.count(split)):
            img, record = coco_item(split, index, config)
            _write_atomic(out / "coco" / "images" / record["image_info"]["file_name"], _png_bytes(img))
            coco_records.append(record)
            ids.append(record["image_id"])
        _write_json(out / "splits" / f"{split}.json", ids)
    _write_json(out / "coco" / "unified.json", {"data": coco_records})

    gqa: dict[str, Any] = {}
    for index in range(config.n_ood):
        img, gqa_image, questions = gqa_item(index, config)
        _write_atomic(out / "gqa" / "images" / f"{gqa_image}.png", _png_bytes(img))
        gqa.update(questions)
    _write_json(out / "gqa" / "questions.json", gqa)

    textvqa = []
    for index in range(config.n_ood):
        img, row = textvqa_item(index, config)
        _write_atomic(out / "textvqa" / "images" / f"{row['image_id']}.png", _png_bytes(img))
        textvqa.append(row)
    release = {"dataset_type": "val", "dataset_name": "textvqa", "dataset_version": "0.5.1", "data": textvqa}
    _write_json(out / "textvqa" / "textvqa.json", release)

    flickr = []
    for index in range(config.n_ood):
        img, row = flickr_item(index, config)
        _write_atomic(out / "flickr30k" / "images" / row["filename"], _png_bytes(img))
        flickr.append(row)
    columns = ("raw", "sentids", "split", "filename", "img_id")
    _write_csv(out / "flickr30k" / "flickr_annotations_30k.csv", flickr, columns)

    manifest = {
        "version": VERSION,
        "config": asdict(config),
        "counts": {"coco": {s: config.count(s) for s in COCO_SPLITS}, "gqa_questions": len(gqa),
                   "textvqa_questions": len(textvqa), "flickr30k_images": len(flickr)},
        "files": {
            "coco": {"annotation_file": "coco/unified.json", "image_root": "coco/images",
                     "splits": {s: f"splits/{s}.json" for s in COCO_SPLITS}},
            "gqa": {"annotation_file": "gqa/questions.json", "image_root": "gqa/images"},
            "textvqa": {"annotation_file": "textvqa/textvqa.json", "image_root": "textvqa/images"},
            "flickr30k": {"annotation_file": "flickr30k/flickr_annotations_30k.csv", "image_root": "flickr30k/images"},
        },
    }  # fmt: skip
    _write_json(out / "toyworld.json", manifest)
    return manifest


# --------------------------------------------------------------------------- corpus


def _unique(strings: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(s for s in strings if s))


def _vocabulary() -> list[str]:
    fixed = [task_prompt("ocr"), task_prompt("caption"), "Yes", "No", "yes", "no", "left", "right"]
    fixed += list(WORDS) + [w.lower() for w in WORDS] + list(COLORS) + list(SHAPES) + [s + "s" for s in SHAPES]
    fixed += list(NUMBER_WORDS) + [str(n) for n in range(10)]
    fixed += [v for vs in COLOR_VARIANTS.values() for v in vs] + [v for vs in SHAPE_VARIANTS.values() for v in vs]
    fixed += list(COCO_BACKGROUNDS) + list(FLICKR_BACKGROUNDS) + list(FLICKR_TEXTURES) + list(TEXTVQA_QUESTIONS)
    return fixed


def _strings_of(coco: Iterable[dict[str, Any]], gqa: Iterable[dict[str, Any]],
                textvqa: Iterable[dict[str, Any]], flickr: Iterable[list[str]]) -> Iterable[str]:  # fmt: skip
    for record in coco:
        vqa = record["vqa"]
        yield task_prompt("vqa", question=vqa["question"])
        yield from vqa["all_answers"]
        for caption in record["captions"]:
            yield caption["caption"]
            yield task_prompt("retrieval", caption=caption["caption"])
        if record.get("ocr"):
            yield record["ocr"]["text"]
    for question in gqa:
        yield task_prompt("vqa", question=question["question"])
        yield question["answer"]
        yield question["fullAnswer"]
    for row in textvqa:
        yield task_prompt("vqa", question=row["question"])
        yield from row["answers"]
    for captions in flickr:
        for caption in captions:
            yield caption
            yield task_prompt("retrieval", caption=caption)


def toy_corpus(
    world_dir: str | os.PathLike[str] | None = None, *, config: ToyWorldConfig | None = None, n_per_split: int = 200
) -> list[str]:
    """Every string a model must read or write in the toy world (for tokenizer training).

    With ``world_dir``: the prompts, answers, captions and words of that written world.
    Without: those of the first ``n_per_split`` items of every split of ``config``
    (generated in memory, no images), plus the full fixed vocabulary either way.
    Deterministic, deduplicated, in first-seen order.
    """
    if world_dir is not None:
        root = Path(world_dir)
        coco = json.loads((root / "coco" / "unified.json").read_text(encoding="utf-8"))["data"]
        gqa = list(json.loads((root / "gqa" / "questions.json").read_text(encoding="utf-8")).values())
        textvqa = json.loads((root / "textvqa" / "textvqa.json").read_text(encoding="utf-8"))["data"]
        with open(root / "flickr30k" / "flickr_annotations_30k.csv", encoding="utf-8", newline="") as handle:
            flickr = [json.loads(row["raw"]) for row in csv.DictReader(handle)]
    else:
        config = config or ToyWorldConfig()
        n = {s: min(n_per_split, config.count(s)) for s in (*COCO_SPLITS, *OOD_SETS)}
        coco = [coco_item(s, k, config, render=False)[1] for s in COCO_SPLITS for k in range(n[s])]
        gqa = [q for k in range(n["gqa"]) for q in gqa_item(k, config, render=False)[2].values()]
        textvqa = [textvqa_item(k, config, render=False)[1] for k in range(n["textvqa"])]
        flickr = [json.loads(flickr_item(k, config, render=False)[1]["raw"]) for k in range(n["flickr30k"])]
    return _unique([*_vocabulary(), *_strings_of(coco, gqa, textvqa, flickr)])


def ensure_world(out_dir: str | os.PathLike[str], config: ToyWorldConfig = ToyWorldConfig()) -> dict[str, Any]:
    """The manifest of the toy world in ``out_dir``, generating it first if absent.

    An existing world written with other settings is an error (one line naming the
    folder and the differing settings) rather than a silent mix of two worlds.
    """
    out = Path(out_dir)
    if (out / "toyworld.json").exists():  # written last: a finished world, no lock needed (read-only copies work)
        return _ensure_world_locked(out, config)
    with _world_lock(out):
        return _ensure_world_locked(out, config)


@contextmanager
def _world_lock(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``<out>/.toyworld.lock`` while a world is checked or made.

    Two processes that need the same world at once (two analyses started side by side on a
    fresh clone) then take turns: the first generates it, the second finds its manifest.
    Without ``fcntl`` (Windows) there is no lock.
    """
    if fcntl is None:
        yield
        return
    out.mkdir(parents=True, exist_ok=True)
    with open(out / LOCK_NAME, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _ensure_world_locked(out: Path, config: ToyWorldConfig) -> dict[str, Any]:
    manifest_path = out / "toyworld.json"
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        wanted = asdict(config)
        diff = {k: (manifest["config"].get(k), v) for k, v in wanted.items() if manifest["config"].get(k) != v}
        if manifest.get("version") != VERSION or diff:
            raise ValueError(
                f"{manifest_path}: toy world written with other settings {diff or {'version': manifest.get('version')}}"
                f" (found, wanted); regenerate with python -m hones.data.toyworld --out {out} --force"
            )
        return manifest
    print(f"hones: generating the toy world in {out} (seed {config.seed}) ...", file=sys.stderr)
    return generate_world(out, config, force=out.exists())


# --------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m hones.data.toyworld", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output directory (must be empty unless --force)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=64, help="image side in pixels (64-256)")
    parser.add_argument("--n-train", type=int, default=4000)
    parser.add_argument("--n-discovery", type=int, default=300)
    parser.add_argument("--n-dev", type=int, default=200)
    parser.add_argument("--n-test", type=int, default=300)
    parser.add_argument("--n-ood", type=int, default=300, help="images per OOD set (GQA, TextVQA, Flickr30k)")
    existing = parser.add_mutually_exclusive_group()
    existing.add_argument("--force", action="store_true", help="overwrite the toy world files in a non-empty --out")
    existing.add_argument(
        "--if-missing", action="store_true",
        help="keep an existing world made with these settings (an error if its settings differ); "
        "waits while another process generates it",
    )
    args = parser.parse_args(argv)
    try:
        config = ToyWorldConfig(
            args.seed, args.image_size, args.n_train, args.n_discovery, args.n_dev, args.n_test, args.n_ood
        )
    except ValueError as err:
        parser.error(str(err))
    start = time.perf_counter()
    try:
        if args.if_missing:
            manifest = ensure_world(args.out, config)
        else:
            manifest = generate_world(args.out, config, force=args.force)
    except (FileExistsError, ValueError) as err:
        print(err, file=sys.stderr)
        return 2
    counts = manifest["counts"]
    print(
        f"toy world {'ready in' if args.if_missing else 'written to'} {args.out} after {time.perf_counter() - start:.1f}s: coco {counts['coco']}, "
        f"gqa {counts['gqa_questions']} questions, textvqa {counts['textvqa_questions']} questions, "
        f"flickr30k {counts['flickr30k_images']} images"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
