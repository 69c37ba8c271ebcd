"""The batch loader over webdataset shards (dalle_ar.data.loader): deterministic evaluation
passes, seeded shuffling and repetition in training, the split across workers and ranks, config
loading, missing shards, and the decode/collate hooks other record types use."""

import json

import pytest
import torch

from dalle_ar.config import DataConfig
from dalle_ar.data import shards
from dalle_ar.data.loader import _Batches, loader_from_config, make_loader


def _keys(batches):
    return [k for batch in batches for k in batch["key"]]


def test_eval_loader_is_one_deterministic_pass_with_partial_batch(shapes_shards):
    loader = make_loader(shapes_shards.eval, 32, 24, train=False)
    batches = list(loader)
    assert [len(b["key"]) for b in batches] == [24, 24, 16]
    b = batches[0]
    assert b["image"].shape == (24, 3, 32, 32) and b["image"].dtype == torch.float32
    assert 0.0 <= float(b["image"].min()) and float(b["image"].max()) <= 1.0
    assert all(isinstance(c, str) and c for c in b["caption"])
    assert all("objects" in m for m in b["meta"])
    assert _keys(loader) == _keys(loader) == [f"{i:09d}" for i in range(64)]
    assert loader.report.total == 0


def test_train_loader_shuffles_repeats_and_is_seeded(shapes_shards):
    def first(seed):
        loader = make_loader(
            shapes_shards.train, 32, 32, train=True, seed=seed, shuffle_buffer=64, epochs=2
        )
        return _keys(loader)

    a, b, c = first(0), first(0), first(1)
    assert a == b and a != c
    assert len(a) == 512 and sorted(set(a)) == sorted(set(a[:256])) and len(set(a)) == 256
    assert a[:256] != sorted(a[:256])


def test_train_loader_repeats_forever_by_default(shapes_shards):
    loader = make_loader(shapes_shards.eval, 32, 50, train=True, shuffle_buffer=10)
    it = iter(loader)
    assert [len(next(it)["key"]) for _ in range(5)] == [50] * 5  # 250 > 64 records


def test_two_workers_cover_every_record_once(shapes_shards):
    loader = make_loader(shapes_shards.eval, 32, 10, train=False, num_workers=2)
    keys = _keys(loader)
    assert sorted(keys) == [f"{i:09d}" for i in range(64)]  # 1 shard < 2 workers: record split
    loader = make_loader(shapes_shards.train, 32, 10, train=False, num_workers=2)
    assert len(_keys(loader)) == 256 and len(set(_keys(loader))) == 256


def test_loader_from_config(shapes_shards):
    cfg = DataConfig(train=shapes_shards.train, eval=shapes_shards.eval, batch_size=16)
    assert len(_keys(loader_from_config(cfg, "eval"))) == 64
    assert len(next(iter(loader_from_config(cfg, "train", seed=1)))["key"]) == 16
    with pytest.raises(ValueError, match="data.eval"):
        loader_from_config(DataConfig(train=shapes_shards.train), "eval")


def test_missing_shards_raise_value_error(tmp_path):
    with pytest.raises(ValueError, match="missing"):
        make_loader(str(tmp_path / "nope-{0..1}.tar"), 32, 4, train=False)
    with pytest.raises(ValueError, match="none"):
        make_loader(str(tmp_path), 32, 4, train=False)


def _rank_keys(rank: int, world: int, port: int, fixture, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        found = {}
        for which in ("train", "eval"):  # 4 shards (split by shard), 1 (split by record)
            loader = make_loader(getattr(fixture, which), 32, 16, train=False)
            found[which] = [k for b in loader for k in b["key"]]
        with open(f"{out}/rank{rank}.json", "w") as f:
            json.dump(found, f)
    finally:
        dist.destroy_process_group()


def test_ranks_split_the_data_under_torch_distributed(shapes_shards, tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank_keys, args=(2, port, shapes_shards, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    for which, n in (("train", shapes_shards.num_train), ("eval", shapes_shards.num_eval)):
        k0, k1 = r0[which], r1[which]
        assert k0 and k1 and not set(k0) & set(k1)
        assert len(set(k0) | set(k1)) == n


def test_decode_and_collate_hooks_serve_other_record_types(shapes_shards):
    class CaptionLengths(_Batches):
        def decode(self, sample, rng):
            caption, reason = shards.read_caption(sample)
            return (None, reason) if reason else ({"n": len(caption)}, None)

        def collate(self, items):
            return {"n": [it["n"] for it in items]}

    loader = make_loader(shapes_shards.eval, 32, 16, train=False)
    loader.dataset = CaptionLengths(loader.urls, 32, 16, False, 0, 0, False, None)
    lengths = [n for batch in loader for n in batch["n"]]
    assert len(lengths) == 64 and min(lengths) > 5


def test_a_huge_caption_is_cut_to_what_the_model_reads_and_warned_once(tmp_path, caplog):
    import numpy as np

    from dalle_ar.data.shards import caption_chars, write_shards

    huge = "a red circle left of a blue square " * 30_000  # about 1 MB
    img = np.full((12, 12, 3), 90, np.uint8)
    write_shards([("big", img, huge, {}), ("small", img, "a blue square", {})], tmp_path, "c", 8)
    loader = make_loader(str(tmp_path), 12, 2, train=True, epochs=3, shuffle_buffer=0,
                         text_len=32)  # fmt: skip
    with caplog.at_level("WARNING", logger="dalle_ar.data.loader"):
        captions = [c for batch in loader for c in batch["caption"]]
    big = [c for c in captions if c != "a blue square"]
    assert len(big) == 3 and big[0] == huge[: caption_chars(32)].rstrip()
    warned = [r.getMessage() for r in caplog.records if "big" in r.getMessage()]
    assert len(warned) == 1 and f"cut to {caption_chars(32)}" in warned[0]  # once, not per pass


def test_a_pass_smaller_than_a_batch_is_warned_once_and_its_records_repeat(tmp_path, caplog):
    import numpy as np

    from dalle_ar.data.shards import write_shards

    pictures = [(f"k{i}", np.full((8, 8, 3), 40 * i, np.uint8), f"picture {i}", {})
                for i in range(3)]  # fmt: skip
    write_shards(pictures, tmp_path, "train", 8)
    loader = make_loader(str(tmp_path), 8, 4, train=True, epochs=8, shuffle_buffer=0)
    with caplog.at_level("WARNING", logger="dalle_ar.data.loader"):
        batches = [b["caption"] for b in loader]
    assert len(batches) == 6 and all(len(b) == 4 for b in batches)  # 24 records of 8 passes
    assert sorted(batches[0]) == ["picture 0", "picture 0", "picture 1", "picture 2"]
    warned = [r.getMessage() for r in caplog.records if "fewer than a batch" in r.getMessage()]
    assert warned == ["a pass over the training shards keeps 3 records, fewer than a batch "
                      "(data.batch_size=4): its batches are filled from several passes, a small "
                      "data set's records repeated"]  # fmt: skip
    # two workers with two records each: a pass of 4 covers a batch of 3, but each worker
    # batches its own records
    more = [(f"m{i}", np.full((8, 8, 3), 9 * i, np.uint8), f"more {i}", {}) for i in range(2)]
    write_shards(pictures[:2], tmp_path / "w", "a", 8)
    write_shards(more, tmp_path / "w", "b", 8)
    caplog.clear()
    loader = make_loader(str(tmp_path / "w"), 8, 3, train=True, epochs=3, shuffle_buffer=0,
                         num_workers=2)  # fmt: skip
    with caplog.at_level("WARNING", logger="dalle_ar.data.loader"):
        batches = [b["caption"] for b in loader]
    assert len(batches) == 4  # 12 records, 2 passes' worth in each worker's batches
    assert [r.getMessage() for r in caplog.records if "fewer than a batch" in r.getMessage()] == [
        "a pass over the training shards keeps 2 records in one of its DataLoader workers, fewer "
        "than a batch (data.batch_size=3): its batches are filled from several passes, a small "
        "data set's records repeated"
    ]
