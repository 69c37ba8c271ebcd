"""Reranked batch generation: N candidates per sample drawn in batches across prompts, scored by
CLIP, by the transformer's PMI or by both, the best K kept, every candidate's seed and score
recorded; `dalle-ar sample --candidates N --keep K --reranker clip`; bad input refused before any
drawing. On the tiny random-weight pipeline with a tiny CLIP built over its tokenizer."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _pipeline_fixtures import build_components, peaked
from PIL import Image

from dalle_ar.cli import main as cli
from dalle_ar.grid import image_grid
from dalle_ar.models.clip import CLIP, CLIPSizes
from dalle_ar.models.transformer import Transformer
from dalle_ar.pipelines import ARPipeline, assemble
from dalle_ar.text import TextTokenizer

PROMPTS = ["a small red circle at the top", "a blue square"]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("rerank")
    parts = build_components(root)
    tf = peaked(Transformer.from_pretrained(parts["transformer"]))  # candidates that differ
    tf.save_pretrained(parts["transformer"])
    sizes = CLIPSizes(image_size=16, patch_size=4, vision_width=32, vision_layers=1,
                      vision_heads=2, text_width=32, text_layers=1, text_heads=2, embed_dim=16,
                      text_len=32)  # fmt: skip
    CLIP.build(sizes, TextTokenizer.from_pretrained(parts["text_tokenizer"])).save_pretrained(
        root / "clip"
    )
    return assemble(root / "pipe", parts["text_tokenizer"], parts["vq"], parts["transformer"],
                    clip=root / "clip")  # fmt: skip


@pytest.fixture(scope="module")
def pipe(pipe_dir) -> ARPipeline:
    return ARPipeline.from_pretrained(pipe_dir)


def _candidates_one_by_one(pipe, n_per_prompt, seed, N):
    """Every candidate drawn alone from its seed (seed + j + c*n), sample-major."""
    n = len(PROMPTS) * n_per_prompt
    prompts = [PROMPTS[j // n_per_prompt] for j in range(n) for _ in range(N)]
    seeds = [seed + j + c * n for j in range(n) for c in range(N)]
    return pipe(prompts, seeds=seeds, batch_size=1), prompts, seeds


def test_clip_reranking_keeps_the_best_k_of_n_and_records_every_candidate(pipe):
    out = pipe(PROMPTS, num_samples=2, seed=3, candidates=4, keep=2, reranker="clip",
               batch_size=3)  # fmt: skip  # batches cut across samples and prompts
    assert len(out.images) == len(PROMPTS) * 2 * 2 and out.codes.shape[0] == 8
    every, prompts, seeds = _candidates_one_by_one(pipe, 2, 3, 4)
    clip = pipe.components["clip"]
    want = clip.score(every.images, prompts).view(4, 4)  # (samples, candidates), from pixels
    got = torch.tensor([c["clip_score"] for c in out.candidates]).view(4, 4)
    assert torch.allclose(got, want, atol=1e-3)
    assert [c["seed"] for c in out.candidates] == seeds
    for j in range(4):
        top = torch.sort(got[j], descending=True, stable=True).indices[:2].tolist()
        kept = out.samples[2 * j : 2 * j + 2]
        assert [m["candidate_index"] for m in kept] == top
        assert [m["rank"] for m in kept] == [0, 1] and kept[0]["reranker"] == "clip"
        for m in kept:  # each kept image is its candidate, regenerated alone from its seed
            alone = every.codes[4 * j + m["candidate_index"]]
            assert torch.equal(out.codes[out.samples.index(m)], alone)
        flags = [c["kept"] for c in out.candidates[4 * j : 4 * j + 4]]
        assert sum(flags) == 2 and all(flags[c] for c in top)
    # prompt-major: prompt 0's samples first, numbered 0..3 (2 samples x keep 2)
    assert [(m["prompt_index"], m["sample_index"]) for m in out.samples[:4]] == [
        (0, 0), (0, 1), (0, 2), (0, 3)]  # fmt: skip


def test_reranking_does_not_depend_on_the_batch(pipe):
    a = pipe(PROMPTS, seed=0, candidates=5, keep=2, reranker="clip+pmi", batch_size=1)
    b = pipe(PROMPTS, seed=0, candidates=5, keep=2, reranker="clip+pmi", batch_size=7)
    assert torch.equal(a.codes, b.codes)
    assert [m["candidate_index"] for m in a.samples] == [m["candidate_index"] for m in b.samples]


def test_clip_plus_pmi_keeps_the_best_mean_z_score(pipe):
    out = pipe(PROMPTS, seed=1, candidates=4, keep=1, reranker="clip+pmi")
    for j in range(len(PROMPTS)):
        rows = out.candidates[4 * j : 4 * j + 4]
        z = 0
        for key in ("clip_score", "pmi_score"):
            x = torch.tensor([r[key] for r in rows])
            sd = x.std(unbiased=False)  # 0 when every candidate scores the same: no say
            z = z + ((x - x.mean()) / sd if sd > 0 else 0 * x)
        assert out.samples[j]["candidate_index"] == int(torch.argmax(z / 2))
        assert out.samples[j]["rerank_score"] == pytest.approx(float((z / 2).max()), abs=1e-5)


def test_bad_rerank_input_is_refused_before_any_drawing(pipe, pipe_dir, monkeypatch):
    drawn = []
    monkeypatch.setattr(pipe, "_draw", lambda *a, **k: drawn.append(1))
    for kw, msg in (
        (dict(candidates=2, keep=3), "'keep': must be an int in \\[1, candidates=2\\]"),
        (dict(candidates=2, keep=0), "'keep'"),
        (dict(candidates=2, reranker="dino"), "'reranker': must be one of"),
    ):
        with pytest.raises(ValueError, match=msg):
            pipe(PROMPTS, **kw)
    with pytest.raises(ValueError, match="encodes .* more than the model's 32"):
        pipe(["a small red circle " * 20], candidates=2, reranker="clip")
    no_clip = ARPipeline(pipe.tokenizer, pipe.vq, pipe.transformer)
    monkeypatch.setattr(no_clip, "_draw", lambda *a, **k: drawn.append(1))
    with pytest.raises(ValueError, match="needs a clip component, which this ar pipeline lacks"):
        no_clip(PROMPTS, candidates=2, reranker="clip+pmi")
    assert not drawn


def test_the_command_line_offers_the_rerankers_there_are(pipe_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli(["sample", "--model", str(pipe_dir), PROMPTS[0], "--candidates", "2", "--reranker",
             "dino", "--out", "never"])  # fmt: skip
    err = capsys.readouterr().err
    assert "--reranker: invalid choice: 'dino'" in err
    offered = err.split("choose from ")[1].split(")")[0].replace("'", "").split(", ")
    assert offered == ["pmi", "clip", "clip+pmi"]
    # one candidate per sample (the folder's default): nothing to rank, so the ranking's
    # flags would be ignored
    assert cli(["sample", "--model", str(pipe_dir), PROMPTS[0], "--reranker", "clip",
                "--rerank-weight", "0.5", "--out", str(tmp_path / "never")]) == 2  # fmt: skip
    assert "--reranker and --rerank-weight apply only with --candidates N > 1" in (
        capsys.readouterr().err)  # fmt: skip
    assert cli(["sample", "--model", str(pipe_dir), PROMPTS[0], "--reranker", "clip",
                "--out", str(tmp_path / "never")]) == 2  # fmt: skip
    assert "--reranker applies only with --candidates N > 1" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_fidelity_refuses_bad_rerankers_before_any_drawing(pipe, monkeypatch):
    from dalle_ar.eval.fidelity import evaluate_fidelity

    drawn = []
    monkeypatch.setattr(pipe, "_draw", lambda *a, **k: drawn.append(1))
    for rerankers, msg in (((), "at least one reranker"), (("dino",), "'reranker'")):
        with pytest.raises(ValueError, match=msg):
            evaluate_fidelity(pipe, 2, candidates=2, rerankers=rerankers)
    no_clip = ARPipeline(pipe.tokenizer, pipe.vq, pipe.transformer)
    monkeypatch.setattr(no_clip, "_draw", lambda *a, **k: drawn.append(1))
    with pytest.raises(ValueError, match="needs a clip component"):
        evaluate_fidelity(no_clip, 2, candidates=2, rerankers=("pmi", "clip"))
    assert not drawn


def test_the_batch_is_sized_to_the_memory_budget(pipe):
    s, rr = pipe.defaults["ar"], pipe.defaults["rerank"]
    assert pipe.candidate_batch(s, rr, 0.001) == 1
    assert pipe.candidate_batch(s, rr, 4096) == 64  # at most MAX_BATCH
    small = pipe.candidate_batch(s, rr, 0.2)
    assert 1 < small < 64
    with pytest.raises(ValueError, match="memory_mb"):
        pipe.candidate_batch(s, rr, 0)


def test_sample_cli_writes_scored_grids_and_regenerates_any_candidate(pipe_dir, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["sample", "--model", str(pipe_dir), *PROMPTS, "--candidates", "3", "--keep", "2",
            "--reranker", "clip", "--seed", "5", "--out", str(out)]  # fmt: skip
    assert cli(argv) == 0
    doc = json.loads((out / "samples.json").read_text())
    assert len(doc["samples"]) == 4 and len(doc["candidates"]) == 6
    assert all("clip_score" in c and "seed" in c for c in doc["candidates"])
    grid = Image.open(out / "grid_000.png")
    plain = image_grid([Image.open(out / "000_00.png")] * 2)
    assert grid.height > plain.height  # caption above, score labels under the tiles
    i = next(k for k, c in enumerate(doc["candidates"]) if not c["kept"])  # one left out
    again = tmp_path / "again"
    assert cli(["sample", "--from-json", str(out / "samples.json"), "--candidate", str(i),
                "--out", str(again)]) == 0  # fmt: skip
    assert f"regenerated candidate {i} (of sample " in capsys.readouterr().out
    pipe = ARPipeline.from_pretrained(pipe_dir)
    c = doc["candidates"][i]
    alone = pipe([c["prompt"]], seeds=[c["seed"]]).images[0]
    again_png = np.asarray(Image.open(again / f"candidate_{i:04d}.png"))
    assert np.array_equal(again_png, np.asarray(alone))
    assert cli([*argv[:-2], "--keep", "4", "--out", str(tmp_path / "x")]) == 2  # keep > candidates


def test_grid_labels_are_written_under_the_tiles():
    tiles = [np.full((8, 8, 3), 255, np.uint8)] * 2
    plain, labelled = image_grid(tiles), image_grid(tiles, labels=["clip 31.2", "clip 30"])
    assert labelled.height > plain.height and labelled.width == plain.width
    band = np.asarray(labelled)[plain.height - 2 :]
    assert (band < 128).any()  # dark text in the label band
    with pytest.raises(ValueError, match="one label per image"):
        image_grid(tiles, labels=["a"])
