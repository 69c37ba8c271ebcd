"""Pretokenizing image shards into token shards, and reading them back (dalle_ar.data.tokens)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from dalle_ar.checkpoint import file_sha256
from dalle_ar.cli.tokens import main as tokens_cli
from dalle_ar.cli.tokens import tokenize_shards
from dalle_ar.data.loader import make_loader
from dalle_ar.data.shapes import generate
from dalle_ar.data.shards import write_samples
from dalle_ar.data.tokens import codes_dtype, encode_codes, make_token_loader, pretokenize
from dalle_ar.models.vq import VQConfig, VQTokenizer

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def vq_dir(tmp_path_factory, shapes_shards) -> Path:
    """A tiny VQ whose codebook k-means saw one batch of the shapes (codes are then varied)."""
    torch.manual_seed(0)
    cfg = VQConfig(image_size=32, width=8, num_res_blocks=1, latent_dim=8, codebook_size=64)
    model = VQTokenizer(cfg).train()
    batch = next(iter(make_loader(shapes_shards.train, 32, 64, train=False)))
    with torch.no_grad():
        model(batch["image"])
    folder = tmp_path_factory.mktemp("vq") / "vq"
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tokens(tmp_path_factory, shapes_shards, vq_dir) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("tokens")
    summary = tokenize_shards(vq_dir, shapes_shards.train, out, "train", shard_size=64)
    return out, summary


def _members(tar_path: Path) -> list[str]:
    with tarfile.open(tar_path) as tf:
        return tf.getnames()


def test_pretokenize_writes_codes_captions_and_meta(tokens, shapes_shards, vq_dir) -> None:
    out, summary = tokens
    assert summary["records"] == shapes_shards.num_train
    assert summary["grid"] == [8, 8] and summary["codebook_size"] == 64
    assert summary["dtype"] == "int16" and sum(summary["skipped"]["counts"].values()) == 0
    assert json.loads((out / "train-tokens.json").read_text()) == summary
    shards = sorted(out.glob("train-*.tar"))
    assert len(shards) == 4
    names = _members(shards[0])
    assert names[:3] == ["000000000.codes.npy", "000000000.txt", "000000000.json"]
    with tarfile.open(shards[0]) as tf:
        arr = np.load(io.BytesIO(tf.extractfile(names[0]).read()), allow_pickle=False)
    assert arr.dtype == np.int16 and arr.shape == (8, 8)

    # Every record equals encoding the image loader's batch with the same VQ.
    vq = VQTokenizer.from_pretrained(vq_dir)
    images = make_loader(shapes_shards.train, 32, 256, train=False)
    tok = make_token_loader(str(out / "train-*.tar"), 256, train=False)
    (ib,), (tb,) = list(images), list(tok)
    assert tb["key"] == ib["key"] and tb["caption"] == ib["caption"] and tb["meta"] == ib["meta"]
    assert tb["codes"].dtype == torch.int64 and tb["codes"].shape == (256, 8, 8)
    assert torch.equal(tb["codes"], vq.encode(ib["image"]))
    assert tb["codes"].unique().numel() > 8  # the fixture VQ does not collapse to one code


def test_token_loader_splits_and_shuffles_like_the_image_loader(tokens, shapes_shards) -> None:
    out, _ = tokens
    kw = dict(train=True, shuffle_buffer=40, seed=3, epochs=2)
    image_keys = [k for b in make_loader(shapes_shards.train, 32, 16, **kw) for k in b["key"]]
    token_keys = [
        k for b in make_token_loader(str(out / "train-*.tar"), 16, **kw) for k in b["key"]
    ]
    assert len(token_keys) == 2 * shapes_shards.num_train
    assert token_keys == image_keys
    assert token_keys[: shapes_shards.num_train] != sorted(token_keys[: shapes_shards.num_train])


def _code_bytes(shape=(8, 8), value=1) -> bytes:
    return encode_codes(np.full(shape, value, np.int64), 64)


def test_token_loader_skips_and_reports_bad_records(tmp_path) -> None:
    good = [
        {"__key__": f"g{i}", "codes.npy": _code_bytes(value=i), "txt": f"cap {i}", "json": {}}
        for i in range(5)
    ]
    bad = [
        {"__key__": "garbage", "codes.npy": b"not an npy file", "txt": "x"},
        {"__key__": "nocodes", "txt": "a caption"},
        {"__key__": "nocaption", "codes.npy": _code_bytes()},
        {"__key__": "othergrid", "codes.npy": _code_bytes((4, 4)), "txt": "y"},
        {"__key__": "floats", "codes.npy": _npy(np.zeros((8, 8), np.float32)), "txt": "z"},
        {"__key__": "badjson", "codes.npy": _code_bytes(), "txt": "w", "json": b"{oops"},
    ]
    write_samples(good[:2] + bad + good[2:], tmp_path, "tok", 100)
    loader = make_token_loader(str(tmp_path / "tok-*.tar"), 4, train=False)
    batches = list(loader)
    keys = [k for b in batches for k in b["key"]]
    assert keys == ["g0", "g1", "g2", "g3", "g4"]
    assert batches[0]["codes"].shape == (4, 8, 8) and batches[1]["codes"].shape == (1, 8, 8)
    assert batches[0]["codes"][3].eq(3).all()
    assert loader.report.counts == {
        "bad_codes": 2,
        "missing_codes": 1,
        "missing_caption": 1,
        "codes_grid_mismatch": 1,
        "bad_meta": 1,
    }


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def test_pretokenize_skips_bad_images(tmp_path, vq_dir) -> None:
    recs = [
        {"__key__": f"s{i}", "png": img, "txt": cap, "json": spec}
        for i, (img, cap, spec) in enumerate(generate(3, seed=1))
    ]
    recs.insert(1, {"__key__": "broken", "png": b"\x89PNG not really", "txt": "a broken image"})
    write_samples(recs, tmp_path / "img", "x", 10)
    summary = tokenize_shards(vq_dir, str(tmp_path / "img"), tmp_path / "tok", "eval")
    assert summary["records"] == 3
    assert summary["skipped"]["counts"] == {"bad_image": 1}
    assert summary["skipped"]["keys"] == {"bad_image": ["broken"]}
    batch = next(iter(make_token_loader(str(tmp_path / "tok"), 8, train=False)))
    assert batch["key"] == ["s0", "s1", "s2"]


def test_cli(tmp_path, vq_dir, shapes_shards, capsys) -> None:
    argv = ["--vq", str(vq_dir), "--shards", shapes_shards.eval, "--out", str(tmp_path)]
    assert tokens_cli([*argv, "--prefix", "eval", "--batch-size", "16"]) == 0
    assert f"{shapes_shards.num_eval} records" in capsys.readouterr().out
    assert (tmp_path / "eval-000000.tar").is_file()
    bad = ["--vq", str(tmp_path / "nope"), "--shards", shapes_shards.eval, "--out", str(tmp_path)]
    assert tokens_cli(bad) == 2
    assert "config.json is missing" in capsys.readouterr().err
    with pytest.raises(TypeError, match="use dalle_ar.cli.tokens.tokenize_shards"):
        pretokenize(vq_dir, shapes_shards.eval, tmp_path / "y")
    with pytest.raises(ValueError, match="multiple of 4, got 30"):
        tokenize_shards(vq_dir, shapes_shards.eval, tmp_path / "x", image_size=30)


def test_codes_dtype_widens_for_large_codebooks() -> None:
    assert codes_dtype(16384) == np.int16 and codes_dtype(32768) == np.int16
    assert codes_dtype(32769) == np.int32
    big = np.load(io.BytesIO(encode_codes(np.full((2, 2), 40000), 65536)), allow_pickle=False)
    assert big.dtype == np.int32 and int(big[0, 0]) == 40000
    with pytest.raises(ValueError, match=r"shape \(h, w\), got \(4,\)"):
        encode_codes(np.zeros(4, np.int64), 64)


def test_token_shards_carry_clip_embeddings_computed_once(tmp_path, shapes_shards, vq_dir):
    from dalle_ar.models.clip import CLIP, CLIPSizes
    from dalle_ar.text import TokenizerConfig, train_tokenizer

    captions = [c for _, c, _ in generate(64, seed=0, split="train")]
    tok = train_tokenizer(captions, TokenizerConfig(vocab_size=300, text_len=32))
    sizes = CLIPSizes(image_size=16, patch_size=4, vision_width=32, vision_layers=1,
                      vision_heads=2, text_width=32, text_layers=1, text_heads=2,
                      embed_dim=16)  # fmt: skip
    clip = CLIP.build(sizes, tok)
    clip.save_pretrained(tmp_path / "clip")
    out = tmp_path / "tok"
    summary = tokenize_shards(vq_dir, shapes_shards.eval, out, "eval", clip_dir=tmp_path / "clip")
    assert summary["clip"]["weights_sha256"] == clip.identity()["weights_sha256"]
    # and the folder's weights file, which says without loading it that it still holds them
    assert summary["clip"]["file_sha256"] == file_sha256(tmp_path / "clip" / "model.safetensors")
    names = _members(sorted(out.glob("eval-*.tar"))[0])
    assert {"000000000.clip_img.npy", "000000000.clip_txt.npy"} <= set(names)
    batch = next(iter(make_token_loader(str(out / "eval-*.tar"), 8, train=False)))
    assert batch["clip_img"].shape == (8, 16) and batch["clip_img"].dtype == torch.float32
    assert torch.allclose(batch["clip_txt"].norm(dim=-1), torch.ones(8), atol=1e-5)
    with torch.no_grad():  # the stored embeddings are the CLIP's own
        want = clip.text_embeds(*clip.encode_text(batch["caption"], truncate=True))
    assert torch.allclose(batch["clip_txt"], want, atol=1e-5)
