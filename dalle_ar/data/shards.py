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
from PIL import Image, ImageOps

log = logging.getLogger(__name__)

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
# Transparent pixels are composited on this neutral grey (emoji and any RGBA input).
BACKGROUND = (128, 128, 128)
CHARS_PER_TEXT_POSITION = 64  # caption characters kept per text position (`caption_chars`)
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


class ShardWriter:
    """Webdataset dicts (`{"__key__": k, "png": ..., "txt": ..., "codes.npy": b"..."}`) written to
    `out_dir/prefix-000000.tar`, ... with `shard_size` records each, one `add` at a time (a
    context manager: `count` records once it closes). Each shard is written to a temporary name
    and renamed when full or at `close`, so a killed writer leaves no half-written shard; an
    exception inside the `with` drops the shard in progress (`count` still counts its records).
    Member mtimes are fixed, so equal input gives byte-identical shards. ValueError for
    `shard_size` < 1 or a key that is not a string without dots."""

    def __init__(self, out_dir: str | Path, prefix: str, shard_size: int) -> None:
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.out, self.prefix, self.shard_size = Path(out_dir), prefix, shard_size
        self.out.mkdir(parents=True, exist_ok=True)
        self.count, self._shards = 0, 0
        self._tar: tarfile.TarFile | None = None
        self._tmp: Path | None = None

    def add(self, rec: dict[str, Any]) -> None:
        """One record, whole or not at all (every member encoded before any is written); a
        shard is renamed to its final name as soon as it is full."""
        key = rec.get("__key__")
        if not isinstance(key, str) or not key or "." in os.path.basename(key):
            raise ValueError(f"each record needs a '__key__' string without dots, got {key!r}")
        members = {
            ext: _encode(ext, value) for ext, value in rec.items() if not ext.startswith("__")
        }
        if self._tar is None:
            self._tmp = self.out / f"{self.prefix}-{self._shards:06d}.tar.tmp"
            self._tar = tarfile.open(self._tmp, "w", format=tarfile.USTAR_FORMAT)
            self._shards += 1
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            self._tar.addfile(info, io.BytesIO(data))
        self.count += 1
        if self.count % self.shard_size == 0:
            self._finish_shard()

    def _finish_shard(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tmp.replace(self._tmp.with_suffix(""))
            self._tar = None

    def close(self) -> None:
        self._finish_shard()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self.close()
        elif self._tar is not None:  # an exception mid-shard: drop the partial file
            self._tar.close()
            self._tmp.unlink(missing_ok=True)
            self._tar = None


def write_samples(
    records: Iterable[dict[str, Any]], out_dir: str | Path, prefix: str, shard_size: int
) -> int:
    """Write webdataset dicts to `out_dir/prefix-000000.tar`, ... (`ShardWriter`); returns the
    record count."""
    with ShardWriter(out_dir, prefix, shard_size) as writer:
        for rec in records:
            writer.add(rec)
    return writer.count


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


def local_missing(urls: list[str]) -> list[str]:
    """The local paths among `urls` that do not exist (`pipe:` and remote URLs are not checked)."""
    return [
        u for u in urls if "://" not in u and not u.startswith("pipe:") and not os.path.exists(u)
    ]


class _EndTarInfo(tarfile.TarInfo):
    """A TarInfo that keeps, on its TarFile, why the member list ended: `tarfile` ends it
    silently at a cut, empty or corrupt header as at the end-of-archive zero block."""

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tar)
        except tarfile.HeaderError as e:
            tar._end_error = e  # type: ignore[attr-defined]
            raise


def _ended_cleanly(tar: tarfile.TarFile) -> bool:
    """Whether the archive ended with its two end-of-archive zero blocks (POSIX; every writer,
    Python's tarfile included, writes both): anything else is a cut or corrupt shard."""
    if not isinstance(getattr(tar, "_end_error", None), tarfile.EOFHeaderError):
        return False  # a cut or corrupt header, or end of file where a header should be
    return tar.fileobj.read(tarfile.BLOCKSIZE) == tarfile.NUL * tarfile.BLOCKSIZE


# Member names webdataset's tar reader skips (its meta files), by its own rule.
_META_NAME = re.compile(r"__[^/]*__($|/)")


def split_name(name: str) -> tuple[str | None, str]:
    """A member name -> (key, extension) by webdataset's rule (the key ends at the first dot of
    the file name: "d/photo.v2.png" -> ("d/photo", "v2.png")); (None, "") for a name without a
    dot or a meta file ("__x__") that webdataset skips. The extension is lower-cased, as
    webdataset's grouping does."""
    if _META_NAME.match(name) or (
        "/" not in name and name.startswith("__") and name.endswith("__")
    ):
        return None, ""
    key, ext = wds.tariterators.base_plus_ext(name)
    return (key, ext.lower()) if key is not None else (None, "")


def _whole(record: dict[str, Any], report: BadDataReport) -> Iterator[dict[str, Any]]:
    if record.pop("__split__", False):
        report.add("split_record", record["__key__"])
    elif record.pop("__duplicate__", False):
        report.add("duplicate_member", record["__key__"])
    else:
        yield record


def raw_samples(url: str, report: BadDataReport) -> Iterator[dict[str, Any]]:
    """Group one shard's members into records by key (`split_name`), in tar order.

    A record is yielded only once it is known whole: when the next record's header has been
    read, or when the archive ends with its end-of-archive blocks. A shard that ends any other
    way (cut anywhere, even at a member boundary, which Python's tarfile takes for the end; a
    corrupt header; a read error) is reported as `truncated_shard`: "URL#KEY" for the record in
    progress, which is dropped, or "URL" when none was; one whose first header cannot be read is
    `unreadable_shard` (URL). A record holding two members of one extension is dropped as
    `duplicate_member` (KEY). A key met again after other keys (`tar cf x.tar *.png *.txt`: a
    record's members must be adjacent, as img2dataset writes them) is dropped as `split_record`
    (KEY); its first part, read as a record of its own, is skipped by what it lacks."""
    current: dict[str, Any] | None = None  # the record being read
    ended: set[str] = set()  # the keys of this shard's records read so far
    clean, seen_any = False, False
    try:
        with (
            wds.gopen(url, "rb") as stream,
            tarfile.open(fileobj=stream, mode="r|*", tarinfo=_EndTarInfo) as tar,
        ):
            for info in tar:
                seen_any = True
                tar.members = []  # stream mode would keep every header of the shard
                key, ext = split_name(info.name)
                if not info.isreg() or key is None:
                    continue
                if current is not None and current["__key__"] != key:
                    ended.add(current["__key__"])
                    yield from _whole(current, report)  # the next record has begun
                    current = None
                if current is None:
                    current = {"__key__": key, "__url__": url}
                    if key in ended:
                        current["__split__"] = True
                if ext in current:
                    current["__duplicate__"] = True
                current[ext] = tar.extractfile(info).read()  # ReadError when cut
            clean = _ended_cleanly(tar)
    except Exception as e:  # tarfile, gzip, zlib and the opener raise many types
        log.debug("tar error in %s: %s", url, e)
    if clean:
        if current is not None:
            yield from _whole(current, report)
    elif current is not None:
        report.add("truncated_shard", f"{url}#{current['__key__']}")
    elif not seen_any:
        report.add("unreadable_shard", url)
    else:
        report.add("truncated_shard", url)


# Pillow modes of one channel wider than 8 bits whose range is known: a viewer shows
# value / full scale as the grey level (16-bit PNG and TIFF greys open as "I;16*", or as "I" from
# a PNG). Other "I" images and float ("F") images have no known range and are skipped.
_FULL_SCALE = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535}


class UnknownRange(ValueError):
    """Pixels whose range no viewer agrees on (32-bit integer or float, or a mode Pillow cannot
    convert to RGB): `to_rgb` cannot show them, and a loader skips them as
    "unsupported_image_mode"."""


def to_rgb(img: Image.Image) -> Image.Image:
    """A PIL image of any mode and bit depth -> 8-bit RGB as an image viewer shows it: turned
    upright by its EXIF orientation, 16-bit greys scaled (not clipped) to 8 bits, transparency
    composited on `BACKGROUND`. UnknownRange (a ValueError) for pixels of unknown range (32-bit
    integer or float) or a mode Pillow cannot convert; Pillow's own errors for an image it cannot
    decode."""
    fmt = img.format
    img.load()
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # a broken EXIF block: viewers ignore it, so do we
        log.debug("unreadable EXIF orientation ignored")
    full = _FULL_SCALE.get(img.mode)
    if full is None and img.mode == "I" and fmt == "PNG":
        full = 65535  # Pillow opens 16-bit greyscale PNGs as 32-bit "I"
    if full is not None:
        grey = np.asarray(img, dtype=np.float64) * (255.0 / full)
        img = Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8), "L")
    elif img.mode in ("I", "F"):
        raise UnknownRange(f"unknown range: cannot show {img.mode} pixels as 8-bit RGB")
    if img.mode in ("RGBA", "RGBa", "LA", "La", "PA", "P") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    try:
        return img.convert("RGB")
    except ValueError as e:  # e.g. LAB: Pillow has no conversion
        raise UnknownRange(f"unknown range: cannot show {img.mode} pixels as RGB ({e})") from None


def decode_image(data: bytes, size: int | None = None) -> tuple[Image.Image | None, str | None]:
    """Image file bytes -> (8-bit RGB PIL image as a viewer shows it (`to_rgb`), None) or (None,
    reason): "bad_image" (not an image, or corrupt or cut), "image_too_large" (over Pillow's
    decompression-bomb limit), "unsupported_image_mode" (pixels of unknown range). With `size`,
    a JPEG may be decoded at a reduced scale whose sides are still >= size."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            if size is not None:
                img.draft("RGB", (size, size))
            return to_rgb(img), None
    except Image.DecompressionBombError:
        return None, "image_too_large"
    except UnknownRange:
        return None, "unsupported_image_mode"
    except Exception:  # PIL raises many types for corrupt or truncated files
        return None, "bad_image"


def missing_member(sample: dict[str, Any], exts: tuple[str, ...], reason: str) -> str:
    """Why a record holds none of `exts`: "dotted_key" when it holds a `STEM.ext` member, i.e. a
    file name with a dot before its extension (webdataset's key ends at the first dot, so
    `photo.v2.txt` is member "v2.txt" of record "photo"), else `reason`."""
    dotted = any(e.endswith("." + x) for e in sample for x in exts)
    return "dotted_key" if dotted else reason


def report_key(sample: dict[str, Any], reason: str) -> str:
    """The name a skipped record is reported by: its key, and for "dotted_key" also its members
    as the shard names them ("photo (photo.v2.png, photo.v2.txt)")."""
    key = sample["__key__"]
    if reason != "dotted_key":
        return key
    return f"{key} ({', '.join(sorted(f'{key}.{e}' for e in sample if not e.startswith('__')))})"


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


def caption_chars(text_len: int) -> int:
    """Characters of a caption kept for a text model of `text_len` positions: captions are cut
    to this before any tokenizer sees them, so a megabyte caption costs what a long one does.
    A byte-level BPE token spans at most a few words (rarely over 16 characters), so 64 per
    position leaves every position the model reads as the whole caption would fill it."""
    return CHARS_PER_TEXT_POSITION * text_len


def read_caption(
    sample: dict[str, Any], max_chars: int | None = None
) -> tuple[str | None, str | None]:
    """(caption, None) or (None, reason) for a raw sample's `txt` member; a caption longer than
    `max_chars` characters (`caption_chars`) is cut to them."""
    raw = sample.get("txt")
    if raw is None:
        return None, missing_member(sample, ("txt",), "missing_caption")
    try:
        text = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        return None, "bad_caption_encoding"
    if max_chars is not None:
        text = text[:max_chars].rstrip()
    return (text, None) if text else (None, "empty_caption")


def read_meta(sample: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
    """(meta, None) or (None, "bad_meta") for a raw sample's optional `json` member ({} if none):
    "bad_meta" for JSON that does not parse or is not an object (img2dataset writes objects)."""
    if "json" not in sample:
        return {}, None
    try:
        meta = json.loads(sample["json"].decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None, "bad_meta"
    return (meta, None) if isinstance(meta, dict) else (None, "bad_meta")


def first_image_size(urls: str | list[str]) -> tuple[int, int] | None:
    """(width, height) in pixels of the first readable picture of the shards `urls` (local
    paths or brace globs, `expand_urls`), as stored, before the loader resizes it; None when
    none is read."""
    for url in expand_urls(urls):
        for sample in raw_samples(url, BadDataReport()):
            ext = next((e for e in IMAGE_EXTS if e in sample), None)
            img, _ = decode_image(sample[ext]) if ext else (None, None)
            if img is not None:
                return img.size
    return None


def decode_sample(
    sample: dict[str, Any],
    size: int,
    rng: random.Random | None = None,
    max_chars: int | None = None,
    captions: bool = True,
) -> tuple[dict[str, Any] | None, str | None]:
    """Raw tar sample -> ({"image": uint8 (S,S,3), "caption", "meta", "key"}, None) or
    (None, reason) when the record must be skipped; the caption is cut to `max_chars`.
    captions=False: a missing or empty caption is no reason (caption "")."""
    caption, reason = read_caption(sample, max_chars)
    if reason and captions:
        return None, reason
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None:
        return None, missing_member(sample, IMAGE_EXTS, "missing_image")
    img, reason = decode_image(sample[ext], size)
    if reason:
        return None, reason
    image = resize_crop(img, size, rng)
    meta, reason = read_meta(sample)
    if reason:
        return None, reason
    return {"image": image, "caption": caption or "", "meta": meta, "key": sample["__key__"]}, None


def iter_captions(
    urls: str | list[str], report: BadDataReport | None = None, max_chars: int | None = None
) -> Iterator[str]:
    """One pass over every caption, each cut to `max_chars` (images are not decoded); bad
    captions are skipped, counted in `report` and logged once at the end."""
    report = BadDataReport() if report is None else report
    for url in expand_urls(urls):
        for sample in raw_samples(url, report):
            caption, reason = read_caption(sample, max_chars)
            if reason:
                report.add(reason, report_key(sample, reason))
            else:
                yield caption
    report.log_if_any("iter_captions")
