#!/usr/bin/env python3
"""Synthetic scenes with captions and questions for the bundled demo VLM pair.

Each scene is a small RGB image (default 48x48) on a noisy grey background holding one to
four shapes (circle, square, triangle, diamond) in six colours and two sizes, placed in the
cells of a 3x3 grid. Every scene carries its ground truth, from which the generator writes
a caption or a question with its answer. Language is varied on purpose: several templates
per question type, synonyms for shapes and positions, optional size adjectives, so that
next-token prediction is not trivial.

Samples are deterministic: sample ``i`` of split ``s`` is drawn from
``numpy.random.default_rng([SEED, SPLIT_ID[s], i])``, so splits are fixed and disjoint in
their random streams. Training regenerates samples on the fly from these functions;
``python tools/gen_data.py --out DIR`` writes a split to disk (PNG + JSONL) for inspection.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

SEED = 20250911
SPLIT_ID = {"train": 0, "val": 1, "test": 2}

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 230),
    "yellow": (240, 220, 40),
    "purple": (150, 60, 200),
    "orange": (250, 140, 20),
}
SHAPES = ["circle", "square", "triangle", "diamond"]
SHAPE_SYNONYMS = {
    "circle": ["circle", "circle", "disk"],
    "square": ["square", "square", "box"],
    "triangle": ["triangle"],
    "diamond": ["diamond", "diamond", "rhombus"],
}
SIZES = ["small", "large"]
SIZE_SYNONYMS = {"small": ["small", "little"], "large": ["large", "big"]}
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}

# Grid cell (row, col) -> canonical position key and its phrasings.
POSITIONS = {
    (0, 0): ("top left", ["in the top left corner", "at the top left"]),
    (0, 1): ("top", ["at the top", "at the top center"]),
    (0, 2): ("top right", ["in the top right corner", "at the top right"]),
    (1, 0): ("left", ["on the left", "on the left side"]),
    (1, 1): ("center", ["in the center", "in the middle"]),
    (1, 2): ("right", ["on the right", "on the right side"]),
    (2, 0): ("bottom left", ["in the bottom left corner", "at the bottom left"]),
    (2, 1): ("bottom", ["at the bottom", "at the bottom center"]),
    (2, 2): ("bottom right", ["in the bottom right corner", "at the bottom right"]),
}

DESCRIBE_PROMPTS = [
    "Describe the image.",
    "What do you see?",
    "Describe this picture briefly.",
    "What is in the image?",
    "Give a short caption.",
    "What does this image show?",
]
CAPTION_INTROS = ["There is", "The image shows", "I can see", "This picture contains", "We see"]
COUNT_PROMPTS = [
    "How many shapes are there?",
    "How many objects are in the image?",
    "Count the shapes.",
    "How many shapes do you see?",
]
QTYPES = ["describe", "count", "colour", "exists", "where", "shape"]
QTYPE_WEIGHTS = [0.35, 0.13, 0.13, 0.13, 0.13, 0.13]


@dataclass
class Obj:
    """One shape in a scene."""

    shape: str
    colour: str
    size: str
    cell: tuple[int, int]

    @property
    def pos(self) -> str:
        return POSITIONS[self.cell][0]


@dataclass
class Sample:
    """A rendered scene with one prompt and its reference answer."""

    image: np.ndarray  # uint8 HxWx3
    objects: list[Obj]
    qtype: str
    prompt: str
    answer: str
    # Ground truth for scoring: e.g. {"count": 3} or {"colour": "red"}.
    key: dict = field(default_factory=dict)


def _pick(rng: np.random.Generator, items):
    return items[int(rng.integers(len(items)))]


def _scene(rng: np.random.Generator) -> list[Obj]:
    n = int(rng.choice([1, 2, 3, 4], p=[0.25, 0.35, 0.25, 0.15]))
    cells = rng.permutation(9)[:n]
    objs = []
    for c in cells:
        objs.append(
            Obj(
                shape=_pick(rng, SHAPES),
                colour=_pick(rng, list(COLOURS)),
                size=_pick(rng, SIZES),
                cell=(int(c) // 3, int(c) % 3),
            )
        )
    # Reading order: top to bottom, left to right.
    objs.sort(key=lambda o: o.cell)
    return objs


def render(objs: list[Obj], rng: np.random.Generator, size: int = 48) -> np.ndarray:
    """Render a scene, supersampled 4x and downscaled for anti-aliasing."""
    ss = 4
    big = size * ss
    bg = int(rng.integers(70, 150))
    tint = rng.integers(-12, 13, size=3)
    base = np.clip(bg + tint, 0, 255).astype(np.uint8)
    img = Image.new("RGB", (big, big), tuple(int(v) for v in base))
    draw = ImageDraw.Draw(img)
    cell = big / 3
    for o in objs:
        cy = (o.cell[0] + 0.5) * cell + rng.uniform(-0.08, 0.08) * cell
        cx = (o.cell[1] + 0.5) * cell + rng.uniform(-0.08, 0.08) * cell
        r = (0.26 if o.size == "small" else 0.42) * cell * rng.uniform(0.9, 1.1)
        col = np.clip(np.array(COLOURS[o.colour]) + rng.integers(-20, 21, size=3), 0, 255)
        fill = tuple(int(v) for v in col)
        if o.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif o.shape == "square":
            s = r * 0.88
            draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
        elif o.shape == "triangle":
            draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=fill)
        else:  # diamond
            draw.polygon([(cx, cy - r), (cx + r * 0.8, cy), (cx, cy + r), (cx - r * 0.8, cy)], fill=fill)
    img = img.resize((size, size), Image.Resampling.BOX)
    arr = np.asarray(img).astype(np.int16)
    arr = arr + rng.integers(-6, 7, size=arr.shape)
    return np.clip(arr, 0, 255).astype(np.uint8)


def _obj_phrase(o: Obj, rng: np.random.Generator, with_pos: bool = True) -> str:
    words = ["a"]
    if rng.random() < 0.5:
        words.append(_pick(rng, SIZE_SYNONYMS[o.size]))
    words.append(o.colour)
    words.append(_pick(rng, SHAPE_SYNONYMS[o.shape]))
    if with_pos:
        words.append(_pick(rng, POSITIONS[o.cell][1]))
    return " ".join(words)


def _join(parts: list[str]) -> str:
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def caption(objs: list[Obj], rng: np.random.Generator) -> str:
    """A caption naming every object with its colour and position."""
    parts = [_obj_phrase(o, rng) for o in objs]
    style = rng.random()
    n = len(objs)
    if style < 0.7:
        return f"{_pick(rng, CAPTION_INTROS)} {_join(parts)}."
    noun = "shape" if n == 1 else "shapes"
    return f"{NUMBER_WORDS[n].capitalize()} {noun}: {_join(parts)}."


def _unique(objs: list[Obj], attr: str) -> list[Obj]:
    vals = [getattr(o, attr) for o in objs]
    return [o for o in objs if vals.count(getattr(o, attr)) == 1]


def _unique_pair(objs: list[Obj]) -> list[Obj]:
    pairs = [(o.colour, o.shape) for o in objs]
    return [o for o in objs if pairs.count((o.colour, o.shape)) == 1]


def make_qa(objs: list[Obj], rng: np.random.Generator, qtype: str) -> tuple[str, str, dict] | None:
    """A (prompt, answer, key) of the given type, or None when the scene does not fit it."""
    if qtype == "describe":
        return _pick(rng, DESCRIBE_PROMPTS), caption(objs, rng), {}
    if qtype == "count":
        n = len(objs)
        w = NUMBER_WORDS[n]
        noun = "shape" if n == 1 else "shapes"
        verb = "is" if n == 1 else "are"
        ans = _pick(rng, [f"There {verb} {w} {noun}.", f"I count {w} {noun}.", f"{w.capitalize()}."])
        return _pick(rng, COUNT_PROMPTS), ans, {"count": w}
    if qtype == "colour":
        cands = _unique(objs, "shape")
        if not cands:
            return None
        o = _pick(rng, cands)
        s = _pick(rng, SHAPE_SYNONYMS[o.shape])
        q = _pick(rng, [f"What color is the {s}?", f"Which color does the {s} have?"])
        a = _pick(rng, [f"The {s} is {o.colour}.", f"It is {o.colour}.", f"{o.colour.capitalize()}."])
        return q, a, {"colour": o.colour}
    if qtype == "shape":
        cands = _unique(objs, "colour")
        if not cands:
            return None
        o = _pick(rng, cands)
        q = _pick(rng, [f"What shape is the {o.colour} object?", f"What is the {o.colour} shape?"])
        s = _pick(rng, SHAPE_SYNONYMS[o.shape])
        a = _pick(rng, [f"It is a {s}.", f"The {o.colour} object is a {s}.", f"A {s}."])
        return q, a, {"shape": o.shape}
    if qtype == "where":
        cands = _unique_pair(objs)
        if not cands:
            return None
        o = _pick(rng, cands)
        s = _pick(rng, SHAPE_SYNONYMS[o.shape])
        q = _pick(rng, [f"Where is the {o.colour} {s}?", f"Where is the {o.colour} {s} located?"])
        p = _pick(rng, POSITIONS[o.cell][1])
        a = _pick(rng, [f"It is {p}.", f"The {o.colour} {s} is {p}."])
        return q, a, {"pos": o.pos}
    if qtype == "exists":
        if rng.random() < 0.5:
            o = _pick(rng, objs)
            colour, shape = o.colour, o.shape
            yes = True
        else:
            present = {(o.colour, o.shape) for o in objs}
            for _ in range(20):
                colour, shape = _pick(rng, list(COLOURS)), _pick(rng, SHAPES)
                if (colour, shape) not in present:
                    break
            yes = False
        s = _pick(rng, SHAPE_SYNONYMS[shape])
        q = _pick(rng, [f"Is there a {colour} {s}?", f"Do you see a {colour} {s}?"])
        if yes:
            p = _pick(rng, POSITIONS[o.cell][1])
            a = _pick(rng, [f"Yes, there is a {colour} {s} {p}.", "Yes."])
        else:
            a = _pick(rng, [f"No, there is no {colour} {s}.", "No."])
        return q, a, {"yes": "yes" if yes else "no"}
    raise ValueError(qtype)


def sample(split: str, index: int, image_size: int = 48, qtype: str | None = None) -> Sample:
    """Deterministic sample ``index`` of ``split``; ``qtype`` forces a question type."""
    rng = np.random.default_rng([SEED, SPLIT_ID[split], index])
    objs = _scene(rng)
    img = render(objs, rng, image_size)
    qt = qtype
    while True:
        if qt is None:
            choice = str(rng.choice(QTYPES, p=QTYPE_WEIGHTS))
        else:
            choice = qt
        qa = make_qa(objs, rng, choice)
        if qa is not None:
            break
        if qt is not None:  # forced type does not fit: fall back to describe
            qt = "describe"
    prompt, answer, key = qa
    return Sample(img, objs, choice, prompt, answer, key)


@dataclass
class Conversation:
    """A rendered scene with one to three question/answer turns (LLaVA-1.5 multi-turn)."""

    image: np.ndarray
    objects: list[Obj]
    turns: list[tuple[str, str]]  # (prompt, answer)


def conversation(split: str, index: int, image_size: int = 48) -> Conversation:
    """Deterministic training conversation ``index`` of ``split``: several turns share one
    image, which amortises the image tokens; the first turn is exactly a single-turn sample.
    Its random stream is disjoint from ``sample``'s."""
    rng = np.random.default_rng([SEED, SPLIT_ID[split], index, 1])
    objs = _scene(rng)
    img = render(objs, rng, image_size)
    k = int(rng.choice([1, 2, 3], p=[0.2, 0.3, 0.5]))
    turns: list[tuple[str, str]] = []
    described = False
    while len(turns) < k:
        qt = str(rng.choice(QTYPES, p=QTYPE_WEIGHTS))
        if qt == "describe" and described:
            continue
        qa = make_qa(objs, rng, qt)
        if qa is None:
            continue
        described |= qt == "describe"
        turns.append((qa[0], qa[1]))
    return Conversation(img, objs, turns)


def chat_text(turns: list[tuple[str, str]]) -> str:
    """LLaVA-1.5 conversation text: ``USER: <image>\n{q} ASSISTANT: {a}</s>USER: ...``."""
    out = []
    for i, (q, a) in enumerate(turns):
        img = "<image>\n" if i == 0 else ""
        out.append(f"USER: {img}{q} ASSISTANT: {a}</s>")
    return "".join(out)


def corpus(n: int = 20000) -> list[str]:
    """Chat-formatted texts from the training split, for tokenizer training."""
    return [chat_text(conversation("train", i).turns).replace("<image>", "") for i in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--split", default="test", choices=list(SPLIT_ID))
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--image-size", type=int, default=48)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{args.split}.jsonl"), "w") as f:
        for i in range(args.n):
            s = sample(args.split, i, args.image_size)
            name = f"{args.split}_{i:05d}.png"
            Image.fromarray(s.image).save(os.path.join(args.out, name))
            rec = {
                "image": name,
                "qtype": s.qtype,
                "prompt": s.prompt,
                "answer": s.answer,
                "key": s.key,
                "objects": [o.__dict__ for o in s.objects],
            }
            f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
