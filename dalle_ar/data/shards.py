"""Webdataset tar shards in the img2dataset layout (`KEY.png|jpg`, `KEY.txt`, `KEY.json`).

Writing: `write_samples` (generic webdataset dicts) and `write_shards` (image, caption, meta).
Reading: records (`decode_sample`, `read_caption`, `read_meta`), `iter_captions` (captions only);
the batch loader (`make_loader`, `loader_from_config`) lives in `dalle_ar.data.loader`, which
builds on this module.

Every reader skips bad records (a corrupt or truncated image, a missing, empty or non-UTF-8
caption, a truncated or unreadable tar) and counts them in a `BadDataReport`, which is logged once
at the end of each pass.
"""

from __future__ import annotations

import dataclasses
import glob
import io
import json
import logging
import os
import random
import re
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import webdataset as wds
from PIL import Image

log = logging.getLogger(__name__)

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
# Transparent pixels are composited on this neutral grey (emoji and any RGBA input).
BACKGROUND = (128, 128, 128)
MAX_KEYS = 10_000  # keys kept per reason (counts stay exact), so a long run's report stays small


@dataclasses.dataclass
class BadDataReport:
    """Skipped records: how many per reason and which keys (shard URLs for shard-level errors)."""

    counts: dict[str, int] = dataclasses.field(default_factory=dict)
    keys: dict[str, list[str]] = dataclasses.field(default_factory=dict)

    def add(self, reason: str, key: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        keys = self.keys.setdefault(reason, [])
        if len(keys) < MAX_KEYS:
            keys.append(key)

    def merge(self, other: BadDataReport | dict) -> None:
        other = other if isinstance(other, BadDataReport) else BadDataReport.from_dict(other)
        for reason, keys in other.keys.items():
            self.counts[reason] = self.counts.get(reason, 0) + other.counts[reason]
            mine = self.keys.setdefault(reason, [])
            mine.extend(keys[: max(0, MAX_KEYS - len(mine))])

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def to_dict(self) -> dict[str, Any]:
        return {"counts": dict(self.counts), "keys": {k: list(v) for k, v in self.keys.items()}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BadDataReport:
        return cls(dict(d.get("counts", {})), {k: list(v) for k, v in d.get("keys", {}).items()})

    def summary(self, max_keys: int = 20) -> str:
        parts = []
        for reason in sorted(self.counts):
            keys, n = self.keys[reason], self.counts[reason]
            more = f" (+{n - max_keys} more)" if n > max_keys else ""
            parts.append(f"{reason}: {n} [{', '.join(keys[:max_keys])}{more}]")
        return f"{self.total} bad records skipped; " + "; ".join(parts)

    def log_if_any(self, where: str) -> None:
        if self.total:
            log.warning("%s: %s", where, self.summary())


# ----------------------------------------------------------------------------------------------
# Writing.


def _encode(ext: str, value: Any) -> bytes:
    """Bytes for one tar member, by extension: images are encoded, text and JSON serialised."""
    if isinstance(value, bytes):
        return value
    base = ext.rsplit(".", 1)[-1].lower()
    if base in IMAGE_EXTS:
        img = Image.fromarray(value) if isinstance(value, np.ndarray) else value
        buf = io.BytesIO()
        fmt = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}[base]
        img.save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
        return buf.getvalue()
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value).encode("utf-8")  # e.g. KEY.cls holds a class id as text
    if base == "json" or isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False, sort_keys=True).encode("utf-8")
    if isinstance(value, np.ndarray) and base == "npy":
        buf = io.BytesIO()
        np.save(buf, value, allow_pickle=False)
        return buf.getvalue()
    raise ValueError(f"cannot encode a {type(value).__name__} as .{ext}; pass bytes instead")


def write_samples(
    records: Iterable[dict[str, Any]], out_dir: str | Path, prefix: str, shard_size: int
) -> int:
    """Write webdataset dicts (`{"__key__": k, "png": ..., "txt": ..., "codes.npy": b"..."}`) to
    `out_dir/prefix-000000.tar`, ... with `shard_size` records each; returns the record count.

    Each shard is written to a temporary name and renamed, so a killed writer leaves no
    half-written shard. Member mtimes are fixed, so equal input gives byte-identical shards."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n, shard, tar, tmp = 0, 0, None, None

    def close() -> None:
        if tar is not None:
            tar.close()
            tmp.replace(tmp.with_suffix(""))

    try:
        for rec in records:
            key = rec.get("__key__")
            if not isinstance(key, str) or not key or "." in os.path.basename(key):
                raise ValueError(f"each record needs a '__key__' string without dots, got {key!r}")
            if n % shard_size == 0:
                close()
                tmp = out / f"{prefix}-{shard:06d}.tar.tmp"
                tar = tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT)
                shard += 1
            for ext, value in rec.items():
                if ext.startswith("__"):
                    continue
                data = _encode(ext, value)
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))
            n += 1
        close()
        tar = None
    finally:
        if tar is not None:  # an exception mid-shard: drop the partial file
            tar.close()
            tmp.unlink(missing_ok=True)
    return n


def write_shards(
    samples: Iterable[tuple[str, Any, str, dict]],
    out_dir: str | Path,
    prefix: str,
    shard_size: int,
    image_format: Literal["png", "jpg"] = "png",
) -> int:
    """Write (key, image as PIL or uint8 HxWx3 array, caption, meta) tuples; returns the count."""
    records = (
        {"__key__": key, image_format: image, "txt": caption, "json": meta}
        for key, image, caption, meta in samples
    )
    return write_samples(records, out_dir, prefix, shard_size)


# ----------------------------------------------------------------------------------------------
# Reading.


def expand_urls(urls: str | list[str]) -> list[str]:
    """A directory -> its *.tar files sorted; brace ranges and `::`-separated lists expanded;
    local globs (`*`, `?`) resolved; `pipe:` and remote URLs kept as they are."""
    items = urls if isinstance(urls, list) else [urls]
    out: list[str] = []
    for item in items:
        for url in wds.shardlists.expand_urls(item) if item else []:
            if url.startswith("pipe:") or re.match(r"^[a-z0-9]+://", url):
                out.append(url)
            elif os.path.isdir(url):
                out.extend(sorted(str(p) for p in Path(url).glob("*.tar")))
            elif any(c in url for c in "*?["):
                out.extend(sorted(glob.glob(url)))
            else:
                out.append(url)
    return out


def _local_missing(urls: list[str]) -> list[str]:
    return [
        u for u in urls if "://" not in u and not u.startswith("pipe:") and not os.path.exists(u)
    ]


def _raw_samples(url: str, report: BadDataReport) -> Iterator[dict[str, Any]]:
    """Group one shard's members by key. On a tar error (truncated, unreadable) the record whose
    member was cut off is dropped and reported as `truncated_shard` ("URL#KEY"); when the break
    falls between members the record in progress is dropped (it may lack a member); a shard
    that yields nothing at all is `unreadable_shard` (URL)."""
    errors: list[Exception] = []
    tried: list[str] = [""]  # the member whose data is being read

    def handler(exn: Exception) -> bool:  # webdataset's hook for tar-level errors
        errors.append(exn)
        return True

    def select(fname: str) -> bool:  # called before a member's data is read
        tried[0] = fname
        return True

    streams = wds.tariterators.url_opener([{"url": url}], handler=handler)
    files = wds.tariterators.tar_file_expander(
        streams, handler=handler, select_files=select, eof_value=None
    )
    current: dict[str, Any] | None = None
    done, seen_any = "", False
    for f in files:
        done, seen_any = f["fname"], True
        key, ext = wds.tariterators.base_plus_ext(f["fname"])
        if key is None:
            continue
        if current is not None and current["__key__"] != key:
            yield current
            current = None
        if current is None:
            current = {"__key__": key, "__url__": url}
        current[ext.lower()] = f["data"]
    if not errors:
        if current is not None:
            yield current
        return
    log.debug("tar error in %s: %s", url, errors[0])
    cut = wds.tariterators.base_plus_ext(tried[0])[0] if tried[0] != done else None
    if current is not None and cut is not None and cut != current["__key__"]:
        yield current  # complete: the next record's member was the one cut off
        current = None
    if cut is not None or current is not None:
        report.add("truncated_shard", f"{url}#{cut if cut is not None else current['__key__']}")
    elif not seen_any:
        report.add("unreadable_shard", url)
    else:
        report.add("truncated_shard", url)


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("RGBA", "LA", "P", "PA") or "transparency" in img.info:
        img = img.convert("RGBA")
        bg = Image.new("RGBA", img.size, BACKGROUND + (255,))
        return Image.alpha_composite(bg, img).convert("RGB")
    return img.convert("RGB")


def resize_crop(img: Image.Image, size: int, rng: random.Random | None = None) -> np.ndarray:
    """Resize the shorter side to `size`, then crop `size`x`size` (centre, or random with rng)."""
    w, h = img.size
    if (w, h) != (size, size):
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), Image.Resampling.BICUBIC)
        w, h = nw, nh
        if rng is None:
            x0, y0 = (w - size) // 2, (h - size) // 2
        else:
            x0, y0 = rng.randint(0, w - size), rng.randint(0, h - size)
        img = img.crop((x0, y0, x0 + size, y0 + size))
    return np.asarray(img, dtype=np.uint8)


def read_caption(sample: dict[str, Any]) -> tuple[str | None, str | None]:
    """(caption, None) or (None, reason) for a raw sample's `txt` member."""
    raw = sample.get("txt")
    if raw is None:
        return None, "missing_caption"
    try:
        text = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        return None, "bad_caption_encoding"
    return (text, None) if text else (None, "empty_caption")


def read_meta(sample: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
    """(meta, None) or (None, "bad_meta") for a raw sample's optional `json` member ({} if none)."""
    if "json" not in sample:
        return {}, None
    try:
        return json.loads(sample["json"].decode("utf-8")), None
    except (UnicodeDecodeError, ValueError):
        return None, "bad_meta"


def decode_sample(
    sample: dict[str, Any], size: int, rng: random.Random | None = None, captions: bool = True
) -> tuple[dict[str, Any] | None, str | None]:
    """Raw tar sample -> ({"image": uint8 (S,S,3), "caption", "meta", "key"}, None) or
    (None, reason) when the record must be skipped. captions=False: a missing or empty caption
    is no reason (caption "")."""
    caption, reason = read_caption(sample)
    if reason and captions:
        return None, reason
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None:
        return None, "missing_image"
    try:
        with Image.open(io.BytesIO(sample[ext])) as img:
            img.draft("RGB", (size, size))  # JPEG only: decode at a reduced scale >= size
            image = resize_crop(_to_rgb(img), size, rng)
    except Exception:  # PIL raises many types for corrupt or truncated files
        return None, "bad_image"
    meta, reason = read_meta(sample)
    if reason:
        return None, reason
    return {"image": image, "caption": caption or "", "meta": meta, "key": sample["__key__"]}, None


def iter_captions(urls: str | list[str], report: BadDataReport | None = None) -> Iterator[str]:
    """One pass over every caption (images are not decoded); bad captions are skipped, counted in
    `report` and logged once at the end."""
    report = BadDataReport() if report is None else report
    for url in expand_urls(urls):
        for sample in _raw_samples(url, report):
            caption, reason = read_caption(sample)
            if reason:
                report.add(reason, sample["__key__"])
            else:
                yield caption
    report.log_if_any("iter_captions")
