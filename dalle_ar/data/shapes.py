"""Procedural shapes: small RGB scenes of one or two objects, a paraphrased caption and the exact
attribute spec of each image.

A scene places objects on a 3x3 grid of cells. Objects are flat, saturated palette colours on a
white background and never overlap (a large object fits inside its cell with a gap to the next),
so `dalle_ar.data.evaluate` can read every attribute back from the pixels. Colour-shape pairs in
`HELD_OUT_COMBOS` never appear in the training split; the evaluation split mixes seen scenes and
scenes with a held-out pair, and each spec says which.

Spec (JSON-able):
    {"objects": [{"color", "shape", "size", "row", "col", "held_out"}, ...],
     "relation": None | "left of" | "right of" | "above" | "below",  # objects[0] REL objects[1]
     "held_out": bool, "split": "train" | "eval"}

Random sources: any `rng` with `.random()` (random.Random or numpy.random.Generator).
"""

from __future__ import annotations

import functools
import random
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import numpy as np

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 20, 30),
    "orange": (250, 135, 0),
    "yellow": (245, 215, 0),
    "green": (20, 160, 40),
    "cyan": (0, 190, 215),
    "blue": (30, 50, 220),
    "purple": (135, 30, 185),
    "pink": (250, 105, 190),
}
BACKGROUND_RGB = (255, 255, 255)
SHAPES = ("square", "circle", "triangle", "diamond")
SIZES = ("small", "large")
RELATIONS = ("left of", "right of", "above", "below")
# Object side in pixels on a 32-pixel canvas; scaled for other sizes. A large object (10) fits
# inside a cell (32/3) with at least one pixel of gap to its neighbour.
SIZE_PX_32 = {"small": 7, "large": 10}
# Never in training; every other colour-shape pair is "seen". One per colour, two per shape.
HELD_OUT_COMBOS: tuple[tuple[str, str], ...] = (
    ("red", "triangle"),
    ("orange", "circle"),
    ("yellow", "square"),
    ("green", "diamond"),
    ("cyan", "triangle"),
    ("blue", "circle"),
    ("purple", "square"),
    ("pink", "diamond"),
)
_HELD = frozenset(HELD_OUT_COMBOS)
SEEN_COMBOS = tuple((c, s) for c in COLORS for s in SHAPES if (c, s) not in _HELD)
TWO_OBJECT_PROB = 0.5  # share of scenes with two objects and a relation
EVAL_HELD_OUT_PROB = 0.5  # share of eval scenes that contain a held-out pair

Split = Literal["train", "eval"]


def _choice(rng: Any, seq: Sequence) -> Any:
    return seq[int(rng.random() * len(seq))]


def is_held_out(color: str, shape: str) -> bool:
    return (color, shape) in _HELD


def _cells_for(relation: str | None, rng: Any) -> list[tuple[int, int]]:
    """Grid cells (row, col) for the objects; for a relation, obj0 REL obj1 holds strictly."""
    cells = [(r, c) for r in range(3) for c in range(3)]
    a = _choice(rng, cells)
    if relation is None:
        return [a]
    ok = {
        "left of": lambda p, q: p[1] < q[1],
        "right of": lambda p, q: p[1] > q[1],
        "above": lambda p, q: p[0] < q[0],
        "below": lambda p, q: p[0] > q[0],
    }[relation]
    pairs = [(p, q) for p in cells for q in cells if ok(p, q)]
    return list(_choice(rng, pairs))


def sample_spec(rng: Any, split: Split = "train") -> dict[str, Any]:
    """One random scene spec for `split` ("train" never contains a held-out pair)."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    relation = _choice(rng, RELATIONS) if rng.random() < TWO_OBJECT_PROB else None
    cells = _cells_for(relation, rng)
    combos = [_choice(rng, SEEN_COMBOS) for _ in cells]
    if split == "eval" and rng.random() < EVAL_HELD_OUT_PROB:
        combos[int(rng.random() * len(combos))] = _choice(rng, HELD_OUT_COMBOS)
    objects = [
        {
            "color": color,
            "shape": shape,
            "size": _choice(rng, SIZES),
            "row": row,
            "col": col,
            "held_out": is_held_out(color, shape),
        }
        for (color, shape), (row, col) in zip(combos, cells)
    ]
    return {
        "objects": objects,
        "relation": relation,
        "held_out": any(o["held_out"] for o in objects),
        "split": split,
    }


# ----------------------------------------------------------------------------------------------
# Rendering.


def object_px(size_name: str, canvas: int) -> int:
    return max(3, round(SIZE_PX_32[size_name] * canvas / 32))


@functools.lru_cache(maxsize=256)
def shape_mask(shape: str, d: int) -> np.ndarray:
    """Boolean (d, d) mask of a shape, evaluated at pixel centres (symmetric by construction)."""
    t = (np.arange(d) + 0.5) / d * 2 - 1  # pixel centres in [-1, 1]
    y, x = np.meshgrid(t, t, indexing="ij")
    if shape == "square":
        m = np.ones((d, d), bool)
    elif shape == "circle":
        m = x * x + y * y <= 1.0
    elif shape == "diamond":
        m = np.abs(x) + np.abs(y) <= 1.0
    elif shape == "triangle":  # apex at the top centre, base along the bottom row
        m = np.abs(x) <= (y + 1) / 2 + 1.0 / d
    else:
        raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")
    m.flags.writeable = False
    return m


def cell_box(row: int, col: int, d: int, canvas: int) -> tuple[int, int]:
    """Top-left pixel of a d x d object centred in grid cell (row, col)."""
    cy, cx = (2 * row + 1) * canvas / 6, (2 * col + 1) * canvas / 6
    return int(np.floor(cy - d / 2 + 0.5)), int(np.floor(cx - d / 2 + 0.5))


MIN_SIZE = 12  # pixels a side: the smallest canvas a scene is drawn on


def is_scene(meta: Any) -> bool:
    """Is a record's metadata a scene spec of this generator (`sample_spec`)?"""
    return isinstance(meta, dict) and "objects" in meta


def render(spec: dict[str, Any], size: int = 32) -> np.ndarray:
    """The scene as uint8 (size, size, 3). ValueError for size < MIN_SIZE or an unknown
    colour."""
    if size < MIN_SIZE:
        raise ValueError(f"size must be >= {MIN_SIZE} pixels, got {size}")
    img = np.empty((size, size, 3), np.uint8)
    img[...] = BACKGROUND_RGB
    for o in spec["objects"]:
        if o["color"] not in COLORS:
            raise ValueError(f"color must be one of {tuple(COLORS)}, got {o['color']!r}")
        d = object_px(o["size"], size)
        y0, x0 = cell_box(o["row"], o["col"], d, size)
        img[y0 : y0 + d, x0 : x0 + d][shape_mask(o["shape"], d)] = COLORS[o["color"]]
    return img


def rendered(specs: Sequence[dict[str, Any]], size: int) -> Any:
    """The scenes drawn by `render` at `size`: a torch tensor (N, 3, size, size) float32 in
    [0, 1] on the CPU, the loader's layout."""
    import torch  # the generator itself needs only numpy

    drawn = np.stack([render(spec, size) for spec in specs])
    return torch.from_numpy(drawn).permute(0, 3, 1, 2).float() / 255


# ----------------------------------------------------------------------------------------------
# Captions: several paraphrases per scene, so the model must read rather than match strings.

_SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("big", "large")}
_ROW_WORDS = (("top", "upper"), ("middle", "center"), ("bottom", "lower"))
_COL_WORDS = (("left",), ("middle", "center"), ("right",))
_REL_WORDS = {
    "left of": ("to the left of", "left of", "on the left of"),
    "right of": ("to the right of", "right of", "on the right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
}
_INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def _position(row: int, col: int, rng: Any) -> str:
    if (row, col) == (1, 1):
        return _choice(rng, ("center", "middle", "centre"))
    if row == 1:
        return _choice(rng, (f"{_COL_WORDS[col][0]}", f"middle {_COL_WORDS[col][0]}"))
    r = _choice(rng, _ROW_WORDS[row])
    if col == 1:
        return _choice(rng, (r, f"{r} middle"))
    c = _COL_WORDS[col][0]
    return _choice(rng, (f"{r} {c}", f"{r}-{c}"))


def _phrase(o: dict[str, Any], rng: Any) -> str:
    size = _choice(rng, _SIZE_WORDS[o["size"]])
    if rng.random() < 0.25:
        return f"a {o['color']} {o['shape']}, {size},"
    return f"a {size} {o['color']} {o['shape']}"


def caption(spec: dict[str, Any], rng: Any) -> str:
    """A caption for `spec`, picked from several templates and word choices with `rng`."""
    objs = spec["objects"]
    if spec.get("relation") is None:
        o = objs[0]
        pos = _position(o["row"], o["col"], rng)
        size = _choice(rng, _SIZE_WORDS[o["size"]])
        what = f"{size} {o['color']} {o['shape']}"
        corner = "corner" if o["row"] != 1 and o["col"] != 1 else "part"
        templates = (
            f"a {what} at the {pos}",
            f"{pos}: a {what}",
            f"a {o['color']} {o['shape']}, {size}, in the {pos} {corner}",
            f"there is a {what} in the {pos}",
            f"{what}, {pos}",
        )
        return _choice(rng, templates).replace(",,", ",")
    rel = spec["relation"]
    if rng.random() < 0.5:
        a, b = _phrase(objs[0], rng), _phrase(objs[1], rng)
    else:  # mention the second object first and invert the relation
        a, b, rel = _phrase(objs[1], rng), _phrase(objs[0], rng), _INVERSE[rel]
    rel_w = _choice(rng, _REL_WORDS[rel])
    templates = (f"{a} {rel_w} {b}", f"{a} is {rel_w} {b}", f"{a} placed {rel_w} {b}")
    text = _choice(rng, templates)
    return text.replace(",, ", ", ").rstrip(",")


_PAIR = re.compile(rf"\b({'|'.join(COLORS)}) ({'|'.join(SHAPES)})\b")


def composed_prompt(text: str) -> str:
    """A caption as a composed prompt (`dalle_ar.prompts.split_prompt`): the caption, then for
    each colour-shape pair in it the caption without the colour and the caption without the
    shape, "a big pink diamond at the top" -> "a big pink diamond at the top AND a big diamond at
    the top AND a big pink at the top". Sampling then multiplies in an expert for the shape and
    one for the colour of each object, which can draw pairs that no training caption named
    (docs/experiments/composed-prompts.md: it helps single objects and hurts two-object
    scenes)."""
    parts = []
    for m in _PAIR.finditer(text):
        for keep in (m.group(2), m.group(1)):
            parts.append(text[: m.start()] + keep + text[m.end() :])
    return " AND ".join([text, *parts])


# ----------------------------------------------------------------------------------------------
# Streams.


def generate(
    n: int, seed: int, split: Split = "train", size: int = 32
) -> Iterator[tuple[np.ndarray, str, dict[str, Any]]]:
    """`n` (image uint8 (size,size,3), caption, spec) triples; deterministic in seed and split."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(f"shapes-{split}-{seed}")
    for _ in range(n):
        spec = sample_spec(rng, split)
        yield render(spec, size), caption(spec, rng), spec


def prompts_for_eval(
    n: int, seed: int = 0, held_out: bool | None = None
) -> list[tuple[str, dict[str, Any]]]:
    """`n` evaluation-split (caption, spec) pairs for fidelity checks of generated images.
    held_out=True/False keeps only scenes with/without a held-out pair; None keeps both."""
    rng = random.Random(f"shapes-prompts-{seed}")
    out: list[tuple[str, dict[str, Any]]] = []
    while len(out) < n:
        spec = sample_spec(rng, "eval")
        if held_out is None or spec["held_out"] == held_out:
            out.append((caption(spec, rng), spec))
    return out


# ----------------------------------------------------------------------------------------------
# Attribute binding: a scene's caption against the captions that differ from it in one attribute.

FOIL_KINDS = ("color", "shape", "size", "position", "relation", "swap")


class _First:
    """An `rng` whose every choice is the first option: one fixed wording per scene."""

    def random(self) -> float:
        return 0.0


def plain_caption(spec: dict[str, Any]) -> str:
    """The scene in one fixed wording of the training templates, "a small red circle at the top
    left" / "a big red circle to the left of a small blue square": two specs that differ in one
    attribute get captions that differ in its words only."""
    rng = _First()

    def phrase(o: dict[str, Any]) -> str:
        return f"a {_SIZE_WORDS[o['size']][0]} {o['color']} {o['shape']}"

    objs = spec["objects"]
    if spec.get("relation") is None:
        return f"{phrase(objs[0])} at the {_position(objs[0]['row'], objs[0]['col'], rng)}"
    return f"{phrase(objs[0])} {_REL_WORDS[spec['relation']][0]} {phrase(objs[1])}"


def _holds(relation: str, a: dict[str, Any], b: dict[str, Any]) -> bool:
    return {"left of": a["col"] < b["col"], "right of": a["col"] > b["col"],
            "above": a["row"] < b["row"], "below": a["row"] > b["row"]}[relation]  # fmt: skip


def _looks(o: dict[str, Any]) -> tuple[str, str, str]:
    return o["color"], o["shape"], o["size"]


def object_attributes(spec: dict[str, Any]) -> tuple[tuple[str, str, str], ...]:
    """The objects' (colour, shape, size), sorted: what a caption names besides places, whatever
    order the spec lists its objects in."""
    return tuple(sorted(_looks(o) for o in spec["objects"]))


def describes(spec: dict[str, Any], scene: dict[str, Any]) -> bool:
    """Is a caption of `spec` true of `scene`'s picture: the same `object_attributes` and, for one
    object, its cell; for two, `spec`'s relation holding between `scene`'s objects that look like
    `spec`'s first and second (in either order of `scene`'s list: "A left of B" is the picture
    of "B right of A"; a two-object caption names no cell)."""
    if object_attributes(spec) != object_attributes(scene):
        return False
    a, b = spec["objects"], scene["objects"]
    if spec.get("relation") is None:
        return (a[0]["row"], a[0]["col"]) == (b[0]["row"], b[0]["col"])
    return any(_looks(a[0]) == _looks(x) and _looks(a[1]) == _looks(y)
               and _holds(spec["relation"], x, y) for x, y in (b, b[::-1]))  # fmt: skip


def foils(spec: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Every spec whose caption differs from `spec`'s in one attribute and is false of its image,
    by kind (`FOIL_KINDS`): another colour, shape or size of one object; another cell (one
    object; a two-object caption names no cell); a relation that does not hold between the two
    objects; the two objects swapped (when they differ). The probe of Winoground / ARO-style
    binding tests (Yuksekgonul et al. 2023), on the shapes' own grammar."""
    objs = spec["objects"]
    out: dict[str, list[dict[str, Any]]] = {k: [] for k in FOIL_KINDS}

    def with_object(i: int, **change: Any) -> dict[str, Any]:
        new = [dict(o) for o in objs]
        new[i].update(change)
        return {**spec, "objects": new}

    for i, o in enumerate(objs):
        out["color"] += [with_object(i, color=c) for c in COLORS if c != o["color"]]
        out["shape"] += [with_object(i, shape=s) for s in SHAPES if s != o["shape"]]
        out["size"] += [with_object(i, size=z) for z in SIZES if z != o["size"]]
    rel = spec.get("relation")
    if rel is None:
        here = (objs[0]["row"], objs[0]["col"])
        out["position"] = [with_object(0, row=r, col=c) for r in range(3) for c in range(3)
                           if (r, c) != here]  # fmt: skip
        return out
    a, b = objs
    out["relation"] = [{**spec, "relation": r} for r in RELATIONS if not _holds(r, a, b)]
    keys = ("color", "shape", "size")
    if any(a[k] != b[k] for k in keys):
        out["swap"] = [{**spec, "objects": [{**a, **{k: b[k] for k in keys}},
                                            {**b, **{k: a[k] for k in keys}}]}]  # fmt: skip
    return out


# the kinds whose foil is another picture: a relation foil names a relation the same picture
# does not show
IMAGE_FOIL_KINDS = ("color", "shape", "size", "position", "swap")
# the kinds of picture a caption is set against: those, and one object drawn twice (`count_foils`)
PICTURE_FOIL_KINDS = (*IMAGE_FOIL_KINDS, "count")


def random_foil(
    spec: dict[str, Any], rng: Any, kinds: Sequence[str] = FOIL_KINDS, seen_pairs: bool = False
) -> dict[str, Any] | None:
    """One of `spec`'s foils: a kind drawn uniformly among those of `kinds` that `foils` has for
    the scene, then one of its foils; with `seen_pairs`, only foils whose every colour-shape pair
    is seen (a foil of a training scene that stays a training scene). None when there is none."""
    by_kind = [[f for f in v if not (seen_pairs and any(is_held_out(o["color"], o["shape"])
                                                        for o in f["objects"]))]
               for k, v in foils(spec).items() if k in kinds]  # fmt: skip
    by_kind = [v for v in by_kind if v]
    return _choice(rng, _choice(rng, by_kind)) if by_kind else None


def foil_scene(spec: dict[str, Any], rng: Any) -> dict[str, Any] | None:
    """A scene that differs from `spec`'s in one attribute a picture shows (`IMAGE_FOIL_KINDS`)
    and holds only seen colour-shape pairs: its spec, with `held_out` False and each object's
    `held_out` set to False. Rendered (`render`) and captioned (`caption`) it is a training pair
    whose picture and caption are each the other scene's hardest negative. None when the scene
    has none."""
    foil = random_foil(spec, rng, IMAGE_FOIL_KINDS, seen_pairs=True)
    if foil is None:
        return None
    objects = [{**o, "held_out": False} for o in foil["objects"]]
    return {**foil, "objects": objects, "held_out": False}


def count_foils(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Every scene that draws one of `spec`'s objects once more, alike in colour, shape and size,
    in a cell no object holds: the picture of a caption with one object too many, what a
    generator gets wrong most on seen pairs (docs/results.md#masked-mode). A two-object scene's
    are pictures only (no caption names three objects); a one-object scene's is the picture of
    a two-object caption of two like objects where the relation holds, so a caller that uses
    them as pictures no caption describes checks its captions (`describes`)."""
    taken = {(o["row"], o["col"]) for o in spec["objects"]}
    free = [(r, c) for r in range(3) for c in range(3) if (r, c) not in taken]
    return [{**spec, "objects": [*spec["objects"], {**o, "row": r, "col": c}]}
            for o in spec["objects"] for r, c in free]  # fmt: skip


def hard_negative(
    spec: dict[str, Any], rng: Any, refuse: Callable[[dict[str, Any]], bool] | None = None
) -> str | None:
    """A caption false of `spec`'s image that differs from a true one in one attribute: a
    `random_foil` worded by `caption` (so as varied as the training captions); None for a spec
    with no foil, or when `refuse` is true of the foil drawn (the draws are made all the same).
    The hard negatives of NegCLIP (Yuksekgonul et al. 2023), which teach a contrastive model the
    relations and bindings that batches of random captions never contrast."""
    foil = random_foil(spec, rng)
    if foil is None:
        return None
    text = caption(foil, rng)
    return None if refuse is not None and refuse(foil) else text
