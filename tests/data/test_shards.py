import io
import json
import os
import tarfile

import numpy as np
import pytest
import torch
from _img2dataset import write_img2dataset
from PIL import Image

from dalle_ar.data import shards
from dalle_ar.data.loader import make_loader


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


def test_loader_images_match_the_written_pixels(shapes_shards):
    from dalle_ar.data.shapes import render

    batch = next(iter(make_loader(shapes_shards.eval, 32, 4, train=False)))
    for img, meta in zip(batch["image"], batch["meta"]):
        expected = torch.from_numpy(render(meta, 32)).permute(2, 0, 1).float() / 255
        assert torch.equal(img, expected)


def test_resize_and_crop_to_the_configured_size(shapes_shards):
    batch = next(iter(make_loader(shapes_shards.eval, 16, 8, train=False)))
    assert batch["image"].shape == (8, 3, 16, 16)
    loader = make_loader(shapes_shards.train, 24, 8, train=True, random_crop=True)
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


def test_pipe_url_and_iter_captions(shapes_shards):
    loader = make_loader(f"pipe:cat {shapes_shards.eval}", 32, 64, train=False)
    assert len(_keys(loader)) == 64
    caps = list(shards.iter_captions(shapes_shards.train))
    assert len(caps) == 256 and all(isinstance(c, str) and c for c in caps)


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


# ----------------------------------------------------------------------------------------------
# Bad data: real broken tar files.


def _png(color: int = 90) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((12, 12, 3), color, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _tar(path, members):
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def _broken_records_tar(path):
    png = _png()
    return _tar(path, [
        ("good0.png", png), ("good0.txt", b"a grey square"),
        ("garbage.png", b"this is not a png at all"), ("garbage.txt", b"caption"),
        ("halfpng.png", png[: len(png) // 2]), ("halfpng.txt", b"caption"),
        ("nocap.png", png),
        ("emptycap.png", png), ("emptycap.txt", b"  \n"),
        ("badutf.png", png), ("badutf.txt", b"\xff\xfe bad"),
        ("noimage.txt", b"only a caption"),
        ("good1.png", png), ("good1.txt", b"another grey square"),
    ])  # fmt: skip


EXPECTED_BAD = {
    "bad_image": ["garbage", "halfpng"],
    "missing_caption": ["nocap"],
    "empty_caption": ["emptycap"],
    "bad_caption_encoding": ["badutf"],
    "missing_image": ["noimage"],
}


def _truncated_tar(path):
    """good2, good3 complete, then the tar is cut in the middle of cut4.png's data."""
    png = _png(200)
    full = _tar(path, [
        ("good2.png", png), ("good2.txt", b"light"),
        ("good3.png", png), ("good3.txt", b"light too"),
        ("cut4.png", png), ("cut4.txt", b"never read"),
    ])  # fmt: skip
    data = open(full, "rb").read()
    # headers are 512 bytes; two full records = 4 members, then cut4.png's header + part of it
    offset = 4 * 512 + sum(-(-len(d) // 512) * 512 for d in (png, b"light", png, b"light too"))
    with open(full, "wb") as f:
        f.write(data[: offset + 512 + len(png) // 2])
    return full


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_records_are_skipped_counted_and_reported_once(tmp_path, caplog, workers):
    a = _broken_records_tar(tmp_path / "bad-000000.tar")
    b = _truncated_tar(tmp_path / "bad-000001.tar")
    loader = make_loader(str(tmp_path), 12, 4, train=False, num_workers=workers)
    with caplog.at_level("WARNING", logger="dalle_ar.data.shards"):
        keys = sorted(_keys(loader))
    assert keys == ["good0", "good1", "good2", "good3"]
    rep = loader.report
    assert {r: sorted(k) for r, k in rep.keys.items() if r != "truncated_shard"} == EXPECTED_BAD
    assert rep.keys["truncated_shard"] == [f"{b}#cut4"]
    assert rep.counts == {**{r: len(k) for r, k in EXPECTED_BAD.items()}, "truncated_shard": 1}
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1
    assert "7 bad records" in warnings[0].getMessage() and "halfpng" in warnings[0].getMessage()
    assert a in shards.expand_urls(str(tmp_path))


def test_report_accumulates_over_passes_and_logs_each_pass(tmp_path, caplog):
    _broken_records_tar(tmp_path / "bad-000000.tar")
    loader = make_loader(str(tmp_path), 12, 4, train=True, epochs=2, shuffle_buffer=2)
    with caplog.at_level("WARNING", logger="dalle_ar.data.shards"):
        list(loader)
    assert loader.report.counts["bad_image"] == 4  # 2 per pass
    passes = [r for r in caplog.records if r.name == "dalle_ar.data.shards"]
    assert len(passes) == 2 and all(r.levelname == "WARNING" for r in passes)


@pytest.mark.parametrize("cut", [100, 700, 1500])
def test_truncated_tar_never_crashes(tmp_path, cut):
    path = _tar(tmp_path / "t.tar", [("k0.png", _png()), ("k0.txt", b"x"), ("k1.png", _png())])
    data = open(path, "rb").read()
    open(path, "wb").write(data[:cut])
    loader = make_loader(path, 12, 4, train=False)
    keys = _keys(loader)
    assert keys in ([], ["k0"])
    assert loader.report.total >= 1


def test_unreadable_shard_is_reported(tmp_path):
    bad = tmp_path / "junk.tar"
    bad.write_bytes(b"\x00\x01 not a tar file" * 10)
    loader = make_loader(str(bad), 12, 4, train=False)
    assert _keys(loader) == []
    assert loader.report.total == 1


def test_iter_captions_skips_and_counts_bad_captions(tmp_path):
    path = _broken_records_tar(tmp_path / "bad.tar")
    report = shards.BadDataReport()
    caps = list(shards.iter_captions(path, report))
    assert caps == ["a grey square", "caption", "caption", "only a caption", "another grey square"]
    assert report.counts == {"missing_caption": 1, "empty_caption": 1, "bad_caption_encoding": 1}


def test_report_round_trips_through_dict():
    r = shards.BadDataReport()
    r.add("bad_image", "k1")
    r.add("bad_image", "k2")
    s = shards.BadDataReport.from_dict(json.loads(json.dumps(r.to_dict())))
    s.merge(r)
    assert s.counts == {"bad_image": 4} and s.keys["bad_image"] == ["k1", "k2", "k1", "k2"]


# ----------------------------------------------------------------------------------------------
# The `dalle-ar data` command.


def _write_folder(src, n=12):
    from PIL import Image

    src.mkdir()
    (src / "sub").mkdir()
    for i in range(n):
        where = src / "sub" if i % 3 == 0 else src
        Image.fromarray(np.full((20, 30, 3), 10 * i, np.uint8)).save(where / f"img{i}.png")
        (where / f"img{i}.txt").write_text(f"picture number {i}\n")
    (src / "nocap.png").write_bytes(_png())
    (src / "broken.jpg").write_bytes(b"not a jpeg")
    (src / "broken.txt").write_text("a caption for a broken file")
    (src / "empty.png").write_bytes(_png())
    (src / "empty.txt").write_text("   ")


def test_data_folder_command(tmp_path, capsys):
    from dalle_ar.cli import main

    src, out = tmp_path / "src", tmp_path / "out"
    _write_folder(src)
    argv = ["data", "folder", str(src), "--out", str(out), "--eval-fraction", "0.3"]
    assert main([*argv, "--shard-size", "5"]) == 0
    info = json.loads((out / "info.json").read_text())
    assert info["counts"]["train"] + info["counts"]["eval"] == 12
    assert info["counts"]["eval"] >= 1
    assert info["skipped"]["counts"] == {"missing_caption": 1, "bad_image": 1, "empty_caption": 1}
    keys = _keys(make_loader(info["train"], 16, 4, train=False))
    assert len(keys) == info["counts"]["train"]
    caps = sorted(shards.iter_captions(str(out)))
    assert caps == sorted(f"picture number {i}" for i in range(12))
    # the split depends only on the file names and the seed
    assert main([*argv, "--out", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "info.json").read_text())
    assert again["counts"] == info["counts"]
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["kind"] == "folder"


def test_data_folder_resizes_only_down(tmp_path):
    from dalle_ar.data.build import main

    src = tmp_path / "src"
    _write_folder(src, n=3)
    assert main(["folder", str(src), "--out", str(tmp_path / "o"), "--size", "10"]) == 0
    with tarfile.open(tmp_path / "o" / "train-000000.tar") as tar:
        from PIL import Image

        png = tar.extractfile(next(n for n in tar.getnames() if n.endswith(".png"))).read()
    assert min(Image.open(io.BytesIO(png)).size) == 10


def test_data_shapes_command_and_bad_arguments(tmp_path):
    from dalle_ar.data.build import main

    out = tmp_path / "s"
    argv = ["shapes", "--out", str(out), "--num-train", "30", "--num-eval", "10"]
    assert main([*argv, "--shard-size", "8", "--size", "24"]) == 0
    info = json.loads((out / "info.json").read_text())
    assert info["train"].endswith("train-{000000..000003}.tar") and info["counts"]["eval"] == 10
    batch = next(iter(make_loader(info["eval"], 24, 10, train=False)))
    assert batch["image"].shape == (10, 3, 24, 24)
    # a smaller rebuild leaves no stale shards behind
    assert main([*argv[:3], "--num-train", "5", "--num-eval", "2"]) == 0
    assert sorted(p.name for p in out.glob("*.tar")) == ["eval-000000.tar", "train-000000.tar"]
    assert main(["shapes", "--out", str(out), "--shard-size", "0"]) == 2
    assert main(["shapes", "--out", str(out), "--num-train", "-5"]) == 2  # refused first:
    assert sorted(p.name for p in out.glob("*.tar")) == ["eval-000000.tar", "train-000000.tar"]
    assert main(["folder", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert main(["nothing"]) == 2


def test_data_emoji_command(tmp_path):
    from dalle_ar.data.build import main

    out = tmp_path / "e"
    assert main(["emoji", "--out", str(out), "--size", "16", "--shard-size", "1000"]) == 0
    info = json.loads((out / "info.json").read_text())
    assert info["counts"]["train"] + info["counts"]["eval"] >= 3000
    batch = next(iter(make_loader(info["eval"], 16, 8, train=False)))
    assert batch["image"].shape == (8, 3, 16, 16) and all(batch["caption"])
    assert {"code", "name", "base"} <= set(batch["meta"][0])


def test_jpeg_shards_of_wide_images_load_at_the_configured_size(tmp_path):
    rng = np.random.default_rng(0)
    imgs = [(rng.random((60, 180, 3)) * 255).astype(np.uint8) for _ in range(3)]
    samples = [(f"j{i}", im, f"wide {i}", {"i": i}) for i, im in enumerate(imgs)]
    assert shards.write_shards(samples, tmp_path, "jpg", 10, image_format="jpg") == 3
    batch = next(iter(make_loader(str(tmp_path), 32, 3, train=False)))
    assert batch["image"].shape == (3, 3, 32, 32) and batch["meta"][2] == {"i": 2}


# ----------------------------------------------------------------------------------------------
# Images as a viewer shows them: bit depth, orientation, transparency.


def _image_bytes(img, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_a_16_bit_grey_png_is_scaled_to_8_bits_not_clipped(tmp_path):
    from PIL import Image

    png = _image_bytes(Image.fromarray(np.full((12, 12), 40000, np.uint16)), "PNG")
    img, reason = shards.decode_image(png)
    assert reason is None and img.mode == "RGB"
    assert np.asarray(img).min() == np.asarray(img).max() == 156  # 40000 / 65535 * 255 = 155.6
    _tar(tmp_path / "g.tar", [("g.png", png), ("g.txt", b"grey")])
    batch = next(iter(make_loader(str(tmp_path / "g.tar"), 12, 1, train=False)))
    assert torch.allclose(batch["image"], torch.full((1, 3, 12, 12), 156 / 255))


def test_a_jpeg_is_turned_upright_by_its_exif_orientation():
    from PIL import Image

    arr = np.zeros((16, 32, 3), np.uint8)
    arr[:, 16:] = 255  # left half black, right half white, 32 wide
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to show"
    jpg = _image_bytes(Image.fromarray(arr), "JPEG", exif=exif.tobytes(), quality=95)
    img, reason = shards.decode_image(jpg)
    shown = np.asarray(img)
    assert reason is None and shown.shape == (32, 16, 3)  # portrait, as a viewer shows it
    assert shown[:12].mean() < 20 and shown[20:].mean() > 235  # the left half is now on top


@pytest.mark.parametrize("mode", ["LA", "P", "RGBA"])
def test_transparent_pixels_are_composited_on_the_background(mode):
    from PIL import Image

    img = Image.new("RGBA", (4, 4), (255, 0, 0, 0)).convert(mode)  # fully transparent red
    kw = {"transparency": 0} if mode == "P" else {}  # palette entry 0 is transparent
    img, reason = shards.decode_image(_image_bytes(img, "PNG", **kw))
    assert reason is None
    assert tuple(np.asarray(img)[0, 0]) == shards.BACKGROUND


def test_pixels_of_unknown_range_are_skipped_and_counted(tmp_path):
    from PIL import Image

    tif = _image_bytes(Image.fromarray(np.full((12, 12), 0.5, np.float32)), "TIFF")
    assert shards.decode_image(tif) == (None, "unsupported_image_mode")
    path = _tar(tmp_path / "f.tar", [("f.tif.png", tif), ("f.txt", b"x"),
                                     ("k.png", tif), ("k.txt", b"float pixels")])  # fmt: skip
    loader = make_loader(path, 12, 2, train=False)
    assert _keys(loader) == [] and loader.report.keys["unsupported_image_mode"] == ["k"]


def test_data_folder_shows_pictures_as_a_viewer_does(tmp_path):
    from PIL import Image

    from dalle_ar.data.build import main

    src = tmp_path / "src"
    src.mkdir()
    (src / "grey16.png").write_bytes(
        _image_bytes(Image.fromarray(np.full((20, 20), 40000, np.uint16)), "PNG")
    )
    (src / "grey16.txt").write_text("a 16-bit grey picture")
    (src / "float.tif").write_bytes(b"")  # not an image extension of the folder: ignored
    assert main(["folder", str(src), "--out", str(tmp_path / "o"), "--size", "10",
                 "--eval-fraction", "0"]) == 0  # fmt: skip
    with tarfile.open(tmp_path / "o" / "train-000000.tar") as tar:
        png = tar.extractfile("000000000.png").read()
    assert np.asarray(Image.open(io.BytesIO(png))).min() == 156


# ----------------------------------------------------------------------------------------------
# Keys and shard ends.


def test_a_key_with_dots_is_reported_as_such(tmp_path):
    import webdataset as wds

    path = _tar(tmp_path / "d.tar", [
        ("photo.v2.png", _png()), ("photo.v2.txt", b"a photo"),
        ("plain.png", _png()), ("plain.txt", b"a plain key"),
    ])  # fmt: skip
    # webdataset's own reader groups the dotted files under the key "photo" too
    found = [(s["__key__"], sorted(k for k in s if not k.startswith("__")))
             for s in wds.WebDataset(path, shardshuffle=False)]  # fmt: skip
    assert found == [("photo", ["v2.png", "v2.txt"]), ("plain", ["png", "txt"])]
    loader = make_loader(path, 12, 4, train=False)
    assert _keys(loader) == ["plain"]
    assert loader.report.counts == {"dotted_key": 1}
    assert loader.report.keys["dotted_key"] == ["photo (photo.v2.png, photo.v2.txt)"]
    report = shards.BadDataReport()
    assert list(shards.iter_captions(path, report)) == ["a plain key"]
    assert report.counts == {"dotted_key": 1}


def test_a_record_with_two_members_of_one_extension_is_skipped(tmp_path):
    path = _tar(tmp_path / "dup.tar", [
        ("a.png", _png()), ("a.txt", b"first"), ("a.txt", b"second"),
        ("b.png", _png()), ("b.txt", b"fine"),
    ])  # fmt: skip
    loader = make_loader(path, 12, 4, train=False)
    assert _keys(loader) == ["b"] and loader.report.keys == {"duplicate_member": ["a"]}


def test_a_record_whose_members_are_apart_is_reported_as_split(tmp_path):
    # `tar cf x.tar *.png *.txt`: every picture, then every caption
    path = _tar(tmp_path / "apart.tar", [
        ("a.png", _png()), ("b.png", _png()), ("c.png", _png()), ("c.txt", b"whole"),
        ("a.txt", b"first"), ("b.txt", b"second"),
    ])  # fmt: skip
    loader = make_loader(path, 12, 4, train=False)
    assert _keys(loader) == ["c"]
    assert loader.report.keys == {"missing_caption": ["a", "b"], "split_record": ["a", "b"]}


def _tiny_records_tar(path):
    """Three records of two tiny members each (a text and a JSON member)."""
    members = (("txt", "record {}"), ("json", "{{}}"))
    return _tar(path, [(f"r{i}.{ext}", text.format(i).encode()) for i in range(3)
                       for ext, text in members])  # fmt: skip


def test_a_shard_cut_at_a_member_boundary_is_reported(tmp_path):
    full = open(_tiny_records_tar(tmp_path / "full.tar"), "rb").read()
    path = tmp_path / "cut.tar"
    path.write_bytes(full[:3072])  # r0's two members, then r1.txt: `head -c 3072`
    report = shards.BadDataReport()
    assert [s["__key__"] for s in shards.raw_samples(str(path), report)] == ["r0"]
    assert report.keys == {"truncated_shard": [f"{path}#r1"]}


def test_a_shard_cut_anywhere_yields_whole_records_or_counts_them(tmp_path):
    src = _tiny_records_tar(tmp_path / "full.tar")
    with tarfile.open(src) as tar:
        first = {m.name.split(".")[0]: m.offset for m in tar if m.name.endswith(".txt")}
        end = tar.offset  # where the two end-of-archive blocks begin
    full = open(src, "rb").read()
    path = str(tmp_path / "cut.tar")
    for cut in range(end + 2 * 512 + 1):
        open(path, "wb").write(full[:cut])
        report = shards.BadDataReport()
        records = list(shards.raw_samples(path, report))
        for r in records:  # whole: both members, as written
            i = r["__key__"][1:]
            assert (r["txt"], r["json"]) == (f"record {i}".encode(), b"{}"), cut
        named = {k.rsplit("#", 1)[-1] for k in report.keys.get("truncated_shard", [])}
        for key, offset in first.items():  # every record whose header was read is accounted
            if offset + 512 <= cut:
                assert key in named or key in [r["__key__"] for r in records], cut
        if cut < end + 2 * 512:
            assert report.total == 1, cut  # the cut shard is reported, once
        else:
            assert report.total == 0 and len(records) == 3


def test_data_shards_command_splits_your_own_shards(tmp_path, capsys, caplog):
    from dalle_ar.cli import main as cli

    def main(argv: list[str]) -> int:  # through the `dalle-ar` command, as a user runs it
        return cli(["data", *argv])

    src, out = tmp_path / "img2dataset", tmp_path / "out"
    sound, skips = write_img2dataset(src)
    argv = ["shards", f"{src}/{{00000..00001}}.tar", "--out", str(out), "--size", "16"]
    assert main([*argv, "--eval-fraction", "0.3", "--shard-size", "4"]) == 0
    info = json.loads((out / "info.json").read_text())
    assert info["kind"] == "shards" and info["counts"]["train"] + info["counts"]["eval"] == sound
    assert info["counts"]["eval"] >= 1 and info["counts"]["train"] >= 1
    assert info["skipped"]["counts"] == dict(skips)
    assert "00000.tar#000000003" in info["skipped"]["keys"]["bad_image"]  # the source's name

    def split_keys(info: dict) -> dict[str, set[str]]:
        return {split: {json.loads(r["json"])["key"] for url in shards.expand_urls(info[split])
                        for r in shards.raw_samples(url, shards.BadDataReport())}
                for split in ("train", "eval")}  # fmt: skip

    keys = split_keys(info)
    assert len(keys["train"] | keys["eval"]) == sound
    records = [r for url in shards.expand_urls(info["train"])
               for r in shards.raw_samples(url, shards.BadDataReport())]  # fmt: skip
    from PIL import Image

    assert {min(Image.open(io.BytesIO(r["png"])).size) for r in records} == {16}
    assert all(json.loads(r["json"])["source"].endswith("#" + json.loads(r["json"])["key"])
               for r in records)  # fmt: skip
    assert sorted(shards.iter_captions(str(out))) == sorted(
        f"photo {k}" for k in keys["train"] | keys["eval"]
    )
    # the split follows each record's shard and key, not the order the shards are read in
    again = tmp_path / "again"
    backwards = ["shards", f"{src}/00001.tar::{src}/00000.tar", "--out", str(again)]
    assert main([*backwards, "--size", "16", "--eval-fraction", "0.3"]) == 0
    assert split_keys(json.loads((again / "info.json").read_text())) == keys
    capsys.readouterr()
    assert main(["shards", str(tmp_path / "none.tar"), "--out", str(out)]) == 2
    assert "expected shards" in capsys.readouterr().err
    assert (out / "train-000000.tar").is_file()  # a source that is not there removes nothing
    assert (out / "eval-000000.tar").is_file() and (out / "info.json").is_file()
    assert main([*argv, "--eval-fraction", "1"]) == 2
    assert "--eval-fraction must be in [0, 1)" in capsys.readouterr().err
    assert main([*argv, "--size", "0"]) == 2
    assert capsys.readouterr().err.endswith("expected --size >= 8 (pixels), got 0\n")
    # several sources read in turn, and a warning where the evaluation split is too small
    both = tmp_path / "both"
    assert main(["shards", str(src / "00000.tar"), str(src / "00001.tar"), "--out", str(both),
                 "--size", "16"]) == 0  # fmt: skip
    counts = json.loads((both / "info.json").read_text())["counts"]
    assert counts["train"] + counts["eval"] == sound
    assert counts["eval"] < 5  # the default share of 16 sound records
    assert f"{counts['eval']} evaluation records: the main job's evaluation needs >= 5" in (
        caplog.text)  # fmt: skip


def test_every_data_kind_is_a_command():
    from dalle_ar.cli import COMMANDS
    from dalle_ar.data.build import KINDS

    assert {f"data {kind}" for kind in KINDS} == {c for c in COMMANDS if c.startswith("data ")}


def test_a_command_group_lists_its_commands_on_help_and_when_left_unnamed(capsys):
    from dalle_ar.cli import main as cli

    assert cli(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert "dalle-ar train clip" in out and "dalle-ar data" not in out
    assert cli(["data"]) == 2
    out = capsys.readouterr().out
    assert out.startswith("dalle-ar data: expected one of shapes | emoji | folder | shards")
    assert "dalle-ar data shards" in out and "dalle-ar train" not in out
    assert cli(["--version"]) == 0 and capsys.readouterr().out.startswith("dalle-ar 0.")


def test_shard_writer_drops_the_shard_an_exception_cut_and_keeps_the_full_ones(tmp_path):
    with pytest.raises(RuntimeError), shards.ShardWriter(tmp_path, "train", 2) as writer:
        for i in range(5):
            writer.add({"__key__": f"k{i}", "txt": f"caption {i}"})
            if i == 2:
                # a record that cannot be encoded is refused whole: nothing of it is written
                with pytest.raises(ValueError):
                    writer.add({"__key__": "bad", "txt": "kept?", "bin": object()})
        raise RuntimeError("killed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train-000000.tar", "train-000001.tar"]
    keys = [s["__key__"] for s in shards.raw_samples(str(tmp_path / "train-000001.tar"),
                                                     shards.BadDataReport())]  # fmt: skip
    assert keys == ["k2", "k3"]


def test_json_that_is_not_an_object_is_bad_meta():
    assert shards.read_meta({"json": b"[1, 2]"}) == (None, "bad_meta")
    assert shards.read_meta({"json": b'{"a": 1}'}) == ({"a": 1}, None)


def test_names_that_are_not_utf8_are_split_and_kept_as_escapes(tmp_path):
    """A member or file name in another encoding (tarfile and os give its bytes as surrogate
    escapes) goes to a split like any other, its JSON "source" written with backslash escapes."""
    from dalle_ar.data.build import build, options

    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    png = io.BytesIO()
    Image.new("RGB", (24, 24), (200, 30, 30)).save(png, "PNG")
    with tarfile.open(src / "00000.tar", "w", format=tarfile.GNU_FORMAT, encoding="latin-1") as t:
        for key in ("a0001", "caf\xe9", "a0002"):
            for ext, data in (("png", png.getvalue()), ("txt", b"a red square")):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
    info = build("shards", out, options("shards", src=str(src), out=out, eval_fraction=0.0))
    assert info["counts"] == {"train": 3, "eval": 0}
    sources = [
        json.loads(r["json"])["source"]
        for r in shards.raw_samples(str(out / "train-000000.tar"), shards.BadDataReport())
    ]
    assert sources[1].endswith("#caf\\xe9")  # fmt: skip
    folder = tmp_path / "pictures"
    folder.mkdir()
    name = os.fsdecode(b"caf\xe9")  # a Latin-1 file name on a UTF-8 system
    (folder / f"{name}.png").write_bytes(png.getvalue())
    (folder / f"{name}.txt").write_text("a red square")
    info = build("folder", tmp_path / "out2", options("folder", src=folder, out=tmp_path / "out2",
                                                        eval_fraction=0.0))  # fmt: skip
    assert info["counts"] == {"train": 1, "eval": 0}


def test_a_split_that_leaves_nothing_to_train_on_names_the_eval_fraction(tmp_path):
    from dalle_ar.data.build import SplitError, build, options

    src = tmp_path / "src"
    write_img2dataset(src, n=2)  # two sound records
    args = options("shards", src=str(src), out=tmp_path / "out", eval_fraction=0.999999)
    with pytest.raises(SplitError, match=r"--eval-fraction 0.999999 sent all 4 usable records"):
        build("shards", tmp_path / "out", args)
    broken = tmp_path / "broken.tar"
    with tarfile.open(broken, "w") as t:  # an empty caption
        info = tarfile.TarInfo("k1.txt")
        t.addfile(info)
    with pytest.raises(ValueError, match="no usable records .*empty_caption: 1"):
        build("shards", tmp_path / "out2", options("shards", src=str(broken), out=tmp_path))


def test_a_rebuild_removes_the_unfinished_shard_a_killed_build_left(tmp_path):
    from dalle_ar.data.build import build, options

    src, out = tmp_path / "src", tmp_path / "out"
    write_img2dataset(src, n=2)
    out.mkdir()
    (out / "train-000003.tar.tmp").write_bytes(b"cut")
    build("shards", out, options("shards", src=str(src), out=out, eval_fraction=0.0))
    assert not (out / "train-000003.tar.tmp").exists()


def test_a_folder_of_shards_given_as_pictures_points_to_the_shards_kind(tmp_path):
    from dalle_ar.data.build import build, check_source, options

    write_img2dataset(tmp_path / "src", n=2)
    with pytest.raises(ValueError, match="it holds .tar files: for shards, the shards kind"):
        build("folder", tmp_path / "out", options("folder", src=tmp_path / "src",
                                                  out=tmp_path / "out"))  # fmt: skip
    with pytest.raises(ValueError, match="not found$"):  # no hint about shards there
        check_source("folder", tmp_path / "none")
