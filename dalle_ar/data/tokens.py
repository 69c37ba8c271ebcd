"""Token shards: images already turned into VQ codes (written by tools/pretokenize.py).

A record is `KEY.codes.npy` (an (h, w) int16 or int32 array of code ids), `KEY.txt` (the
caption) and `KEY.json` (meta), so transformer training never reruns the image encoder.

`make_token_loader` yields {"codes": LongTensor (B, h, w), "caption", "meta", "key"} and behaves
like the image loader of `dalle_ar.data.shards` in everything else: the same shard split across
ranks and workers, the same shuffle buffer and seeds, the same bad-record rules (skip, count in a
`BadDataReport`, log once per pass) and the same pass bookkeeping (it reuses `shards.Loader`).
"""

from __future__ import annotations

import io
import json
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from dalle_ar.data.shards import (
    _REPORT,
    BadDataReport,
    Loader,
    _Batches,
    _rank_world,
    _raw_samples,
    read_caption,
)

CODES_EXT = "codes.npy"


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


def decode_token_sample(sample: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
    """Raw tar sample -> ({"codes": int64 (h, w), "caption", "meta", "key"}, None) or
    (None, reason) when the record must be skipped."""
    caption, reason = read_caption(sample)
    if reason:
        return None, reason
    raw = sample.get(CODES_EXT)
    if raw is None:
        return None, "missing_codes"
    try:
        codes = np.load(io.BytesIO(raw), allow_pickle=False)
    except (ValueError, OSError, EOFError):
        return None, "bad_codes"
    if codes.ndim != 2 or codes.dtype.kind not in "iu" or codes.size == 0 or codes.min() < 0:
        return None, "bad_codes"
    meta: dict[str, Any] = {}
    if "json" in sample:
        try:
            meta = json.loads(sample["json"].decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return None, "bad_meta"
    item = {"codes": codes.astype(np.int64), "caption": caption, "meta": meta}
    return item | {"key": sample["__key__"]}, None


def _collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "codes": torch.from_numpy(np.stack([it["codes"] for it in items])),  # (B, h, w)
        "caption": [it["caption"] for it in items],
        "meta": [it["meta"] for it in items],
        "key": [it["key"] for it in items],
    }


class _TokenBatches(_Batches):
    """`shards._Batches` with token records in place of images.

    The two methods below follow `_Batches.__iter__` / `_Batches._records` line for line and
    differ only in how a record is decoded and collated (`shards` has no hook for that);
    tests/test_pretokenize.py checks that both loaders give the same record order."""

    def __iter__(self) -> Iterator[dict[str, Any]]:
        rank, world = _rank_world()
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        slot, slots = rank * workers + worker, world * workers
        epochs = self.epochs if self.train else 1
        pending: list[dict[str, Any]] = []
        epoch = self.start_epoch
        while epochs is None or epoch < self.start_epoch + epochs:
            report = BadDataReport()
            rng = random.Random(f"{self.seed}-{epoch}-{slot}")
            for item in self._records(epoch, slot, slots, report, rng):
                pending.append(item)
                if len(pending) == self.batch:
                    yield _collate(pending)
                    pending = []
            if not self.train and pending:  # evaluation keeps the last partial batch
                yield _collate(pending)
                pending = []
            yield {_REPORT: report.to_dict(), "epoch": epoch, "slot": slot}
            epoch += 1

    def _records(
        self, epoch: int, slot: int, slots: int, report: BadDataReport, rng: random.Random
    ) -> Iterator[dict[str, Any]]:
        urls = list(self.urls)
        if self.train:
            random.Random(f"{self.seed}-{epoch}").shuffle(urls)
        by_shard = len(urls) >= slots
        mine = urls[slot::slots] if by_shard else urls
        buf: list[dict[str, Any]] = []
        grid: tuple[int, ...] | None = None  # every record of a batch must share one grid
        index = 0
        for url in mine:
            shard_report = BadDataReport()
            for sample in _raw_samples(url, shard_report):
                index += 1
                if not by_shard and (index - 1) % slots != slot:
                    continue
                item, reason = decode_token_sample(sample)
                if item is not None:
                    grid = grid or item["codes"].shape
                    if item["codes"].shape != grid:
                        item, reason = None, "codes_grid_mismatch"
                if item is None:
                    report.add(reason or "bad_codes", sample["__key__"])
                    continue
                if not self.train or self.buffer <= 1:
                    yield item
                    continue
                if len(buf) < self.buffer:
                    buf.append(item)
                    continue
                j = rng.randrange(len(buf))
                buf[j], item = item, buf[j]
                yield item
            if by_shard or urls.index(url) % slots == slot:
                report.merge(shard_report)
        rng.shuffle(buf)
        yield from buf


class TokenLoader(Loader):
    """Iterable of batches {"codes": (B, h, w) int64, "caption", "meta", "key"}; `report`
    accumulates the skipped records of every pass."""

    def __init__(
        self,
        urls: str | list[str],
        batch_size: int,
        *,
        train: bool,
        shuffle_buffer: int = 1000,
        num_workers: int = 0,
        seed: int = 0,
        epochs: int | None = None,
    ) -> None:
        # The image loader checks the arguments and the shard list; image_size is unused here.
        super().__init__(
            urls,
            1,
            batch_size,
            train=train,
            shuffle_buffer=shuffle_buffer,
            num_workers=num_workers,
            seed=seed,
            epochs=epochs,
        )
        self.dataset = _TokenBatches(
            self.urls, 1, batch_size, train, shuffle_buffer, seed, False, epochs
        )


def make_token_loader(
    urls: str | list[str],
    batch_size: int,
    *,
    train: bool,
    shuffle_buffer: int = 1000,
    num_workers: int = 0,
    seed: int = 0,
    epochs: int | None = None,
) -> TokenLoader:
    """Batches from token shards. train=True: shuffled, repeats (forever when epochs is None),
    full batches only. train=False: one deterministic pass, last partial batch kept."""
    return TokenLoader(
        urls,
        batch_size,
        train=train,
        shuffle_buffer=shuffle_buffer,
        num_workers=num_workers,
        seed=seed,
        epochs=epochs,
    )
