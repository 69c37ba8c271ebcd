"""The masked mode end to end on tiny random-weight components: `pipe(prompts, mode="masked")`,
inpainting (kept codes bit-identical), reranking in this mode, `dalle-ar sample --mode masked`
with and without --init/--mask, regeneration from samples.json, and a masked component that does
not fit refused by name."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _pipeline_fixtures import build_components, peaked, tiny_transformer_config
from PIL import Image

from dalle_ar.cli import main as cli
from dalle_ar.models.transformer import Transformer
from dalle_ar.pipelines import Pipeline, ar, assemble
from dalle_ar.sampling.masked import masked_precision

PROMPTS = ["a small red circle at the top", "a blue square"]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("masked_mode")
    parts = build_components(root)
    torch.manual_seed(1)
    masked = peaked(Transformer(tiny_transformer_config(layouts="bidir", objective="masked")))
    masked.save_pretrained(root / "masked")
    return {**parts, "masked": root / "masked", "root": root}


@pytest.fixture(scope="module")
def pipe_dir(parts):
    return assemble(parts["root"] / "pipe", parts["text_tokenizer"], parts["vq"],
                    parts["transformer"], masked=parts["masked"])  # fmt: skip


@pytest.fixture(scope="module")
def pipe(pipe_dir):
    return Pipeline.from_pretrained(pipe_dir)


def test_masked_mode_draws_every_code_in_parallel_passes(pipe):
    out = pipe(PROMPTS, num_samples=2, seed=0, mode="masked", steps=3, guidance_scale=1.5)
    assert out.codes.shape == (4, 4, 4) and len(out.images) == 4
    assert out.codes.max() < 32  # no [MASK] left
    assert all(m["mode"] == "masked" and m["steps"] == 3 for m in out.samples)
    ran = masked_precision(torch.device("cpu"), "auto")
    assert {m["precision"] for m in out.samples} == {ran}  # "auto" recorded as it ran
    fp32 = pipe([PROMPTS[0]], seed=0, mode="masked", steps=3, precision="fp32")
    assert fp32.samples[0]["precision"] == "fp32"
    alone = pipe([PROMPTS[1]], seeds=[out.samples[3]["seed"]], mode="masked", steps=3,
                 guidance_scale=1.5)  # fmt: skip
    assert torch.equal(alone.codes[0], out.codes[3])
    ar = pipe(PROMPTS, num_samples=2, seed=0)
    assert not torch.equal(ar.codes, out.codes)
    # another mode's setting, which the call would ignore, is refused by name
    with pytest.raises(ValueError, match=r"mode='masked' would ignore settings of other modes: "
                                         r"'top_p' \(ar and prior modes\)"):  # fmt: skip
        pipe(PROMPTS, mode="masked", top_p=0.9)
    both = r"'prior_steps' \(prior mode\), 'steps' \(masked mode\)"
    with pytest.raises(
        ValueError, match=r"mode='ar' would ignore settings of other modes: " + both
    ):
        pipe(PROMPTS, steps=3, prior_steps=5)
    with pytest.raises(ValueError, match=r"'prior_steps' \(prior mode\)"):
        pipe(PROMPTS, mode="masked", prior_steps=5)
    # and so is another mode's settings object
    from dalle_ar.sampling.settings import ARSampling, MaskedSampling, PriorSampling

    with pytest.raises(ValueError, match=r"mode='ar' would ignore settings of other modes: "
                                         r"masked_settings= \(MaskedSampling\)"):  # fmt: skip
        pipe(PROMPTS, masked_settings=MaskedSampling(steps=2))
    with pytest.raises(ValueError, match=r"mode='masked' would ignore settings of other modes: "
                                         r"settings= \(ARSampling\), prior_settings= "
                                         r"\(PriorSampling\)"):  # fmt: skip
        pipe(PROMPTS, mode="masked", settings=ARSampling(), prior_settings=PriorSampling())
    # embeddings given to another mode than ar: refused as such, not for its settings
    with pytest.raises(ValueError, match="takes no embeddings"):
        pipe(PROMPTS, mode="masked", embeds=torch.zeros(2, 8), settings=ARSampling())
    # None keeps the default: nothing to ignore
    assert pipe([PROMPTS[0]], seed=0, mode="masked", steps=2, prior_steps=None).codes.shape == (
        1,
        4,
        4,
    )
    with pytest.raises(ValueError, match="unknown sampling setting 'no_such'"):
        pipe(PROMPTS, mode="masked", no_such=1)


def test_inpainting_keeps_every_code_outside_the_mask(pipe):
    scene = Image.new("RGB", (16, 16), (90, 90, 90))
    scene.paste((220, 30, 30), (0, 0, 8, 8))
    mask = np.zeros((16, 16), dtype=bool)
    mask[8:, 8:] = True  # the bottom-right quarter: 2x2 of the 4x4 codes
    out = pipe.inpaint([scene], [mask], "a blue square", num_samples=3, seed=2, steps=2)
    init = pipe.inpaint_codes([scene], [mask])[0]
    region = init == pipe.components["masked"].cfg.mask_id
    assert int(region.sum()) == 4
    for codes in out.codes:
        assert torch.equal(codes[~region], init[~region])
    with pytest.raises(ValueError, match="repaints nothing"):
        pipe.inpaint([scene], [np.zeros((16, 16))], "a blue square")


def test_the_progress_bar_counts_the_codes_drawn(pipe, capsys):
    """The bar counts the codes drawn: an inpainting's kept codes are not work."""
    scene = Image.new("RGB", (16, 16), (90, 90, 90))
    mask = np.zeros((16, 16), dtype=bool)
    mask[8:, 8:] = True  # 4 of the 16 codes
    pipe.inpaint([scene], [mask], "a blue square", num_samples=3, seed=2, steps=2, progress=True)
    bars = capsys.readouterr().err.replace("\r", "\n")
    assert "tokens: 100%" in bars and "12/12" in bars
    pipe(PROMPTS, seed=1, mode="masked", steps=4, progress=True)
    assert "32/32" in capsys.readouterr().err  # 2 prompts of 16 codes


def test_masked_mode_reranks(pipe):
    out = pipe(PROMPTS, seed=1, mode="masked", steps=2, candidates=3, keep=1, reranker="pmi")
    assert len(out.candidates) == 6 and out.codes.shape[0] == 2
    assert all(m["mode"] == "masked" for m in out.samples)


def test_sample_command_masked_and_inpainting(pipe_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "m"
    assert cli(["sample", "--model", str(pipe_dir), PROMPTS[0], "--num", "2", "--mode", "masked",
                "--steps", "3", "--temperature", "0.8", "--out", str(out)]) == 0  # fmt: skip
    doc = json.loads((out / "samples.json").read_text())
    assert [s["steps"] for s in doc["samples"]] == [3, 3]
    assert doc["samples"][0]["temperature"] == 0.8
    again = tmp_path / "again"
    assert cli(["sample", "--from-json", str(out / "samples.json"), "--index", "1",
                "--out", str(again)]) == 0  # fmt: skip
    a, b = Image.open(out / "000_01.png"), Image.open(again / "000_01.png")
    assert np.array_equal(np.asarray(a), np.asarray(b))
    # a regeneration draws as recorded: a setting given beside it would be ignored, so is refused
    assert cli(["sample", "--from-json", str(out / "samples.json"), "--temperature", "0.9",
                "--steps", "4", "--out", str(tmp_path / "never")]) == 2  # fmt: skip
    assert "--from-json draws each sample again as its record says: it takes no --temperature, " \
           "--steps" in capsys.readouterr().err  # fmt: skip
    assert cli(["sample", "--from-json", str(out / "samples.json"), "--seed", "5", "--num", "2",
                "--mode", "masked", "a prompt", "--out", str(tmp_path / "never")]) == 2  # fmt: skip
    assert "it takes no --seed, --num, --mode, prompts" in capsys.readouterr().err
    # where and how it draws are its own: batches do not change a sample
    assert cli(["sample", "--from-json", str(out / "samples.json"), "--index", "1",
                "--batch-size", "1", "--out", str(again)]) == 0  # fmt: skip
    assert np.array_equal(np.asarray(a), np.asarray(Image.open(again / "000_01.png")))
    old = tmp_path / "old"  # a record from before the precision setting: drawn in fp32
    assert cli(["sample", "--model", str(pipe_dir), PROMPTS[0], "--mode", "masked", "--steps",
                "3", "--precision", "fp32", "--out", str(old)]) == 0  # fmt: skip
    doc = json.loads((old / "samples.json").read_text())
    assert doc["samples"][0].pop("precision") == "fp32"
    (old / "samples.json").write_text(json.dumps(doc))
    asked = []  # what the regeneration asks the masked mode for
    monkeypatch.setattr(ar, "masked_precision", lambda d, p: asked.append(p) or "fp32")
    assert cli(["sample", "--from-json", str(old / "samples.json"), "--out", str(again)]) == 0
    assert asked == ["fp32"]
    assert np.array_equal(np.asarray(Image.open(old / "000_00.png")),
                          np.asarray(Image.open(again / "000_00.png")))  # fmt: skip
    Image.new("RGB", (16, 16), (90, 90, 90)).save(tmp_path / "scene.png")
    m = np.zeros((16, 16), dtype=np.uint8)
    m[:8] = 255
    Image.fromarray(m).save(tmp_path / "mask.png")
    inp = tmp_path / "inp"
    assert cli(["sample", "--model", str(pipe_dir), "a red circle", "--mode", "masked",
                "--init", str(tmp_path / "scene.png"), "--mask", str(tmp_path / "mask.png"),
                "--out", str(inp)]) == 0  # fmt: skip
    rec = json.loads((inp / "samples.json").read_text())["samples"][0]
    assert len(rec["init_codes"]) == 4
    assert cli(["sample", "--model", str(pipe_dir), "a red circle", "--init",
                str(tmp_path / "scene.png"), "--out", str(inp)]) == 2  # fmt: skip


@pytest.mark.parametrize(
    ("mode", "flags", "message"),
    [
        ("ar", ["--steps", "3"],
         "--mode ar would ignore settings of other modes: --steps (masked mode)"),
        ("ar", ["--precision", "bf16"], "--precision (masked mode)"),
        ("masked", ["--top-p", "0.9"],
         "--mode masked would ignore settings of other modes: --top-p (ar and prior modes)"),
        ("masked", ["--prior-steps", "5", "--corrector-steps", "1"],
         "--mode masked would ignore settings of other modes: --prior-steps (prior mode)"),
        ("prior", ["--confidence-temperature", "2"],
         "--mode prior would ignore settings of other modes: --confidence-temperature (masked "
         "mode)"),
    ],
)  # fmt: skip
def test_the_command_line_refuses_another_modes_flags(pipe_dir, tmp_path, capsys, mode, flags,
                                                      message):  # fmt: skip
    out = tmp_path / "never"
    assert cli(["sample", "--model", str(pipe_dir), PROMPTS[0], "--mode", mode, *flags,
                "--out", str(out)]) == 2  # fmt: skip
    assert message in capsys.readouterr().err
    assert not out.exists()  # refused before any drawing
    # and so does the fidelity evaluation, which would draw without them
    assert cli(["eval", "fidelity", "--model", str(pipe_dir), "--num", "2", "--mode", mode,
                *flags]) == 2  # fmt: skip
    assert message in capsys.readouterr().err


def test_the_command_line_refuses_a_precision_it_does_not_know(pipe_dir, capsys):
    with pytest.raises(SystemExit):
        cli(["sample", "--model", str(pipe_dir), PROMPTS[0], "--mode", "masked", "--precision",
             "fp16"])  # fmt: skip
    assert "--precision: invalid choice: 'fp16'" in capsys.readouterr().err


def test_a_masked_component_that_does_not_fit_is_refused(parts, tmp_path):
    ar = Transformer(tiny_transformer_config())
    ar.save_pretrained(tmp_path / "not_masked")
    with pytest.raises(ValueError, match="must be a masked generator"):
        assemble(tmp_path / "p1", parts["text_tokenizer"], parts["vq"], parts["transformer"],
                 masked=tmp_path / "not_masked")  # fmt: skip
    other = Transformer(tiny_transformer_config(layouts="bidir", objective="masked", text_len=9))
    other.save_pretrained(tmp_path / "other_len")
    with pytest.raises(ValueError, match="text positions"):
        assemble(tmp_path / "p2", parts["text_tokenizer"], parts["vq"], parts["transformer"],
                 masked=tmp_path / "other_len")  # fmt: skip
