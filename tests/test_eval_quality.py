"""`dalle-ar eval`: image quality of a pipeline in every mode on shards written by `dalle-ar data
shapes` (bits per image token, VQ PSNR, CLIP score, R-precision, CLIP-feature FD, near-copies,
the shape checker's fidelity as the main job scores it), on the tiny random-weight pipeline with
every mode; the metrics' own checks; bad input refused before any drawing."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from _pipeline_fixtures import build_all_modes

from dalle_ar.cli import main as cli
from dalle_ar.data.build import main as build_data
from dalle_ar.eval.fidelity import evaluate_fidelity
from dalle_ar.eval.metrics import distractor_pools, frechet_distances, r_precision
from dalle_ar.eval.quality import (
    FD_KEY,
    bits_per_image_token,
    evaluate_quality,
    markdown_table,
)
from dalle_ar.jobs import shapes
from dalle_ar.jobs.config import MainJobConfig
from dalle_ar.models.clip import CLIPImageFeatures
from dalle_ar.pipelines import ARPipeline, Pipeline
from dalle_ar.sampling import RerankSettings, image_log_likelihood
from dalle_ar.sampling.settings import RERANKERS

NUM, K = 6, 2  # evaluation images, candidates
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """16x16 shapes shards (the tiny pipeline's size): 48 training, 24 evaluation scenes."""
    out = tmp_path_factory.mktemp("quality_shards")
    argv = ["shapes", "--out", str(out), "--num-train", "48", "--num-eval", "24", "--size", "16"]
    assert build_data([*argv, "--shard-size", "16"]) == 0
    return {"eval": str(out / "eval-*.tar"), "train": str(out / "train-*.tar"), "dir": out}


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    return build_all_modes(tmp_path_factory.mktemp("quality_pipe"))


@pytest.fixture(scope="module")
def pipe(pipe_dir) -> ARPipeline:
    return Pipeline.from_pretrained(pipe_dir)


@pytest.fixture(scope="module")
def job() -> MainJobConfig:
    """The main job's settings, scaled down: NUM prompts, best of K."""
    return MainJobConfig(fidelity_prompts=NUM, rerank=RerankSettings(candidates=K))


@pytest.fixture(scope="module")
def report(pipe, data, job):
    return evaluate_quality(pipe, data["eval"], data["train"], num_prompts=NUM, candidates=K,
                            seed=job.seed, batch_size=8, **job.sampling_settings())  # fmt: skip


def test_report_has_every_figure_finite_and_in_range(report):
    names = [r["name"] for r in report["rows"]]
    assert names == [
        "real evaluation images", "VQ reconstructions", "ar, single", "ar, best of 2 by clip",
        "ar, best of 2 by pmi", "prior, single", "prior, best of 2 by clip", "masked, single",
        "masked, best of 2 by clip",
    ]  # fmt: skip
    assert report["num_images"] == NUM and report["num_train_images"] == 48
    assert 0 < report["bits_per_image_token"] < 3 * math.log2(32)  # 32 codes: 5 bits at chance
    assert math.isfinite(report["vq_psnr_db"]) and 0 <= report["vq_ssim"] <= 1
    assert 0 < report["near_copy_threshold_cosine"] <= 1 + 1e-6
    for row in report["rows"]:
        assert 0 <= row["clip_score"] <= 100, row
        assert 0 <= row["r_precision"] <= 1, row
        assert math.isfinite(row[FD_KEY]) and row[FD_KEY] > -1e-4, row
        assert -1 - 1e-6 <= row["nearest_train_cosine"] <= 1 + 1e-6, row
        assert 0 <= row["near_copies"] <= 1, row
    real = report["rows"][0]
    # the threshold is the 99th percentile of these very images: one of NUM at most above it
    assert real["near_copies"] <= 1 / NUM + 1e-9
    assert report["r_precision_pool"] == min(100, len(set(_eval_captions(report))))
    json.loads(json.dumps(report))  # JSON-able


def _eval_captions(report) -> list[str]:
    from dalle_ar.data.shards import iter_captions

    return list(iter_captions(report["eval_data"]))


def test_shapes_fidelity_is_the_main_jobs_exactly(pipe, report, job):
    """The same pipeline, prompts, seeds and settings: `dalle-ar eval`'s fidelity is the main
    job's evaluation figure for figure, and its ar part that of `evaluate_fidelity` called
    directly."""

    def figures(r):  # all but the wall-clock seconds
        if isinstance(r, dict):
            return {k: figures(v) for k, v in r.items() if k != "seconds"}
        return r

    main_job = shapes.evaluate(pipe, job)
    assert figures(report["fidelity"]) == figures(main_job)
    assert {"prior_mode", "masked_mode"} <= set(main_job)
    settings = {k: v for k, v in dataclasses.asdict(job.sampling).items()
                if k != "guidance_scale"}  # fmt: skip
    direct = evaluate_fidelity(pipe, NUM, seed=job.seed,
                               guidance_scales=(1.0, job.sampling.guidance_scale), candidates=K,
                               rerankers=RERANKERS, rerank_weight=job.rerank.rerank_weight,
                               batch_size=8, **settings)  # fmt: skip
    ar = {k: v for k, v in report["fidelity"]["summary"].items() if "mode" not in k}
    assert ar == direct["summary"]


def test_bits_per_image_token_is_the_models_own_likelihood(pipe, data):
    from dalle_ar.data.loader import make_loader

    batch = next(iter(make_loader(data["eval"], 16, 5, train=False)))
    bits = bits_per_image_token(pipe, batch["image"], batch["caption"], batch_size=2)
    tf, text = pipe.transformer, pipe.tokenizer.encode(batch["caption"])
    with torch.no_grad():
        codes = pipe.vq.encode(batch["image"])
        ll = image_log_likelihood(tf, text.ids, codes, text_lens=text.mask.sum(1),
                                  cond=tf.null_cond(5))  # fmt: skip
    assert bits == pytest.approx(float(-ll.sum()) / codes.numel() / math.log(2), rel=1e-5)


def test_frechet_distance_of_a_set_to_itself_is_zero_and_to_noise_is_not(pipe, data):
    from dalle_ar.data.loader import make_loader

    real = next(iter(make_loader(data["eval"], 16, 24, train=False)))["image"]
    noise = torch.rand(real.shape, generator=torch.Generator().manual_seed(0))
    fd = frechet_distances(real, {"itself": real, "noise": noise},
                           CLIPImageFeatures(pipe.components["clip"]))  # fmt: skip
    assert abs(fd["itself"]) < 1e-4
    assert fd["noise"] > 100 * max(abs(fd["itself"]), 1e-6)


def test_r_precision_is_one_for_the_captions_own_embeddings_and_chance_for_random_ones():
    captions = [f"caption {i}" for i in range(300)]
    pools = distractor_pools(captions[:200], captions, 100, seed=0)
    assert pools.shape == (200, 100)
    assert torch.equal(pools, distractor_pools(captions[:200], captions, 100, seed=0))
    assert all(len(set(row.tolist())) == 100 for row in pools)  # distinct captions
    g = torch.Generator().manual_seed(0)
    text = torch.nn.functional.normalize(torch.randn(300, 16, generator=g), dim=-1)
    own = text[pools[:, 0]]
    assert bool(r_precision(own, text, pools).all())  # the caption's own embedding: always
    rand = torch.nn.functional.normalize(torch.randn(200, 16, generator=g), dim=-1)
    assert r_precision(rand, text, pools).float().mean() < 0.05  # chance: 1 / 100
    small = distractor_pools(["a", "b"], ["a", "b", "b"], 100)  # fewer distinct captions
    assert small.tolist() == [[0, 1], [1, 0]]


def test_markdown_table_has_a_row_per_set_and_the_fidelity(report):
    table = markdown_table(report)
    assert "CLIP-feature FD, not Inception FID" in table
    for row in report["rows"]:
        assert f"| {row['name']}" in table
    assert "| prior mode guidance 1.5 best of 2 by clip |" in table


def test_cli_writes_json_and_table_and_eval_fidelity_still_runs(pipe_dir, data, tmp_path):
    out = tmp_path / "q"
    argv = ["eval", "--model", str(pipe_dir), "--data", data["eval"], "--num", "3",
            "--candidates", "1", "--modes", "ar", "--out", str(out)]  # fmt: skip
    assert cli(argv) == 0
    report = json.loads((out / "eval.json").read_text())
    assert [r["name"] for r in report["rows"]] == [
        "real evaluation images", "VQ reconstructions", "ar, single"]  # fmt: skip
    assert report["rows"][0]["nearest_train_cosine"] is None  # no --train-data
    assert "| ar, single |" in (out / "eval.md").read_text()
    f = tmp_path / "fidelity.json"
    assert cli(["eval", "fidelity", "--model", str(pipe_dir), "--num", "2", "--out", str(f)]) == 0
    assert "guidance 1.5" in json.loads(f.read_text())["summary"]


def test_bad_input_is_refused_before_any_drawing(pipe, pipe_dir, data, tmp_path, monkeypatch,
                                                 capsys):  # fmt: skip
    drawn = []
    monkeypatch.setattr(pipe, "_draw", lambda *a, **k: drawn.append(1))
    ok = dict(eval_shards=data["eval"], num_prompts=2, candidates=2)
    pickle = tmp_path / "code.pth"  # a pickle that would call a function when loaded
    torch.save({"w": torch.zeros(1), "f": dataclasses.replace}, pickle)
    for kw, msg in (
        (dict(eval_shards=str(tmp_path / "none-*.tar")), "evaluation shards: expected shard"),
        (dict(train_shards=str(tmp_path / "t.tar")), "training shards: expected existing"),
        (dict(num_prompts=0), "must be >= 1, got 0"),
        (dict(candidates=0), "candidates must be >= 1"),
        (dict(modes=["dino"]), "unknown mode 'dino'"),
        (dict(modes=[]), "at least one mode"),
        (dict(temprature=0.7), "unknown sampling settings \\['temprature'\\]"),
        (dict(masked={"steps": 0}), "steps"),
        (dict(inception_weights=str(tmp_path / "w.pth")), "Inception weights: no file"),
        (dict(inception_weights=str(pickle)), "not a plain state dict of tensors"),
    ):
        with pytest.raises(ValueError, match=msg):
            evaluate_quality(pipe, **{**ok, **kw})
    no_masked = ARPipeline(pipe.tokenizer, pipe.vq, pipe.transformer, clip=pipe.components["clip"])
    monkeypatch.setattr(no_masked, "_draw", lambda *a, **k: drawn.append(1))
    with pytest.raises(ValueError, match="mode 'masked' needs the masked component"):
        evaluate_quality(no_masked, modes=["masked"], **ok)
    no_clip = ARPipeline(pipe.tokenizer, pipe.vq, pipe.transformer)
    with pytest.raises(ValueError, match="need the pipeline's clip component"):
        evaluate_quality(no_clip, **ok)
    assert not drawn
    from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

    if not _TORCH_FIDELITY_AVAILABLE:  # a plain state dict, but nothing here to read it with
        weights = tmp_path / "inception.pth"
        torch.save({"w": torch.zeros(1)}, weights)
        with pytest.raises(ValueError, match="needs torch-fidelity"):
            evaluate_quality(pipe, inception_weights=str(weights), **ok)
    out = tmp_path / "out"
    argv = ["eval", "--model", str(pipe_dir), "--data", str(tmp_path / "x.tar"), "--out", str(out)]
    assert cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dalle-ar eval: evaluation shards:") and "\n" not in err
    assert not out.exists()
    # a mode the pipeline lacks is found once it is loaded: still no folder left behind
    argv = ["eval", "--model", str(pipe_dir), "--data", data["eval"], "--out", str(out),
            "--modes", "nope"]  # fmt: skip
    assert cli(argv) == 2
    assert "unknown mode 'nope'" in capsys.readouterr().err and not out.exists()


def test_single_draws_are_the_same_images_with_or_without_candidates(pipe, data, job, report):
    """Each mode's single draws are read off its draw of K candidates (each caption's first,
    the same seed): the same images, so the same figures, as a run that draws them alone."""
    alone = evaluate_quality(pipe, data["eval"], data["train"], num_prompts=NUM, candidates=1,
                             seed=job.seed, batch_size=8, **job.sampling_settings())  # fmt: skip
    rows = {r["name"]: r for r in report["rows"]}
    assert [r["name"] for r in alone["rows"]][2:] == ["ar, single", "prior, single",
                                                      "masked, single"]  # fmt: skip
    for row in alone["rows"][2:]:
        for key in ("clip_score", "r_precision", "nearest_train_cosine"):
            assert row[key] == pytest.approx(rows[row["name"]][key], abs=1e-6), (row["name"], key)
