"""Token shards: images already turned into VQ codes (`pretokenize`; the command is
`dalle-ar tokens`).

A record is `KEY.codes.npy` (an (h, w) int16 or int32 array of code ids), `KEY.txt` (the
caption) and `KEY.json` (meta), so transformer training never reruns the image encoder. Shards
written with a CLIP also hold `KEY.clip_img.npy` and `KEY.clip_txt.npy`: the CLIP's unit image and
caption embeddings (D,) float32, computed once here for the prior and the embedding-conditioned
transformer (`PREFIX-tokens.json` records which CLIP, `dalle_ar.models.clip.CLIP.identity`).

`make_token_loader` yields {"codes": LongTensor (B, h, w), "caption", "meta", "key"} (plus
"clip_img", "clip_txt" (B, D) float32 when the shards hold them) and behaves
like the image loader of `dalle_ar.data.loader` in everything else, because it is that loader
with another record decoder: the same shard split across ranks and workers, the same shuffle
buffer and seeds, the same bad-record rules (skip, count in a `BadDataReport`, log once per pass).
"""

from __future__ import annotations

import io
import json
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm import tqdm

from dalle_ar.data.loader import Loader, _Batches, checked_urls, make_loader
from dalle_ar.data.shards import missing_member, read_caption, read_meta, write_samples

if TYPE_CHECKING:
    from dalle_ar.models.clip import CLIP
    from dalle_ar.models.vq import VQTokenizer

CODES_EXT = "codes.npy"
CLIP_EXTS = {"clip_img": "clip_img.npy", "clip_txt": "clip_txt.npy"}  # batch key -> record ext


def codes_dtype(codebook_size: int) -> np.dtype:
    """The smallest integer type that holds every code id: int16 up to 32768 codes, else int32."""
    return np.dtype(np.int16) if codebook_size <= 2**15 else np.dtype(np.int32)


def encode_codes(codes: np.ndarray, codebook_size: int) -> bytes:
    """(h, w) code ids -> `.npy` bytes in the smallest integer type (no pickle)."""
    if codes.ndim != 2:
        raise ValueError(f"expected codes of shape (h, w), got {codes.shape}")
    buf = io.BytesIO()
    np.save(buf, codes.astype(codes_dtype(codebook_size)), allow_pickle=False)
    return buf.getvalue()


def decode_token_sample(
    sample: dict[str, Any], max_chars: int | None = None
) -> tuple[dict[str, Any] | None, str | None]:
    """Raw tar sample -> ({"codes": int64 (h, w), "caption", "meta", "key"}, None) or
    (None, reason) when the record must be skipped; the caption is cut to `max_chars`."""
    caption, reason = read_caption(sample, max_chars)
    if reason:
        return None, reason
    raw = sample.get(CODES_EXT)
    if raw is None:
        return None, missing_member(sample, (CODES_EXT,), "missing_codes")
    try:
        codes = np.load(io.BytesIO(raw), allow_pickle=False)
    except (ValueError, OSError, EOFError):
        return None, "bad_codes"
    if codes.ndim != 2 or codes.dtype.kind not in "iu" or codes.size == 0 or codes.min() < 0:
        return None, "bad_codes"
    meta, reason = read_meta(sample)
    if reason:
        return None, reason
    item = {"codes": codes.astype(np.int64), "caption": caption, "meta": meta}
    for name, ext in CLIP_EXTS.items():
        if sample.get(ext) is None:
            continue
        try:
            vec = np.load(io.BytesIO(sample[ext]), allow_pickle=False)
        except (ValueError, OSError, EOFError):
            return None, "bad_clip"
        if vec.ndim != 1 or vec.dtype.kind != "f" or not np.isfinite(vec).all():
            return None, "bad_clip"
        item[name] = vec.astype(np.float32)
    return item | {"key": sample["__key__"]}, None


def _collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    out = {
        "codes": torch.from_numpy(np.stack([it["codes"] for it in items])),  # (B, h, w)
        "caption": [it["caption"] for it in items],
        "meta": [it["meta"] for it in items],
        "key": [it["key"] for it in items],
    }
    for name in CLIP_EXTS:
        if name in items[0]:
            out[name] = torch.from_numpy(np.stack([it[name] for it in items]))  # (B, D)
    return out


class _TokenBatches(_Batches):
    """`loader._Batches` (split, shuffle, bad-record counting) with token records for images."""

    codebook_size: int = 0  # > 0: a record with a code >= it is skipped ("code_out_of_range")
    grid: tuple[int, ...] | None = None  # the first record's grid; every batch must share it
    # the first record's CLIP embedding sizes ({} for none); every record must match them
    embeds: dict[str, int] | None = None

    def decode(
        self, sample: dict[str, Any], rng: random.Random | None
    ) -> tuple[dict[str, Any] | None, str | None]:
        item, reason = decode_token_sample(sample, self.max_chars)
        if item is None:
            return None, reason
        if self.codebook_size and int(item["codes"].max()) >= self.codebook_size:
            return None, "code_out_of_range"
        self.grid = self.grid or item["codes"].shape
        if item["codes"].shape != self.grid:
            return None, "codes_grid_mismatch"
        sizes = {k: len(item[k]) for k in CLIP_EXTS if k in item}
        self.embeds = sizes if self.embeds is None else self.embeds
        if sizes != self.embeds:
            return None, "clip_embeds_mismatch"
        return item, None

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        return _collate(items)


def token_summaries(*urls: str) -> list[Path]:
    """The `PREFIX-tokens.json` summaries beside local token shards (`urls`: paths, globs or
    folders; remote and `pipe:` URLs have none), sorted."""
    out: set[Path] = set()
    for u in urls:
        if u and "://" not in u and not u.startswith("pipe:"):
            folder = Path(u) if Path(u).is_dir() else Path(u).parent
            out |= set(folder.glob("*-tokens.json"))
    return sorted(out)


def clip_embeddings(batch: dict[str, Any], name: str, dim: int, urls: str) -> torch.Tensor:
    """A token batch's CLIP embeddings `name` ("clip_img" or "clip_txt"), (B, dim) float32.
    ValueError when the shards `urls` carry none (written without a CLIP) or another size."""
    if name not in batch:
        raise ValueError(f"the token shards {urls} carry no CLIP embeddings ({name}): write "
                         "them with `dalle-ar tokens --clip FOLDER`")  # fmt: skip
    x = batch[name].float()
    if x.shape[1:] != (dim,):
        raise ValueError(f"the token shards {urls} carry {x.shape[1]}-dim CLIP embeddings, the "
                         f"model takes {dim}: expected equal")  # fmt: skip
    return x


def make_token_loader(
    urls: str | list[str],
    batch_size: int,
    *,
    train: bool,
    shuffle_buffer: int = 1000,
    num_workers: int = 0,
    seed: int = 0,
    epochs: int | None = None,
    text_len: int | None = None,
    codebook_size: int = 0,
) -> Loader:
    """Batches {"codes": (B, h, w) int64, "caption", "meta", "key"} from token shards; the
    loader's `report` accumulates the skipped records of every pass; `text_len` cuts captions
    as `make_loader` does. train=True: shuffled, repeats (forever when epochs is None; a pass
    that keeps no record ends it), full batches only. train=False: one deterministic pass, last
    partial batch kept. codebook_size > 0: a record holding a code >= it is skipped and counted
    ("code_out_of_range"). ValueError for bad arguments and missing local shards."""
    # The image loader's checks apply; image_size is unused here (1 passes them).
    shards = checked_urls(urls, 1, batch_size, shuffle_buffer, num_workers, epochs)
    dataset = _TokenBatches(
        shards, 1, batch_size, train, shuffle_buffer, seed, False, epochs, text_len
    )
    dataset.codebook_size = codebook_size
    return Loader(dataset, num_workers)


# ----------------------------------------------------------------------------------------------
# Writing: image shards -> token shards.


def token_records(
    vq: VQTokenizer, batches: Any, device: torch.device, clip: CLIP | None = None
) -> Iterator[dict[str, Any]]:
    """Webdataset records {"__key__", "codes.npy", "txt", "json"} for each image of `batches`,
    with a `clip` also {"clip_img.npy", "clip_txt.npy"}: its unit embeddings of the image and of
    the caption (cut to the CLIP's text length, as in its training), (D,) float32."""
    for batch in batches:
        codes = vq.encode(batch["image"].to(device)).cpu().numpy()  # (B, h, w)
        embeds: dict[str, np.ndarray] = {}
        if clip is not None:
            with torch.no_grad():
                img = clip.image_embeds(clip.pixels_from_tensor(batch["image"].to(clip.device)))
                txt = clip.text_embeds(*clip.encode_text(batch["caption"], truncate=True))
            embeds = {CLIP_EXTS["clip_img"]: img.cpu().numpy(),
                      CLIP_EXTS["clip_txt"]: txt.cpu().numpy()}  # fmt: skip
        for i, (key, caption, meta, c) in enumerate(
            zip(batch["key"], batch["caption"], batch["meta"], codes)
        ):
            rec = {"__key__": key, CODES_EXT: encode_codes(c, vq.codebook_size), "txt": caption,
                   "json": meta}  # fmt: skip
            rec.update({ext: _npy(v[i]) for ext, v in embeds.items()})
            yield rec


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a, dtype=np.float32), allow_pickle=False)
    return buf.getvalue()


def pretokenize(
    vq: VQTokenizer,
    shards: str,
    out: str | Path,
    prefix: str = "train",
    image_size: int | None = None,
    batch_size: int = 64,
    shard_size: int = 5000,
    num_workers: int = 0,
    source: str = "",
    clip: CLIP | None = None,
    clip_source: str = "",
) -> dict[str, Any]:
    """Encode every image of `shards` with the loaded VQ `vq` (on its own device); returns the
    summary written to `out/PREFIX-tokens.json` (`source`: the VQ folder, for the record). With a
    loaded `clip`, each record also holds its CLIP image and caption embeddings, and the summary
    the CLIP's identity ("clip": `CLIP.identity()` plus "folder": `clip_source` and
    "file_sha256": `CLIP.file_sha256`). The command
    `dalle-ar tokens` loads the VQ (and CLIP) from their folders and calls this."""
    if isinstance(vq, (str, Path)):
        raise TypeError(
            f"pretokenize takes a loaded VQ, got the path {str(vq)!r}: for a VQ folder use "
            "dalle_ar.cli.tokens.tokenize_shards (the `dalle-ar tokens` command)"
        )
    dev = next(vq.parameters()).device
    # the CLIP folder's weights file as the encoding starts (`CLIP.file_sha256`), for the record
    clip_file_sha256 = None if clip is None else clip.file_sha256
    size = image_size or vq.config.image_size
    grid = list(vq.grid_size(size))
    loader = make_loader(shards, size, batch_size, train=False, num_workers=num_workers)
    start = time.time()
    bar = tqdm(desc=f"pretokenize {prefix}", unit="batch", disable=None)
    records = token_records(vq, _counted(loader, bar), dev, clip)
    count = write_samples(records, out, prefix, shard_size)
    bar.close()
    clip_record = None
    if clip is not None:
        clip_record = {**clip.identity(), "folder": clip_source, "file_sha256": clip_file_sha256}
    summary = {
        "vq": source,
        # the VQ's content hash (`VQTokenizer.weights_sha256`): what a transformer trained on
        # these codes records; None for a VQ not loaded from a folder
        "vq_sha256": getattr(vq, "weights_sha256", None),
        "shards": shards,
        "prefix": prefix,
        "image_size": size,
        "grid": grid,
        "codebook_size": vq.codebook_size,
        "dtype": codes_dtype(vq.codebook_size).name,
        "records": count,
        "skipped": loader.report.to_dict(),
        "seconds": round(time.time() - start, 2),
        # the CLIP's identity, where it was read from and the content hash of that folder's
        # weights file (`CLIP.file_sha256`; None for a CLIP not loaded from a folder)
        "clip": clip_record,
    }
    path = Path(out) / f"{prefix}-tokens.json"
    path.write_text(json.dumps(summary, indent=2))
    return summary


def _counted(batches: Any, bar: tqdm) -> Iterator[dict[str, Any]]:
    for batch in batches:
        bar.update(1)
        yield batch
