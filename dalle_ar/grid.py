"""Image grids as PNG-ready PIL images: plain tiles (reconstruction rows, sample rows) and grids
with a caption above them (one grid per prompt).

    image_grid(torch.cat([originals, recons]), ncols=n).save("recon.png")  # 2 rows of n
    captioned_grid(samples, "a small red circle at the top left").save("grid.png")

Small images are enlarged with nearest-neighbour sampling (to about 64 pixels a side by
default) so a 32-pixel sample stays legible; the canvas is white with `gap` pixels between and
around the tiles.

Text is written in DejaVu Sans where it is installed (Latin, Greek, Cyrillic and more; found at
its usual paths or by fontconfig), else in Pillow's built-in font; a caption's characters the
font has no glyph for are named in a warning (they show as boxes). No font is downloaded.
"""

from __future__ import annotations

import functools
import logging
import math
import shutil
import subprocess
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

log = logging.getLogger(__name__)
Images = torch.Tensor | Sequence[Any]  # (N, 3, H, W) in [0, 1], or PIL images / uint8 HWC arrays
# DejaVu Sans where distributions put it: Debian / Ubuntu, Fedora, Arch, macOS with Homebrew
FONT_FILES = (
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu-sans-fonts/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/opt/homebrew/share/fonts/DejaVuSans.ttf",
)
FONT_FAMILY = "DejaVu Sans"
NO_CHAR = "\U0010ffff"  # a noncharacter: no font maps it, so it draws the font's "no glyph" box


def to_uint8(images: Images) -> np.ndarray:
    """(N, H, W, 3) uint8 from a (N, 3, H, W) float tensor in [0, 1] or a list of PIL images /
    uint8 (H, W, 3) arrays / (3, H, W) float tensors."""
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images (N, 3, H, W), got shape {tuple(images.shape)}")
        x = images.detach().float().clamp(0, 1).mul(255).round().byte()
        return x.permute(0, 2, 3, 1).cpu().numpy()
    arrays = [_one_uint8(im) for im in images]
    if not arrays:
        raise ValueError("expected at least one image, got none")
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise ValueError(f"expected images of one size, got sizes {sorted(shapes)}")
    return np.stack(arrays)


def _one_uint8(image: Any) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    if isinstance(image, torch.Tensor):
        return to_uint8(image[None])[0]
    a = np.asarray(image)
    if a.ndim != 3 or a.shape[-1] != 3 or a.dtype != np.uint8:
        raise ValueError(f"expected a uint8 (H, W, 3) array, got {a.dtype} {a.shape}")
    return a


def image_grid(
    images: Images,
    ncols: int | None = None,
    scale: int | None = None,
    gap: int = 2,
    labels: Sequence[str] | None = None,
    font_size: int = 10,
) -> Image.Image:
    """Tiles in rows of `ncols` (default: all in one row), each enlarged `scale` times (default
    max(1, 64 // H)), on a white canvas with `gap` pixels between and around them; `labels`
    (one per image, e.g. its rerank score) are written under the tiles in `font_size` px."""
    arr = to_uint8(images)
    n, h, w, _ = arr.shape
    ncols = n if ncols is None else ncols
    if ncols < 1:
        raise ValueError(f"ncols must be >= 1, got {ncols}")
    if labels is not None and len(labels) != n:
        raise ValueError(f"expected one label per image, got {len(labels)} for {n} images")
    scale = max(1, 64 // h) if scale is None else scale
    if scale < 1 or gap < 0:
        raise ValueError(f"expected scale >= 1 and gap >= 0, got {scale} and {gap}")
    nrows = math.ceil(n / ncols)
    th, tw = h * scale, w * scale
    lh = font_size + 2 if labels is not None else 0  # a label's line under each tile
    canvas = np.full((nrows * (th + lh + gap) + gap, ncols * (tw + gap) + gap, 3), 255, np.uint8)
    for i in range(n):
        r, c = divmod(i, ncols)
        y, x = gap + r * (th + lh + gap), gap + c * (tw + gap)
        canvas[y : y + th, x : x + tw] = arr[i].repeat(scale, 0).repeat(scale, 1)
    out = Image.fromarray(canvas)
    if labels is not None:
        draw, font = ImageDraw.Draw(out), _font(font_size)
        for i, label in enumerate(labels):
            r, c = divmod(i, ncols)
            draw.text((gap + c * (tw + gap), gap + r * (th + lh + gap) + th), label, fill="black",
                      font=font)  # fmt: skip
    return out


def captioned_grid(
    images: Images,
    caption: str,
    ncols: int | None = None,
    scale: int | None = None,
    gap: int = 2,
    font_size: int = 12,
    labels: Sequence[str] | None = None,
) -> Image.Image:
    """`image_grid` with `caption` written above it in black, wrapped to the grid's width (a
    word longer than that widens the picture rather than being cut), and `labels` under the
    tiles."""
    grid = image_grid(images, ncols, scale, gap, labels)
    font = _font(font_size)
    missing = missing_glyphs(caption, font)
    if missing:
        log.warning("the caption font has no glyph for %s: they show as boxes in the grid of %r",
                    " ".join(missing), caption)  # fmt: skip
    draw = ImageDraw.Draw(grid)
    char_w = max(1.0, draw.textlength("x", font=font))
    width = max(1, int((grid.width - 2 * gap) / char_w))
    lines = textwrap.wrap(caption, width=width, break_long_words=False) or [""]
    line_h = font_size + 3
    top = gap + len(lines) * line_h + gap
    text_w = max(int(draw.textlength(line, font=font)) for line in lines) + 2 * gap
    out = Image.new("RGB", (max(grid.width, text_w), grid.height + top), "white")
    out.paste(grid, (0, top))
    draw = ImageDraw.Draw(out)
    for i, line in enumerate(lines):
        draw.text((gap, gap + i * line_h), line, fill="black", font=font)
    return out


def stack_vertical(images: Sequence[Image.Image]) -> Image.Image:
    """Images one under the other, left-aligned on white (e.g. one captioned grid per prompt)."""
    if not images:
        raise ValueError("expected at least one image, got none")
    out = Image.new("RGB", (max(im.width for im in images), sum(im.height for im in images)),
                    "white")  # fmt: skip
    y = 0
    for im in images:
        out.paste(im, (0, y))
        y += im.height
    return out


Font = ImageFont.ImageFont | ImageFont.FreeTypeFont


def missing_glyphs(text: str, font: Font) -> list[str]:
    """The distinct characters of `text` (whitespace aside), in order, that `font` has no glyph
    for: those it draws as its "no glyph" box (the drawing of a noncharacter)."""
    box = _drawing(font, NO_CHAR)
    return [ch for ch in dict.fromkeys(text) if not ch.isspace() and _drawing(font, ch) == box]


def _drawing(font: Font, ch: str) -> tuple[tuple[int, int], bytes] | None:
    """The size and pixels of `ch` drawn in `font`; None where the font cannot take it at all
    (Pillow's bitmap font holds Latin-1 alone)."""
    try:
        mask = font.getmask(ch)
    except UnicodeEncodeError:
        return None
    return mask.size, bytes(mask)


@functools.cache
def _font(size: int) -> Font:
    path = font_file()
    if path is not None:
        return ImageFont.truetype(path, size)
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed-size bitmap font
        return ImageFont.load_default()


@functools.lru_cache(maxsize=1)
def font_file() -> str | None:
    """DejaVu Sans's file: at a usual path, else where fontconfig (`fc-list`) finds it; None
    (logged once: captions then cover Latin alone) where it is not installed."""
    for path in FONT_FILES:
        if Path(path).is_file():
            return path
    fc = shutil.which("fc-list")
    if fc is not None:
        try:
            found = subprocess.run([fc, f"{FONT_FAMILY}:style=Book", "file"], capture_output=True,
                                   text=True, timeout=10, check=False).stdout  # fmt: skip
        except (OSError, subprocess.SubprocessError):
            found = ""
        for line in found.splitlines():
            path = line.strip().rstrip(":")
            if path.endswith((".ttf", ".otf")) and Path(path).is_file():
                return path
    log.warning("%s is not installed (fonts-dejavu-core): grid captions use Pillow's built-in "
                "font, which draws Latin letters alone", FONT_FAMILY)  # fmt: skip
    return None


__all__ = [
    "captioned_grid", "font_file", "image_grid", "missing_glyphs", "prompt_grids",
    "save_prompt_grid", "score_label", "stack_vertical", "to_uint8",
]  # fmt: skip


def score_label(meta: dict[str, Any]) -> str | None:
    """A kept candidate's label: its reranker and score ("clip 31.2"); None for a plain sample."""
    if "rerank_score" not in meta:
        return None
    return f"{meta['reranker']} {meta['rerank_score']:.3g}"


def save_prompt_grid(result: Any, path: str | Path) -> Path:
    """One PNG: per prompt, a row of its samples under the prompt as caption; reranked samples
    are labelled with their scores (`score_label`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    stack_vertical(prompt_grids(result)).save(path)
    return path


TRUNCATED = " [... truncated: the model read no more]"


def prompt_caption(meta: dict[str, Any]) -> str:
    """A sample's caption: its prompt, or for an over-long one what the model read of it
    (`truncated_to`, recorded by the pipeline) marked as truncated; never more than the model
    read (a 500-word prompt would make a grid thousands of pixels tall)."""
    cut = meta.get("truncated_to")
    return meta["prompt"] if cut is None else cut + TRUNCATED


def prompt_grids(result: Any) -> list[Image.Image]:
    """One captioned grid per prompt of a pipeline's output, in prompt order: its samples in a
    row, labelled with their scores when reranked."""
    groups: dict[tuple[int, str], list[tuple[Any, str | None]]] = {}
    for img, meta in zip(result.images, result.samples):
        groups.setdefault((meta["prompt_index"], prompt_caption(meta)), []).append(
            (img, score_label(meta))
        )
    out = []
    for (_, prompt), items in sorted(groups.items()):
        labels = [lab for _, lab in items]
        out.append(captioned_grid([im for im, _ in items], prompt or "(empty prompt)",
                                  labels=None if None in labels else labels))  # fmt: skip
    return out
