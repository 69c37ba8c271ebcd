"""The prior mode (DALL-E 2) end to end on tiny random-weight components: caption -> CLIP text
embedding -> diffusion prior -> CLIP image embedding -> embedding-conditioned transformer ->
codes; variations, interpolation, reranking in this mode, and the checks that refuse a prior
with another CLIP or a transformer that takes no embedding."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _pipeline_fixtures import (
    EMBED_DIM,
    TINY_CLIP,
    build_components,
    peaked,
    tiny_prior,
    tiny_transformer_config,
)
from PIL import Image

from dalle_ar.models.clip import CLIP
from dalle_ar.models.transformer import Transformer
from dalle_ar.pipelines import ARPipeline, Pipeline, assemble
from dalle_ar.sampling.diffusion import sample_prior
from dalle_ar.text import TextTokenizer

PROMPTS = ["a small red circle at the top", "a blue square"]
D = EMBED_DIM

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("prior_mode")
    parts = build_components(root)
    torch.manual_seed(0)
    tf = peaked(Transformer(tiny_transformer_config(cond_dim=D, cond_tokens=1)))
    tf.save_pretrained(parts["transformer"])
    clip = CLIP.build(TINY_CLIP, TextTokenizer.from_pretrained(parts["text_tokenizer"]))
    clip.save_pretrained(root / "clip")
    tiny_prior(clip).save_pretrained(root / "prior")
    return {**parts, "clip": root / "clip", "prior": root / "prior", "root": root}


@pytest.fixture(scope="module")
def pipe_dir(parts):
    return assemble(parts["root"] / "pipe", parts["text_tokenizer"], parts["vq"],
                    parts["transformer"], clip=parts["clip"], prior=parts["prior"])  # fmt: skip


@pytest.fixture(scope="module")
def pipe(pipe_dir) -> ARPipeline:
    return Pipeline.from_pretrained(pipe_dir)


def test_prior_mode_draws_from_the_priors_embedding(pipe):
    out = pipe(PROMPTS, num_samples=2, seed=5, mode="prior", prior_steps=4, guidance_scale=2.0)
    assert out.codes.shape == (4, 4, 4) and len(out.images) == 4
    assert all(m["mode"] == "prior" and m["prior_steps"] == 4 for m in out.samples)
    # by hand: the prior's embedding for each sample's seed, then the transformer on it
    clip, prior = pipe.components["clip"], pipe.components["prior"]
    text = clip.text_embeds(*clip.encode_text(PROMPTS)).repeat_interleave(2, 0)
    seeds = [m["seed"] for m in out.samples]
    settings = pipe.defaults["prior"].__class__(prior_steps=4)
    emb = sample_prior(prior, text, settings, seeds)
    want = pipe([p for p in PROMPTS for _ in range(2)], seeds=seeds, embeds=emb,
                guidance_scale=2.0)  # fmt: skip
    assert torch.equal(out.codes, want.codes)
    # the embedding matters: text mode (the null embedding) draws other codes
    text_mode = pipe(PROMPTS, num_samples=2, seed=5, guidance_scale=2.0)
    assert not torch.equal(out.codes, text_mode.codes)
    assert all(m["mode"] == "ar" for m in text_mode.samples)


def test_an_empty_prompt_draws_the_priors_unconditional_embedding(pipe):
    """An empty prompt is the prior's "no caption" (a zero text embedding, what it learnt from
    its dropped captions), not CLIP's embedding of the empty string."""
    prior = pipe.components["prior"]
    settings = pipe.defaults["prior"].__class__(prior_steps=4)
    out = pipe(["", PROMPTS[0]], seed=3, mode="prior", prior_steps=4)
    none = sample_prior(prior, torch.zeros(1, D), settings, [out.samples[0]["seed"]])
    want = pipe([""], seeds=[out.samples[0]["seed"]], embeds=none)
    assert torch.equal(out.codes[0], want.codes[0])
    clip = pipe.components["clip"]
    as_text = sample_prior(prior, clip.text_embeds(*clip.encode_text([""])), settings,
                           [out.samples[0]["seed"]])  # fmt: skip
    assert not torch.allclose(none, as_text, atol=1e-4)  # the two are not the same


def test_prior_mode_sample_does_not_depend_on_its_batch(pipe):
    both = pipe(PROMPTS, seed=7, mode="prior", prior_steps=3)
    alone = pipe([PROMPTS[1]], seeds=[both.samples[1]["seed"]], mode="prior", prior_steps=3)
    assert torch.equal(both.codes[1], alone.codes[0])


def test_prior_mode_reranks_by_clip(pipe):
    out = pipe(PROMPTS, seed=1, mode="prior", prior_steps=3, candidates=3, keep=1,
               reranker="clip")  # fmt: skip
    assert len(out.candidates) == 6 and out.codes.shape[0] == 2
    assert all(m["mode"] == "prior" and m["candidates"] == 3 for m in out.samples)


def test_variations_and_interpolation(pipe):
    pics = [Image.new("RGB", (16, 16), (200, 30, 30)), Image.new("RGB", (16, 16), (30, 30, 200))]
    out = pipe.variations(pics, num_samples=3, seed=0)
    assert out.codes.shape == (6, 4, 4)
    assert all(m["mode"] == "embeds" and m["prompt"] == "" for m in out.samples)
    same = pipe.variations(pics[:1], num_samples=3, seed=0)
    assert torch.equal(same.codes, out.codes[:3])
    path = pipe.interpolate(PROMPTS[0], pics[1], steps=4, seed=2, prior_steps=3)
    assert path.codes.shape == (4, 4, 4)
    with pytest.raises(ValueError, match="steps must be >= 2"):
        pipe.interpolate(PROMPTS[0], PROMPTS[1], steps=1)
    # the given pictures' embeddings stand in for the prior's: its settings have nothing to do
    with pytest.raises(ValueError, match=r"given embeddings would ignore settings of other "
                                         r"modes: 'prior_steps' \(prior mode\)"):  # fmt: skip
        pipe.variations(pics, prior_steps=3)


def test_a_prior_of_another_clip_is_refused_by_name(parts, tmp_path):
    other = CLIP.build(TINY_CLIP, TextTokenizer.from_pretrained(parts["text_tokenizer"]), seed=1)
    other.save_pretrained(tmp_path / "other_clip")
    with pytest.raises(ValueError, match="the prior was trained on another CLIP"):
        assemble(tmp_path / "pipe", parts["text_tokenizer"], parts["vq"], parts["transformer"],
                 clip=tmp_path / "other_clip", prior=parts["prior"])  # fmt: skip
    with pytest.raises(ValueError, match="pass clip=FOLDER too"):
        assemble(tmp_path / "pipe2", parts["text_tokenizer"], parts["vq"], parts["transformer"],
                 prior=parts["prior"])  # fmt: skip


def test_prior_mode_needs_its_parts(pipe):
    no_prior = ARPipeline(pipe.tokenizer, pipe.vq, pipe.transformer, clip=pipe.components["clip"])
    with pytest.raises(ValueError, match="needs the prior component"):
        no_prior(PROMPTS, mode="prior")
    with pytest.raises(ValueError, match="mode must be one of"):
        pipe(PROMPTS, mode="masked-typo")
    plain = Transformer(tiny_transformer_config())
    text_only = ARPipeline(pipe.tokenizer, pipe.vq, plain)
    with pytest.raises(ValueError, match="needs the clip and prior component.*modes: ar;"):
        text_only(PROMPTS, mode="prior")  # what the folder lacks, said first
    with pytest.raises(ValueError, match="takes no CLIP image embedding"):
        text_only(PROMPTS, embeds=torch.nn.functional.normalize(torch.randn(len(PROMPTS), 8)))


def test_sample_command_draws_in_prior_mode_and_variations(pipe_dir, tmp_path, capsys):
    from dalle_ar.cli import main as cli

    out = tmp_path / "prior"
    assert cli(["sample", "--model", str(pipe_dir), PROMPTS[0], "--num", "2", "--mode", "prior",
                "--prior-steps", "3", "--out", str(out)]) == 0  # fmt: skip
    doc = json.loads((out / "samples.json").read_text())
    assert [s["mode"] for s in doc["samples"]] == ["prior", "prior"]
    assert doc["samples"][0]["prior_steps"] == 3
    again = tmp_path / "again"  # a prior-mode sample regenerates from its record
    assert cli(["sample", "--from-json", str(out / "samples.json"), "--index", "1",
                "--out", str(again)]) == 0  # fmt: skip
    a, b = Image.open(out / "000_01.png"), Image.open(again / "000_01.png")
    assert np.array_equal(np.asarray(a), np.asarray(b))
    Image.new("RGB", (16, 16), (200, 30, 30)).save(tmp_path / "red.png")
    var = tmp_path / "var"
    assert cli(["sample", "--model", str(pipe_dir), "--variations", str(tmp_path / "red.png"),
                "--num", "3", "--out", str(var)]) == 0  # fmt: skip
    assert len(list(var.glob("000_*.png"))) == 3 and (var / "grid_000.png").is_file()
    assert cli(["sample", "--model", str(pipe_dir), "--variations", str(tmp_path / "no.png"),
                "--out", str(var)]) == 2  # fmt: skip
    # variations draw from the pictures' embeddings: neither another mode nor its settings
    red = str(tmp_path / "red.png")
    assert cli(["sample", "--model", str(pipe_dir), "--variations", red, "--mode", "prior",
                "--out", str(tmp_path / "v2")]) == 2  # fmt: skip
    assert "not in --mode prior" in capsys.readouterr().err
    assert cli(["sample", "--model", str(pipe_dir), "--variations", red, "--prior-steps", "3",
                "--out", str(tmp_path / "v2")]) == 2  # fmt: skip
    assert "--variations would ignore settings of other modes: --prior-steps (prior mode)" in (
        capsys.readouterr().err)  # fmt: skip


def test_variations_tool_scores_agreement_with_the_source(pipe_dir, shapes_shards, tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "tools" / "variations.py"
    spec = importlib.util.spec_from_file_location("variations", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    argv = ["--model", str(pipe_dir), "--data", shapes_shards.eval, "--num", "2",
            "--grid-images", "2", "--images", "4", "--out", str(tmp_path)]  # fmt: skip
    assert tool.main(argv) == 0
    report = json.loads((tmp_path / "variations.json").read_text())
    assert report["images"] == 4 and report["variations"]["n"] == 8
    assert 0 <= report["variations"]["exact"] <= 1 and report["sources"]["n"] == 4
    assert Image.open(tmp_path / "variations.png").width > 16 * 3


def test_a_transformer_trained_on_another_clips_embeddings_is_refused(parts, tmp_path):
    tf = Transformer.from_pretrained(parts["transformer"])
    tf.cfg.cond_clip = "0" * 64  # as if its token shards held another CLIP's embeddings
    tf.save_pretrained(tmp_path / "transformer")
    with pytest.raises(ValueError, match="the transformer was trained on another CLIP"):
        assemble(tmp_path / "pipe", parts["text_tokenizer"], parts["vq"],
                 tmp_path / "transformer", clip=parts["clip"])  # fmt: skip


def test_given_embeddings_are_checked(pipe):
    bad = torch.ones(len(PROMPTS), D)  # not unit vectors
    with pytest.raises(ValueError, match="unit CLIP image embeddings"):
        pipe(PROMPTS, embeds=bad)
    good = torch.nn.functional.normalize(bad, dim=-1)
    with pytest.raises(ValueError, match="not both"):
        pipe(PROMPTS, embeds=good, mode="prior")
    with pytest.raises(ValueError, match="must have shape"):
        pipe(PROMPTS, embeds=good[:1])


def test_the_prior_mode_ends_in_the_cascade_too(parts, tmp_path):
    from dalle_ar.models.upsampler import Upsampler, UpsamplerConfig

    torch.manual_seed(0)
    Upsampler(UpsamplerConfig(low_size=16, channels=[8, 16], norm_groups=4,
                              mid_attention=False)).save_pretrained(tmp_path / "up")  # fmt: skip
    pipe = Pipeline.from_pretrained(assemble(
        tmp_path / "pipe", parts["text_tokenizer"], parts["vq"], parts["transformer"],
        clip=parts["clip"], prior=parts["prior"], upsampler=tmp_path / "up"))  # fmt: skip
    out = pipe(["a red circle"], seed=0, mode="prior", prior_steps=3, upsample=True,
               upsample_steps=2)  # fmt: skip
    small = pipe(["a red circle"], seed=0, mode="prior", prior_steps=3)
    assert out.images[0].size == (32, 32) and out.samples[0]["mode"] == "prior"
    assert np.array_equal(np.asarray(out.small_images[0]), np.asarray(small.images[0]))


def test_an_embedding_added_to_the_caption_draws_in_both_modes(parts, tmp_path):
    """A transformer with cond_mode=add in a pipeline: the prior mode's embedding changes the
    draws, text mode draws with the null embedding and reranks by PMI."""
    torch.manual_seed(2)
    peaked(Transformer(tiny_transformer_config(cond_dim=D, cond_mode="add"))).save_pretrained(
        tmp_path / "add_tf"
    )
    folder = assemble(tmp_path / "pipe", parts["text_tokenizer"], parts["vq"], tmp_path / "add_tf",
                      clip=parts["clip"], prior=parts["prior"])  # fmt: skip
    pipe = Pipeline.from_pretrained(folder)
    assert (
        pipe.transformer.cfg.adds_cond
        and pipe.transformer.cfg.prefix_len == pipe.transformer.cfg.text_len
    )
    kw = dict(num_samples=2, seed=5, guidance_scale=2.0)
    prior, text = pipe(PROMPTS, mode="prior", prior_steps=3, **kw), pipe(PROMPTS, **kw)
    assert not torch.equal(prior.codes, text.codes)
    best = pipe(PROMPTS, seed=1, candidates=3, keep=1, reranker="pmi")
    assert best.codes.shape[0] == 2 and all(m["rerank_score"] is not None for m in best.samples)


@pytest.fixture(scope="module")
def two_models(parts):
    """The text-only transformer beside the embedding-conditioned one (DALL-E 2's decoder)."""
    root = parts["root"]
    torch.manual_seed(1)
    peaked(Transformer(tiny_transformer_config(text_vocab=300))).save_pretrained(root / "text_tf")
    folder = assemble(root / "pipe_two", parts["text_tokenizer"], parts["vq"], root / "text_tf",
                      clip=parts["clip"], prior=parts["prior"],
                      cond_transformer=parts["transformer"])  # fmt: skip
    return Pipeline.from_pretrained(folder)


def test_with_a_cond_transformer_each_mode_draws_with_its_own_model(pipe, two_models):
    assert two_models.cond_transformer is two_models.components["cond_transformer"]
    assert not two_models.transformer.cfg.takes_cond  # text mode: the text-only model
    # the prior mode draws with the cond_transformer: the one-model pipeline's codes, whose
    # transformer is the same folder
    kw = dict(num_samples=2, seed=5, mode="prior", prior_steps=4, guidance_scale=2.0)
    assert torch.equal(two_models(PROMPTS, **kw).codes, pipe(PROMPTS, **kw).codes)
    # text mode draws with the text-only transformer, whatever the cond_transformer holds
    alone = ARPipeline(two_models.tokenizer, two_models.vq, two_models.transformer)
    got = two_models(PROMPTS, num_samples=2, seed=5, guidance_scale=2.0)
    assert torch.equal(got.codes, alone(PROMPTS, num_samples=2, seed=5, guidance_scale=2.0).codes)
    emb = two_models.image_embeds([Image.new("RGB", (16, 16), "red")])
    var = two_models.variations([Image.new("RGB", (16, 16), "red")], num_samples=2, seed=1)
    assert torch.equal(var.codes, pipe([""], num_samples=2, seed=1, embeds=emb).codes)


def test_a_cond_transformer_must_read_an_embedding(parts, two_models):
    root = parts["root"]
    with pytest.raises(ValueError, match="conditioned on a CLIP image embedding.*cond_dim=0"):
        assemble(root / "pipe_bad", parts["text_tokenizer"], parts["vq"], parts["transformer"],
                 clip=parts["clip"], prior=parts["prior"],
                 cond_transformer=root / "text_tf")  # fmt: skip
    assert not (root / "pipe_bad").exists()
