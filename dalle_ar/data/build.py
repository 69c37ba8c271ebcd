"""`dalle-ar data shapes|emoji|folder|shards --out DIR`: write train and eval webdataset shards:
the procedural shapes, the Twemoji set, a folder of pictures with same-stem .txt captions, or
shards of your own in img2dataset layout (`KEY.jpg|png|webp`, `KEY.txt`, `KEY.json`), split in
two by a hash of each record's name.

Output: DIR/train-000000.tar ..., DIR/eval-000000.tar ..., and DIR/info.json with the counts,
the shard URLs (brace globs usable as data.train / data.eval) and how the set was made.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from dalle_ar.data import shapes
from dalle_ar.data.shards import (
    IMAGE_EXTS,
    BadDataReport,
    ShardWriter,
    decode_image,
    expand_urls,
    local_missing,
    missing_member,
    raw_samples,
    read_caption,
    read_meta,
    report_key,
    write_samples,
    write_shards,
)

log = logging.getLogger(__name__)

FOLDER_IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp")
KINDS = ("shapes", "emoji", "folder", "shards")


def shard_glob(out: Path, prefix: str, count: int, shard_size: int) -> str:
    """Brace glob naming every shard of a split, e.g. DIR/train-{000000..000009}.tar."""
    n = -(-count // shard_size)
    if n == 0:
        return ""
    if n == 1:
        return str(out / f"{prefix}-000000.tar")
    return str(out / f"{prefix}-{{000000..{n - 1:06d}}}.tar")


def _progress(it: Iterator, total: int, desc: str) -> Iterator:
    return tqdm(it, total=total, desc=desc, unit="img", mininterval=2.0, leave=False)


def build_shapes(
    out: Path, num_train: int, num_eval: int, seed: int, size: int, shard_size: int
) -> dict[str, Any]:
    counts = {}
    for split, n in (("train", num_train), ("eval", num_eval)):
        samples = (
            (f"{i:09d}", img, cap, spec)
            for i, (img, cap, spec) in enumerate(shapes.generate(n, seed, split, size))
        )
        counts[split] = write_shards(_progress(samples, n, split), out, split, shard_size)
    return {
        "counts": counts,
        "held_out_combos": [list(c) for c in shapes.HELD_OUT_COMBOS],
        "colors": list(shapes.COLORS),
        "shapes": list(shapes.SHAPES),
    }


def build_emoji(out: Path, size: int | None, shard_size: int) -> dict[str, Any]:
    from dalle_ar.data import emoji

    pairs = emoji.load_pairs()
    counts = {}
    for split in ("train", "eval"):
        chosen = [p for p in pairs if emoji.split_of(p.base_key) == split]
        samples = (
            (f"{i:09d}", emoji.load_image(p, size), p.caption, p.meta())
            for i, p in enumerate(chosen)
        )
        counts[split] = write_shards(_progress(samples, len(chosen), split), out, split, shard_size)
    return {"counts": counts, "eval_fraction": emoji.EVAL_FRACTION, "credit": emoji.CREDIT}


# evaluation records a job on your own pictures needs: the CLIP's held-out top-5 retrieval (in
# one batch of them all where there are fewer than its config's retrieval_batch), R-precision's
# distractors (`dalle_ar.jobs.own`, which refuses fewer)
MIN_EVAL = 5


def _fraction_of(text: str, seed: int) -> float:
    """A stable number in [0, 1) for a string: the split does not move when files are added."""
    # a file name that is not UTF-8 comes as surrogate escapes (os and tarfile): its own bytes
    h = hashlib.sha256(f"{seed}:{text}".encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def _shown(name: str) -> str:
    """A file or member name as a record's JSON keeps it: bytes that are not UTF-8 (surrogate
    escapes from os and tarfile) written as backslash escapes."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _picture(data: bytes, ext: str, size: int | None) -> tuple[Any, str, str | None]:
    """(image, extension, None) or (None, "", reason) for one picture's file bytes: without
    `size`, those bytes (the loader decodes them as `decode_image` does); with it, the picture
    as a viewer shows it (`decode_image`), its shorter side cut to `size`, as PNG."""
    img, reason = decode_image(data, size)  # a JPEG decoded at a reduced scale where it can be
    if reason:
        return None, "", reason
    if size is None:
        return data, ext.replace("jpeg", "jpg"), None
    scale = size / min(img.size)
    if scale < 1:
        w, h = round(img.size[0] * scale), round(img.size[1] * scale)
        img = img.resize((max(size, w), max(size, h)), Image.Resampling.LANCZOS)
    return img, "png", None


def build_folder(
    src: Path, out: Path, eval_fraction: float, seed: int, size: int | None, shard_size: int
) -> dict[str, Any]:
    files = sorted(p for p in src.rglob("*") if p.suffix.lower() in FOLDER_IMAGE_EXTS)
    if not files:
        tars = " (it holds .tar files: for shards, the shards kind)" * any(src.rglob("*.tar"))
        raise ValueError(
            f"expected images ({', '.join(FOLDER_IMAGE_EXTS)}) under {src}, found none{tars}"
        )
    report = BadDataReport()
    splits: dict[str, list[Path]] = {"train": [], "eval": []}
    for p in files:
        rel = p.relative_to(src).as_posix()
        splits["eval" if _fraction_of(rel, seed) < eval_fraction else "train"].append(p)

    def records(paths: list[Path]) -> Iterator[dict[str, Any]]:
        for i, p in enumerate(paths):
            rel, key = p.relative_to(src).as_posix(), f"{i:09d}"
            txt = p.with_suffix(".txt")
            try:
                cap = txt.read_bytes().decode("utf-8").strip() if txt.is_file() else ""
            except UnicodeDecodeError:
                report.add("bad_caption_encoding", rel)
                continue
            if not cap:
                report.add("missing_caption" if not txt.is_file() else "empty_caption", rel)
                continue
            image, ext, reason = _picture(p.read_bytes(), p.suffix.lower().lstrip("."), size)
            if reason:
                report.add(reason, rel)
                continue
            yield {"__key__": key, ext: image, "txt": cap, "json": {"source": _shown(rel)}}

    counts = {
        split: write_samples(_progress(records(paths), len(paths), split), out, split, shard_size)
        for split, paths in splits.items()
    }
    report.log_if_any(f"data folder {src}")
    _check_split(counts, src, eval_fraction, report)
    return {
        "counts": counts,
        "eval_fraction": eval_fraction,
        "source": str(src),
        "skipped": report.to_dict(),
    }


class SplitError(ValueError):
    """The evaluation split took every usable record: none is left to train on."""


def _check_split(
    counts: dict[str, int], src: Any, eval_fraction: float, report: BadDataReport
) -> None:
    """ValueError where `src` gave no usable record (the bad ones counted by reason), SplitError
    where `eval_fraction` sent every usable one to the evaluation split."""
    if not counts["train"] and not counts["eval"]:
        raise ValueError(f"no usable records in {src} ({report.summary()})")
    if not counts["train"]:
        raise SplitError(f"--eval-fraction {eval_fraction} sent all {counts['eval']} usable "
                         f"records of {src} to the evaluation split, none to training")  # fmt: skip


def shard_urls(src: str) -> list[str]:
    """The shard URLs `src` names (`expand_urls`); ValueError when it names none, or local files
    that are not there."""
    urls = expand_urls(src)
    missing = local_missing(urls)
    if urls and not missing:
        return urls
    why = ""
    if missing:
        why = f": {len(missing)} not found ({', '.join(missing[:3])}{', ...' * (len(missing) > 3)})"
    elif Path(src).is_dir():
        why = ": a folder without .tar files (pictures with .txt captions: data folder)"
    raise ValueError(f"expected shards (.tar files, a folder of them, a brace glob), got "
                     f"{src!r}{why}")  # fmt: skip


def check_source(kind: str, src: Any) -> None:
    """ValueError naming the problem where `src` is not what `kind` reads: a folder (folder), or
    shards that are there (shards: `shard_urls`); the other kinds read no source."""
    if kind == "folder" and not Path(src).is_dir():
        shards_like = Path(src).suffix == ".tar" or "{" in str(src)
        tar = " (for .tar shards: the shards kind)" * shards_like
        why = "" if Path(src).exists() else ": not found"
        raise ValueError(f"expected a directory of images with .txt captions, got {src}{why}{tar}")
    if kind == "shards":
        shard_urls(src)


def build_shards(
    src: str, out: Path, eval_fraction: float, seed: int, size: int | None, shard_size: int
) -> dict[str, Any]:
    """Shards of your own (img2dataset layout; paths, folders of .tar files, brace globs, `pipe:`
    URLs), read once and written again as a training and an evaluation split: a record goes to
    the evaluation split by a hash of its shard's file name and key (with `seed`; stable when
    shards are added), keeps its caption and its JSON (with "source": "SHARD#KEY"), and its
    picture (with `size`: its shorter side cut to `size` where longer, as PNG). Records the
    loader would skip (no caption, a corrupt picture, JSON that is not an object, ...) are
    skipped here, counted by reason in the info's "skipped". ValueError for a source that names
    no shards or holds no usable record, SplitError where `eval_fraction` leaves none to train
    on."""
    urls = shard_urls(src)
    report = BadDataReport()

    def record(raw: dict[str, Any], i: int) -> dict[str, Any] | None:
        caption, reason = read_caption(raw)  # the loader's checks, in its order
        ext = next((e for e in IMAGE_EXTS if e in raw), None)
        if not reason and ext is None:
            reason = missing_member(raw, IMAGE_EXTS, "missing_image")
        if not reason:
            image, out_ext, reason = _picture(raw[ext], ext, size)
        if not reason:
            meta, reason = read_meta(raw)
        if reason:  # named as "source" names the records kept: SHARD#KEY
            report.add(reason, f"{Path(raw['__url__']).name}#{report_key(raw, reason)}")
            return None
        source = _shown(f"{raw['__url__']}#{raw['__key__']}")
        return {"__key__": f"{i:09d}", out_ext: image, "txt": caption,
                "json": {**meta, "source": source}}  # fmt: skip

    with (
        ShardWriter(out, "train", shard_size) as train,
        ShardWriter(out, "eval", shard_size) as held,
    ):
        records = (raw for url in urls for raw in raw_samples(url, report))
        for raw in _progress(records, None, "records"):
            name = f"{Path(raw['__url__']).name}#{raw['__key__']}"
            writer = held if _fraction_of(name, seed) < eval_fraction else train
            rec = record(raw, writer.count)
            if rec is not None:
                writer.add(rec)
    counts = {"train": train.count, "eval": held.count}
    report.log_if_any(f"shards {src}")
    _check_split(counts, src, eval_fraction, report)
    return {"counts": counts, "eval_fraction": eval_fraction, "source": src,
            "skipped": report.to_dict()}  # fmt: skip


def _parser(kind: str) -> argparse.ArgumentParser:
    # the module docstring's first paragraph: what each kind writes
    p = argparse.ArgumentParser(prog=f"dalle-ar data {kind}", description=__doc__.split("\n\n")[0])
    if kind == "folder":
        p.add_argument("src", type=Path, help="folder of images with same-stem .txt captions")
    if kind == "shards":
        p.add_argument(
            "src",
            nargs="+",
            help="your shards in img2dataset layout: .tar files, "
            "folders of them or brace globs (quote them); several are read in turn",
        )
    if kind in ("folder", "shards"):
        p.add_argument("--eval-fraction", type=float, default=0.05,
                       help=f"share held out for the evaluation (default 0.05; the main job "
                       f"needs >= {MIN_EVAL} evaluation records)")  # fmt: skip
    p.add_argument("--out", type=Path, required=True, help="output folder for the shards")
    if kind == "shapes":
        p.add_argument("--num-train", type=int, default=50_000, help="training images")
        p.add_argument("--num-eval", type=int, default=2_000, help="evaluation images")
    p.add_argument("--seed", type=int, default=0,
                   help="random seed (shapes; the folder and shards split)")  # fmt: skip
    default_size = 32 if kind == "shapes" else None
    p.add_argument(
        "--size",
        type=int,
        default=default_size,
        help="image side in pixels (shapes: render size, default 32; others: shorter side, "
        "only downscaled, default: keep the source size)",
    )
    # several shards per split, so DataLoader workers and DDP ranks each get whole shards
    default_shard = {"shapes": 5_000, "emoji": 500, "folder": 1_000, "shards": 1_000}[kind]
    p.add_argument("--shard-size", type=int, default=default_shard, help="records per shard")
    return p


def build(kind: str, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Write the shards of `kind` (shapes | emoji | folder | shards) into `out`, replacing old
    shards, and `out/info.json`; returns the info. `args`: the options of `dalle-ar data KIND`
    (`options` gives their defaults). ValueError for impossible options, before old shards are
    removed."""
    if args.shard_size < 1:
        raise ValueError(f"expected --shard-size >= 1, got {args.shard_size}")
    if args.size is not None and args.size < 8:
        raise ValueError(f"expected --size >= 8 (pixels), got {args.size}")
    if kind == "shapes" and min(args.num_train, args.num_eval) < 0:
        raise ValueError("--num-train and --num-eval must be >= 0")
    if kind in ("folder", "shards") and not 0 <= args.eval_fraction < 1:
        raise ValueError(f"--eval-fraction must be in [0, 1), got {args.eval_fraction}")
    check_source(kind, getattr(args, "src", None))
    out.mkdir(parents=True, exist_ok=True)  # checked first: nothing old is removed for a typo
    # (and the unfinished shard a killed build left, `ShardWriter`'s .tar.tmp)
    stale = [p for split in ("train", "eval") for ext in ("tar", "tar.tmp")
             for p in sorted(out.glob(f"{split}-*.{ext}")) if p.is_file()]  # fmt: skip
    if stale:  # a smaller rebuild must not leave old shards that a directory URL would read
        log.info("removing %d old shards from %s", len(stale), out)
        for p in stale:
            p.unlink()
    (out / "info.json").unlink(missing_ok=True)  # it names the shards: written again at the end
    start = time.perf_counter()
    if kind == "shapes":
        info = build_shapes(
            out, args.num_train, args.num_eval, args.seed, args.size, args.shard_size
        )
    elif kind == "emoji":
        info = build_emoji(out, args.size, args.shard_size)
    elif kind == "folder":
        info = build_folder(
            args.src, out, args.eval_fraction, args.seed, args.size, args.shard_size
        )
    else:
        info = build_shards(
            args.src, out, args.eval_fraction, args.seed, args.size, args.shard_size
        )
    info = {
        "kind": kind,
        "seed": args.seed,
        "size": args.size,
        "shard_size": args.shard_size,
        "train": shard_glob(out, "train", info["counts"]["train"], args.shard_size),
        "eval": shard_glob(out, "eval", info["counts"]["eval"], args.shard_size),
        **info,
        "seconds": round(time.perf_counter() - start, 2),
    }
    (out / "info.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def options(kind: str, **given: Any) -> argparse.Namespace:
    """The options of `dalle-ar data KIND` with their defaults, `given` put in (by dest name:
    out, num_train, seed, ...)."""
    args = _parser(kind).parse_args(["--out", str(given.get("out", "."))] + (
        [str(given["src"])] if kind in ("folder", "shards") else []))  # fmt: skip
    for k, v in given.items():
        setattr(args, k, v)
    return args


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in KINDS:
        print(f"usage: dalle-ar data {'|'.join(KINDS)} --out DIR [options]")
        return 2
    kind = argv[0]
    args = _parser(kind).parse_args(argv[1:])
    if kind == "shards":  # several sources: one list of shards, read in turn
        args.src = "::".join(args.src)
    try:
        info = build(kind, args.out, args)
    except ValueError as e:
        print(f"dalle-ar data {kind}: {e}", file=sys.stderr)
        return 2
    if kind in ("folder", "shards") and info["counts"]["eval"] < MIN_EVAL:
        log.warning("%d evaluation records: the main job's evaluation needs >= %d (a larger "
                    "--eval-fraction)", info["counts"]["eval"], MIN_EVAL)  # fmt: skip
    print(json.dumps({k: info[k] for k in ("kind", "counts", "train", "eval", "seconds")}))
    return 0
