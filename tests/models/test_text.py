"""Tests for dalle_ar.text (BPE tokenizer) and the `dalle-ar train tokenizer` recipe."""

from __future__ import annotations

import io
import json
import logging
import tarfile
from pathlib import Path

import pytest
import torch

from dalle_ar.config import ConfigError, load_config
from dalle_ar.text import TextTokenizer, TokenizerConfig, train_tokenizer

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny" / "tokenizer.yaml"

COLOURS = ["red", "green", "blue", "yellow", "purple"]
SHAPES = ["circle", "square", "triangle"]
CAPTIONS = [
    f"a {c} {s} {rel} a {c2} {s2}"
    for c in COLOURS
    for s in SHAPES
    for rel, c2, s2 in (("left of", "blue", "square"), ("above", "red", "circle"))
]


@pytest.fixture(scope="module")
def tok() -> TextTokenizer:
    return train_tokenizer(CAPTIONS, TokenizerConfig(vocab_size=320, min_frequency=1, text_len=16))


def _wide(tok: TextTokenizer) -> TextTokenizer:
    """The same tokenizer with room for 62 content tokens."""
    return TextTokenizer(tok.hf, TokenizerConfig(vocab_size=320, text_len=64))


# -- encode / decode ----------------------------------------------------------------------------


def test_round_trip_ordinary_text(tok: TextTokenizer) -> None:
    texts = ["a red circle left of a blue square", "A Purple  Triangle, above!", "zebra 42"]
    assert tok.decode(tok.encode(texts).ids) == [tok.normalize(t) for t in texts]
    assert tok.normalize("A Purple  Triangle, above!") == "a purple  triangle, above!"


def test_nfkc_and_lowercase_applied(tok: TextTokenizer) -> None:
    # Full-width letters and the "fi" ligature fold to plain lower-case ASCII under NFKC.
    assert tok.decode(tok.encode("ＲＥＤ ﬁsh").ids) == ["red fish"]
    assert torch.equal(tok.encode("ＲＥＤ").ids, tok.encode("red").ids)


def test_padding_and_mask_layout(tok: TextTokenizer) -> None:
    batch = tok.encode(["a red circle", "a blue square left of a red circle"])
    assert batch.ids.shape == (2, 16) and batch.ids.dtype == torch.long
    assert batch.mask.shape == (2, 16) and batch.mask.dtype == torch.bool
    for row, mask in zip(batch.ids, batch.mask):
        n = int(mask.sum())
        assert mask[:n].all() and not mask[n:].any()  # real tokens first, then padding
        assert row[0] == tok.bos_id and row[n - 1] == tok.eos_id
        assert (row[n:] == tok.pad_id).all()
        body = row[1 : n - 1]
        assert not any(int(i) in (tok.pad_id, tok.bos_id, tok.eos_id) for i in body)
    assert batch.mask[0].sum() < batch.mask[1].sum()


def test_empty_caption(tok: TextTokenizer) -> None:
    batch = tok.encode("")
    want = [tok.bos_id, tok.eos_id] + [tok.pad_id] * 14
    assert batch.ids.tolist() == [want]
    assert batch.mask.tolist() == [[True, True] + [False] * 14]
    assert tok.decode(batch.ids) == [""]


def test_truncation_counted_and_warned(caplog: pytest.LogCaptureFixture) -> None:
    tok = train_tokenizer(CAPTIONS, TokenizerConfig(vocab_size=300, min_frequency=1, text_len=6))
    long = "a red circle left of a blue square above a green triangle"
    with caplog.at_level(logging.WARNING, logger="dalle_ar.text"):
        batch = tok.encode([long, "a", long])
    assert tok.num_truncated == 2
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "truncated 2 of 3" in warnings[0].getMessage()
    for row in (batch.ids[0], batch.ids[2]):
        assert row[0] == tok.bos_id and row[-1] == tok.eos_id
    assert batch.mask[0].all()
    assert long.startswith(tok.decode(batch.ids[:1])[0])  # the head survives, the tail goes
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dalle_ar.text"):
        tok.encode("a")  # fits: no warning
        for _ in range(7):  # one at a time, as a training run's batches: said at 4 and 8
            tok.encode(long)
    assert tok.num_truncated == 9
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(said) == 2 and "; 4 so far" in said[0] and "; 8 so far" in said[1]
    assert "text_len=6 (4 tokens between BOS and EOS" in said[0]


@pytest.mark.parametrize(
    "text",
    [
        "😀🐍 party",
        "👩\u200d👩\u200d👧 family",
        "👍🏽",
        "中文字幕 红色圆形",
        "日本語のテキスト",
        "🇯🇵",
    ],
)
def test_emoji_and_cjk_round_trip_exactly(tok: TextTokenizer, text: str) -> None:
    tok = _wide(tok)
    assert tok.normalize(text) == text  # NFKC and lower-casing leave these unchanged
    assert tok.decode(tok.encode(text).ids) == [text]


def test_control_characters_encode(tok: TextTokenizer) -> None:
    texts = ["tab\there", "line\nbreak", "nul\x00byte", "\x1b[31mesc", "\u200b\ufeff", "\x7f"]
    batch = tok.encode(texts)
    assert batch.ids.shape == (len(texts), 16)
    assert tok.decode(batch.ids) == [tok.normalize(t) for t in texts]


def test_special_token_text_is_plain_text(tok: TextTokenizer) -> None:
    tok = _wide(tok)
    batch = tok.encode("a <eos> <pad> b")
    n = int(batch.mask.sum())
    body = batch.ids[0, 1 : n - 1].tolist()
    assert not {tok.pad_id, tok.bos_id, tok.eos_id} & set(body)
    assert tok.decode(batch.ids) == ["a <eos> <pad> b"]


def test_decode_accepts_lists_and_one_row(tok: TextTokenizer) -> None:
    ids = tok.encode(["a red circle", "a blue square"]).ids
    want = ["a red circle", "a blue square"]
    assert tok.decode(ids.tolist()) == want
    assert tok.decode(ids[1]) == want[1:] and tok.decode(ids[1].tolist()) == want[1:]
    assert tok.decode(ids.numpy()) == want


def test_bad_inputs_raise_value_error(tok: TextTokenizer) -> None:
    with pytest.raises(ValueError, match="list of str"):
        tok.encode(123)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="all be str"):
        tok.encode(["ok", None])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="ids must be in"):
        tok.decode(torch.tensor([[1, tok.vocab_size]]))
    with pytest.raises(ValueError, match="integer tensor"):
        tok.decode(torch.zeros(2, 3))


def test_specials_and_vocab(tok: TextTokenizer) -> None:
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert 256 + 3 < tok.vocab_size <= 320
    assert tok.text_len == 16


def test_training_is_deterministic() -> None:
    cfg = TokenizerConfig(vocab_size=300, min_frequency=1, text_len=16)
    a, b = train_tokenizer(CAPTIONS, cfg), train_tokenizer(CAPTIONS, cfg)
    assert a.backend.get_vocab() == b.backend.get_vocab()
    assert torch.equal(a.encode(CAPTIONS).ids, b.encode(CAPTIONS).ids)


# -- save / load --------------------------------------------------------------------------------


def test_save_load_round_trip(tok: TextTokenizer, tmp_path: Path) -> None:
    tok.save_pretrained(tmp_path / "tok")
    assert {"tokenizer.json", "tokenizer_config.json", "config.json"} <= {
        p.name for p in (tmp_path / "tok").iterdir()
    }
    back = TextTokenizer.from_pretrained(tmp_path / "tok")
    texts = CAPTIONS[:5] + ["Ünïcödé 中文 😀", ""]
    assert torch.equal(back.encode(texts).ids, tok.encode(texts).ids)
    assert (back.vocab_size, back.text_len, back.pad_id) == (tok.vocab_size, 16, tok.pad_id)
    longer = TextTokenizer.from_pretrained(tmp_path / "tok", text_len=40)
    assert longer.encode("a red circle").ids.shape == (1, 40)
    with pytest.raises(ValueError, match="text_len"):
        TextTokenizer.from_pretrained(tmp_path / "tok", text_len=1)


def test_normalization_settings_survive_save(tmp_path: Path) -> None:
    cfg = TokenizerConfig(vocab_size=300, min_frequency=1, lowercase=False, normalization="none")
    tok = train_tokenizer(CAPTIONS, cfg)
    tok.save_pretrained(tmp_path / "cased")
    back = TextTokenizer.from_pretrained(tmp_path / "cased")
    assert back.cfg.lowercase is False and back.cfg.normalization == "none"
    assert back.decode(back.encode("A Red ＣＩＲＣＬＥ").ids) == ["A Red ＣＩＲＣＬＥ"]


def test_load_refuses_other_component(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"component": "vq", "config": {}}))
    with pytest.raises(ValueError, match="expected 'text_tokenizer'"):
        TextTokenizer.from_pretrained(tmp_path)


def test_config_validation() -> None:
    for bad, key in (({"vocab_size": 100}, "vocab_size"), ({"text_len": 1}, "text_len")):
        with pytest.raises(ConfigError, match=key):
            TokenizerConfig(**bad).validate()
    with pytest.raises(ConfigError, match="min_frequency"):
        train_tokenizer(CAPTIONS, TokenizerConfig(min_frequency=0))


# -- recipe -------------------------------------------------------------------------------------


def test_recipe_config_from_file_and_overrides() -> None:
    from dalle_ar.train.tokenizer import TokenizerRecipeConfig

    cfg = load_config(TokenizerRecipeConfig, TINY, ["data.train=x.tar", "tokenizer.text_len=24"])
    assert cfg.tokenizer.text_len == 24 and cfg.tokenizer.vocab_size == 300
    assert cfg.data.train == "x.tar" and cfg.run.wandb == "disabled"
    with pytest.raises(ConfigError, match="'tokenizer.normalization'"):
        load_config(
            TokenizerRecipeConfig, TINY, ["data.train=x.tar", "tokenizer.normalization=nfd"]
        )
    with pytest.raises(ConfigError, match="'data.train'"):
        load_config(TokenizerRecipeConfig, TINY)


def _write_shard(path: Path, captions: list[str]) -> None:
    from PIL import Image

    with tarfile.open(path, "w") as tar:
        for i, cap in enumerate(captions):
            key = f"{i:06d}"
            buf = io.BytesIO()
            Image.new("RGB", (8, 8), (i * 7 % 256, 0, 0)).save(buf, format="PNG")
            meta = json.dumps({"caption": cap, "key": key}).encode()
            for name, data in (("png", buf.getvalue()), ("txt", cap.encode()), ("json", meta)):
                info = tarfile.TarInfo(f"{key}.{name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_recipe_end_to_end(tmp_path: Path) -> None:
    pytest.importorskip("dalle_ar.data.shards", reason="data stage (iter_captions) not present")
    from dalle_ar.cli import main

    captions = CAPTIONS + ["😀 emoji", "中文 caption " * 8]
    _write_shard(tmp_path / "shard-000000.tar", captions)
    out = tmp_path / "run"
    args = ["train", "tokenizer", "--config", str(TINY)]
    code = main(args + [f"data.train={tmp_path / 'shard-000000.tar'}", f"run.out_dir={out}"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    tok = TextTokenizer.from_pretrained(out / "tokenizer")
    from dalle_ar.data.shards import iter_captions

    read = list(iter_captions(str(tmp_path / "shard-000000.tar")))
    assert len(read) == len(captions)
    lengths = tok.tokenize_lengths(read)
    assert metrics["captions"] == len(captions)
    assert metrics["vocab_size"] == tok.vocab_size and metrics["text_len"] == 16
    assert metrics["mean_ids_per_caption"] == pytest.approx(sum(lengths) / len(lengths))
    assert metrics["max_ids_per_caption"] == max(lengths)
    assert metrics["truncated"] == sum(n > 14 for n in lengths) >= 1
    assert (out / "config.yaml").is_file()
    assert tok.decode(tok.encode(captions[:3]).ids) == captions[:3]


def test_recipe_on_shapes_shards(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    try:
        shards = request.getfixturevalue("shapes_shards")
    except pytest.FixtureLookupError:
        pytest.skip("the shapes_shards fixture (tests/conftest.py) is not present")
    from dalle_ar.cli import main

    out = tmp_path / "run"
    argv = ["train", "tokenizer", "--config", str(TINY), f"data.train={shards.train}"]
    sizes = ["tokenizer.vocab_size=1000", "tokenizer.text_len=32"]
    assert main([*argv, f"run.out_dir={out}", *sizes]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["captions"] == shards.num_train
    # Word-level merges fit every shapes caption in 30 content tokens (text_len 32).
    assert metrics["truncated"] == 0 and 3 <= metrics["mean_ids_per_caption"] <= 16
    tok = TextTokenizer.from_pretrained(out / "tokenizer")
    assert tok.text_len == 32 and 300 < tok.vocab_size == metrics["vocab_size"] <= 1000


def test_recipe_bad_config_fails_before_work(tmp_path: Path, capsys) -> None:
    from dalle_ar.cli import main

    out = tmp_path / "run"
    assert main(["train", "tokenizer", "--config", str(TINY), "data.train=x.tar",
                 f"run.out_dir={out}", "tokenizer.vocab_size=10"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert err.startswith("dalle-ar train tokenizer: config key 'tokenizer.vocab_size'")
    assert len(err.splitlines()) == 1 and not out.exists()


def test_recipe_on_empty_captions_is_one_line_and_exit_2(tmp_path: Path, capsys) -> None:
    from dalle_ar.cli import main
    from dalle_ar.data.shards import write_samples

    write_samples([{"__key__": f"r{i}", "txt": " " * i} for i in range(4)], tmp_path, "train", 4)
    shard = tmp_path / "train-000000.tar"
    argv = ["train", "tokenizer", "--config", str(TINY), f"data.train={shard}",
            f"run.out_dir={tmp_path / 'run'}", "run.wandb=disabled"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == f"dalle-ar train tokenizer: no captions found in data.train='{shard}'\n"


def test_training_alphabet_is_recorded_and_survives_save(tmp_path: Path) -> None:
    # "-" occurs once, so no merge holds it; it was still seen in training.
    captions = ["Top-left: a red circle", "a red circle", "a blue square"] * 3
    tok = train_tokenizer(captions, TokenizerConfig(vocab_size=300, min_frequency=2))
    assert {"-", ":", "t", " "} <= tok.alphabet  # normalized (lower-cased) characters
    assert "T" not in tok.alphabet and "😀" not in tok.alphabet
    tok.save_pretrained(tmp_path / "tok")
    assert TextTokenizer.from_pretrained(tmp_path / "tok").alphabet == tok.alphabet


def test_training_words_are_recorded_survive_save_and_name_unseen_ones(tmp_path: Path) -> None:
    captions = ["Top-left: a red circle", "a red circle", "a blue square"] * 3
    cfg = TokenizerConfig(vocab_size=300, min_frequency=2, text_len=64)  # no prompt cut here
    tok = train_tokenizer(captions, cfg)
    assert tok.words == {"top", "left", "a", "red", "circle", "blue", "square"}  # normalized
    assert tok.unseen_words("A tiny CRIMSON circle, top left; a tiny one") == ["tiny", "crimson",
                                                                               "one"]  # fmt: skip
    assert tok.unseen_words("a smal red circel") == ["smal", "circel"]  # typos too
    assert tok.unseen_words("") == [] and tok.unseen_words("a red circle") == []
    tok.save_pretrained(tmp_path / "tok")
    again = TextTokenizer.from_pretrained(tmp_path / "tok")
    assert again.words == tok.words and again.with_text_len(8).words == tok.words
    (tmp_path / "tok" / "words.json").unlink()  # a folder saved before words were recorded
    old = TextTokenizer.from_pretrained(tmp_path / "tok")
    assert old.words is None and old.unseen_words("a crimson ball") is None


def test_unseen_words_are_those_the_model_reads_and_a_cut_prompt_is_warned_once(caplog) -> None:
    from dalle_ar.prompts import encode_prompts, known_chars

    captions = ["a red circle", "a blue square"] * 3
    tok = train_tokenizer(captions, TokenizerConfig(vocab_size=300, min_frequency=2, text_len=12))
    prompt = "a red cirlce with a purpel zebrra"
    assert tok.read_back(prompt) == ("a red cirlce wi", True)  # 10 byte-level tokens
    # "with", cut in two, is named whole; "purpel" and "zebrra" are never read
    assert tok.unseen_words(prompt) == ["cirlce", "with"]
    with caplog.at_level("WARNING"):
        encode_prompts(tok, [prompt], known_chars(tok))
    said = [r.getMessage() for r in caplog.records]
    assert sum("truncated" in m for m in said) == 1  # once, not by the tokenizer as well
    assert any("'cirlce'" in m for m in said) and not any("zebrra" in m for m in said)


def test_read_back_never_cuts_a_character_in_half(tok: TextTokenizer) -> None:
    text = "a red " + "😀" * 8  # an unseen emoji: four byte tokens each
    halves = 0
    for n in range(4, 14):
        short = TextTokenizer(tok.hf, TokenizerConfig(vocab_size=320, text_len=n))
        raw = short.decode(short.encode(text).ids)[0]
        head, cut = short.read_back(text)
        halves += raw.endswith("\ufffd")
        assert cut and "\ufffd" not in head and text.startswith(head) and raw.startswith(head)
        assert len(head) >= len(raw) - 1  # only the broken character is dropped
    assert halves >= 3  # most lengths end inside an emoji's bytes
    assert tok.read_back("a red circle") == ("a red circle", False)


def test_a_huge_caption_is_cut_by_characters_before_tokenizing(tok: TextTokenizer) -> None:
    from dalle_ar.data.shards import caption_chars

    huge = "a red circle left of a blue square " * 30_000  # about 1 MB
    limit = caption_chars(tok.text_len)
    whole = tok.backend.encode(huge[:20_000], add_special_tokens=False).ids
    # what the model reads is what the whole caption would give ...
    assert tok.encode([huge]).ids[0, 1:-1].tolist() == whole[: tok.text_len - 2]
    # ... but only the first `limit` characters are tokenized
    cut = tok.backend.encode(huge[:limit], add_special_tokens=False).ids
    assert tok.tokenize_lengths([huge]) == [len(cut)]
    assert tok.tokenize_lengths([huge])[0] < limit
