"""The cascade end to end on tiny random-weight components: `pipe(prompts, upsample=True)` in
every mode, reranking before upsampling (only kept images are upsampled), `pipe.upsample` on a
user's own pictures, `dalle-ar sample --upsample` and its regeneration, and what does not fit
refused by name before any drawing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _pipeline_fixtures import build_components, peaked, tiny_transformer_config
from PIL import Image

from dalle_ar.cli import main as cli
from dalle_ar.models.transformer import Transformer
from dalle_ar.models.upsampler import Upsampler, UpsamplerConfig
from dalle_ar.pipelines import Pipeline, assemble

PROMPTS = ["a small red circle at the top", "a blue square"]
pytestmark = pytest.mark.usefixtures("one_thread")


def _upsampler(low_size: int, seed: int = 0) -> Upsampler:
    torch.manual_seed(seed)
    up = Upsampler(UpsamplerConfig(low_size=low_size, channels=[8, 16], norm_groups=4,
                                   mid_attention=False))  # fmt: skip
    with torch.no_grad():  # a fresh U-Net's last conv is zero: give it an output
        for p in up.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return up.eval()


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("cascade")
    parts = build_components(root)
    _upsampler(16).save_pretrained(root / "upsampler")
    _upsampler(8).save_pretrained(root / "upsampler_8")
    torch.manual_seed(1)
    masked = peaked(Transformer(tiny_transformer_config(layouts="bidir", objective="masked")))
    masked.save_pretrained(root / "masked")
    return {**parts, "upsampler": root / "upsampler", "upsampler_8": root / "upsampler_8",
            "masked": root / "masked", "root": root}  # fmt: skip


@pytest.fixture(scope="module")
def pipe_dir(parts):
    return assemble(parts["root"] / "pipe", parts["text_tokenizer"], parts["vq"],
                    parts["transformer"], masked=parts["masked"], upsampler=parts["upsampler"],
                    defaults={"upsample": {"upsample_steps": 3}})  # fmt: skip


@pytest.fixture(scope="module")
def pipe(pipe_dir):
    return Pipeline.from_pretrained(pipe_dir)


@pytest.mark.parametrize("mode", ["ar", "masked"])
def test_upsample_draws_small_then_large_in_any_mode(pipe, mode):
    out = pipe(PROMPTS, num_samples=2, seed=0, mode=mode, upsample=True)
    small = pipe(PROMPTS, num_samples=2, seed=0, mode=mode)
    assert [im.size for im in out.images] == [(32, 32)] * 4
    assert [im.size for im in out.small_images] == [(16, 16)] * 4
    for a, b in zip(out.small_images, small.images):  # the small stage is the plain call's
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert all(m["upsample"] and m["upsample_steps"] == 3 for m in out.samples)
    # a sample upsampled alone (its seed, its prompt) is the one of the batch
    one = pipe([PROMPTS[1]], seeds=[out.samples[3]["seed"]], mode=mode, upsample=True)
    diff = np.abs(np.asarray(one.images[0], int) - np.asarray(out.images[3], int))
    assert diff.max() <= 1  # batched convolutions may round one 8-bit level apart
    other = pipe(PROMPTS[:1], seeds=[out.samples[0]["seed"]], mode=mode, upsample=True,
                 noise_level=600)  # fmt: skip
    assert not np.array_equal(np.asarray(other.images[0]), np.asarray(out.images[0]))


def test_reranking_scores_small_candidates_and_upsamples_only_the_kept(pipe, monkeypatch):
    seen = []
    real = Pipeline._upsample_pixels  # every upsampling goes through it

    def counting(self, images, *a, **kw):
        seen.append(len(images))
        return real(self, images, *a, **kw)

    monkeypatch.setattr(Pipeline, "_upsample_pixels", counting)
    out = pipe(PROMPTS, seed=0, candidates=4, keep=1, reranker="pmi", upsample=True)
    assert seen == [2] and len(out.candidates) == 8
    assert [im.size for im in out.images] == [(32, 32)] * 2


def test_upsample_takes_a_users_own_pictures(pipe):
    pics = [Image.new("RGB", (16, 16), c) for c in ((200, 30, 30), (30, 30, 200))]
    a = pipe.upsample(pics, seeds=[0, 1])
    b = pipe.upsample(np.stack([np.asarray(p) for p in pics]), seeds=[0, 1])
    assert [im.size for im in a] == [(32, 32)] * 2
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))
    with pytest.raises(ValueError, match="the upsampler takes 16x16 pictures, got 24x24"):
        pipe.upsample([Image.new("RGB", (24, 24))])
    with pytest.raises(ValueError, match=r"one seed per picture \(2\), got 1"):
        pipe.upsample(pics, seeds=[0])


def test_what_does_not_fit_is_refused_before_drawing(parts, pipe, tmp_path):
    plain = Pipeline.from_pretrained(
        assemble(tmp_path / "plain", parts["text_tokenizer"], parts["vq"], parts["transformer"])
    )
    with pytest.raises(ValueError, match="upsampling needs the upsampler component"):
        plain(PROMPTS, upsample=True)
    with pytest.raises(ValueError, match="noise_level=5000 must fit the upsampler's 1000"):
        pipe(PROMPTS, upsample=True, noise_level=5000)
    with pytest.raises(ValueError, match=r"upsampling settings \['noise_level'\] apply only "
                                         "with upsample=True"):  # fmt: skip
        pipe(PROMPTS, noise_level=3)
    from dalle_ar.sampling.settings import UpsampleSampling

    with pytest.raises(ValueError, match="upsampling settings upsample_settings= apply only with "
                                         "upsample=True"):  # fmt: skip
        pipe(PROMPTS, upsample_settings=UpsampleSampling(upsample_steps=2))
    with pytest.raises(ValueError, match="the upsampler takes 8x8 pictures, the VQ draws 16x16"):
        assemble(tmp_path / "bad", parts["text_tokenizer"], parts["vq"], parts["transformer"],
                 upsampler=parts["upsampler_8"])  # fmt: skip


def test_cli_sample_upsample_and_regenerate(pipe_dir, tmp_path):
    out = tmp_path / "out"
    assert cli(["sample", "--model", str(pipe_dir), PROMPTS[0], "--num", "2", "--upsample",
                "--upsample-steps", "2", "--out", str(out)]) == 0  # fmt: skip
    doc = json.loads((out / "samples.json").read_text())
    assert all(s["upsample"] and s["upsample_steps"] == 2 for s in doc["samples"])
    assert Image.open(out / "000_01.png").size == (32, 32)
    again = tmp_path / "again"
    assert cli(["sample", "--from-json", str(out / "samples.json"), "--index", "1",
                "--out", str(again)]) == 0  # fmt: skip
    a, b = (np.asarray(Image.open(d / "000_01.png"), int) for d in (out, again))
    assert a.shape == b.shape == (32, 32, 3) and np.abs(a - b).max() <= 1
    small = tmp_path / "small.png"
    Image.new("RGB", (16, 16), (20, 160, 40)).save(small)
    assert cli(["sample", "--model", str(pipe_dir), "--upsample-images", str(small),
                "--out", str(tmp_path / "up")]) == 0  # fmt: skip
    assert Image.open(tmp_path / "up" / "000_small.png").size == (32, 32)
    rec = json.loads((tmp_path / "up" / "upsampled.json").read_text())
    assert rec["pictures"][0]["seed"] == 0 and rec["settings"]["upsample_steps"] == 3
    assert Image.open(out / "small" / "000_01.png").size == (16, 16)  # the small ones kept too
    # settings of the cascade without --upsample are refused, naming them
    assert cli(["sample", "--model", str(pipe_dir), PROMPTS[0], "--noise-level", "3",
                "--out", str(tmp_path / "x")]) == 2  # fmt: skip


def test_an_upsampler_that_reads_captions_goes_with_its_clip(parts, tmp_path):
    from dalle_ar.identity import CLIPIdentity
    from dalle_ar.models.clip import CLIP, CLIPSizes
    from dalle_ar.text import TextTokenizer

    sizes = CLIPSizes(
        image_size=16,
        patch_size=4,
        vision_width=32,
        vision_layers=1,
        vision_heads=2,
        text_width=32,
        text_layers=1,
        text_heads=2,
        embed_dim=16,
    )
    tok = TextTokenizer.from_pretrained(parts["text_tokenizer"])
    for seed in (0, 1):
        CLIP.build(sizes, tok, seed=seed).save_pretrained(tmp_path / f"clip{seed}")
    ident = CLIPIdentity.from_identity(CLIP.from_pretrained(tmp_path / "clip0").identity())
    torch.manual_seed(0)
    up = Upsampler(UpsamplerConfig(low_size=16, channels=[8, 16], norm_groups=4,
                                   mid_attention=False, caption_dim=16, clip=ident))  # fmt: skip
    with torch.no_grad():
        for p in up.parameters():
            p.add_(0.05 * torch.randn_like(p))
    up.save_pretrained(tmp_path / "up")
    base = (parts["text_tokenizer"], parts["vq"], parts["transformer"])
    pipe = Pipeline.from_pretrained(assemble(tmp_path / "pipe", *base, clip=tmp_path / "clip0",
                                             upsampler=tmp_path / "up"))  # fmt: skip
    out = pipe(PROMPTS, seed=0, upsample=True, upsample_steps=2)
    assert [im.size for im in out.images] == [(32, 32)] * 2
    pics = out.small_images[:1] * 2
    a, b = (pipe.upsample(pics, [3, 3], prompts, upsample_steps=2) for prompts in
            (PROMPTS[:1] * 2, PROMPTS[1:] * 2))  # fmt: skip
    assert not np.array_equal(np.asarray(a[0]), np.asarray(b[0]))  # the caption conditions it
    with pytest.raises(ValueError, match="reads the caption: it needs the prompts"):
        pipe.upsample(pics)
    with pytest.raises(ValueError, match="reads captions through the CLIP it was trained with"):
        assemble(tmp_path / "p2", *base, upsampler=tmp_path / "up")
    with pytest.raises(ValueError, match="the upsampler was trained on another CLIP"):
        assemble(tmp_path / "p3", *base, clip=tmp_path / "clip1", upsampler=tmp_path / "up")
