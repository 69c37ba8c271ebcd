"""Batches from webdataset shards for training and evaluation (records read by
`dalle_ar.data.shards`).

`make_loader` gives image batches; another record type (token shards, `dalle_ar.data.tokens`)
subclasses `_Batches`, overriding `decode` and `collate`, and runs through the same `Loader`: the
same shard split across ranks and workers, the same shuffle buffer and seeds, the same bad-record
rules. DataLoader workers cannot share memory, so each worker sends its `BadDataReport` (and how
many records it kept) through the batch stream as a marker item after each of its passes; the
loader merges them, logs each pass's report once, and ends an endless training loader after a
pass that kept no record at all (its consumer says why: `Loader.empty_pass`).
"""

from __future__ import annotations

import logging
import random
import sys
from collections.abc import Iterable, Iterator
from typing import Any, Literal

import numpy as np
import torch

from dalle_ar.config import DataConfig
from dalle_ar.data.shards import (
    BadDataReport,
    caption_chars,
    decode_sample,
    expand_urls,
    local_missing,
    raw_samples,
    report_key,
)

log = logging.getLogger(__name__)

_REPORT = "__report__"


def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    images = torch.from_numpy(np.stack([it["image"] for it in items]))  # (B, S, S, 3) uint8
    return {
        "image": images.permute(0, 3, 1, 2).float().div_(255.0),  # (B, 3, S, S)
        "caption": [it["caption"] for it in items],
        "meta": [it["meta"] for it in items],
        "key": [it["key"] for it in items],
    }


def _identity(x: Any) -> Any:
    return x


class _Batches(torch.utils.data.IterableDataset):
    """Batches for one process (or one DataLoader worker) plus a report marker after each pass.

    Shards are split across ranks x workers; with fewer shards than slots every slot reads every
    shard and keeps every n-th record instead, so no slot ever sits idle or repeats another.
    A loader for other record types overrides `decode` and `collate` only. With `text_len`,
    captions are cut to `caption_chars(text_len)` characters, and each cut one is logged once
    (per process or DataLoader worker: a fresh worker of a later pass logs it again)."""

    def __init__(
        self,
        urls: list[str],
        size: int,
        batch: int,
        train: bool,
        buffer: int,
        seed: int,
        random_crop: bool,
        epochs: int | None,
        text_len: int | None = None,
        captions: bool = True,
    ) -> None:
        super().__init__()
        self.urls, self.size, self.batch, self.train = urls, size, batch, train
        self.buffer, self.seed, self.random_crop, self.epochs = buffer, seed, random_crop, epochs
        self.captions = captions  # False: a record without a caption is kept (caption "")
        self.start_epoch = 0
        self.max_chars = None if text_len is None else caption_chars(text_len)
        self._cut_keys: set[str] = set()  # records whose caption was cut and logged

    def decode(
        self, sample: dict[str, Any], rng: random.Random | None
    ) -> tuple[dict[str, Any] | None, str | None]:
        """Raw record -> (item, None) or (None, reason); rng is set for random crops."""
        return decode_sample(sample, self.size, rng, self.max_chars, captions=self.captions)

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        return _collate(items)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        rank, world = _rank_world()
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        slot, slots = rank * workers + worker, world * workers
        epochs = self.epochs if self.train else 1
        pending: list[dict[str, Any]] = []
        epoch = self.start_epoch
        while epochs is None or epoch < self.start_epoch + epochs:
            report, kept = BadDataReport(), 0
            for item in self._records(epoch, slot, slots, report):
                kept += 1
                pending.append(item)
                if len(pending) == self.batch:
                    yield self.collate(pending)
                    pending = []
            if not self.train and pending:  # evaluation keeps the last partial batch
                yield self.collate(pending)
                pending = []
            yield {_REPORT: report.to_dict(), "epoch": epoch, "slot": slot, "records": kept}
            epoch += 1

    def _log_cut_caption(self, sample: dict[str, Any]) -> None:
        raw = sample.get("txt", b"")
        if self.max_chars is None or len(raw) <= self.max_chars:
            return  # never more characters than bytes
        # a kept record's caption decoded once already, unless captions are not read (then a
        # caption that is not UTF-8 is kept too, and counted here by its replaced characters)
        n = len(raw.decode("utf-8", errors="replace").strip())
        key = sample["__key__"]
        if n > self.max_chars and key not in self._cut_keys:
            self._cut_keys.add(key)
            log.warning("caption of %s (%s) has %d characters: cut to %d, as the model reads "
                        "no more", key, sample.get("__url__", "?"), n, self.max_chars)  # fmt: skip

    def _records(
        self, epoch: int, slot: int, slots: int, report: BadDataReport
    ) -> Iterator[dict[str, Any]]:
        rng = random.Random(f"{self.seed}-{epoch}-{slot}")
        urls = list(self.urls)
        if self.train:  # the same order in every slot (seeded by epoch only) before splitting
            random.Random(f"{self.seed}-{epoch}").shuffle(urls)
        by_shard = len(urls) >= slots
        crop_rng = rng if (self.train and self.random_crop) else None
        buf: list[dict[str, Any]] = []
        index = 0
        for i, url in enumerate(urls):
            if by_shard and i % slots != slot:
                continue
            shard_report = BadDataReport()
            for sample in raw_samples(url, shard_report):
                index += 1
                if not by_shard and (index - 1) % slots != slot:
                    continue
                item, reason = self.decode(sample, crop_rng)
                if item is None:
                    report.add(reason or "bad_record", report_key(sample, reason or ""))
                    continue
                self._log_cut_caption(sample)
                if not self.train or self.buffer <= 1:
                    yield item
                elif len(buf) < self.buffer:
                    buf.append(item)
                else:
                    j = rng.randrange(len(buf))
                    buf[j], item = item, buf[j]
                    yield item
            if i % slots == slot:  # shard-level errors are counted once, by the shard's owner
                report.merge(shard_report)
        rng.shuffle(buf)
        yield from buf


def checked_urls(
    urls: str | list[str],
    image_size: int,
    batch_size: int,
    shuffle_buffer: int,
    num_workers: int,
    epochs: int | None,
) -> list[str]:
    """The shard list of `urls` after checking a loader's arguments (every loader takes these)."""
    if image_size < 1 or batch_size < 1:
        raise ValueError(f"expected image_size, batch_size >= 1, got {image_size}, {batch_size}")
    if num_workers < 0 or shuffle_buffer < 0 or (epochs is not None and epochs < 1):
        raise ValueError(
            "expected num_workers >= 0, shuffle_buffer >= 0, epochs >= 1 or None, got "
            f"{num_workers}, {shuffle_buffer}, {epochs}"
        )
    shards = expand_urls(urls)
    if not shards:
        raise ValueError(f"expected shard files, found none at {urls!r}")
    missing = local_missing(shards)
    if missing:
        raise ValueError(f"expected existing shard files, missing: {', '.join(missing[:5])}")
    return shards


class Loader:
    """Iterable of the batches of `dataset` (see `make_loader`), read by `num_workers` DataLoader
    workers (0: in this process). `report` accumulates the skipped records of every pass; each
    pass's report is logged once, when the last worker has finished it."""

    def __init__(self, dataset: _Batches, num_workers: int = 0) -> None:
        self.dataset, self.urls = dataset, dataset.urls
        self.num_workers, self.train = num_workers, dataset.train
        self.report = BadDataReport()
        self._passes = 0
        # (pass, its report) of a training pass that kept no record; the iteration ended there
        self.empty_pass: tuple[int, BadDataReport] | None = None
        self._said_small = False  # a pass smaller than a batch: warned once

    def __iter__(self) -> Iterator[dict[str, Any]]:
        # a new iteration continues the epoch count, so a restarted train loader reshuffles
        self.dataset.start_epoch = self._passes if self.train else 0
        if self.num_workers == 0:
            stream: Iterable[dict[str, Any]] = iter(self.dataset)
        else:
            stream = torch.utils.data.DataLoader(
                self.dataset,
                batch_size=None,
                num_workers=self.num_workers,
                collate_fn=_identity,
                pin_memory=torch.cuda.is_available(),
                # the workers' base seed from a generator of its own: starting them draws nothing
                # from torch's global one, which a resumed run restores to the step it stopped at
                generator=torch.Generator().manual_seed(self.dataset.seed),
            )
        _, world = _rank_world()
        slots = max(1, self.num_workers)
        # a pass's (workers seen, records kept, the fewest one worker kept, its report)
        per_epoch: dict[int, tuple[int, int, int, BadDataReport]] = {}
        for item in stream:
            if _REPORT not in item:
                yield item
                continue
            epoch = int(item["epoch"])
            seen, kept, fewest, rep = per_epoch.pop(epoch, (0, 0, sys.maxsize, BadDataReport()))
            kept += int(item.get("records", 0))
            fewest = min(fewest, int(item.get("records", 0)))
            rep.merge(item[_REPORT])
            self.report.merge(item[_REPORT])
            if seen + 1 < slots:
                per_epoch[epoch] = (seen + 1, kept, fewest, rep)
                continue
            self._passes = max(self._passes, epoch + 1)
            rep.log_if_any(f"data pass {epoch}" + (f" (rank-local, {world} ranks)" * (world > 1)))
            if self.train and kept == 0:  # every later pass would yield nothing as well
                self.empty_pass = (epoch, rep)
                return
            # each worker batches its own records: one with fewer than a batch repeats them
            if self.train and fewest < self.dataset.batch and not self._said_small:
                self._said_small = True
                reader = " in one of its DataLoader workers" * (slots > 1)
                log.warning("a pass over the training shards keeps %d records%s%s, fewer than a "
                            "batch (data.batch_size=%d): its batches are filled from several "
                            "passes, a small data set's records repeated", fewest, reader,
                            " on this rank" * (world > 1),
                            self.dataset.batch)  # fmt: skip


def make_loader(
    urls: str,
    image_size: int,
    batch_size: int,
    *,
    train: bool,
    shuffle_buffer: int = 1000,
    num_workers: int = 0,
    seed: int = 0,
    random_crop: bool = False,
    epochs: int | None = None,
    text_len: int | None = None,
    captions: bool = True,
) -> Loader:
    """Batches {"image": (B,3,S,S) float in [0,1], "caption", "meta", "key"} from webdataset
    shards (a path, directory, brace glob or pipe: URL). `text_len`: the text positions of the
    model that reads the captions; each is cut to `shards.caption_chars(text_len)` characters.
    captions=False keeps records without a caption (caption ""), for models that read none.

    train=True: shuffled (shard order per epoch, then a `shuffle_buffer` of records), repeated
    forever when epochs is None, full batches only; a pass that keeps no record ends it
    (`Loader.empty_pass`). train=False: one deterministic pass, the last partial batch kept.
    Shards are split across DDP ranks and `num_workers` workers. ValueError for bad arguments
    and missing local shards."""
    shards = checked_urls(urls, image_size, batch_size, shuffle_buffer, num_workers, epochs)
    dataset = _Batches(
        shards,
        image_size,
        batch_size,
        train,
        shuffle_buffer,
        seed,
        random_crop,
        epochs,
        text_len,
        captions,
    )
    return Loader(dataset, num_workers)


def loader_from_config(
    cfg: DataConfig, split: Literal["train", "eval"], seed: int = 0, captions: bool = True
) -> Loader:
    """The loader a recipe uses for `cfg.train` or `cfg.eval` (random crops only in training;
    `captions` as in `make_loader`). ValueError for an empty split or what `make_loader`
    refuses."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    urls = cfg.train if split == "train" else cfg.eval
    if not urls:
        raise ValueError(f"data.{split} is empty: expected shard paths or URLs")
    train = split == "train"
    return make_loader(
        urls, cfg.image_size, cfg.batch_size, train=train, shuffle_buffer=cfg.shuffle_buffer,
        num_workers=cfg.num_workers, seed=seed, random_crop=cfg.random_crop and train,
        captions=captions,
    )  # fmt: skip
