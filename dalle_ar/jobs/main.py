"""`dalle-ar pipeline [--config FILE] [key=value ...]`: the main job, text to image end to end.

    shards -> BPE tokenizer -> VQ-VAE -> token shards -> transformer
           -> CLIP (with `vq_round_trip`, some scenes as the VQ gives them back), beside the
              transformer -> token shards with the CLIP's image embeddings
           -> diffusion prior, and the transformer fine-tuned to read the CLIP image embedding
              too (DALL-E 2's decoder), which then draws both modes
           -> upsampler (on the scenes at twice the size) -> pipeline folder
           -> samples for a handful of prompts (some held-out combinations), each the best of
              `rerank.candidates` by `rerank.reranker` (CLIP) -> captioned grids with the scores,
              in text mode and in prior mode, and upsampled beside the small ones
           -> the data set's evaluation: single draws, and best of the candidates by the
              transformer's own score (PMI), by CLIP and by both (terminal + JSON); the prior
              mode's single draws and best of the candidates by CLIP beside them; the guided
              single draws upsampled

Each stage writes into `out_dir` and is skipped on a rerun once its output is complete and the
job settings it is made from (`plan.MADE_FROM`) are those it ran with (`stage_settings.json`); a
changed setting runs it again, and every stage that needs it. A training stage that was killed
resumes from its last checkpoint. On a CPU, stages that need nothing of each other run side by
side (`lanes`, `run.side_by_side`), each in a process of its own. Training stages are sized in
steps (the component configs' run.steps, or `vq_steps` / `transformer_steps`); their minutes are
safety caps: a stage a cap stops is reported under-trained and continues to its planned steps
on the next run.
Each stage calls the same functions as its own command (`dalle-ar data ...`, `dalle-ar train ...`,
`dalle-ar tokens`), with the component configs of the data set (`data`: `dalle_ar.jobs.shapes`,
`emoji`, `own`) under configs/<data>/ (pictures of your own: configs/emoji/).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

from yaml import safe_load

from dalle_ar.config import ConfigError, load_config, save_config, settings_help, to_dict
from dalle_ar.jobs.config import MainJobConfig
from dalle_ar.jobs.plan import DATA_SETS, plan, read_mapping, settings_ran_with
from dalle_ar.jobs.run import (
    StageFailed,
    StageStopped,
    job_lanes,
    one_after_another,
    say,
    side_by_side,
)
from dalle_ar.jobs.stages import Paths, tokens_done, training_state
from dalle_ar.runtime import describe_machine

__all__ = ["Paths", "main", "run_stages"]


# The keys the main job took before its sampling settings were grouped: `guidance_scale=2` still
# means `sampling.guidance_scale=2`.
LEGACY_KEYS = {
    "guidance_scale": "sampling.guidance_scale",
    "temperature": "sampling.temperature",
    "top_k": "sampling.top_k",
    "part_scale": "sampling.part_scale",
    "candidates": "rerank.candidates",
    "vq_minutes": "vq_max_minutes",  # budgets became step counts; the minutes are caps now
    "transformer_minutes": "transformer_max_minutes",
}


def run_stages(cfg: MainJobConfig) -> dict:
    """Run every stage not done yet, one after another or (`lanes`) side by side; returns the
    summary (also out_dir/summary.json). StageStopped for a training stage stopped by
    non-finite numbers; ConfigError for configs that do not fit; StageFailed for a stage that
    failed in a process of its own (naming the stage and where its output went)."""
    job = plan(cfg)
    p = job.paths
    p.out.mkdir(parents=True, exist_ok=True)
    previous = read_mapping(p.out / "main_job.yaml", safe_load)  # before it holds this run's
    ran_with = settings_ran_with(p, previous, job.config_steps)
    save_config(cfg, p.out / "main_job.yaml")
    if cfg.prior and not tokens_done(p.clip_tokens, p.clip) and tokens_done(p.tokens, p.clip):
        # a folder of the layout before clip_tokens/, whose token shards hold this CLIP's
        # embeddings: they are those shards, and the stages trained on them stay done
        shutil.copytree(p.tokens, p.clip_tokens, dirs_exist_ok=True)
    lanes = job_lanes(cfg)
    if lanes > 1:
        say(f"stages side by side where one needs nothing of the other: up to {lanes} at once")
    timings: dict[str, float | str] = {}
    start = time.perf_counter()
    if lanes == 1:
        one_after_another(job, timings, ran_with)
    else:
        side_by_side(cfg, job, lanes, timings, ran_with)
    total = round(time.perf_counter() - start, 1)
    timings = {s.name: timings[s.name] for s in job.stages if s.name in timings}  # plan order
    training = {"vq": training_state(p.vq_run),
                **({"clip": training_state(p.clip_run)} if cfg.clip else {}),
                "transformer": training_state(p.transformer_run)}  # fmt: skip
    if cfg.prior:
        training["prior"] = training_state(p.prior_run)
        training["cond_transformer"] = training_state(p.cond_run)
    if cfg.masked:
        training["masked"] = training_state(p.masked_run)
    if job.cascade:
        training["upsampler"] = training_state(p.upsampler_run)
    before = read_mapping(p.out / "summary.json", json.loads)
    # total_seconds: this run's wall time; total_seconds_when_run: the wall time of the last run
    # that did work (this one, unless it found every stage done; after a partial rerun, this
    # run's, while stage_seconds_when_run keeps each stage's own)
    ran = any(not isinstance(v, str) for v in timings.values())
    when = total if ran else _seconds(before).get("total")
    summary = {"config": to_dict(cfg), "machine": describe_machine(), "lanes": lanes,
               "stage_seconds": timings, "stage_seconds_when_run": _when_run(before, timings),
               "training": training, "total_seconds": total,
               "total_seconds_when_run": when}  # fmt: skip
    if p.fidelity.is_file():
        summary["fidelity"] = json.loads(p.fidelity.read_text())
    (p.out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _seconds(old: dict) -> dict[str, float]:
    """What a previous summary timed when it ran: each stage's seconds and "total" (older
    summaries: their stage_seconds, and their total_seconds where a stage ran); entries that
    are not numbers dropped."""

    def numbers(d: object) -> dict[str, float]:
        return {k: v for k, v in (d.items() if isinstance(d, dict) else ())
                if isinstance(v, (int, float)) and not isinstance(v, bool)}  # fmt: skip

    stages = numbers(old.get("stage_seconds_when_run", old.get("stage_seconds")))
    if "total_seconds_when_run" in old:
        total = old["total_seconds_when_run"]
    else:  # written before the field: its total is the job's where some stage ran in it
        total = old.get("total_seconds") if numbers(old.get("stage_seconds")) else None
    return {**stages, **numbers({"total": total})}


def _when_run(old: dict, timings: dict[str, float | str]) -> dict[str, float]:
    """Each stage's seconds when it last ran: this job's where it ran, else what the folder's
    previous summary.json recorded (a rerun that skips a stage keeps its measured time; a job
    that failed wrote no summary, so its times are not carried); a stage no summary timed is
    left out."""
    before = _seconds(old)
    return {name: secs if isinstance(secs, (int, float)) else before[name]
            for name, secs in timings.items()
            if isinstance(secs, (int, float)) or name in before}  # fmt: skip


def table(summary: dict) -> str:
    """The stages as a terminal table: time, and for training stages the steps against the plan,
    the precision and threads; an under-trained stage is named again below it."""
    rows, loud = [("stage", "time", "training")], []
    for name, secs in summary["stage_seconds"].items():
        t = summary.get("training", {}).get(name)
        what = ""
        if t:
            what = f"{t.get('step', 0):,} of {t.get('planned_steps', 0):,} steps"
            used = t.get("threads_used") or [t.get("threads", "?")]  # a run follows the CPUs
            threads = "-".join(str(n) for n in (used if len(used) == 1 else (used[0], used[-1])))
            what += f", {t.get('precision', '?')}, {threads} thread(s)"
            if t.get("under_trained"):
                what += ", UNDER-TRAINED"
                loud.append(f"{name}: {t['under_trained']}; run the job again to continue")
        if secs == "skipped":
            before = summary.get("stage_seconds_when_run", {}).get(name)
            shown = "skipped" + (f" (ran in {before} s)" if before is not None else "")
        else:
            shown = f"{secs} s"
        rows.append((name, shown, what))
    widths = [max(len(str(r[i])) for r in rows) for i in range(3)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join([*lines, *(f"WARNING {m}" for m in loud)])


def _upgrade(overrides: list[str]) -> list[str]:
    """`guidance_scale=2` -> `sampling.guidance_scale=2` (LEGACY_KEYS)."""
    out = []
    for o in overrides:
        key, eq, value = o.partition("=")
        if eq and key.endswith("_minutes") and key in LEGACY_KEYS:  # its meaning changed
            budget = key.replace("_minutes", "_steps")
            print(f"dalle-ar pipeline: {key} is now {LEGACY_KEYS[key]}, a safety cap; the "
                  f"budget is {budget} (the component config's run.steps by default)",
                  file=sys.stderr)  # fmt: skip
        out.append(f"{LEGACY_KEYS[key]}={value}" if eq and key in LEGACY_KEYS else o)
    return out


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(
        prog="dalle-ar pipeline",
        description=__doc__.split("\n")[0],
        epilog="settings (key=value; a --config YAML sets the same keys), with their "
        "defaults:\n" + settings_help(MainJobConfig) + "\nwhat each means: README.md (the main "
        "job) and the comments of MainJobConfig (dalle_ar/jobs/config.py); a budget of 0 steps "
        "is the component config's run.steps",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--config", help="a main-job YAML (fields: MainJobConfig)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides (e.g. out_dir=runs/x)")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(MainJobConfig, args.config, _upgrade(args.overrides))
    except ConfigError as e:
        print(f"dalle-ar pipeline: {e}")
        return 2
    logging.getLogger().setLevel(logging.WARNING)
    try:
        summary = run_stages(cfg)
    except ConfigError as e:  # a component config that does not fit: before its stage's work
        print(f"dalle-ar pipeline: {e}")
        return 2
    except (StageStopped, StageFailed) as e:  # StageStopped: as `dalle-ar train` exits for it
        print(f"dalle-ar pipeline: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ndalle-ar pipeline: interrupted; a rerun of the job goes on from the stages it "
              "finished", file=sys.stderr)  # fmt: skip
        return 130
    if summary.get("fidelity"):
        print(DATA_SETS[cfg.data].summarize(summary["fidelity"]))
    print(table(summary))
    print(f"pipeline folder: {Path(cfg.out_dir) / 'pipeline'}")
    grids = sorted((Path(cfg.out_dir) / "samples").glob("grid*.png"))  # one per mode, upsampled
    print(f"sample grids:    {', '.join(str(g) for g in grids)}")
    took, when = f"{summary['total_seconds']} s", summary["total_seconds_when_run"]
    if when is not None and set(summary["stage_seconds"].values()) == {"skipped"}:
        took += f"; the last run that did work took {when} s"
    print(f"summary:         {Path(cfg.out_dir) / 'summary.json'}  ({took})")
    return 0
