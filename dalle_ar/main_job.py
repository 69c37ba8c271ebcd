"""`dalle-ar pipeline [key=value ...]`: the main job, text to image end to end on the shapes data.

    shards -> BPE tokenizer -> VQ-VAE -> token shards -> transformer -> pipeline folder
           -> samples for a handful of prompts (some held-out combinations), each the best of
              `candidates` by the model's own score (dalle_ar.rerank) -> captioned grid
           -> fidelity measured by the shape checker, single draws and reranked (terminal + JSON)

Each stage writes into `out_dir` and is skipped on a rerun once its output is complete; a training
stage that was killed resumes from its last checkpoint. Every stage runs the same code as its own
command (`dalle-ar data ...`, `dalle-ar train ...`), with the component configs under configs/.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

from dalle_ar.config import ConfigError, load_config, require, save_config, to_dict

log = logging.getLogger(__name__)

# A handful of prompts for the grid: seen and held-out colour-shape combinations
# (dalle_ar.data.shapes.HELD_OUT_COMBOS), one- and two-object scenes, in the captions' own words
# (shapes.caption: the cell above the centre is "top middle" or "top").
DEFAULT_PROMPTS = [
    "a small red circle at the top left",
    "a big blue square in the centre",
    "a large green triangle at the bottom right",
    "a small yellow diamond at the top middle",
    "a red square to the left of a blue circle",
    "a big purple circle above a small orange square",
]


@dataclasses.dataclass
class MainJobConfig:
    out_dir: str = "runs/main"  # every stage writes below this folder
    config_dir: str = ""  # component YAMLs; empty = the repository's configs/
    num_train: int = 50_000  # shapes training images
    num_eval: int = 2_000  # shapes evaluation images (held-out combinations appear only here)
    vq_minutes: float = 3.0  # wall-time cap of the VQ-VAE stage
    transformer_minutes: float = 12.0  # wall-time cap of the transformer stage
    prompts: list[str] = dataclasses.field(default_factory=lambda: list(DEFAULT_PROMPTS))
    samples_per_prompt: int = 4  # images per prompt in the grid
    fidelity_prompts: int = 400  # evaluation-split prompts scored by the shape checker
    fidelity_composed: bool = False  # score composed prompts too (shapes.composed_prompt)
    # Each grid image is the best of this many candidates by the model's own caption-image score
    # (dalle_ar.rerank), and fidelity is scored once more that way; 1 = no reranking.
    candidates: int = 16
    part_scale: float = 0.5  # weight of each part of a composed prompt (README)
    # Sampling for the grid, the fidelity scores and the pipeline folder's defaults. Guidance 1.5
    # and temperature 0.7 measured best on the shapes (README); at guidance 3 the model adds
    # stray objects.
    guidance_scale: float = 1.5
    temperature: float = 0.7
    top_k: int = 0  # 0 = no top-k filtering
    seed: int = 0  # data, training and sampling seed
    device: str = "auto"  # auto | cpu | cuda
    wandb: str = "offline"  # offline | online | disabled

    def validate(self) -> None:
        require(self.num_train >= 100, "num_train", "must be >= 100")
        require(self.num_eval >= 10, "num_eval", "must be >= 10")
        require(self.vq_minutes > 0, "vq_minutes", "must be > 0")
        require(self.transformer_minutes > 0, "transformer_minutes", "must be > 0")
        require(len(self.prompts) >= 1, "prompts", "needs at least one prompt")
        require(self.samples_per_prompt >= 1, "samples_per_prompt", "must be >= 1")
        require(self.fidelity_prompts >= 0, "fidelity_prompts", "must be >= 0")
        require(self.candidates >= 1, "candidates", "must be >= 1")
        require(self.part_scale >= 0, "part_scale", "must be >= 0")
        require(self.device in ("auto", "cpu", "cuda"), "device", "must be auto, cpu or cuda")
        require(self.wandb in ("offline", "online", "disabled"), "wandb", "offline|online|disabled")


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
    return Path(__file__).resolve().parents[1] / "configs"


def _run_cli(argv: list[str]) -> None:
    from dalle_ar.cli import main as cli_main

    code = cli_main(argv)
    if code != 0:
        raise RuntimeError(f"stage command failed with exit code {code}: dalle-ar {' '.join(argv)}")


# ----------------------------------------------------------------------------------------------
# Stages. Each is (name, done?, run).


def stage_data(cfg: MainJobConfig, p: Paths) -> None:
    _run_cli(
        ["data", "shapes", "--out", str(p.data), "--num-train", str(cfg.num_train),
         "--num-eval", str(cfg.num_eval), "--seed", str(cfg.seed)]
    )  # fmt: skip


def stage_tokenizer(cfg: MainJobConfig, p: Paths, configs: Path) -> None:
    _run_cli(
        ["train", "tokenizer", "--config", str(configs / "tokenizer_shapes.yaml"),
         f"data.train={p.data}/train-*.tar", f"run.out_dir={p.tokenizer_run}",
         f"run.wandb={cfg.wandb}"]
    )  # fmt: skip


def _resume_flag(run_dir: Path) -> list[str]:
    return ["--resume"] if (run_dir / "ckpt" / "last" / "train_state.pt").is_file() else []


def stage_vq(cfg: MainJobConfig, p: Paths, configs: Path) -> None:
    _run_cli(
        ["train", "vq", "--config", str(configs / "vq_shapes.yaml"), *_resume_flag(p.vq_run),
         f"data.train={p.data}/train-*.tar", f"data.eval={p.data}/eval-*.tar",
         f"run.out_dir={p.vq_run}", f"run.max_minutes={cfg.vq_minutes}",
         f"run.seed={cfg.seed}", f"run.device={cfg.device}", f"run.wandb={cfg.wandb}"]
    )  # fmt: skip


def stage_tokens(cfg: MainJobConfig, p: Paths) -> None:
    from dalle_ar.data.tokens import pretokenize

    for split in ("train", "eval"):
        pretokenize(p.vq, f"{p.data}/{split}-*.tar", p.tokens, prefix=split, device=cfg.device)
        # (the summary file of the last split marks the stage complete)


def stage_transformer(cfg: MainJobConfig, p: Paths, configs: Path) -> None:
    from dalle_ar.text import TextTokenizer
    from dalle_ar.vq import VQTokenizer

    tok = TextTokenizer.from_pretrained(p.tokenizer)
    vq = VQTokenizer.from_pretrained(p.vq)
    h, w = vq.grid_size(vq.config.image_size)
    _run_cli(
        ["train", "transformer", "--config", str(configs / "transformer_shapes.yaml"),
         *_resume_flag(p.transformer_run),
         f"data.train={p.tokens}/train-*.tar", f"data.eval={p.tokens}/eval-*.tar",
         f"text_tokenizer={p.tokenizer}", f"vq={p.vq}",
         f"model.text_vocab={tok.vocab_size}",
         f"model.image_vocab={vq.codebook_size}", f"model.grid_h={h}", f"model.grid_w={w}",
         f"run.out_dir={p.transformer_run}", f"run.max_minutes={cfg.transformer_minutes}",
         "run.steps=1000000",  # the time budget ends the run (and the LR cosine), not a count
         f"run.seed={cfg.seed}", f"run.device={cfg.device}", f"run.wandb={cfg.wandb}"]
    )  # fmt: skip


def stage_pipeline(cfg: MainJobConfig, p: Paths) -> None:
    from dalle_ar.pipeline import assemble

    defaults = {
        "guidance_scale": cfg.guidance_scale,
        "temperature": cfg.temperature,
        "part_scale": cfg.part_scale,
    }
    if cfg.top_k:
        defaults["top_k"] = cfg.top_k
    assemble(
        p.pipeline, tokenizer=p.tokenizer, vq=p.vq, transformer=p.transformer, defaults=defaults
    )


def stage_samples(cfg: MainJobConfig, p: Paths) -> None:
    from dalle_ar.pipeline import DalleAR, evaluate_fidelity, save_prompt_grid
    from dalle_ar.runtime import pick_device

    pipe = DalleAR.from_pretrained(p.pipeline, device=pick_device(cfg.device))
    result = pipe(
        cfg.prompts,
        num_samples=cfg.samples_per_prompt,
        seed=cfg.seed,
        temperature=cfg.temperature,
        top_k=cfg.top_k or None,
        guidance_scale=cfg.guidance_scale,
        candidates=cfg.candidates,
    )
    grid = save_prompt_grid(result, p.samples / "grid.png")
    fidelity = evaluate_fidelity(
        pipe,
        num_prompts=cfg.fidelity_prompts,
        seed=cfg.seed,
        guidance_scales=(1.0, cfg.guidance_scale),
        temperature=cfg.temperature,
        top_k=cfg.top_k or None,
        composed=cfg.fidelity_composed,
        part_scale=cfg.part_scale,
        candidates=cfg.candidates,
    )
    fidelity["grid"] = str(grid)
    p.fidelity.write_text(json.dumps(fidelity, indent=2))


def _complete(folder: Path) -> bool:
    return (folder / "config.json").is_file()


def run_stages(cfg: MainJobConfig) -> dict:
    p = Paths(Path(cfg.out_dir))
    p.out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, p.out / "main_job.yaml")
    configs = Path(cfg.config_dir) if cfg.config_dir else _repo_configs()
    if not (configs / "vq_shapes.yaml").is_file():
        raise ConfigError(f"config key 'config_dir': no component configs in {configs}")
    stages: list[tuple[str, Callable[[], bool], Callable[[], None]]] = [
        ("data", lambda: (p.data / "info.json").is_file(), lambda: stage_data(cfg, p)),
        ("tokenizer", lambda: _complete(p.tokenizer), lambda: stage_tokenizer(cfg, p, configs)),
        ("vq", lambda: _complete(p.vq), lambda: stage_vq(cfg, p, configs)),
        (
            "tokens",
            lambda: (p.tokens / "eval-tokens.json").is_file(),
            lambda: stage_tokens(cfg, p),
        ),
        (
            "transformer",
            lambda: _complete(p.transformer),
            lambda: stage_transformer(cfg, p, configs),
        ),
        (
            "pipeline",
            lambda: (p.pipeline / "pipeline.json").is_file(),
            lambda: stage_pipeline(cfg, p),
        ),
        ("samples", lambda: p.fidelity.is_file(), lambda: stage_samples(cfg, p)),
    ]
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


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="dalle-ar pipeline", description=__doc__.split("\n")[0])
    ap.add_argument("overrides", nargs="*", help="key=value overrides (e.g. out_dir=runs/x)")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(MainJobConfig, None, args.overrides)
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
