"""Pieces the training loop (`dalle_ar.train.loop`) and the recipes share: the run folder, LR
schedule, progress bar, optimizer groups, wandb logging, checkpoints and resume, the command line.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch
from tqdm import tqdm

from dalle_ar.checkpoint import (
    complete_dir,
    load_train_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
    write_json_atomic,
)
from dalle_ar.config import ConfigError, OptimConfig, RunConfig, load_config, save_config, to_dict

# Their old import path; they live in the floor (dalle_ar.runtime).
from dalle_ar.runtime import (  # noqa: F401
    autocast_context,
    cpu_has_bf16,
    pick_device,
    seed_everything,
    set_threads,
    uses_bf16,
)

log = logging.getLogger(__name__)
T = TypeVar("T")


def lr_at(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Linear warmup to `lr`, then cosine decay to `lr * min_lr_ratio` at `total_steps`."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, total_steps - cfg.warmup_steps)
    t = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * t))


def schedule_step(cfg: Any, step: int, minutes: float) -> int:
    """The step the LR schedule sees, for a recipe config with `optim`, `run` and
    `lr_follows_time`. With `lr_follows_time` (and run.max_minutes) it is, after warmup, whichever
    of steps and wall time is further through its budget, so a time-capped run on a slow or
    shared machine still ends its cosine. `minutes` are the run's, over every resume of it."""
    warm, total, limit = cfg.optim.warmup_steps, cfg.run.steps, cfg.run.max_minutes
    if not (cfg.lr_follows_time and limit > 0) or step < warm:
        return step
    frac = max((step - warm) / max(1, total - warm), minutes / limit)
    return warm + int(min(1.0, frac) * (total - warm))


class BudgetBar:
    """A tqdm bar over a run's budget, in percent of `run.steps`. With `by_time` (runs whose LR
    follows the clock, `lr_follows_time`) it is steps done or wall minutes used (the same minutes
    that end the run), whichever is further along, so a run whose `run.steps` is out of reach
    still shows a true bar and a true time left. The step count sits in the postfix."""

    def __init__(
        self, run: RunConfig, step: int, desc: str, disable: bool | None = None,
        by_time: bool = False,
    ) -> None:  # fmt: skip
        self.steps, self.limit = run.steps, run.max_minutes if by_time else 0.0
        self.bar = tqdm(
            total=100, desc=desc, disable=disable,
            bar_format="{l_bar}{bar}| {n:.0f}% [{elapsed}<{remaining}{postfix}]",
        )  # fmt: skip
        self.percent = 0.0
        self.update(step, 0.0)

    def fraction(self, step: int, minutes: float) -> float:
        frac = step / max(1, self.steps)
        if self.limit > 0:
            frac = max(frac, minutes / self.limit)
        return min(1.0, frac)

    def update(self, step: int, minutes: float, **postfix: str) -> None:
        percent = 100 * self.fraction(step, minutes)
        self.bar.set_postfix(step=step, **postfix, refresh=False)
        self.bar.update(percent - self.percent)
        self.percent = percent

    def close(self) -> None:
        self.bar.close()


def build_optimizer(
    model: torch.nn.Module, cfg: OptimConfig, fused: bool = False
) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norms, biases or embeddings: a parameter
    of a module whose name holds "emb", or a bare parameter whose own name does, as diffusers'
    `positional_embedding`).
    `fused` runs one fused kernel over all parameters (CPU and CUDA; ~9x faster on the CPU for
    a few-million-parameter model than the per-tensor loop)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        *_, module, leaf = ["", *name.split(".")]
        is_embedding = "emb" in module or "emb" in leaf
        (decay if p.ndim >= 2 and not is_embedding else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    extra = {"fused": True} if fused else {}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), **extra)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


class Run:
    """A run folder: resolved config, wandb, checkpoints (`ckpt/last`), metrics JSON. Nothing
    is written before `begin`."""

    def __init__(self, cfg: Any, run: RunConfig, rank: int = 0) -> None:
        self.cfg = cfg
        self.run_cfg = run
        self.rank = rank
        self.dir = Path(run.out_dir)
        self.ckpt_dir = checkpoint_dir(run.out_dir)
        self.start_time = time.time()
        self.minutes_before = 0.0  # minutes spent by earlier processes of this run (resumes)
        self._wandb = None

    def begin(self) -> None:
        """Create the folder and write the resolved config (`config.yaml`): called once the run
        is accepted, so a refused resume leaves the folder as it was. Rank 0 only writes."""
        if self.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, self.dir / "config.yaml")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def has_checkpoint(self) -> bool:
        return has_checkpoint(self.dir)

    def minutes(self) -> float:
        """Wall minutes the run has spent: earlier processes plus this one."""
        return self.minutes_before + (time.time() - self.start_time) / 60

    # -- logging ---------------------------------------------------------------------------
    def init_wandb(self, name: str) -> None:
        if not self.is_main or self.run_cfg.wandb == "disabled":
            return
        import wandb  # imported here: slow, and only the main process logs

        os.environ.setdefault("WANDB_SILENT", "true")
        self._wandb = wandb.init(
            project=self.run_cfg.wandb_project,
            name=name,
            dir=str(self.dir),
            mode=self.run_cfg.wandb,
            config=to_dict(self.cfg),
            reinit="finish_previous",
        )

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)

    def log_image(self, key: str, path: Path, step: int, caption: str = "") -> None:
        if self._wandb is not None:
            import wandb

            self._wandb.log({key: wandb.Image(str(path), caption=caption)}, step=step)

    def write_json(self, name: str, data: dict[str, Any]) -> Path:
        return write_json_atomic(self.dir / name, data)

    def finish(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    # -- checkpoints -----------------------------------------------------------------------
    def save(
        self,
        model: torch.nn.Module,
        model_cfg: Any,
        component: str,
        step: int,
        optimizer: torch.optim.Optimizer,
        extra: dict[str, Any] | None = None,
    ) -> None:
        """Weights + optimizer + step + RNG (+ data position etc. in `extra`), atomically."""
        if not self.is_main:
            return
        state = {
            "step": step,
            "optimizer": optimizer.state_dict(),
            "rng": rng_state(),
            "extra": extra or {},
        }
        save_checkpoint(self.ckpt_dir, model, model_cfg, component, state)

    def resume(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Restore weights, optimizer and RNG from the last checkpoint (`last_checkpoint`);
        return the saved state. FileNotFoundError without one; ValueError for weights of
        another shape (naming the tensors), or an optimizer over other parameters."""
        from safetensors.torch import load_file

        from dalle_ar.checkpoint import load_state_strict

        found = last_checkpoint(self.dir)
        if found is None:
            raise FileNotFoundError(f"--resume given but {self.ckpt_dir} holds no checkpoint")
        weights = load_file(str(found / "model.safetensors"))
        load_state_strict(model, weights, str(found), assign=False)
        state = load_train_state(found)
        try:
            optimizer.load_state_dict(state["optimizer"])
        except ValueError as e:  # torch's words name no setting
            raise ValueError(
                f"the checkpoint in {found} trained other parameters than this run would "
                f"({e}): a setting that chooses them (freeze_body, say) differs from the run's "
                "own; resume with the run's settings, or start a new run (init_from=...)"
            ) from None
        set_rng_state(state["rng"])
        log.info("resumed from %s at step %d", found, state["step"])
        return state


def checkpoint_dir(out_dir: str | Path) -> Path:
    """Where a run writes its last checkpoint: out_dir/ckpt/last."""
    return Path(out_dir) / "ckpt" / "last"


def last_checkpoint(out_dir: str | Path) -> Path | None:
    """The checkpoint a run resumes from: out_dir/ckpt/last, or the newest whole version a
    process killed while replacing it left beside it (`checkpoint.complete_dir`); None
    without one."""
    found = complete_dir(checkpoint_dir(out_dir))
    return found if found is not None and (found / "train_state.pt").is_file() else None


def has_checkpoint(out_dir: str | Path) -> bool:
    """Whether the run folder holds a complete checkpoint to resume from."""
    return last_checkpoint(out_dir) is not None


def spent_minutes(out_dir: str | Path) -> float:
    """Wall minutes a run has spent up to its last checkpoint (0 without one)."""
    found = last_checkpoint(out_dir)
    if found is None:
        return 0.0
    return checkpoint_minutes(load_train_state(found).get("extra", {}))


def checkpoint_minutes(extra: dict[str, Any]) -> float:
    """The minutes a checkpoint's `extra` records (older versions: seconds, `elapsed_s`)."""
    return float(extra.get("minutes", extra.get("elapsed_s", 0.0) / 60))


class NonFiniteLoss(RuntimeError):
    """`max_bad_steps` non-finite steps in a row, or non-finite weights at the end; the last good
    checkpoint is kept and no component folder is written."""


def run_recipe(
    cfg_type: type[T],
    train: Callable[..., dict[str, Any]],
    argv: list[str] | None,
    prog: str,
    description: str,
    example: str,
    report: Callable[[dict[str, Any]], str],
) -> int:
    """A recipe's `main`: parse `--config FILE [--resume] [key=value ...]`, refuse --resume
    without a checkpoint, run `train(cfg, resume=...)`, and turn what a user can act on into an
    exit status: 2 for a config, file or folder that is wrong or missing, 1 for a run stopped by
    non-finite steps (its last good checkpoint kept). Rank 0 prints `report(metrics)`."""
    from dalle_ar.train import dist

    parsed = recipe_config(cfg_type, argv, prog, description, example)
    if parsed is None:
        return 2
    cfg, resume = parsed
    if resume and not has_checkpoint(cfg.run.out_dir):
        print(f"{prog}: --resume given but {checkpoint_dir(cfg.run.out_dir)} holds no "
              "checkpoint", file=sys.stderr)  # fmt: skip
        return 2
    try:
        metrics = train(cfg, resume=resume)
    except (ValueError, FileNotFoundError) as e:  # a bad value or a missing shard or folder
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    except NonFiniteLoss as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 1
    finally:
        dist.cleanup()
    if dist.is_main_process():  # under torchrun, rank 0 speaks
        print(report(metrics))
        if metrics.get("under_trained"):
            print(f"{prog}: {metrics['under_trained']}; continue with --resume and a larger "
                  "run.max_minutes (or 0)", file=sys.stderr)  # fmt: skip
    return 0


def recipe_config(
    cfg_type: type[T], argv: list[str] | None, prog: str, description: str, example: str
) -> tuple[T, bool] | None:
    """A recipe's command line, `--config FILE [--resume] [key=value ...]`: (config, resume), or
    None after printing `prog: message` to stderr when the config does not load (the caller then
    exits with status 2). For a recipe's `main` only: it prints."""
    ap = argparse.ArgumentParser(prog=prog, description=description)
    ap.add_argument("--config", required=True, help=f"YAML config (e.g. {example})")
    ap.add_argument("--resume", action="store_true", help="continue from run.out_dir/ckpt/last")
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides (optim.lr=1e-3)")
    args = ap.parse_args(argv)
    try:
        return load_config(cfg_type, args.config, args.overrides), args.resume
    except ConfigError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return None


def training_batches(loader: Iterable[dict[str, Any]], urls: str) -> Iterator[dict[str, Any]]:
    """The batches of an endless training loader (`dalle_ar.data.loader.Loader`) over `urls`.
    ValueError, naming why its records were skipped, when a whole pass yielded no record: the
    loader ends there, where it would otherwise loop forever without a batch."""
    yield from loader
    empty = getattr(loader, "empty_pass", None)
    if empty is not None:
        _, report = empty
        why = report.summary() if report.total else "the shards hold no records"
        raise ValueError(f"a whole pass over the training shards {urls} yielded no record: {why}")


class ShardImages:
    """A `loop.Source` of image-caption batches {"image": (B, 3, S, S) in [0, 1], "caption",
    "meta", "key"} from a recipe's data.train and data.eval (`config.DataConfig`); under DDP each
    rank reads its part of the shards (dalle_ar.data.loader). The VQ, CLIP and upsampler recipes
    read it; `captions=False` keeps the records without a caption (caption "") for a model that
    reads none."""

    def __init__(self, cfg: Any, captions: bool = True) -> None:  # cfg: `data` and `run.seed`
        self.data, self.seed, self.captions = cfg.data, cfg.run.seed, captions

    def train(self, skip: int) -> Iterator[dict[str, Any]]:
        """This rank's batches from the `skip`-th on; ValueError for a pass that yields none
        (`training_batches`)."""
        from dalle_ar.data.loader import loader_from_config  # the data stage; imported when used

        loader = loader_from_config(self.data, "train", seed=self.seed, captions=self.captions)
        batches = training_batches(loader, self.data.train)
        return itertools.islice(batches, skip, None)  # exact: the order is fixed by the seed

    def eval(self) -> Iterable[dict[str, Any]] | None:
        from dalle_ar.data.loader import loader_from_config

        if not self.data.eval:
            return None
        return loader_from_config(self.data, "eval", seed=self.seed, captions=self.captions)
