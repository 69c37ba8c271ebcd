"""The main job (`dalle-ar pipeline`) end to end at toy size: every stage runs on real shards,
the pipeline folder it writes samples, the grid and the fidelity JSON (single draws and
reranked) are written, a rerun skips every finished stage, and a bad key stops it first."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from dalle_ar.config import load_config
from dalle_ar.jobs.config import STAGE_SETTINGS, MainJobConfig
from dalle_ar.jobs.main import _seconds, _upgrade
from dalle_ar.jobs.main import main as main_job
from dalle_ar.jobs.plan import plan
from dalle_ar.pipeline import DalleAR

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.usefixtures("one_thread")


def _toy_configs(folder: Path, size: int = 32, grid: int = 8) -> Path:
    """The tiny configs under the names the main job reads, for size x size pictures (the
    shapes' 32) drawn as grid x grid codes."""
    folder.mkdir()
    for name in ("tokenizer", "transformer", "vq", "clip", "prior", "upsampler", "masked"):
        cfg = yaml.safe_load((ROOT / "configs" / "tiny" / f"{name}.yaml").read_text())
        if name == "vq":
            cfg["data"]["image_size"] = cfg["model"]["image_size"] = size
            cfg["model"]["downsample"] = size // grid
        if name in ("transformer", "masked"):
            cfg["model"].update(grid_h=grid, grid_w=grid, text_len=20)
        if name == "masked":  # adapted from a transformer: the job hands it its own
            cfg["init_from"] = "runs/transformer/transformer"
        if name == "clip":  # count foils (a masked job's) draw scenes of >= 21 pixels
            cfg["data"]["image_size"] = cfg["model"]["image_size"] = 24
        if name == "upsampler":  # 32 -> 64 pixels, each scene rendered at both (as the shapes')
            cfg["model"]["low_size"], cfg["data"]["image_size"] = 32, 64
            cfg["small_from"] = "render"
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    return folder


def test_main_job_runs_every_stage_then_skips_them(tmp_path, capsys):
    out = tmp_path / "main"
    args = [f"out_dir={out}", f"config_dir={_toy_configs(tmp_path / 'configs')}",
            "num_train=200", "num_eval=20", "vq_steps=3", "clip_steps=0", "transformer_steps=4",
            "samples_per_prompt=2", "fidelity_prompts=4", "candidates=2", "wandb=disabled",
            "device=cpu", "prompts=[a small red circle at the top left, a blue square]",
            "prior=true", "cond_transformer_steps=2", "upsampler_images=100",
            "upsample_sampling.upsample_steps=2", "masked=true", "masked_steps=3",
            "lanes=2"]  # fmt: skip
    assert main_job(args) == 0
    printed = capsys.readouterr().out
    assert "[14/14] samples: finished" in printed
    # the transformer does not wait for the CLIP: its token shards are written without the
    # CLIP's embeddings, and those of the prior and the embedding-conditioned transformer after
    # the CLIP, with them
    stages = {s.name: s for s in plan(load_config(MainJobConfig, out / "main_job.yaml", [])).stages}
    assert "clip" not in stages["tokens"].needs | stages["transformer"].needs
    assert {"clip", "vq"} <= stages["clip_tokens"].needs
    assert "clip_tokens" in stages["prior"].waits_for() & stages["cond_transformer"].needs
    tokens = {f: json.loads((out / f / "train-tokens.json").read_text())
              for f in ("tokens", "clip_tokens")}  # fmt: skip
    assert tokens["tokens"]["clip"] is None and tokens["clip_tokens"]["clip"]["embed_dim"] > 0
    # with the masked mode, the CLIP trains with count foils (its config has them off)
    assert yaml.safe_load((out / "clip_run" / "config.yaml").read_text())["count_foils"] is True
    assert "stages side by side where one needs nothing of the other: up to 2 at once" in printed
    # two stages at once where one needs nothing of the other, each in a process of its own:
    # the first two (neither needs anything) start together, and the second writes to a log
    log = out / "logs" / "data_large.log"
    assert f"[11/14] data_large: running beside data, output in {log}" in printed
    assert log.is_file()
    for line in printed.splitlines():  # whatever else ran beside another stage: its log too
        if ", output in " in line:
            assert Path(line.split(", output in ")[1]).is_file(), line
    # the table: each training stage reached its planned steps, in the precision it says
    assert "3 of 3 steps, fp32" in printed and "4 of 4 steps" in printed
    assert "UNDER-TRAINED" not in printed
    pipe = DalleAR.from_pretrained(out / "pipeline")
    assert pipe(["a red circle"], seed=0).codes.shape == (1, 8, 8)
    assert (out / "samples" / "grid.png").is_file()
    assert (out / "pipeline" / "clip" / "model.safetensors").is_file()  # reranks with CLIP
    assert (out / "samples" / "grid_prior.png").is_file()  # the prior mode's grid
    # one transformer for both modes: the one fine-tuned from the text-only one on the CLIP
    # image embeddings (text mode draws with its null embedding)
    assert pipe.transformer.cfg.cond_len == 2 and "cond_transformer" not in pipe.components
    assert not (out / "pipeline" / "cond_transformer").exists()
    # the cascade: the grid upsampled beside the small one, the guided draws scored upsampled
    from PIL import Image

    small, large = (Image.open(out / "samples" / f) for f in ("grid.png", "grid_upsampled.png"))
    # 32-px images shown twice their size beside 64-px ones: one layout, other pixels
    assert large.size == small.size
    assert not np.array_equal(np.asarray(large), np.asarray(small))
    assert pipe(["a red circle"], seed=0, upsample=True).images[0].size == (64, 64)
    assert pipe(["a red circle"], seed=0, mode="prior").codes.shape == (1, 8, 8)
    fid = json.loads((out / "fidelity.json").read_text())
    best = [f"1.5 best of 2 by {r}" for r in ("pmi", "clip", "clip+pmi")]
    assert set(fid["settings"]) == {"1", "1.5", *best}
    assert set(fid["prior_mode"]["settings"]) == {"1.5", "1.5 best of 2 by clip"}
    assert fid["prior_mode"]["settings"]["1.5"]["mode"] == "prior"
    assert "prior mode guidance 1.5" in fid["summary"]
    assert fid["upsampled"]["settings"]["1.5 upsampled"]["upsample"] is True
    # the same small pictures as the guided run's, then upsampled
    assert fid["upsampled"]["settings"]["1.5"]["all"] == fid["settings"]["1.5"]["all"]
    assert "guidance 1.5 upsampled" in fid["summary"]
    for name in best:  # one draw of the candidates, picked three ways
        res = fid["settings"][name]
        assert res["candidates"] == 2 and res["all"]["n"] == 4
        assert res["any_of_k"]["all"] >= res["all"]["exact"]
    assert fid["num_prompts"] == 4 and fid["settings"]["1"]["all"]["n"] == 4
    # the grids named inside the job folder, which may be moved
    assert fid["grid"] == "samples/grid.png" and fid["grid_masked"] == "samples/grid_masked.png"
    # the terminal and evaluation.md show the exact-match shares as a table, one row a setting
    table = (out / "evaluation.md").read_text()
    seen = 100 * fid["summary"]["prior mode guidance 1.5"]["exact_seen"]
    assert "| setting | all | seen | held-out |" in table and "| setting | all |" in printed
    assert "| prior mode guidance 1.5 | " in table and f"| {seen:.1f}% |" in table
    summary = json.loads((out / "summary.json").read_text())
    assert summary["lanes"] == 2
    assert summary["fidelity"]["summary"] == fid["summary"]
    assert summary["training"]["transformer"]["step"] == 4
    assert summary["training"]["vq"]["finished"] and summary["machine"]["cpus"] >= 1
    assert summary["training"]["prior"]["finished"]
    assert summary["training"]["cond_transformer"]["step"] == 2
    assert summary["training"]["upsampler"]["finished"]
    # the masked generator started from the job's own transformer, and draws its grid
    masked_run = yaml.safe_load((out / "masked_run" / "config.yaml").read_text())
    assert masked_run["init_from"] == str(out / "transformer_run" / "transformer")
    assert summary["training"]["masked"]["step"] == 3
    assert (out / "samples" / "grid_masked.png").is_file()
    # the end of the job names every grid
    assert f"{out / 'samples' / 'grid_masked.png'}, {out / 'samples' / 'grid_prior.png'}" in printed
    assert main_job(args) == 0  # everything is done: nothing runs again
    printed = capsys.readouterr().out
    assert printed.count("done already, skipped") == 14
    # the rerun's summary keeps the seconds each stage took when it ran
    again = json.loads((out / "summary.json").read_text())
    assert set(again["stage_seconds"].values()) == {"skipped"}
    assert again["stage_seconds_when_run"] == summary["stage_seconds"]
    assert f"skipped (ran in {summary['stage_seconds']['vq']} s)" in printed
    # and the job's own time: this run's, and the run that did the work's
    assert summary["total_seconds_when_run"] == summary["total_seconds"] > 0
    assert again["total_seconds_when_run"] == summary["total_seconds"] != again["total_seconds"]
    assert f"the last run that did work took {summary['total_seconds']} s" in printed
    # a folder of the earlier layout (one token folder, with the CLIP's embeddings): taken as it
    # is, nothing trained again
    shutil.rmtree(out / "tokens")
    (out / "clip_tokens").rename(out / "tokens")
    assert main_job(args) == 0
    assert capsys.readouterr().out.count("done already, skipped") == 14
    assert (out / "clip_tokens" / "train-tokens.json").is_file()
    # the folder moved elsewhere: its token shards hold the same CLIP's embeddings, by the
    # content of its weights, and nothing trains again
    moved = tmp_path / "moved" / "main"
    moved.parent.mkdir()
    out.rename(moved)
    moved_args = [f"out_dir={moved}" if a.startswith("out_dir=") else a for a in args]
    assert main_job(moved_args) == 0
    assert capsys.readouterr().out.count("done already, skipped") == 14
    # shards that hold another CLIP's embeddings than the folder's weights are not done (the
    # job writes them again, and trains the embedding-conditioned transformer on them)
    summary_tokens = moved / "clip_tokens" / "eval-tokens.json"
    record = json.loads(summary_tokens.read_text())
    record["clip"]["file_sha256"] = "0" * 64
    summary_tokens.write_text(json.dumps(record))
    stages = {s.name: s for s in plan(load_config(MainJobConfig, moved / "main_job.yaml",
                                                  [])).stages}  # fmt: skip
    assert not stages["clip_tokens"].done() and stages["tokens"].done()
    # a pipeline folder with the two transformers a prior-mode job made before is made again
    assert stages["pipeline"].done()
    (moved / "pipeline" / "cond_transformer").mkdir()
    assert not stages["pipeline"].done()
    (moved / "pipeline" / "cond_transformer").rmdir()
    out = moved
    args = moved_args
    assert main_job([*args, "candidates=0"]) == 2  # refused before any work
    assert main_job([*args, "precision=FP32"]) == 2
    assert "'precision': must be auto, fp32 or bf16, got 'FP32'" in capsys.readouterr().out
    assert main_job([*args, "no_such_key=1"]) == 2


def test_the_emoji_main_job_draws_and_scores_real_pictures(tmp_path, capsys):
    """configs/emoji/main.yaml's job at toy size: the Twemoji shards (64 px, held-out base
    emoji), every stage, a grid of the emoji prompts and the quality evaluation on the held-out
    names (dalle_ar.eval.quality) in place of the shapes checker."""
    out = tmp_path / "emoji"
    job = ROOT / "configs" / "emoji" / "main.yaml"
    args = ["--config", str(job), f"out_dir={out}",
            f"config_dir={_toy_configs(tmp_path / 'configs', size=64, grid=4)}",
            "vq_steps=2", "clip_steps=0", "transformer_steps=2", "samples_per_prompt=1",
            "fidelity_prompts=4", "rerank.candidates=2", "wandb=disabled",
            "device=cpu"]  # fmt: skip
    assert main_job(args) == 0
    printed = capsys.readouterr().out
    assert "[8/8] samples: finished" in printed
    info = json.loads((out / "data" / "info.json").read_text())
    assert info["kind"] == "emoji" and info["size"] == 64 and info["counts"]["eval"] >= 300
    report = json.loads((out / "fidelity.json").read_text())
    rows = {r["name"]: r for r in report["rows"]}
    assert set(rows) == {"real evaluation images", "VQ reconstructions", "ar, single",
                         "ar, best of 2 by clip", "ar, best of 2 by pmi"}  # fmt: skip
    assert report["num_images"] == 4 and math.isfinite(report["bits_per_image_token"])
    assert 0 <= rows["ar, single"]["r_precision"] <= 1 and "fidelity" not in report
    # the terminal and out_dir/evaluation.md show the report as its table
    table = (out / "evaluation.md").read_text()
    assert "| ar, best of 2 by clip |" in table and "| ar, best of 2 by clip |" in printed
    from PIL import Image

    grid = Image.open(out / "samples" / "grid.png")
    assert grid.height > 8 * 64  # a row per prompt (eight emoji prompts), captioned


def test_the_main_job_trains_on_your_own_img2dataset_shards(tmp_path, capsys):
    """data=shards: your img2dataset shards written again at the VQ config's size and split (bad
    records skipped and counted), every stage on them, the grid drawn from their evaluation
    captions, the quality evaluation; a source that is not there, a folder that is not one and
    an evaluation split too small to score are refused by name; the data stage runs again for
    a changed eval_fraction, not for num_train (which it does not read), nor once the source
    has moved away (then a changed eval_fraction is refused before any shard is removed)."""
    from _img2dataset import write_img2dataset

    from dalle_ar.data.shapes import generate
    from dalle_ar.jobs.own import grid_captions

    src, out = tmp_path / "img2dataset", tmp_path / "own"
    sound, skips = write_img2dataset(src, n=30, pictures=((img, cap) for img, cap, _ in
                                                          generate(60, 0, size=80)))  # fmt: skip
    job = ROOT / "configs" / "emoji" / "main.yaml"
    args = ["--config", str(job), "data=shards", f"out_dir={out}", "eval_fraction=0.12",
            f"config_dir={_toy_configs(tmp_path / 'configs', size=64, grid=4)}",
            "vq_steps=2", "clip_steps=2", "transformer_steps=2", "samples_per_prompt=1",
            "fidelity_prompts=4", "rerank.candidates=2", "wandb=disabled",
            "device=cpu"]  # fmt: skip
    for bad in ([], [f"data_src={tmp_path / 'none'}/{{00000..00001}}.tar"],
                ["data=folder", f"data_src={src / '00000.tar'}"]):  # fmt: skip
        assert main_job([*args, *bad]) == 2  # refused by name before any work
        assert "data_src" in capsys.readouterr().out and not (out / "data").exists()
    assert main_job([*args, f"data_src={src}", "eval_fraction=0.99999"]) == 2
    assert "'eval_fraction': --eval-fraction 0.99999 sent all" in capsys.readouterr().out
    assert main_job([*args, f"data_src={src}", "eval_fraction=0.001"]) == 2
    assert "'eval_fraction'" in capsys.readouterr().out
    assert not (out / "data" / "info.json").exists()  # the next run writes the shards again
    assert main_job([*args, f"data_src={src}"]) == 0
    info = json.loads((out / "data" / "info.json").read_text())
    assert info["kind"] == "shards" and info["size"] == 64
    assert info["counts"]["train"] + info["counts"]["eval"] == sound
    assert info["skipped"]["counts"] == dict(skips)
    # fewer evaluation pictures than the CLIP config's retrieval batch (8): one batch of them all
    clip_run = yaml.safe_load((out / "clip_run" / "config.yaml").read_text())
    assert clip_run["retrieval_batch"] == info["counts"]["eval"] == 5
    report = json.loads((out / "fidelity.json").read_text())
    assert report["num_images"] == 4 and math.isfinite(report["bits_per_image_token"])
    prompts = grid_captions(out / "data")
    assert report["grid_prompts"] == prompts and len(prompts) == min(8, info["counts"]["eval"])
    from PIL import Image

    assert Image.open(out / "samples" / "grid.png").height > len(prompts) * 64  # captioned rows
    capsys.readouterr()
    assert main_job([*args, f"data_src={src}", "num_train=500"]) == 0
    assert "[1/8] data: done already, skipped" in capsys.readouterr().out
    src.rename(tmp_path / "moved")  # the job no longer reads the source its shards came from
    assert main_job([*args, f"data_src={src}"]) == 0
    assert "[8/8] samples: done already, skipped" in capsys.readouterr().out
    # ... unless the data stage would read it again: refused before its shards are removed
    for again in ([f"data_src={src}", "eval_fraction=0.15"], [f"data_src={src}/"]):
        assert main_job([*args, *again]) == 2  # data_src is compared as written
        assert "'data_src'" in capsys.readouterr().out and (out / "data" / "info.json").exists()
    (tmp_path / "moved").rename(src)
    assert main_job([*args, f"data_src={src}", "eval_fraction=0.15"]) == 0
    assert "eval_fraction: 0.12 -> 0.15" in capsys.readouterr().out


def test_a_line_said_beside_a_running_bar_starts_a_line_of_its_own(capsys):
    """Not on a terminal (a log file), a stage that ends beside the one whose progress bar is
    on does not end that bar's line."""
    from dalle_ar.jobs.run import say

    say("[6/14] clip: finished in 1.0 s", bar_open=True)
    say("[7/14] prior: running")
    assert capsys.readouterr().out == "\n[6/14] clip: finished in 1.0 s\n[7/14] prior: running\n"


def test_token_shards_with_clip_embeddings_are_done_for_that_clips_weights(tmp_path):
    """`tokens_done` with a CLIP folder: its weights file's hash against the recorded one; the
    folder's path for shards written before the hash was recorded; not done without weights."""
    from dalle_ar.checkpoint import file_sha256
    from dalle_ar.jobs.stages import tokens_done

    clip, shards = tmp_path / "clip", tmp_path / "tokens"
    clip.mkdir()
    shards.mkdir()
    (clip / "model.safetensors").write_bytes(b"weights")

    def record(**clip_record: object) -> None:
        (shards / "eval-tokens.json").write_text(json.dumps({"clip": clip_record}))

    record(folder="/elsewhere/clip", file_sha256=file_sha256(clip / "model.safetensors"))
    assert tokens_done(shards, clip) and tokens_done(shards)
    (clip / "model.safetensors").write_bytes(b"other weights")
    assert not tokens_done(shards, clip)
    record(folder=str(clip.resolve()))  # written before the hash: the path decides
    assert tokens_done(shards, clip)
    record(folder="/elsewhere/clip", file_sha256=None)
    assert not tokens_done(shards, clip)
    record(folder=str(clip.resolve()), file_sha256="0" * 64)
    (clip / "model.safetensors").unlink()
    assert not tokens_done(shards, clip)
    record()
    assert not tokens_done(shards, clip)  # no CLIP recorded at all
    (shards / "eval-tokens.json").write_text(json.dumps({"clip": None}))
    assert not tokens_done(shards, clip) and tokens_done(shards)


def test_a_summary_written_before_the_when_run_total_gives_its_total_only_where_a_stage_ran():
    ran = {"stage_seconds": {"vq": 12.5, "samples": "skipped"}, "total_seconds": 30.0}
    assert _seconds(ran) == {"vq": 12.5, "total": 30.0}
    rerun = {"stage_seconds": {"vq": "skipped"}, "total_seconds": 0.4}  # its 0.4 s is no job's
    assert _seconds(rerun) == {}
    now = {"stage_seconds_when_run": {"vq": 12.5}, "stage_seconds": {"vq": "skipped"},
           "total_seconds": 0.4, "total_seconds_when_run": 30.0}  # fmt: skip
    assert _seconds(now) == {"vq": 12.5, "total": 30.0}
    assert _seconds({"stage_seconds": [1], "total_seconds": True}) == {}  # another shape


def test_the_quick_job_has_every_mode_on_smaller_budgets():
    """configs/shapes/quick.yaml loads and plans every stage of the job with every mode, each
    training stage on fewer steps than the main job's (0 there: the component config's)."""
    quick = load_config(MainJobConfig, ROOT / "configs" / "shapes" / "quick.yaml", [])
    job = plan(quick)
    assert [s.name for s in job.stages] == [
        "data", "tokenizer", "vq", "tokens", "transformer", "clip", "clip_tokens", "prior",
        "masked", "cond_transformer", "data_large", "upsampler", "pipeline", "samples"]  # fmt: skip
    full = MainJobConfig()

    def steps(cfg: MainJobConfig, key: str, stage: str) -> int:
        own = yaml.safe_load(job.yaml[stage].read_text())["run"]["steps"]
        return getattr(cfg, key) or own

    for key, stage in (("vq_steps", "vq"), ("transformer_steps", "transformer"),
                       ("clip_steps", "clip"), ("prior_train_steps", "prior"),
                       ("masked_steps", "masked"), ("upsampler_steps", "upsampler")):  # fmt: skip
        assert 0 < steps(quick, key, stage) < steps(full, key, stage), key
    assert quick.cond_transformer_steps < full.cond_transformer_steps
    assert quick.num_train < full.num_train and quick.fidelity_prompts < full.fidelity_prompts


def test_the_emoji_job_refuses_settings_its_evaluation_cannot_finish_with(tmp_path, capsys):
    job = ["--config", str(ROOT / "configs" / "emoji" / "main.yaml"), f"out_dir={tmp_path}/e"]
    assert main_job([*job, "clip=false", "rerank.reranker=pmi"]) == 2
    assert "config key 'clip': must be true" in capsys.readouterr().out
    assert main_job([*job, "fidelity_prompts=1"]) == 2
    assert "'fidelity_prompts': must be >= 2" in capsys.readouterr().out
    assert not (tmp_path / "e").exists()  # before any work


def test_a_stage_its_safety_cap_stops_is_reported_and_continued_by_a_rerun(
    tmp_path, capsys, step_clock
):
    out = tmp_path / "main"
    args = [f"out_dir={out}", f"config_dir={_toy_configs(tmp_path / 'configs')}",
            "num_train=200", "num_eval=20", "vq_steps=2", "clip_steps=0", "transformer_steps=6",
            "samples_per_prompt=1", "fidelity_prompts=2", "candidates=1", "wandb=disabled",
            "device=cpu", "prompts=[a red circle]", "prior=true", "upsampler=false",
            "cond_transformer_steps=1", "lanes=1"]  # fmt: skip
    assert main_job([*args, "transformer_max_minutes=2.5"]) == 0  # a minute a step
    printed = capsys.readouterr().out
    said = json.loads((out / "summary.json").read_text())["training"]["transformer"]
    assert said["under_trained"] == "under-trained: stopped by max_minutes at step 3 of 6"
    assert said["step"] == 3 and "UNDER-TRAINED" in printed
    assert f"WARNING transformer: {said['under_trained']}" in printed
    assert (out / "fidelity.json").is_file()  # the job went on with the model it had

    assert main_job(args) == 0  # the cap is the default again: the stage continues to step 6
    printed = capsys.readouterr().out
    assert "[5/11] transformer: running" in printed and "6 of 6 steps" in printed
    # the fine-tuned copy, the pipeline and its evaluation are made again from the finished
    # transformer
    assert "[9/11] cond_transformer: running again (transformer ran)" in printed
    assert "[10/11] pipeline: running again (cond_transformer, transformer ran)" in printed
    assert "[11/11] samples: running again" in printed
    assert "[6/11] clip: done already" in printed  # the CLIP does not depend on the transformer
    assert "[8/11] prior: done already" in printed  # nor does the prior
    assert "[7/11] clip_tokens: done already" in printed  # nor do its token shards
    summary = json.loads((out / "summary.json").read_text())
    assert summary["training"]["transformer"]["finished"] and "UNDER-TRAINED" not in printed


def test_a_rerun_with_changed_settings_makes_what_they_change_again(tmp_path, capsys):
    out = tmp_path / "main"
    args = [f"out_dir={out}", f"config_dir={_toy_configs(tmp_path / 'configs')}",
            "num_train=100", "num_eval=20", "vq_steps=2", "transformer_steps=2", "clip=false",
            "rerank.reranker=pmi", "samples_per_prompt=1", "fidelity_prompts=2",
            "candidates=1", "wandb=disabled", "device=cpu", "prompts=[a red circle]",
            "upsampler=false", "lanes=1"]  # fmt: skip
    assert main_job(args) == 0
    capsys.readouterr()
    assert json.loads((out / STAGE_SETTINGS).read_text())["samples"]["fidelity_prompts"] == 2
    # what the evaluation reads: only the samples stage runs again, and says why
    assert main_job([*args, "fidelity_prompts=4", "lanes=2", "wandb=offline"]) == 0
    printed = capsys.readouterr().out
    assert "[7/7] samples: running again (settings changed: fidelity_prompts: 2 -> 4)" in printed
    assert printed.count("done already, skipped") == 6  # lanes and wandb change no output
    assert json.loads((out / "fidelity.json").read_text())["num_prompts"] == 4
    # a sampling default: the pipeline folder that records it, and its samples
    assert main_job([*args, "fidelity_prompts=4", "sampling.temperature=0.9"]) == 0
    printed = capsys.readouterr().out
    assert ("[6/7] pipeline: running again (settings changed: sampling.temperature: 0.5 -> 0.9)"
            in printed)  # fmt: skip
    assert "[7/7] samples: running again (pipeline ran)" in printed
    assert json.loads((out / "pipeline" / "pipeline.json").read_text())["defaults"]["ar"][
        "temperature"] == 0.9  # fmt: skip
    # a folder written before the record: the main_job.yaml it held stands in for it
    (out / STAGE_SETTINGS).unlink()
    assert main_job([*args, "fidelity_prompts=4", "sampling.temperature=0.9",
                     "transformer_steps=3"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "[5/7] transformer: running again (settings changed: transformer_steps: 2 -> 3)" in (
        printed)  # fmt: skip
    assert "[3/7] vq: done already, skipped" in printed
    assert "3 of 3 steps" in printed
    # a budget of 0 steps is the component config's run.steps, and compares as that number
    zero = plan(load_config(MainJobConfig, out / "main_job.yaml", ["transformer_steps=0"]))
    steps = yaml.safe_load((tmp_path / "configs" / "transformer.yaml").read_text())["run"]["steps"]
    assert next(s for s in zero.stages if s.name == "transformer").made_from == {
        "transformer_steps": steps}  # fmt: skip
    # the prior mode stands on the CLIP stage: refused without it, before any work
    assert main_job([*args, "prior=true"]) == 2
    assert "config key 'prior': needs the CLIP stage (clip=true)" in capsys.readouterr().out
    # said first where the CLIP reranker is asked for too: the mode is what needs the stage
    assert main_job([*args, "prior=true", "rerank.reranker=clip"]) == 2
    assert "config key 'prior': needs the CLIP stage (clip=true)" in capsys.readouterr().out


def test_a_clip_continued_by_a_rerun_leaves_the_vq_and_the_transformer_alone(
    tmp_path, capsys, step_clock
):
    out = tmp_path / "main"
    args = [f"out_dir={out}", f"config_dir={_toy_configs(tmp_path / 'configs')}",
            "num_train=200", "num_eval=20", "vq_steps=2", "clip_steps=0", "transformer_steps=2",
            "samples_per_prompt=1", "fidelity_prompts=2", "candidates=2", "wandb=disabled",
            "device=cpu", "prompts=[a red circle]", "upsampler=false", "lanes=1"]  # fmt: skip
    assert main_job([*args, "clip_max_minutes=2.5"]) == 0  # a minute a step: 3 of 6
    capsys.readouterr()
    said = json.loads((out / "summary.json").read_text())["training"]["clip"]
    assert said["step"] == 3 and said["under_trained"]
    assert main_job(args) == 0
    printed = capsys.readouterr().out
    assert "[6/8] clip: running" in printed and "6 of 6 steps" in printed
    for stage in ("[3/8] vq", "[4/8] tokens", "[5/8] transformer"):
        assert f"{stage}: done already, skipped" in printed
    assert "[7/8] pipeline: running again (clip ran)" in printed
    # a VQ made again: a CLIP of rendered scenes only is left alone ...
    shutil.rmtree(out / "vq_run" / "vq")
    assert main_job(args) == 0
    printed = capsys.readouterr().out
    assert "[3/8] vq: running" in printed and "[6/8] clip: done already" in printed
    # ... one that learns from the VQ's round trips is made again, from the job's own VQ
    clip_yaml = tmp_path / "configs" / "clip.yaml"
    clip_yaml.write_text(clip_yaml.read_text() + "vq_round_trip: 0.5\n")
    shutil.rmtree(out / "vq_run" / "vq")
    assert main_job(args) == 0
    printed = capsys.readouterr().out
    assert "[3/8] vq: running" in printed and "[6/8] clip: running again (vq ran)" in printed
    clip_cfg = yaml.safe_load((out / "clip_run" / "config.yaml").read_text())
    assert clip_cfg["vq"] == str(out / "vq_run" / "vq") and clip_cfg["vq_round_trip"] == 0.5
    assert clip_cfg["count_foils"] is False  # no masked mode, no count foils


def test_a_stage_stopped_by_non_finite_numbers_is_one_line_and_exit_1(tmp_path, capsys):
    configs = _toy_configs(tmp_path / "configs")
    vq = yaml.safe_load((configs / "vq.yaml").read_text())
    vq["optim"]["lr"], vq["max_bad_steps"] = 1e30, 2  # the weights blow up at the first step
    (configs / "vq.yaml").write_text(yaml.safe_dump(vq))
    out = tmp_path / "main"
    args = [f"out_dir={out}", f"config_dir={configs}", "num_train=200", "num_eval=20",
            "vq_steps=10", "clip_steps=0", "transformer_steps=2", "wandb=disabled", "device=cpu",
            "upsampler=false"]  # fmt: skip
    for lanes in (1, 2):  # in this process, and in a process of its own beside another stage
        assert main_job([*args, f"lanes={lanes}"]) == 1  # as `dalle-ar train vq` exits
        err = capsys.readouterr().err.strip().splitlines()
        said = f"dalle-ar pipeline: the vq stage stopped ({configs / 'vq.yaml'}): "
        assert err[-1].startswith(f"{said}2 non-finite losses")
        assert "no checkpoint was written yet" in err[-1] and "Traceback" not in "".join(err)
        assert not (out / "vq_run" / "vq").exists() and not (out / "tokens").exists()


def test_a_stage_that_fails_in_its_own_process_is_named_and_the_job_stops(tmp_path, capsys):
    configs = _toy_configs(tmp_path / "configs")
    cfg = yaml.safe_load((configs / "transformer.yaml").read_text())
    cfg["optim"]["lr"] = -1.0  # read when its stage starts, after the stages before it ran
    (configs / "transformer.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "main"
    args = [f"out_dir={out}", f"config_dir={configs}", "num_train=200", "num_eval=20",
            "vq_steps=2", "clip_steps=0", "transformer_steps=2", "wandb=disabled", "device=cpu",
            "upsampler=false", "lanes=2"]  # fmt: skip
    assert main_job(args) == 2  # as for a config refused in this process
    printed = capsys.readouterr().out
    assert "dalle-ar pipeline: config key 'optim.lr'" in printed
    assert "[4/8] tokens: finished" in printed and "transformer: finished" not in printed
    assert not (out / "pipeline").exists()


def test_a_stage_that_breaks_in_its_own_process_is_one_line_and_exit_1(tmp_path, capsys):
    out = tmp_path / "main"
    out.mkdir()
    (out / "data").write_text("a file where the first stage writes a folder")
    args = [f"out_dir={out}", f"config_dir={_toy_configs(tmp_path / 'configs')}",
            "num_train=200", "num_eval=20", "vq_steps=2", "clip_steps=0", "transformer_steps=2",
            "fidelity_prompts=2", "wandb=disabled", "device=cpu", "lanes=2"]  # fmt: skip
    assert main_job(args) == 1
    printed, err = capsys.readouterr()
    assert err.strip().splitlines()[-1].startswith("dalle-ar pipeline: the data stage failed: ")
    # the stage that started beside it (needing nothing either) was stopped, and said so
    assert "[7/10] data_large: running beside data" in printed
    assert "[7/10] data_large: stopped; a rerun of the job runs it again" in printed
    assert not (out / "pipeline").exists()


def test_a_stage_whose_process_is_killed_is_named_and_the_job_stops(tmp_path, capsys):
    import multiprocessing
    import os
    import signal
    import threading
    import time

    out = tmp_path / "main"
    args = [f"out_dir={out}", f"config_dir={_toy_configs(tmp_path / 'configs')}",
            "num_train=200", "num_eval=20", "vq_steps=100000", "vq_max_minutes=1",
            "clip_steps=0", "transformer_steps=2", "wandb=disabled", "device=cpu",
            "upsampler=false", "lanes=2"]  # fmt: skip
    killed = []

    def kill_the_vq() -> None:  # as the kernel's OOM killer would: no word from the stage
        end = time.monotonic() + 150  # a slow, loaded machine reaches the VQ-VAE late
        while not killed and time.monotonic() < end:
            for p in multiprocessing.active_children():
                if p.name == "dalle-ar vq" and (out / "vq_run").is_dir():  # training
                    os.kill(p.pid, signal.SIGKILL)
                    killed.append(p.pid)
            time.sleep(0.2)

    killer = threading.Thread(target=kill_the_vq, daemon=True)
    killer.start()
    assert main_job(args) == 1
    killer.join()
    assert killed
    printed, err = capsys.readouterr()
    assert err.strip().splitlines()[-1] == (
        "dalle-ar pipeline: the vq stage failed: its process ended with exit code -9"
        f" (its output: {out / 'logs' / 'vq.log'})"
    )
    assert "tokens: running" not in printed and not (out / "pipeline").exists()


def test_bench_train_times_the_recipe_of_a_main_job_folder(tmp_path, capsys):
    configs, out = _toy_configs(tmp_path / "configs"), tmp_path / "main"
    assert main_job([f"out_dir={out}", f"config_dir={configs}", "num_train=200", "num_eval=20",
                     "vq_steps=2", "clip_steps=0", "transformer_steps=2", "fidelity_prompts=0",
                     "candidates=1", "samples_per_prompt=1", "wandb=disabled", "device=cpu",
                     "prompts=[a red circle]", "upsampler=false"]) == 0  # fmt: skip
    capsys.readouterr()
    spec = importlib.util.spec_from_file_location("bench_train", ROOT / "tools" / "bench_train.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    argv = ["--recipe", "--config", str(configs / "transformer.yaml"), "--data", str(out),
            "--turns", "2", "--turn-steps", "2", "--variant", "inline: prefetch=0 run.threads=1",
            "--variant", "ahead: prefetch=2 run.threads=1 data.batch_size=4 run.precision=fp32",
            "run.precision=bf16"]  # fmt: skip
    assert tool.main(argv) == 0
    rep = json.loads(capsys.readouterr().out)["variants"]
    assert list(rep) == ["inline", "ahead"] and rep["ahead"]["batch_size"] == 4
    assert len(rep["inline"]["samples_per_s_turns"]) == 2
    assert (rep["inline"]["precision"], rep["ahead"]["precision"]) == ("bf16", "fp32")
    assert rep["inline"]["warmup_seconds"] > 0
    assert rep["ahead"]["samples_per_s"] > 0 and rep["ahead"]["threads"] == 1


def test_the_help_lists_every_setting_with_its_default(capsys):
    with pytest.raises(SystemExit) as e:
        main_job(["--help"])
    printed = capsys.readouterr().out
    assert e.value.code == 0
    for key in ("fidelity_prompts=400", "lanes=0", "masked_sampling.steps=24", "rerank.keep=1"):
        assert key in printed


def test_the_old_minute_budgets_are_read_as_caps_and_said_so(capsys):
    cfg = load_config(MainJobConfig, None, _upgrade(["vq_minutes=3", "transformer_minutes=12"]))
    assert (cfg.vq_max_minutes, cfg.transformer_max_minutes) == (3.0, 12.0)
    err = capsys.readouterr().err
    assert "transformer_minutes is now transformer_max_minutes, a safety cap" in err
    assert "the budget is vq_steps" in err


def test_one_sampling_key_keeps_the_jobs_other_sampling_values():
    cfg = load_config(
        MainJobConfig, None, _upgrade(["guidance_scale=2", "rerank.rerank_weight=0.5"])
    )
    assert (cfg.sampling.guidance_scale, cfg.sampling.temperature, cfg.sampling.part_scale) == (
        2.0, 0.5, 0.5)  # fmt: skip
    assert (cfg.rerank.candidates, cfg.rerank.rerank_weight) == (16, 0.5)


def test_an_upsampler_of_another_size_than_the_vq_is_refused_first(tmp_path, capsys):
    configs = _toy_configs(tmp_path / "configs")
    up = yaml.safe_load((configs / "upsampler.yaml").read_text())
    up["model"]["low_size"], up["data"]["image_size"] = 16, 32
    (configs / "upsampler.yaml").write_text(yaml.safe_dump(up))
    out = tmp_path / "main"
    assert main_job([f"out_dir={out}", f"config_dir={configs}", "wandb=disabled"]) == 2
    assert "upsamples 16-px pictures" in capsys.readouterr().out and not out.exists()


def test_count_foils_on_scenes_too_small_are_refused_before_any_work(tmp_path, capsys):
    tiny = Path(__file__).resolve().parents[2] / "configs" / "tiny"  # 16-px scenes
    out = tmp_path / "main"
    assert main_job([f"out_dir={out}", f"config_dir={tiny}", "masked=true", "upsampler=false",
                     "wandb=disabled"]) == 2  # fmt: skip
    said = capsys.readouterr().out
    assert "config key 'masked': trains the CLIP with count foils" in said
    assert "data.image_size 16" in said and not out.exists()
    # without the CLIP stage there is nothing to refuse
    plan(MainJobConfig(out_dir=str(out), config_dir=str(tiny), masked=True, clip=False,
                       upsampler=False))  # fmt: skip


def test_the_data_stage_is_made_from_what_its_data_set_reads():
    """A data set's shards are written again for a change of the settings its build reads, and
    of no other (the emoji set is fixed: num_train and the seed do not make it again)."""

    def data_keys(*overrides: str) -> set[str]:
        job = plan(load_config(MainJobConfig, None, list(overrides)))
        return set(next(s for s in job.stages if s.name == "data").made_from)

    assert data_keys() == {"data", "num_train", "num_eval", "seed"}
    assert data_keys("data=emoji") == {"data"}
