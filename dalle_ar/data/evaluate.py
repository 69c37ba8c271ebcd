"""The shape checker: read colour, shape, size and position of each object back from pixels and
score an image against its scene spec (see `dalle_ar.data.shapes`).

Reading works on clean renders and on blurred ones (VQ reconstructions, samples):
1. each pixel takes the nearest palette entry (background included); non-background pixels are
   foreground;
2. foreground splits into 4-connected components; specks are dropped, and a component that spans
   several grid cells (neighbours merged by blur) is split along the cell borders;
3. colour: the nearest palette colour to the median of the component's core (its pixels farthest
   from the background, so blurred rims do not pull the colour);
4. the object's "alpha" map (how far each pixel lies from the background towards that colour,
   over the component and the rim a blur spreads around it) gives blur-invariant features: its
   total (area), its centroid (grid cell = position), a 4th-order joint cumulant (square 0,
   circle and diamond increasingly negative) and the vertical skew (a triangle's apex);
5. shape: the nearest clean prototype in (cumulant, skew); size: the area against the geometric
   mean of that shape's small and large areas.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from dalle_ar.data import shapes

_NAMES = list(shapes.COLORS)
_PALETTE = np.array([shapes.COLORS[n] for n in _NAMES] + [shapes.BACKGROUND_RGB], np.float32)
_BG = len(_NAMES)  # index of the background in _PALETTE
ATTRIBUTES = ("count", "color", "shape", "size", "position", "relation")


def _as_uint8_hwc(image: Any) -> np.ndarray:
    """Accept uint8 (H,W,3) or float in [0,1] as (H,W,3) / (3,H,W), numpy or torch."""
    if hasattr(image, "detach"):
        image = image.detach().cpu().numpy()
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[0] == 3 and a.shape[-1] != 3:
        a = a.transpose(1, 2, 0)
    if a.ndim != 3 or a.shape[-1] != 3 or a.shape[0] != a.shape[1]:
        raise ValueError(f"expected a square RGB image (H,W,3) or (3,H,W), got shape {a.shape}")
    if a.dtype != np.uint8:
        if not np.issubdtype(a.dtype, np.floating):
            raise ValueError(f"expected uint8 or float pixels, got {a.dtype}")
        a = (np.clip(a, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return a


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask, as boolean masks (min-label propagation)."""
    h, w = mask.shape
    big = h * w + 1
    lab = np.where(mask, np.arange(1, h * w + 1).reshape(h, w), big)
    while True:
        nb = lab.copy()
        np.minimum(nb[1:], lab[:-1], out=nb[1:])
        np.minimum(nb[:-1], lab[1:], out=nb[:-1])
        np.minimum(nb[:, 1:], lab[:, :-1], out=nb[:, 1:])
        np.minimum(nb[:, :-1], lab[:, 1:], out=nb[:, :-1])
        nb = np.where(mask, nb, big)
        if np.array_equal(nb, lab):
            break
        lab = nb
    return [lab == v for v in np.unique(lab[mask])]


def _cell_of(coord: float, size: int) -> int:
    return min(2, max(0, int(coord * 3 / size)))


def _cell_mask(part: np.ndarray, size: int) -> np.ndarray:
    """The grid cell holding the centroid of `part`, as a mask."""
    ys, xs = np.nonzero(part)
    r, c = _cell_of(ys.mean() + 0.5, size), _cell_of(xs.mean() + 0.5, size)
    idx = np.minimum(2, (np.arange(size) * 3) // size)
    return (idx[:, None] == r) & (idx[None, :] == c)


def _split_by_cells(comp: np.ndarray, size: int) -> list[np.ndarray]:
    ys, xs = np.nonzero(comp)
    cell = size / 3
    if xs.max() - xs.min() + 1 <= 1.3 * cell and ys.max() - ys.min() + 1 <= 1.3 * cell:
        return [comp]
    rows = np.minimum(2, (np.arange(size) * 3) // size)
    out = []
    for r, c in itertools.product(range(3), range(3)):
        part = comp & (rows[:, None] == r) & (rows[None, :] == c)
        if part.any():
            out.append(part)
    return out


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    out = mask.copy()
    for _ in range(r):
        grown = out.copy()
        grown[1:] |= out[:-1]
        grown[:-1] |= out[1:]
        grown[:, 1:] |= out[:, :-1]
        grown[:, :-1] |= out[:, 1:]
        out = grown
    return out


def _alpha(img: np.ndarray, color: int) -> np.ndarray:
    """How far each pixel lies from the background towards palette colour `color` (0..1): linear
    in the pixels, so a blur moves this mass around without changing its total."""
    c, bg = _PALETTE[color], _PALETTE[_BG]
    axis = c - bg
    return ((img.astype(np.float32) - bg) @ axis) / float(axis @ axis)


def shape_features(alpha: np.ndarray) -> tuple[float, float, float, float, float]:
    """(area, k22, skew, cy, cx) of an object's alpha map. k22 = <x^2 y^2> - <x^2><y^2> - 2<xy>^2
    (a joint cumulant; 0 for a square, negative for round or pointed shapes) over area^2 and
    skew = <y^3> over area^1.5 (a triangle's apex makes it negative). Cumulants add under
    convolution and a separable symmetric blur has zero cross and odd cumulants, so both stay
    the same under blur, and dividing by the area (the total mass) removes the scale."""
    area = float(alpha.sum())
    h, w = alpha.shape
    y, x = np.mgrid[0:h, 0:w].astype(np.float64) + 0.5
    cy, cx = float((alpha * y).sum() / area), float((alpha * x).sum() / area)
    dy, dx = y - cy, x - cx

    def m(p: int, q: int) -> float:
        return float((alpha * dx**p * dy**q).sum() / area)

    k22 = m(2, 2) - m(2, 0) * m(0, 2) - 2 * m(1, 1) ** 2
    return area, 1000 * k22 / area**2, 100 * m(0, 3) / area**1.5, cy, cx


@functools.lru_cache(maxsize=16)
def _prototypes(size: int) -> tuple[tuple[str, str, float, float, float], ...]:
    """(shape, size name, area, k22, skew) of every clean object at this canvas size."""
    out = []
    for shape, size_name in itertools.product(shapes.SHAPES, shapes.SIZES):
        m = np.pad(shapes.shape_mask(shape, shapes.object_px(size_name, size)), 2)
        area, k22, skew, _, _ = shape_features(m.astype(np.float64))
        out.append((shape, size_name, area, k22, skew))
    return tuple(out)


def _classify(area: float, k22: float, skew: float, size: int) -> tuple[str, str]:
    """Nearest prototype in (k22, skew) picks the shape; the area against the geometric mean of
    that shape's small and large areas picks the size."""
    protos = _prototypes(size)
    shape = min(protos, key=lambda p: (p[3] - k22) ** 2 + (p[4] - skew) ** 2)[0]
    small, large = (p[2] for p in protos if p[0] == shape)
    return shape, ("large" if area > (small * large) ** 0.5 else "small")


def read_scene(image: Any) -> list[dict[str, Any]]:
    """Objects found in a scene image, top-left first: dicts with color, shape, size, row, col,
    cy, cx (centroid in pixels) and area."""
    img = _as_uint8_hwc(image)
    size = img.shape[0]
    px = img.reshape(-1, 3).astype(np.float32)
    dist = ((px[:, None, :] - _PALETTE[None, :, :]) ** 2).sum(-1)  # (H*W, colours + 1)
    nearest = dist.argmin(1).reshape(size, size)
    bg_dist = np.sqrt(dist[:, _BG]).reshape(size, size)
    small_area = shapes.shape_mask("diamond", shapes.object_px("small", size)).sum()
    fg = nearest != _BG
    objects = []
    for comp in _components(fg):
        parts = _split_by_cells(comp, size)
        for part in parts:
            if part.sum() < 0.35 * small_area:  # specks from noise or blur
                continue
            core = bg_dist[part] >= 0.6 * bg_dist[part].max()
            rgb = np.median(img[part][core].astype(np.float32), axis=0)
            color = int(((_PALETTE[:_BG] - rgb) ** 2).sum(1).argmin())
            # the object's mass: its own pixels and the faint rim a blur spreads around them,
            # without the pixels of another object or those at least as close to another one
            others = fg & ~part
            near1, near2 = _dilate(part, 1), _dilate(part, 2)
            region = part | (near1 & ~_dilate(others, 1)) | (near2 & ~_dilate(others, 2))
            if len(parts) > 1:
                region &= _cell_mask(part, size)
            alpha = np.where(region, _alpha(img, color), 0.0)
            if alpha.sum() < 0.35 * small_area:  # too faint to be an object
                continue
            area, k22, skew, cy, cx = shape_features(alpha)
            shape, size_name = _classify(area, k22, skew, size)
            objects.append({
                "color": _NAMES[color],
                "shape": shape,
                "size": size_name,
                "row": _cell_of(cy, size),
                "col": _cell_of(cx, size),
                "cy": cy,
                "cx": cx,
                "area": area,
            })  # fmt: skip
    objects.sort(key=lambda o: (o["row"], o["col"], o["cy"], o["cx"]))
    return objects


def _relation_holds(relation: str, a: dict[str, Any], b: dict[str, Any]) -> bool:
    return {
        "left of": a["col"] < b["col"],
        "right of": a["col"] > b["col"],
        "above": a["row"] < b["row"],
        "below": a["row"] > b["row"],
    }[relation]


def score(image: Any, spec: dict[str, Any]) -> dict[str, bool | None]:
    """Per-attribute correctness of `image` against `spec`, plus `exact`.

    Detected objects are matched to the spec's objects in the way that agrees most. `position`
    (the grid cell of every object) decides `exact` only for one-object scenes; two-object
    captions state a relation, not cells, so `relation` decides instead (None where it does not
    apply). `count`: exactly as many objects as the spec."""
    want = spec["objects"]
    found = read_scene(image)
    keys = ("color", "shape", "size")
    best: tuple[int, tuple[dict[str, Any] | None, ...]] = (-1, ())
    pool: list[dict[str, Any] | None] = [*found, *([None] * len(want))]
    for perm in itertools.permutations(range(len(pool)), len(want)):
        got = tuple(pool[i] for i in perm)
        agree = sum(g is not None and g[k] == w[k] for g, w in zip(got, want) for k in keys)
        agree += sum(g is not None and (g["row"], g["col"]) == (w["row"], w["col"])
                     for g, w in zip(got, want))  # fmt: skip
        if agree > best[0]:
            best = (agree, got)
    got = best[1]
    out: dict[str, bool | None] = {"count": len(found) == len(want)}
    for k in keys:
        out[k] = all(g is not None and g[k] == w[k] for g, w in zip(got, want))
    out["position"] = all(
        g is not None and (g["row"], g["col"]) == (w["row"], w["col"]) for g, w in zip(got, want)
    )
    rel = spec.get("relation")
    out["relation"] = None
    if rel is not None:
        a, b = got[0], got[1]
        out["relation"] = a is not None and b is not None and _relation_holds(rel, a, b)
    placed = out["position"] if rel is None else out["relation"]
    out["exact"] = bool(out["count"] and out["color"] and out["shape"] and out["size"] and placed)
    return out


def score_batch(images: Iterable[Any], specs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Accuracies over a batch (JSON-able): each attribute, `exact`, and `exact` split into
    scenes with and without a held-out colour-shape pair. Attributes that do not apply to a
    scene (None) are left out of that attribute's mean."""
    images = list(images)
    if len(images) != len(specs):
        raise ValueError(
            f"expected one spec per image, got {len(images)} images, {len(specs)} specs"
        )
    if not images:
        raise ValueError("expected at least one image, got none")
    rows = [score(img, spec) for img, spec in zip(images, specs)]
    out: dict[str, Any] = {"n": len(rows)}
    for k in (*ATTRIBUTES, "exact"):
        vals = [r[k] for r in rows if r[k] is not None]
        out[k] = float(np.mean(vals)) if vals else None
    for name, flag in (("held_out", True), ("seen", False)):
        vals = [r["exact"] for r, s in zip(rows, specs) if bool(s.get("held_out")) == flag]
        out[f"exact_{name}"] = float(np.mean(vals)) if vals else None
        out[f"n_{name}"] = len(vals)
    return out
