import io
import json
import tarfile

import numpy as np
import pytest
import torch

from dalle_ar.config import DataConfig
from dalle_ar.data import shards


def _keys(loader):
    return [k for batch in loader for k in batch["key"]]


def test_fixture_info_and_expand_urls(shapes_shards):
    info = json.loads((shapes_shards.dir / "info.json").read_text())
    assert info["counts"] == {"train": 256, "eval": 64}
    assert info["train"] == shapes_shards.train
    urls = shards.expand_urls(shapes_shards.train)
    assert [u.rsplit("/", 1)[1] for u in urls] == [f"train-{i:06d}.tar" for i in range(4)]
    assert shards.expand_urls(str(shapes_shards.dir)) == sorted([*urls, shapes_shards.eval])
    assert shards.expand_urls("pipe:cat a.tar") == ["pipe:cat a.tar"]


def test_eval_loader_is_one_deterministic_pass_with_partial_batch(shapes_shards):
    loader = shards.make_loader(shapes_shards.eval, 32, 24, train=False)
    batches = list(loader)
    assert [len(b["key"]) for b in batches] == [24, 24, 16]
    b = batches[0]
    assert b["image"].shape == (24, 3, 32, 32) and b["image"].dtype == torch.float32
    assert 0.0 <= float(b["image"].min()) and float(b["image"].max()) <= 1.0
    assert all(isinstance(c, str) and c for c in b["caption"])
    assert all("objects" in m for m in b["meta"])
    assert _keys(loader) == _keys(loader) == [f"{i:09d}" for i in range(64)]
    assert loader.report.total == 0


def test_loader_images_match_the_written_pixels(shapes_shards):
    from dalle_ar.data.shapes import render

    batch = next(iter(shards.make_loader(shapes_shards.eval, 32, 4, train=False)))
    for img, meta in zip(batch["image"], batch["meta"]):
        expected = torch.from_numpy(render(meta, 32)).permute(2, 0, 1).float() / 255
        assert torch.equal(img, expected)


def test_train_loader_shuffles_repeats_and_is_seeded(shapes_shards):
    def first(seed):
        loader = shards.make_loader(
            shapes_shards.train, 32, 32, train=True, seed=seed, shuffle_buffer=64, epochs=2
        )
        return _keys(loader)

    a, b, c = first(0), first(0), first(1)
    assert a == b and a != c
    assert len(a) == 512 and sorted(set(a)) == sorted(set(a[:256])) and len(set(a)) == 256
    assert a[:256] != sorted(a[:256])


def test_train_loader_repeats_forever_by_default(shapes_shards):
    loader = shards.make_loader(shapes_shards.eval, 32, 50, train=True, shuffle_buffer=10)
    it = iter(loader)
    assert [len(next(it)["key"]) for _ in range(5)] == [50] * 5  # 250 > 64 records


def test_resize_and_crop_to_the_configured_size(shapes_shards):
    batch = next(iter(shards.make_loader(shapes_shards.eval, 16, 8, train=False)))
    assert batch["image"].shape == (8, 3, 16, 16)
    loader = shards.make_loader(shapes_shards.train, 24, 8, train=True, random_crop=True)
    assert next(iter(loader))["image"].shape == (8, 3, 24, 24)


def test_resize_crop_shorter_side_and_random_crop():
    import random

    from PIL import Image

    arr = np.zeros((40, 80, 3), np.uint8)
    arr[:, 40:] = 255  # right half white
    img = Image.fromarray(arr)
    centre = shards.resize_crop(img, 20)
    assert centre.shape == (20, 20, 3)
    assert centre[:, 0].mean() < 10 and centre[:, -1].mean() > 245  # centre crop straddles
    crops = {shards.resize_crop(img, 20, random.Random(s))[:, 10].mean() for s in range(8)}
    assert len(crops) > 1


def test_two_workers_cover_every_record_once(shapes_shards):
    loader = shards.make_loader(shapes_shards.eval, 32, 10, train=False, num_workers=2)
    keys = _keys(loader)
    assert sorted(keys) == [f"{i:09d}" for i in range(64)]  # 1 shard < 2 workers: record split
    loader = shards.make_loader(shapes_shards.train, 32, 10, train=False, num_workers=2)
    assert len(_keys(loader)) == 256 and len(set(_keys(loader))) == 256


def test_pipe_url_and_iter_captions(shapes_shards):
    loader = shards.make_loader(f"pipe:cat {shapes_shards.eval}", 32, 64, train=False)
    assert len(_keys(loader)) == 64
    caps = list(shards.iter_captions(shapes_shards.train))
    assert len(caps) == 256 and all(isinstance(c, str) and c for c in caps)


def test_loader_from_config(shapes_shards):
    cfg = DataConfig(train=shapes_shards.train, eval=shapes_shards.eval, batch_size=16)
    assert len(_keys(shards.loader_from_config(cfg, "eval"))) == 64
    assert len(next(iter(shards.loader_from_config(cfg, "train", seed=1)))["key"]) == 16
    with pytest.raises(ValueError, match="data.eval"):
        shards.loader_from_config(DataConfig(train=shapes_shards.train), "eval")


def test_missing_shards_raise_value_error(tmp_path):
    with pytest.raises(ValueError, match="missing"):
        shards.make_loader(str(tmp_path / "nope-{0..1}.tar"), 32, 4, train=False)
    with pytest.raises(ValueError, match="none"):
        shards.make_loader(str(tmp_path), 32, 4, train=False)


def test_write_samples_extra_fields_round_trip(tmp_path):
    codes = np.arange(16, dtype=np.int16).reshape(4, 4)
    buf = io.BytesIO()
    np.save(buf, codes)
    recs = [
        {"__key__": f"k{i}", "txt": f"cap {i}", "codes.npy": buf.getvalue(), "json": {"i": i}}
        for i in range(5)
    ]
    assert shards.write_samples(recs, tmp_path, "tok", 2) == 5
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["tok-000000.tar", "tok-000001.tar", "tok-000002.tar"]
    with tarfile.open(tmp_path / "tok-000000.tar") as tar:
        assert tar.getnames() == [
            "k0.txt",
            "k0.codes.npy",
            "k0.json",
            "k1.txt",
            "k1.codes.npy",
            "k1.json",
        ]
        got = np.load(io.BytesIO(tar.extractfile("k1.codes.npy").read()))
    assert np.array_equal(got, codes)


def test_write_samples_is_byte_deterministic(tmp_path):
    img = np.full((8, 8, 3), 7, np.uint8)
    for d in ("a", "b"):
        shards.write_shards([("x", img, "c", {"m": 1})], tmp_path / d, "s", 10)
    assert (tmp_path / "a/s-000000.tar").read_bytes() == (tmp_path / "b/s-000000.tar").read_bytes()


def test_write_samples_rejects_bad_keys(tmp_path):
    with pytest.raises(ValueError, match="__key__"):
        shards.write_samples([{"__key__": "a.b", "txt": "x"}], tmp_path, "s", 10)
    assert not list(tmp_path.glob("*.tar*"))
