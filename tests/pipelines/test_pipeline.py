"""The pipeline folder, DalleAR, `dalle-ar sample` and the fidelity tool, on a tiny random-weight
pipeline (tests/_pipeline_fixtures.py): outputs, reproducibility, JSON round trip, and a clear
message for every bad input."""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from _pipeline_fixtures import CODEBOOK, GRID, TEXT_LEN, build_components, tiny_transformer_config
from PIL import Image

from dalle_ar.cli import main as cli
from dalle_ar.cli.sample import _parser as sample_parser
from dalle_ar.cli.sample import _Writer
from dalle_ar.grid import TRUNCATED, captioned_grid, prompt_grids
from dalle_ar.models.transformer import Transformer
from dalle_ar.pipeline import (
    DalleAR,
    assemble,
    evaluate_fidelity,
    read_pipeline_json,
    save_prompt_grid,
    split_prompt,
)
from dalle_ar.pipelines import ARPipeline, Pipeline
from dalle_ar.rerank import keep_best, pmi_scores
from dalle_ar.sampling import decode_one, generate_image_tokens, image_log_likelihood, prefill

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["a small red circle at the top", "a blue square"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="session")
def parts(tmp_path_factory) -> dict[str, Path]:
    return build_components(tmp_path_factory.mktemp("parts"))


@pytest.fixture(scope="session")
def pipe_dir(parts, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("pipes") / "pipe"
    return assemble(folder, parts["text_tokenizer"], parts["vq"], parts["transformer"])


@pytest.fixture(scope="session")
def pipe(pipe_dir) -> DalleAR:
    return DalleAR.from_pretrained(pipe_dir)


def _pixels(img) -> np.ndarray:
    return np.asarray(img.convert("RGB") if isinstance(img, Image.Image) else Image.open(img))


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- the pipeline ------------------------------------------------------------------------------


def test_pipeline_folder_names_its_class_and_components(pipe_dir):
    meta = read_pipeline_json(pipe_dir)
    assert meta["version"] == 2 and meta["class"] == "ARPipeline"
    assert meta["components"] == {
        "text_tokenizer": ["dalle_ar", "TextTokenizer"],
        "vq": ["dalle_ar", "VQTokenizer"],
        "transformer": ["dalle_ar", "Transformer"],
        "clip": None,  # the optional CLIP reranker, not held
        "prior": None,  # nor the optional prior
        "cond_transformer": None,  # nor the prior mode's own transformer
        "masked": None,  # nor the optional masked generator
        "upsampler": None,  # nor the cascade's upsampler
    }
    for name in ("text_tokenizer", "vq", "transformer"):
        assert (pipe_dir / name / "config.json").is_file()
    assert set(meta["defaults"]) == {"ar", "prior", "masked", "rerank", "upsample"}
    assert isinstance(Pipeline.from_pretrained(pipe_dir), ARPipeline)  # the class it names


def test_save_pretrained_writes_every_component(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "again")
    again = Pipeline.from_pretrained(tmp_path / "again")
    assert (
        read_pipeline_json(tmp_path / "again")["components"]
        == read_pipeline_json(tmp_path / "again")["components"]
    )
    for name in ("text_tokenizer", "vq", "transformer"):
        assert (tmp_path / "again" / name / "config.json").is_file()
    assert again.defaults == pipe.defaults
    a, b = pipe(PROMPTS, seed=4, guidance_scale=2.0), again(PROMPTS, seed=4, guidance_scale=2.0)
    assert torch.equal(a.codes, b.codes)


def test_defaults_of_other_modes_are_left_to_them(pipe_dir, tmp_path):
    folder = tmp_path / "shared"
    shutil.copytree(pipe_dir, folder)
    meta = json.loads((folder / "pipeline.json").read_text())
    meta["defaults"]["ar"]["guidance_scale"] = 2.5
    meta["defaults"]["cascade"] = {"steps": 16}  # another mode's section
    (folder / "pipeline.json").write_text(json.dumps(meta))
    assert ARPipeline.from_pretrained(folder).defaults["ar"].guidance_scale == 2.5
    meta["defaults"]["tempreature"] = 0.7
    (folder / "pipeline.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"pipeline.json defaults: unknown sampling defaults \['t"):
        ARPipeline.from_pretrained(folder)


def test_a_mode_refuses_a_folder_without_its_components(pipe_dir, tmp_path):
    folder = tmp_path / "no_transformer"
    shutil.copytree(pipe_dir, folder)
    meta = json.loads((folder / "pipeline.json").read_text())
    del meta["components"]["transformer"]
    (folder / "pipeline.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"ar mode \(ARPipeline\) needs the transformer comp"):
        ARPipeline.from_pretrained(folder)
    meta["components"]["transformer"] = ["os", "system"]  # never a library to import from
    (folder / "pipeline.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="library one of"):
        Pipeline.from_pretrained(folder)
    meta["components"]["transformer"], meta["class"] = ["dalle_ar", "Transformer"], "Nope"
    (folder / "pipeline.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="unknown pipeline class 'Nope'"):
        Pipeline.from_pretrained(folder)


def test_call_returns_images_codes_and_metadata(pipe):
    out = pipe(PROMPTS, num_samples=2, seed=5, top_k=8, guidance_scale=2.0)
    assert len(out.images) == 4 and out.codes.shape == (4, GRID, GRID)
    assert all(im.size == (GRID * 4, GRID * 4) and im.mode == "RGB" for im in out.images)
    assert [s["seed"] for s in out.samples] == [5, 6, 7, 8]
    assert [s["prompt"] for s in out.samples] == [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2
    assert out.samples[3]["sample_index"] == 1 and out.samples[3]["prompt_index"] == 1
    assert out.samples[0]["top_k"] == 8 and out.samples[0]["guidance_scale"] == 2.0
    assert out.samples[0]["temperature"] == 1.0  # the pipeline default


def test_one_sample_regenerates_alone_with_the_same_pixels(pipe):
    out = pipe(PROMPTS, num_samples=2, seed=0, top_p=0.9, guidance_scale=2.0, batch_size=3)
    s = out.samples[3]
    again = pipe([s["prompt"]], seeds=[s["seed"]], top_p=0.9, guidance_scale=2.0)
    assert torch.equal(again.codes[0], out.codes[3])
    assert np.array_equal(_pixels(again.images[0]), _pixels(out.images[3]))


def test_candidates_keep_the_best_scoring_sample_and_its_seed(pipe):
    """candidates=K draws K per sample and keeps the one with the highest caption-image mutual
    information; its recorded seed regenerates it alone, and its score is what pmi_scores gives."""
    out = pipe(PROMPTS, num_samples=2, seed=4, candidates=3, guidance_scale=2.0, rerank_weight=0.7)
    assert out.codes.shape == (4, GRID, GRID) and len(out.images) == 4
    # candidate c of sample j has seed 4 + j + 4c: candidate 0 is the sample drawn plainly
    prompts = [PROMPTS[j // 2] for j in range(4) for c in range(3)]
    seeds = [4 + j + 4 * c for j in range(4) for c in range(3)]
    every = pipe(prompts, seeds=seeds, guidance_scale=2.0)  # the 12 candidates, one by one
    plain = pipe(PROMPTS, num_samples=2, seed=4, guidance_scale=2.0)
    assert torch.equal(every.codes[::3], plain.codes)
    scores = pmi_scores(pipe.transformer, pipe.tokenizer, prompts, every.codes, weight=0.7)
    want = keep_best(scores.view(4, 3), 1)[:, 0]  # each sample: the best of its 3 candidates
    for j, meta in enumerate(out.samples):
        i = j * 3 + int(want[j])
        assert meta["prompt_index"] == j // 2 and meta["sample_index"] == j % 2
        assert meta["candidate_index"] == int(want[j]) and meta["candidates"] == 3
        assert meta["seed"] == every.samples[i]["seed"] and torch.equal(
            out.codes[j], every.codes[i]
        )
        assert meta["rerank_score"] == pytest.approx(float(scores[i]), rel=1e-5, abs=1e-4)
    assert scores.view(4, 3).amax(1).tolist() == [m["rerank_score"] for m in out.samples]
    given = pipe(PROMPTS, num_samples=2, seeds=seeds, candidates=3, guidance_scale=2.0,
                 rerank_weight=0.7)  # fmt: skip
    assert torch.equal(given.codes, out.codes)
    with pytest.raises(ValueError, match="3 per sample"):
        pipe(PROMPTS, num_samples=2, seeds=[0, 1, 2, 3], candidates=3)
    again = pipe([PROMPTS[1]], seeds=[out.samples[3]["seed"]], guidance_scale=2.0)
    assert torch.equal(again.codes[0], out.codes[3])
    with pytest.raises(ValueError, match="candidates"):
        pipe(PROMPTS, candidates=0)
    for bad in (-1.0, float("inf")):  # None keeps the default, as for every setting
        with pytest.raises(ValueError, match="rerank_weight"):
            pipe(PROMPTS, candidates=2, rerank_weight=bad)


def test_pmi_scores_are_caption_minus_weighted_empty_likelihood(pipe):
    """The score is log p(codes | caption) - w log p(codes | empty caption), whatever the batch;
    start_row leaves the primed rows out; keep_best takes the highest, the earlier on ties."""
    codes = pipe(PROMPTS, num_samples=2, seed=1).codes
    prompts = [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2
    model, tok = pipe.transformer, pipe.tokenizer

    def loglik(texts, start_row=0):
        text = tok.encode(texts)
        return image_log_likelihood(
            model, text.ids, codes, text_lens=text.mask.sum(1), start_row=start_row
        )

    full = pmi_scores(model, tok, prompts, codes, weight=0.5, batch_size=3)
    torch.testing.assert_close(full, loglik(prompts) - 0.5 * loglik([""] * 4))
    alone = pmi_scores(model, tok, prompts, codes, weight=0.0, batch_size=1)
    torch.testing.assert_close(alone, loglik(prompts))
    assert (alone < 0).all()  # a sum of log-probabilities
    later = loglik(prompts, start_row=2)
    assert (later > alone).all()  # fewer (negative) terms
    # step by step, as sampling sees it: prefill, then one cached decode step per code
    text, flat = tok.encode(prompts), codes.flatten(1)
    lens = text.mask.sum(1)
    model.setup_cache(4)
    with torch.no_grad():
        steps = [prefill(model, text.ids, text_lens=lens)]
        for i in range(flat.shape[1] - 1):
            pos = torch.tensor([model.cfg.text_positions + i])
            steps.append(decode_one(model, flat[:, i : i + 1], pos, text_lens=lens))
    model.clear_cache()
    logp = torch.stack(steps, 1).log_softmax(-1).gather(-1, flat[..., None])[..., 0]
    torch.testing.assert_close(alone, logp.sum(1), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(later, logp[:, 2 * GRID :].sum(1), rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="start_row"):
        loglik(prompts, start_row=GRID)
    ranks = keep_best(torch.tensor([[0.0, 2.0, 2.0, -1.0], [5.0, 1.0, 3.0, 4.0]]), 2)
    assert ranks.tolist() == [[1, 2], [0, 3]]


def test_split_prompt_and_its_errors():
    assert split_prompt("a red circle") == ("a red circle", [])
    assert split_prompt("top: a red circle AND a circle AND a red::-0.5") == (
        "top: a red circle",
        [("a circle", 1.0), ("a red", -0.5)],
    )
    with pytest.raises(ValueError, match="part 1 of the composed prompt"):
        split_prompt("a red circle AND  AND a red")
    assert split_prompt(" a red circle  AND  a red ::2 ") == ("a red circle", [("a red", 2.0)])
    for bad in ("lots", "nan", "inf", "1e400"):
        with pytest.raises(ValueError, match="expected a finite number after ::"):
            split_prompt(f"a red circle AND a red::{bad}")


def test_composed_prompts_sample_with_their_parts(pipe):
    """A composed prompt samples what generate_image_tokens does with its parts; prompts with
    different numbers of parts share one call and keep their order; part_scale 0 is the plain
    prompt; each sample regenerates alone."""
    composed = "a small red circle AND a circle AND a red::-0.5"
    out = pipe([composed, "a blue square", composed], seed=3, guidance_scale=1.5, batch_size=1)
    tok = pipe.tokenizer
    text, parts, empty = (
        tok.encode(["a small red circle"]),
        tok.encode(["a circle", "a red"]),
        tok.encode([""]),
    )
    direct = generate_image_tokens(
        pipe.transformer,
        text.ids,
        text_lens=text.mask.sum(1),
        parts=parts.ids[None],
        part_lens=parts.mask.sum(1)[None],
        part_weights=torch.tensor([[1.0, -0.5]]),
        guidance_scale=1.5,
        empty_ids=empty.ids[0],
        empty_len=2,
        seeds=[3],
    )
    assert torch.equal(out.codes[0], direct[0])
    plain = pipe(["a blue square"], seeds=[4], guidance_scale=1.5)
    assert torch.equal(out.codes[1], plain.codes[0])
    assert [s["prompt"] for s in out.samples] == [composed, "a blue square", composed]
    assert out.samples[0]["part_scale"] == 1.0
    again = pipe([composed], seeds=[5], guidance_scale=1.5)
    assert torch.equal(again.codes[0], out.codes[2])
    off = pipe([composed], seeds=[3], guidance_scale=1.5, part_scale=0.0)
    assert torch.equal(
        off.codes[0], pipe(["a small red circle"], seeds=[3], guidance_scale=1.5).codes[0]
    )
    assert not torch.equal(off.codes[0], out.codes[0])


def test_save_pretrained_round_trips(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "copy")
    other = DalleAR.from_pretrained(tmp_path / "copy")
    a = pipe(PROMPTS[:1], num_samples=2, seed=1)
    b = other(PROMPTS[:1], num_samples=2, seed=1)
    assert torch.equal(a.codes, b.codes)


def test_assemble_links_and_keeps_sampling_defaults(parts, tmp_path):
    folder = assemble(
        tmp_path / "linked",
        tokenizer=parts["text_tokenizer"],
        vq=parts["vq"],
        transformer=parts["transformer"],
        link=True,
        defaults={"guidance_scale": 2.5, "top_k": 4},
    )
    assert (folder / "vq").is_symlink()
    pipe = DalleAR.from_pretrained(folder)
    out = pipe(PROMPTS[:1], seed=0)
    assert out.samples[0]["guidance_scale"] == 2.5 and out.samples[0]["top_k"] == 4
    with pytest.raises(ValueError, match="unknown sampling defaults"):
        assemble(tmp_path / "bad", *parts.values(), defaults={"tempreature": 1.0})


def test_priming_keeps_the_image_rows(pipe, capsys):
    scene = pipe(PROMPTS[:1], seed=3).images[0]
    prime = pipe.encode_prime(scene, rows=2)
    assert prime.shape == (1, 2, GRID)
    out = pipe(PROMPTS, num_samples=2, seed=0, prime_codes=prime, progress=True)
    drawn = 4 * (GRID - 2) * GRID  # the progress bar counts the codes drawn, not the kept rows
    assert f" {drawn}/{drawn} " in capsys.readouterr().err
    assert torch.equal(out.codes[:, :2], prime.expand(4, -1, -1))
    assert all(s["prime_rows"] == 2 for s in out.samples)
    per_sample = torch.cat([prime, prime.flip(-1), prime, prime.flip(-1)])  # one grid per sample
    for grids in (prime, per_sample):
        best = pipe(PROMPTS, num_samples=2, seed=0, prime_codes=grids, candidates=2)
        want = grids.expand(4, -1, -1)
        assert torch.equal(best.codes[:, :2], want) and best.samples[0]["prime_rows"] == 2
        prompts = [m["prompt"] for m in best.samples]
        rows_on = pmi_scores(pipe.transformer, pipe.tokenizer, prompts, best.codes, start_row=2)
        torch.testing.assert_close(rows_on, torch.tensor([m["rerank_score"] for m in best.samples]))
    with pytest.raises(ValueError, match="or 4 \\(per sample\\) grids, got 3"):
        pipe(PROMPTS, num_samples=2, prime_codes=torch.cat([prime] * 3), candidates=2)


# -- prompts that need a word --------------------------------------------------------------


def test_empty_prompt_is_the_unconditional_sample_with_a_warning(pipe, caplog):
    with caplog.at_level(logging.WARNING, logger="dalle_ar.prompts"):
        out = pipe([""], seed=0)
    assert "prompt 0 is empty: this is an unconditional sample" in caplog.text
    assert out.codes.shape == (1, GRID, GRID)


def test_long_prompt_is_truncated_with_a_warning(pipe, caplog):
    long = "a small red circle at the top left of a big blue square below a green diamond"
    with caplog.at_level(logging.WARNING, logger="dalle_ar.prompts"):
        pipe([long], seed=0)
    assert f"the model reads {TEXT_LEN - 2}: truncated to 'a small" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dalle_ar.prompts"):
        pipe(["a blue square", long], seed=1)  # the same prompt again: said once per pipeline
    assert "truncated" not in caplog.text


def test_an_over_long_prompt_is_captioned_with_what_the_model_read(pipe, caplog):
    long = " ".join(["a small red circle at the top left of a big blue square"] * 45)  # 540 words
    with caplog.at_level(logging.WARNING, logger="dalle_ar.prompts"):
        out = pipe([long, "a red 🙂🙂🙂🙂🙂🙂"], seed=0)
    read = out.samples[0]["truncated_to"]
    assert read == pipe.tokenizer.decode(pipe.tokenizer.encode(long).ids)[0] and long.startswith(
        read
    )
    grid, short = prompt_grids(out)
    assert grid.height < 300  # the whole prompt would be over 3,000 px tall
    assert captioned_grid(out.images[:1], read + TRUNCATED).size == grid.size
    assert out.samples[1]["truncated_to"] == "a red 🙂"  # the cut emoji's bytes are dropped
    assert "\ufffd" not in caplog.text and "truncated to 'a red 🙂'" in caplog.text
    assert pipe(PROMPTS[1:], seed=0).samples[0]["truncated_to"] is None  # it fits


def test_unknown_characters_are_named_in_a_warning(pipe, caplog):
    with caplog.at_level(logging.WARNING, logger="dalle_ar.prompts"):
        pipe(["a red 🙂 circle"], seed=0)
    assert "never saw in training: '🙂'" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dalle_ar.prompts"):
        pipe(["A RED circle"], seed=0)  # upper case is normalised away: nothing to warn
    assert "never saw" not in caplog.text


def test_unseen_words_are_named_in_a_warning_and_the_record(pipe, pipe_dir, tmp_path, caplog):
    """Words no training caption held (the shapes captions know "tiny", "upper", "corner", not
    "crimson" or "ball"; typos) are warned about by the API and the CLI and recorded per sample;
    a composed prompt's parts are read without their marks."""
    with caplog.at_level(logging.WARNING, logger="dalle_ar.prompts"):
        out = pipe(["a crimson ball", "a smal red circel"], seed=0)
    assert "prompt 0 has words no training caption held: 'crimson', 'ball';" in caplog.text
    assert "prompt 1 has words no training caption held: 'smal', 'circel';" in caplog.text
    assert [m["unseen_words"] for m in out.samples] == [["crimson", "ball"], ["smal", "circel"]]
    # the model reads "a tiny crimso" of a longer one: "ball" comes after the cut
    long = pipe(["a tiny crimson ball in the upper left corner"], seed=0).samples[0]
    assert long["unseen_words"] == ["crimson"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dalle_ar.prompts"):
        out = pipe(["a red circle AND a red::-0.5 AND a crimson::2"], seed=0)
    assert out.samples[0]["unseen_words"] == ["crimson"]
    assert "'crimson'" in caplog.text and "'red'" not in caplog.text
    assert pipe(PROMPTS, seed=0).samples[0]["unseen_words"] == []
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dalle_ar.prompts"):
        assert cli(["sample", "--model", str(pipe_dir), "a crimson ball", "--candidates", "2",
                    "--out", str(tmp_path / "o")]) == 0  # fmt: skip
    assert "prompt 0 has words no training caption held: 'crimson', 'ball';" in caplog.text
    doc = json.loads((tmp_path / "o" / "samples.json").read_text())
    assert doc["samples"][0]["unseen_words"] == ["crimson", "ball"]


@pytest.mark.parametrize("memory_mb", [0.0, -1.0, math.inf, math.nan])
def test_memory_budget_must_be_a_finite_positive_number(pipe, memory_mb):
    with pytest.raises(ValueError, match=f"memory_mb must be a finite number > 0, got {memory_mb}"):
        pipe(PROMPTS, memory_mb=memory_mb)


@pytest.mark.parametrize("num", [0, -2])
def test_num_samples_below_one_is_refused(pipe, num):
    with pytest.raises(ValueError, match=f"num_samples must be an int >= 1, got {num}"):
        pipe(PROMPTS, num_samples=num)


# -- folders that do not fit -------------------------------------------------------------------


def test_missing_pipeline_json_and_missing_component(pipe_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        DalleAR.from_pretrained(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="pipeline.json is missing"):
        DalleAR.from_pretrained(empty)
    broken = tmp_path / "broken"
    shutil.copytree(pipe_dir, broken)
    shutil.rmtree(broken / "vq")
    with pytest.raises(FileNotFoundError, match=r"the vq component \(vq/\) is missing"):
        DalleAR.from_pretrained(broken)


def test_mismatched_codebook_and_vocabulary_are_refused(parts, tmp_path):
    small_vocab = Transformer(tiny_transformer_config(text_vocab=100))
    small_vocab.save_pretrained(tmp_path / "tf_vocab")
    with pytest.raises(ValueError, match="tokenizer has 300 ids but the transformer's text_vocab"):
        assemble(tmp_path / "p1", parts["text_tokenizer"], parts["vq"], tmp_path / "tf_vocab")
    other_book = Transformer(tiny_transformer_config(image_vocab=CODEBOOK * 2))
    other_book.save_pretrained(tmp_path / "tf_book")
    with pytest.raises(ValueError, match=f"VQ codebook has {CODEBOOK} codes but"):
        assemble(tmp_path / "p2", parts["text_tokenizer"], parts["vq"], tmp_path / "tf_book")
    # a hand-edited folder is checked on loading too
    folder = tmp_path / "p3"
    assemble(folder, *parts.values())
    shutil.rmtree(folder / "transformer")
    shutil.copytree(tmp_path / "tf_book", folder / "transformer")
    with pytest.raises(ValueError, match="image_vocab is 64: expected equal"):
        DalleAR.from_pretrained(folder)
    other_patch = Transformer(tiny_transformer_config(code_features=5))
    other_patch.save_pretrained(tmp_path / "tf_feats")
    with pytest.raises(ValueError, match="describes codes with 5 features but this VQ draws"):
        assemble(tmp_path / "p4", parts["text_tokenizer"], parts["vq"], tmp_path / "tf_feats")


# -- dalle-ar sample ---------------------------------------------------------------------------


def test_cli_writes_images_grids_and_json_that_regenerates(pipe_dir, tmp_path):
    out = tmp_path / "out"
    argv = ["sample", "--model", str(pipe_dir), *PROMPTS, "--num", "2", "--seed", "7"]
    assert cli([*argv, "--top-k", "8", "--guidance", "2", "--out", str(out)]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["000_00.png", "000_01.png", "001_00.png", "001_01.png",
                     "grid_000.png", "grid_001.png", "samples.json"]  # fmt: skip
    doc = json.loads((out / "samples.json").read_text())
    rec = doc["samples"][3]
    assert rec["seed"] == 10 and rec["top_k"] == 8 and rec["guidance_scale"] == 2.0
    recorded = sample_parser().parse_args(doc["command"][2:])  # the record runs again
    assert (recorded.guidance_scale, recorded.top_k, recorded.seed) == (2.0, 8, 7)
    grid = Image.open(out / "grid_000.png")
    assert grid.width > 2 * GRID * 4 and grid.height > GRID * 4  # tiles plus a caption
    again = tmp_path / "again"
    json_path = str(out / "samples.json")
    assert cli(["sample", "--from-json", json_path, "--index", "3", "--out", str(again)]) == 0
    assert np.array_equal(_pixels(again / "001_01.png"), _pixels(out / "001_01.png"))
    # reranked: the kept candidate's seed is recorded, and regenerates it alone
    best = tmp_path / "best"
    assert cli([*argv, "--candidates", "3", "--rerank-weight", "0.5", "--out", str(best)]) == 0
    rec = json.loads((best / "samples.json").read_text())["samples"][2]
    assert rec["candidates"] == 3 and 0 <= rec["candidate_index"] < 3
    assert rec["seed"] == 7 + 2 + 4 * rec["candidate_index"]  # sample 2: seeds 9, 13, 17
    json_path = str(best / "samples.json")
    assert cli(["sample", "--from-json", json_path, "--index", "2", "--out", str(again)]) == 0
    assert np.array_equal(_pixels(again / "001_00.png"), _pixels(best / "001_00.png"))


class Stop(Exception):
    """The run dies here (a kill, a full disk, a power cut)."""


@pytest.mark.parametrize(("extra", "first"), [([], ["000_00.png", "000_01.png"]),
                                              (["--candidates", "3"], ["000_00.png"])])  # fmt: skip
def test_a_run_that_dies_keeps_what_it_drew(pipe_dir, pipe, tmp_path, extra, first):
    """The CLI writes each batch as it finishes: a run stopped after its first batch leaves that
    batch's PNGs (reranked: the first sample, done once its 3 candidates are scored, two
    batches of 2) and a valid samples.json naming exactly them, with the pixels of the run."""
    out = tmp_path / "out"
    argv = ["--model", str(pipe_dir), *PROMPTS, "--num", "3", "--seed", "7", "--batch-size", "2"]
    args = sample_parser().parse_args([*argv, *extra, "--out", str(out)])
    writer = _Writer(args)

    def dies_after_one(part):
        writer(part)
        raise Stop

    kw = {"candidates": 3} if extra else {}
    with pytest.raises(Stop):
        pipe(PROMPTS, num_samples=3, seed=7, batch_size=2, on_batch=dies_after_one, **kw)
    assert sorted(p.name for p in out.iterdir()) == [*first, "samples.json"]
    doc = json.loads((out / "samples.json").read_text())
    assert [r["file"] for r in doc["samples"]] == first
    full = pipe(PROMPTS, num_samples=3, seed=7, batch_size=2, **kw)
    for i, name in enumerate(first):
        assert np.array_equal(_pixels(out / name), _pixels(full.images[i]))
    assert len(doc["candidates"]) == (3 if extra else 0)  # the kept sample's own candidates


def test_cli_streamed_files_are_the_api_images(pipe_dir, pipe, tmp_path):
    """Written batch by batch (batches of 3 across the prompts, a composed prompt drawn apart
    from the others), the files, their names and records are those of one call's output."""
    prompts = [PROMPTS[0], "a blue square AND a square::0.5", PROMPTS[1]]
    out = tmp_path / "out"
    argv = ["sample", "--model", str(pipe_dir), *prompts, "--num", "2", "--seed", "3"]
    assert cli([*argv, "--batch-size", "3", "--out", str(out)]) == 0
    want = pipe(prompts, num_samples=2, seed=3)  # one batch, no callback
    doc = json.loads((out / "samples.json").read_text())
    names = [f"{p:03d}_{j:02d}.png" for p in range(3) for j in range(2)]
    assert [r["file"] for r in doc["samples"]] == names
    for i, (rec, meta) in enumerate(zip(doc["samples"], want.samples)):
        assert rec == {"index": i, "file": names[i], **meta}
        assert np.array_equal(_pixels(out / names[i]), _pixels(want.images[i]))


def test_cli_prompts_file_and_priming(pipe_dir, pipe, tmp_path):
    (tmp_path / "prompts.txt").write_text("a blue square\n\na red circle\n")
    scene = tmp_path / "scene.png"
    pipe(PROMPTS[:1], seed=3).images[0].save(scene)
    out = tmp_path / "out"
    argv = ["sample", "--model", str(pipe_dir), "--prompts-file", str(tmp_path / "prompts.txt")]
    argv += ["--prime-image", str(scene), "--prime-rows", "1", "--out", str(out)]
    assert cli(argv) == 0
    doc = json.loads((out / "samples.json").read_text())
    assert [r["prompt"] for r in doc["samples"]] == ["a blue square", "a red circle"]
    want = pipe.encode_prime(Image.open(scene), 1)[0].tolist()
    assert all(r["prime_codes"] == want for r in doc["samples"])
    again = tmp_path / "again"
    assert cli(["sample", "--from-json", str(out / "samples.json"), "--out", str(again)]) == 0
    assert np.array_equal(_pixels(again / "000_00.png"), _pixels(out / "000_00.png"))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--num", "0", "a circle"], "--num must be >= 1, got 0"),
        ([], "expected at least one prompt"),
        (["--prime-rows", "2", "a circle"], "--prime-rows needs --prime-image"),
        (["--prompts-file", "/nonexistent/p.txt"], "prompts file /nonexistent/p.txt does not"),
    ],
)
def test_cli_bad_arguments_exit_2_with_a_message(pipe_dir, tmp_path, capsys, extra, message):
    code = cli(["sample", "--model", str(pipe_dir), *extra, "--out", str(tmp_path / "o")])
    assert code == 2
    assert message in capsys.readouterr().err


def test_cli_bad_model_folder_exits_2(tmp_path, capsys):
    assert cli(["sample", "--model", str(tmp_path), "a circle", "--out", str(tmp_path / "o")]) == 2
    assert "pipeline.json is missing" in capsys.readouterr().err
    bad = tmp_path / "samples.json"
    bad.write_text(json.dumps({"samples": []}))
    assert cli(["sample", "--from-json", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "holds no samples" in capsys.readouterr().err


def test_from_json_writes_only_inside_out(pipe_dir, tmp_path, capsys):
    """A handed samples.json naming its file outside --out (absolute, or up with "..") is refused
    by name before any drawing, and the file it names is left as it was."""
    out = tmp_path / "out"
    assert cli(["sample", "--model", str(pipe_dir), PROMPTS[0], "--out", str(out)]) == 0
    victim = tmp_path / "victim.png"
    victim.write_bytes(b"keep me")
    doc = json.loads((out / "samples.json").read_text())
    for bad in (str(victim), "../victim.png", "../../x.png", ""):
        doc["samples"][0]["file"] = bad
        (out / "evil.json").write_text(json.dumps(doc))
        argv = ["sample", "--from-json", str(out / "evil.json"), "--out", str(out / "again")]
        assert cli(argv) == 2
        assert f"samples[0].file must be a relative path inside {out / 'again'}, got {bad!r}" in (
            capsys.readouterr().err
        )
    assert victim.read_bytes() == b"keep me" and not (tmp_path / "x.png").exists()
    assert not (out / "again").exists()  # refused before anything was written
    doc["samples"][0] = {"file": "a.png"}  # not a record: named, no traceback
    (out / "evil.json").write_text(json.dumps(doc))
    assert cli(["sample", "--from-json", str(out / "evil.json"), "--out", str(out / "o")]) == 2
    assert "samples[0] is not a sample record (it lacks index, prompt" in capsys.readouterr().err


def test_pipeline_json_names_no_component_folder_outside_it(pipe_dir, tmp_path):
    folder = tmp_path / "evil"
    shutil.copytree(pipe_dir, folder)
    shutil.copytree(pipe_dir / "vq", tmp_path / "outside_vq")
    meta = json.loads((folder / "pipeline.json").read_text())
    for name in ("../outside_vq", str(tmp_path / "outside_vq")):
        bad = dict(meta, components={**meta["components"], name: ["dalle_ar", "VQTokenizer"]})
        (folder / "pipeline.json").write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=r"component name \(its folder's name\) must be a rel"):
            Pipeline.from_pretrained(folder)
    # version 1 named each component's subfolder: confined the same way
    v1 = {"format": "dalle_ar.pipeline", "version": 1,
          "components": {"text_tokenizer": "text_tokenizer", "vq": "../outside_vq",
                         "transformer": "transformer"}}  # fmt: skip
    (folder / "pipeline.json").write_text(json.dumps(v1))
    with pytest.raises(ValueError, match=r"the vq component's folder must be a relative path ins"):
        Pipeline.from_pretrained(folder)


def test_cli_output_place_is_checked_before_drawing(pipe_dir, tmp_path, capsys):
    """--out naming a file, a path under a file, or (for a user without root) a read-only
    folder is refused before the pipeline loads, and nothing is written."""
    afile = tmp_path / "taken.png"
    afile.write_bytes(b"x")
    argv = ["sample", "--model", str(tmp_path / "no_pipeline"), PROMPTS[0]]  # never loaded
    assert cli([*argv, "--out", str(afile)]) == 2
    assert capsys.readouterr().err == f"dalle-ar sample: --out {afile} is a file, not a folder\n"
    assert cli([*argv, "--out", str(afile / "sub")]) == 2
    err = capsys.readouterr().err
    want = f"--out {afile / 'sub'} cannot be made: {afile} is a file, not a folder"
    assert err == f"dalle-ar sample: {want}\n"
    assert afile.read_bytes() == b"x"
    if os.geteuid() != 0:  # root writes into read-only folders
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert cli([*argv, "--out", str(locked / "o")]) == 2
        assert "cannot be written (in" in capsys.readouterr().err


def test_an_output_too_large_for_memory_is_refused_before_drawing(pipe_dir, tmp_path, capsys):
    out = tmp_path / "o"
    argv = ["sample", "--model", str(pipe_dir), PROMPTS[0], "--out", str(out)]
    assert cli([*argv, "--num", "1000000000"]) == 2  # before: a MemoryError traceback
    err = capsys.readouterr().err.splitlines()
    assert (
        len(err) == 1
        and err[0].startswith(
            "dalle-ar sample: setting 'num_samples': 1,000,000,000 image(s) of 1 prompt(s) x "
            "num_samples=1000000000 x keep=1, held until the call returns ("
        )
        and "more than this machine's memory" in err[0]
    )
    assert cli([*argv, "--candidates", "1000000000"]) == 2  # each candidate's record
    err = capsys.readouterr().err
    assert err.startswith(
        "dalle-ar sample: setting 'candidates': 1 image(s) of 1 prompt(s) x "
        "num_samples=1 x keep=1, each the best of candidates=1000000000"
    )
    assert not list(out.glob("*.png"))


def test_cli_device_this_machine_lacks_is_one_line_and_exit_2(pipe_dir, tmp_path, capsys):
    argv = ["sample", "--model", str(pipe_dir), PROMPTS[0], "--out", str(tmp_path / "o")]
    assert cli([*argv, "--device", "gpu"]) == 2
    assert capsys.readouterr().err == (
        "dalle-ar sample: device must be auto, cpu, cuda or cuda:N, got 'gpu'\n"
    )
    lacking = "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"
    assert cli([*argv, "--device", lacking]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"dalle-ar sample: device {lacking} was asked for, but ")
    assert len(err.splitlines()) == 1


# -- tools -------------------------------------------------------------------------------------


def test_eval_fidelity_reports_both_settings_split_by_combination(pipe_dir, tmp_path):
    tool = _tool("eval_fidelity")
    out = tmp_path / "fid.json"
    argv = ["--model", str(pipe_dir), "--num", "6", "--guidance", "2", "--out", str(out)]
    assert tool.main(argv) == 0
    rep = json.loads(out.read_text())
    assert rep["num_prompts"] == 6 and 0 <= rep["n_held_out"] <= 6
    assert set(rep["settings"]) == {"1", "2"}
    for key, scale in (("1", 1.0), ("2", 2.0)):
        res = rep["settings"][key]
        assert res["guidance_scale"] == scale and res["all"]["n"] == 6
        assert 0.0 <= res["all"]["exact"] <= 1.0
        n_seen = res["seen"]["n"] if res["seen"] else 0
        n_held = res["held_out"]["n"] if res["held_out"] else 0
        assert n_seen + n_held == 6 and n_held == rep["n_held_out"]
        assert set(res["all"]) >= {"count", "color", "shape", "size", "position", "relation"}
        assert rep["summary"][f"guidance {key}"]["exact"] == res["all"]["exact"]
    assert tool.main(["--model", str(pipe_dir), "--num", "0"]) == 2
    argv = ["--model", str(pipe_dir), "--num", "4", "--composed", "--part-scale", "0.5"]
    assert tool.main([*argv, "--out", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert set(rep["settings"]) == {"1", "1.5", "1 composed", "1.5 composed"}
    res = rep["settings"]["1.5 composed"]
    assert res["composed"] and res["part_scale"] == 0.5 and res["all"]["n"] == 4
    assert not rep["settings"]["1.5"]["composed"]
    argv = ["--model", str(pipe_dir), "--num", "4", "--candidates", "3", "--rerank-weight", "1"]
    assert tool.main([*argv, "--out", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert set(rep["settings"]) == {"1", "1.5", "1.5 best of 3 by pmi"}
    res = rep["settings"]["1.5 best of 3 by pmi"]
    assert res["candidates"] == 3 and res["rerank_weight"] == 1.0 and res["all"]["n"] == 4
    assert tool.main(["--model", str(pipe_dir), "--candidates", "0"]) == 2


def test_evaluate_fidelity_with_no_prompts_is_empty(pipe):
    rep = evaluate_fidelity(pipe, num_prompts=0)
    assert rep["num_prompts"] == 0 and rep["settings"] == {}


def test_save_prompt_grid_stacks_one_captioned_row_per_prompt(pipe, tmp_path):
    out = pipe(PROMPTS, num_samples=3, seed=0)
    path = save_prompt_grid(out, tmp_path / "g" / "grid.png")
    img = Image.open(path)
    one = Image.open(
        save_prompt_grid(pipe(PROMPTS[:1], num_samples=3, seed=0), tmp_path / "one.png")
    )
    assert img.width == one.width and img.height > 2 * GRID * 4 * 3


def test_bench_sampling_smoke_run(capsys):
    tool = _tool("bench_sampling")
    assert tool.main(["--tiny", "--grids", "2,4", "--repeats", "1", "--compile"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["tokens_equal"] is True and rep["speedup"] > 0
    assert rep["compiled"]["tokens_equal"] is True and rep["compile_speedup"] > 0
    assert rep["scaling"]["tokens_per_image"] == [4, 16] and "exponent" in rep["scaling"]


def test_bench_masked_smoke_run(capsys):
    """tools/bench_masked.py (the masked mode's speed bars; gpu_check.sh runs it on a GPU): both
    modes timed on the same grid and batch, the ratio reported."""
    tool = _tool("bench_masked")
    assert tool.main(["--grids", "2", "--batch", "2", "--repeats", "1", "--steps", "2"]) == 0
    rep = json.loads(capsys.readouterr().out.strip().split("\n", 1)[1])  # after the row's line
    (row,) = rep["rows"]
    assert rep["device"] == "cpu" and row["grid"] == "2x2" and row["masked_steps"] == 2
    assert row["speedup"] == row["ar_seconds"] / row["masked_seconds"] > 0


def test_bench_train_compares_fp32_and_bf16(capsys):
    tool = _tool("bench_train")
    argv = ["--config", str(ROOT / "configs" / "tiny" / "transformer.yaml"), "--steps", "2"]
    assert tool.main([*argv, "--warmup", "1", "--compare-bf16", "data.batch_size=2"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["bf16"]["bf16_autocast"] is True and rep["bf16_speedup"] > 0
    assert rep["bf16_autocast"] is False  # the baseline is fp32 even where auto would be bf16
    assert rep["samples_per_s"] > 0 and rep["bf16"]["samples_per_s"] > 0


def test_a_tokenizer_or_vq_the_transformer_was_not_trained_with_is_refused(
    parts, tmp_path, caplog, capsys
):
    from _pipeline_fixtures import peaked

    from dalle_ar.checkpoint import file_sha256
    from dalle_ar.data.shapes import generate
    from dalle_ar.models.vq import VQTokenizer
    from dalle_ar.text import TextTokenizer, TokenizerConfig, train_tokenizer

    # a tokenizer trained apart, of the same size: it fits every size check
    scenes = generate(64, seed=1, split="train", size=GRID * 4)
    other = train_tokenizer(
        (c for _, c, _ in scenes), TokenizerConfig(vocab_size=300, text_len=TEXT_LEN)
    )
    other.save_pretrained(tmp_path / "other_tok")
    assert TextTokenizer.from_pretrained(tmp_path / "other_tok").vocab_size == 300
    torch.manual_seed(1)
    VQTokenizer(VQTokenizer.from_pretrained(parts["vq"]).config).save_pretrained(tmp_path / "vq2")
    tok_sha = file_sha256(parts["text_tokenizer"] / "tokenizer.json")
    vq_sha = file_sha256(parts["vq"] / "model.safetensors")
    for name, cfg in (
        ("tf", tiny_transformer_config()),
        ("masked", tiny_transformer_config(objective="masked", layouts="bidir")),
    ):
        model = peaked(Transformer(cfg))
        model.cfg.text_tokenizer_sha256, model.cfg.vq_sha256 = tok_sha, vq_sha  # as the recipe
        model.save_pretrained(tmp_path / name)
    tok, vq, tf = parts["text_tokenizer"], parts["vq"], tmp_path / "tf"
    assemble(tmp_path / "ok", tok, vq, tf, masked=tmp_path / "masked")  # its own: accepted
    with pytest.raises(ValueError, match=f"the transformer was trained on another tokenizer "
                       rf"\(content hash {tok_sha[:12]}\) than this one"):  # fmt: skip
        assemble(tmp_path / "p1", tmp_path / "other_tok", vq, tf)
    with pytest.raises(ValueError, match="the transformer was trained on another VQ"):
        assemble(tmp_path / "p2", tok, tmp_path / "vq2", tf)
    with pytest.raises(ValueError, match="the masked generator was trained on another tokenizer"):
        assemble(tmp_path / "p3", tmp_path / "other_tok", vq, parts["transformer"],
                 masked=tmp_path / "masked")  # fmt: skip
    # the override: a warning, and the folder is written
    with caplog.at_level(logging.WARNING):
        folder = assemble(tmp_path / "p4", tmp_path / "other_tok", vq, tf, allow_mismatch=True)
    assert "another tokenizer" in caplog.text and "allow_mismatch" in caplog.text
    # a hand-edited folder is refused on loading too, unless told
    with pytest.raises(ValueError, match="the transformer was trained on another tokenizer"):
        DalleAR.from_pretrained(folder)
    assert DalleAR.from_pretrained(folder, allow_mismatch=True).tokenizer.vocab_size == 300
    # and so on the command line: one line naming it, or --allow-mismatch
    from dalle_ar.cli import main as cli

    argv = ["sample", "--model", str(folder), "--out", str(tmp_path / "drawn"), "a red circle"]
    assert cli(argv) == 2
    assert "trained on another tokenizer" in capsys.readouterr().err
    assert cli([*argv, "--allow-mismatch"]) == 0
    assert (tmp_path / "drawn" / "samples.json").is_file()
    # a transformer folder without the record (written before it existed) is not checked
    assemble(tmp_path / "p5", tmp_path / "other_tok", vq, parts["transformer"])
