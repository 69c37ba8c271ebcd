"""`dalle-ar pipeline [--config FILE] [key=value ...]`: the main job, text to image end to end.

    shards -> BPE tokenizer -> VQ-VAE -> token shards -> transformer -> pipeline folder
           -> samples for a handful of prompts (some held-out combinations), each the best of
              `rerank.candidates` by the model's own score (dalle_ar.rerank) -> captioned grid
           -> the data set's evaluation, single draws and reranked (terminal + JSON)

Each stage writes into `out_dir` and is skipped on a rerun once its output is complete; a training
stage that was killed resumes from its last checkpoint. Each stage calls the same functions as its
own command (`dalle-ar data ...`, `dalle-ar train ...`, `dalle-ar tokens`), with the component
configs of the data set (`data`, `dalle_ar.jobs.shapes`) under configs/.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

from dalle_ar.config import ConfigError, load_config, save_config, to_dict
from dalle_ar.jobs.config import MainJobConfig
from dalle_ar.jobs.dataset import DataSet
from dalle_ar.jobs.shapes import SHAPES

log = logging.getLogger(__name__)

DATA_SETS: dict[str, DataSet] = {SHAPES.name: SHAPES}


# The keys the main job took before its sampling settings were grouped: `guidance_scale=2` still
# means `sampling.guidance_scale=2`.
LEGACY_KEYS = {
    "guidance_scale": "sampling.guidance_scale",
    "temperature": "sampling.temperature",
    "top_k": "sampling.top_k",
    "part_scale": "sampling.part_scale",
    "candidates": "rerank.candidates",
}


class Paths:
    """Where each stage writes, below `out_dir`."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.data = out / "data"
        self.tokenizer_run = out / "tokenizer_run"
        self.tokenizer = self.tokenizer_run / "tokenizer"
        self.vq_run = out / "vq_run"
        self.vq = self.vq_run / "vq"
        self.tokens = out / "tokens"
        self.transformer_run = out / "transformer_run"
        self.transformer = self.transformer_run / "transformer"
        self.pipeline = out / "pipeline"
        self.samples = out / "samples"
        self.fidelity = out / "fidelity.json"


def _repo_configs() -> Path:
    return Path(__file__).resolve().parents[2] / "configs"


# ----------------------------------------------------------------------------------------------
# Stages: each calls the functions behind its command.


def stage_tokenizer(cfg: MainJobConfig, p: Paths, yaml: Path) -> None:
    from dalle_ar.train import tokenizer

    overrides = [f"data.train={p.data}/train-*.tar", f"run.out_dir={p.tokenizer_run}",
                 f"run.wandb={cfg.wandb}"]  # fmt: skip
    tokenizer.train(load_config(tokenizer.TokenizerRecipeConfig, yaml, overrides))


def stage_vq(cfg: MainJobConfig, p: Paths, yaml: Path) -> None:
    from dalle_ar.train import vq
    from dalle_ar.train.common import has_checkpoint

    overrides = [
        f"data.train={p.data}/train-*.tar",
        f"data.eval={p.data}/eval-*.tar",
        f"run.out_dir={p.vq_run}",
        f"run.max_minutes={cfg.vq_minutes}",
        f"run.seed={cfg.seed}",
        f"run.device={cfg.device}",
        f"run.wandb={cfg.wandb}",
    ]
    vq.train(load_config(vq.VQRecipeConfig, yaml, overrides), resume=has_checkpoint(p.vq_run))


def stage_tokens(cfg: MainJobConfig, p: Paths) -> None:
    from dalle_ar.cli.tokens import tokenize_shards

    for split in ("train", "eval"):  # the summary of the last split marks the stage complete
        tokenize_shards(p.vq, f"{p.data}/{split}-*.tar", p.tokens, split, device=cfg.device)


def stage_transformer(cfg: MainJobConfig, p: Paths, yaml: Path) -> None:
    from dalle_ar.text import TextTokenizer
    from dalle_ar.train import transformer
    from dalle_ar.train.common import has_checkpoint
    from dalle_ar.vq import VQTokenizer

    tok = TextTokenizer.from_pretrained(p.tokenizer)
    vq = VQTokenizer.from_pretrained(p.vq)
    h, w = vq.grid_size(vq.config.image_size)
    overrides = [
        f"data.train={p.tokens}/train-*.tar",
        f"data.eval={p.tokens}/eval-*.tar",
        f"text_tokenizer={p.tokenizer}",
        f"vq={p.vq}",
        f"model.text_vocab={tok.vocab_size}",
        f"model.image_vocab={vq.codebook_size}",
        f"model.grid_h={h}",
        f"model.grid_w={w}",
        f"run.out_dir={p.transformer_run}",
        f"run.max_minutes={cfg.transformer_minutes}",
        "run.steps=1000000",  # the time budget ends the run (and the LR cosine)
        f"run.seed={cfg.seed}",
        f"run.device={cfg.device}",
        f"run.wandb={cfg.wandb}",
    ]
    rcfg = load_config(transformer.TrainTransformerConfig, yaml, overrides)
    transformer.train(rcfg, resume=has_checkpoint(p.transformer_run))


def stage_pipeline(cfg: MainJobConfig, p: Paths) -> None:
    from dalle_ar.pipelines import assemble

    # The folder's defaults are the job's sampling settings and rerank weight; its candidates
    # stay 1, so `dalle-ar sample --model` draws once per sample unless asked for more.
    rerank = dataclasses.replace(cfg.rerank, candidates=1)
    defaults = {"ar": dataclasses.asdict(cfg.sampling), "rerank": dataclasses.asdict(rerank)}
    assemble(p.pipeline, p.tokenizer, p.vq, p.transformer, defaults=defaults)


def stage_samples(cfg: MainJobConfig, p: Paths, data: DataSet) -> None:
    from dalle_ar.grid import save_prompt_grid
    from dalle_ar.pipelines import Pipeline
    from dalle_ar.runtime import pick_device

    pipe = Pipeline.from_pretrained(p.pipeline, device=pick_device(cfg.device))
    prompts = cfg.prompts or data.prompts
    result = pipe(prompts, cfg.samples_per_prompt, cfg.seed, settings=cfg.sampling,
                  rerank=cfg.rerank)  # fmt: skip
    grid = save_prompt_grid(result, p.samples / "grid.png")
    report = data.evaluate(pipe, cfg)
    report["grid"] = str(grid)
    p.fidelity.write_text(json.dumps(report, indent=2))


def _complete(folder: Path) -> bool:
    return (folder / "config.json").is_file()


def run_stages(cfg: MainJobConfig) -> dict:
    """Run every stage not done yet; returns the summary (also out_dir/summary.json)."""
    p = Paths(Path(cfg.out_dir))
    data = DATA_SETS[cfg.data]
    configs = Path(cfg.config_dir) if cfg.config_dir else _repo_configs()
    yaml = {stage: configs / name for stage, name in data.configs.items()}
    missing = [str(f) for f in yaml.values() if not f.is_file()]
    if missing:
        raise ConfigError(f"config key 'config_dir': no component configs {missing}")
    p.out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, p.out / "main_job.yaml")
    stages: list[tuple[str, Callable[[], bool], Callable[[], None]]] = [
        ("data", lambda: (p.data / "info.json").is_file(), lambda: data.build(cfg, p.data)),
        ("tokenizer", lambda: _complete(p.tokenizer),
         lambda: stage_tokenizer(cfg, p, yaml["tokenizer"])),
        ("vq", lambda: _complete(p.vq), lambda: stage_vq(cfg, p, yaml["vq"])),
        ("tokens", lambda: (p.tokens / "eval-tokens.json").is_file(),
         lambda: stage_tokens(cfg, p)),
        ("transformer", lambda: _complete(p.transformer),
         lambda: stage_transformer(cfg, p, yaml["transformer"])),
        ("pipeline", lambda: (p.pipeline / "pipeline.json").is_file(),
         lambda: stage_pipeline(cfg, p)),
        ("samples", lambda: p.fidelity.is_file(), lambda: stage_samples(cfg, p, data)),
    ]  # fmt: skip
    timings: dict[str, float | str] = {}
    start = time.perf_counter()
    for i, (name, done, run) in enumerate(stages, 1):
        if done():
            print(f"[{i}/{len(stages)}] {name}: done already, skipped")
            timings[name] = "skipped"
            continue
        print(f"[{i}/{len(stages)}] {name}: running", flush=True)
        t0 = time.perf_counter()
        run()
        timings[name] = round(time.perf_counter() - t0, 1)
        print(f"[{i}/{len(stages)}] {name}: finished in {timings[name]} s", flush=True)
    total = round(time.perf_counter() - start, 1)
    summary = {"config": to_dict(cfg), "stage_seconds": timings, "total_seconds": total}
    if p.fidelity.is_file():
        summary["fidelity"] = json.loads(p.fidelity.read_text())
    (p.out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _upgrade(overrides: list[str]) -> list[str]:
    """`guidance_scale=2` -> `sampling.guidance_scale=2` (LEGACY_KEYS)."""
    out = []
    for o in overrides:
        key, eq, value = o.partition("=")
        out.append(f"{LEGACY_KEYS[key]}={value}" if eq and key in LEGACY_KEYS else o)
    return out


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="dalle-ar pipeline", description=__doc__.split("\n")[0])
    ap.add_argument("--config", help="a main-job YAML (fields: MainJobConfig)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides (e.g. out_dir=runs/x)")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(MainJobConfig, args.config, _upgrade(args.overrides))
    except ConfigError as e:
        print(f"dalle-ar pipeline: {e}")
        return 2
    logging.getLogger().setLevel(logging.WARNING)
    summary = run_stages(cfg)
    fid = summary.get("fidelity")
    if fid:
        print(json.dumps(fid.get("summary", fid), indent=2))
    print(f"pipeline folder: {Path(cfg.out_dir) / 'pipeline'}")
    print(f"sample grid:     {Path(cfg.out_dir) / 'samples' / 'grid.png'}")
    print(f"summary:         {Path(cfg.out_dir) / 'summary.json'}  ({summary['total_seconds']} s)")
    return 0
