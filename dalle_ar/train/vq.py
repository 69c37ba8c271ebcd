"""Recipe: train the VQ-VAE image tokenizer on image shards.

    dalle-ar train vq --config configs/vq_shapes.yaml [--resume] [key=value ...]

Loss: reconstruction (L1 or MSE on [0, 1] pixels) + `commitment_weight` * ||z - sg(q)||^2 (the
commitment term of the VQ-VAE paper, arXiv 1711.00937 eq. 3; the codebook itself follows the
latents by EMA, so it has no loss term). AdamW with warmup + cosine decay, gradient clipping, bf16
autocast where the run asks for it (the quantizer always runs in fp32).

Writes into `run.out_dir`: `config.yaml`, `ckpt/last` (weights + optimizer + step + RNG, every
`run.save_every` steps and at the end, atomically), `samples/recon_STEP.png` (originals above
reconstructions), `metrics.json` (held-out PSNR, codebook usage, code perplexity) and `vq/`, the
component folder the pipeline loads.

Resuming (`--resume`) restores weights, codebook, optimizer, step, LR schedule position and RNG
from `ckpt/last`. The data position is not replayed sample by sample: the training loader is
reseeded with (seed, step), so a resumed run reads a fresh, deterministic order of the same data.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from dalle_ar.config import DataConfig, OptimConfig, RunConfig, require
from dalle_ar.grid import image_grid
from dalle_ar.runtime import autocast_context, pick_device, seed_everything
from dalle_ar.train.common import (
    BudgetBar,
    Run,
    build_optimizer,
    lr_at,
    recipe_config,
    schedule_step,
    set_lr,
)
from dalle_ar.vq import COMPONENT, VQConfig, VQTokenizer

log = logging.getLogger(__name__)

VQ_DIR = "vq"  # subfolder of run.out_dir holding the trained component


@dataclasses.dataclass
class VQLossConfig:
    recon: Literal["l1", "mse"] = "l1"  # reconstruction loss on [0, 1] pixels
    commitment_weight: float = 0.25  # beta of the commitment term ||z - sg(q)||^2

    def validate(self) -> None:
        require(self.commitment_weight >= 0, "commitment_weight", "must be >= 0")


@dataclasses.dataclass
class VQRecipeConfig:
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: VQConfig = dataclasses.field(default_factory=VQConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    loss: VQLossConfig = dataclasses.field(default_factory=VQLossConfig)
    eval_batches: int = 0  # held-out batches per periodic evaluation (0 = all); the final reads all
    grid_images: int = 8  # images per reconstruction grid
    # torch CPU threads (0 = torch's default). On a CPU shared with other jobs, 1 thread runs
    # several times faster than 2: multi-threaded ops wait on descheduled threads.
    cpu_threads: int = 0
    lr_follows_time: bool = False  # with run.max_minutes: the cosine ends when time runs out

    def validate(self) -> None:
        require(bool(self.data.train), "data.train", "must name the training shards, got ''")
        require(
            self.data.image_size == self.model.image_size,
            "model.image_size",
            f"must equal data.image_size={self.data.image_size}, got {self.model.image_size}",
        )
        require(self.eval_batches >= 0, "eval_batches", "must be >= 0")
        require(self.grid_images >= 1, "grid_images", "must be >= 1")
        require(self.cpu_threads >= 0, "cpu_threads", "must be >= 0 (0 = torch's default)")


def data_seed(seed: int, step: int) -> int:
    """Seed of the training loader for a run (re)started at `step`."""
    return seed * 1_000_003 + step


def recon_loss(recon: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "l1":
        return F.l1_loss(recon, target)
    return F.mse_loss(recon, target)


# ----------------------------------------------------------------------------------------------
# Evaluation and pictures.


@torch.no_grad()
def evaluate(model: VQTokenizer, batches: Any, device: torch.device, max_batches: int = 0) -> dict:
    """Held-out PSNR (of the mean squared error over all pixels, and the mean of per-image PSNR),
    codebook usage (fraction of codes used at least once) and code perplexity."""
    was_training = model.training
    model.eval()
    counts = torch.zeros(model.codebook_size, dtype=torch.float64)
    sq_sum, pixels, images, per_image_psnr = 0.0, 0, 0, 0.0
    for i, batch in enumerate(batches):
        if max_batches and i >= max_batches:
            break
        x = batch["image"].to(device)
        codes = model.encode(x)
        err = (model.decode(codes) - x).double().pow(2)  # (B, 3, H, W)
        sq_sum += err.sum().item()
        pixels += err.numel()
        images += x.shape[0]
        mse_img = err.flatten(1).mean(1).clamp_min(1e-10)
        per_image_psnr += (10 * torch.log10(1 / mse_img)).sum().item()
        counts += torch.bincount(codes.flatten().cpu(), minlength=model.codebook_size).double()
    model.train(was_training)
    if images == 0:
        raise ValueError("the held-out split yielded no images")
    mse = sq_sum / pixels
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
    return {
        "psnr": 10 * math.log10(1 / max(mse, 1e-10)),
        "psnr_per_image_mean": per_image_psnr / images,
        "mse": mse,
        "codebook_usage": (counts > 0).double().mean().item(),
        "codes_used": int((counts > 0).sum().item()),
        "perplexity": math.exp(entropy),
        "eval_images": images,
    }


def save_recon_grid(originals: torch.Tensor, recons: torch.Tensor, path: Path) -> Path:
    """PNG with the originals in the top row and their reconstructions below (2 px gaps)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(torch.cat([originals, recons]), ncols=originals.shape[0]).save(path)
    return path


# ----------------------------------------------------------------------------------------------
# The recipe.


def train(cfg: VQRecipeConfig, resume: bool = False) -> dict[str, Any]:
    """Run the recipe with a validated config; returns the final metrics (also metrics.json)."""
    threads = torch.get_num_threads()
    if cfg.cpu_threads:
        torch.set_num_threads(cfg.cpu_threads)
    try:
        return _train(cfg, resume)
    finally:
        torch.set_num_threads(threads)  # a process-wide setting: leave it as it was


def _train(cfg: VQRecipeConfig, resume: bool) -> dict[str, Any]:
    from dalle_ar.data.loader import loader_from_config  # the data stage; imported when it runs

    run = Run(cfg, cfg.run)
    seed_everything(cfg.run.seed)
    device = pick_device(cfg.run.device)
    model = VQTokenizer(cfg.model).to(device).train()
    opt = build_optimizer(model, cfg.optim)
    step, elapsed = 0, 0.0
    if resume:
        state = run.resume(model, opt)
        step, elapsed = int(state["step"]), float(state["extra"].get("elapsed_s", 0.0))
    history = _read_history(run.dir / "metrics.json", step) if resume else []
    log.info("vq: %d parameters, %s", sum(p.numel() for p in model.parameters()), device)

    train_batches = iter(loader_from_config(cfg.data, "train", seed=data_seed(cfg.run.seed, step)))
    eval_loader = loader_from_config(cfg.data, "eval", seed=cfg.run.seed) if cfg.data.eval else None
    grid_source = eval_loader if eval_loader is not None else train_batches
    grid = next(iter(grid_source))["image"][: cfg.grid_images].to(device)

    total, accum = cfg.run.steps, cfg.optim.grad_accum
    run.init_wandb("vq")
    pbar = BudgetBar(cfg.run, step, "vq")
    postfix: dict[str, str] = {}
    start, start_step, metrics = time.time(), step, {}

    def save() -> None:
        extra = {"elapsed_s": elapsed + time.time() - start}
        run.save(model, cfg.model, COMPONENT, step, opt, extra=extra)

    def eval_and_record(max_batches: int) -> dict[str, Any]:
        if eval_loader is None:
            return {}
        m = evaluate(model, eval_loader, device, max_batches)
        history.append({"step": step, **m})
        run.log({f"eval/{k}": v for k, v in m.items()}, step=step)
        log.info("step %d eval: %s", step, _fmt(m))
        return m

    try:
        while step < total:
            minutes = (time.time() - run.start_time) / 60
            lr = lr_at(schedule_step(cfg, step, minutes), cfg.optim, total)
            set_lr(opt, lr)
            for _ in range(accum):
                x = next(train_batches)["image"].to(device, non_blocking=True)
                with autocast_context(device, cfg.run.precision):
                    recon, terms, codes = model(x)
                rec = recon_loss(recon.float(), x, cfg.loss.recon)
                loss = rec + cfg.loss.commitment_weight * terms["commit"]
                (loss / accum).backward()
            if cfg.optim.grad_clip > 0:
                gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            else:
                gnorm = torch.zeros(())
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            pbar.update(step, minutes, **postfix)
            if step % cfg.run.log_every == 0 or step == total:
                rate = (step - start_step) / max(1e-9, time.time() - start)
                used = codes.unique().numel() / model.codebook_size
                stats = {"loss": loss.item(), "recon": rec.item(), "commit": terms["commit"].item()}
                run.log(
                    {**{f"train/{k}": v for k, v in stats.items()}, "train/lr": lr,
                     "train/grad_norm": gnorm.item(), "train/batch_code_usage": used,
                     "train/steps_per_s": rate},
                    step=step,
                )  # fmt: skip
                postfix = {"loss": f"{stats['loss']:.4f}", "used": f"{used:.2f}"}
            if cfg.run.eval_every and step % cfg.run.eval_every == 0 and step < total:
                metrics = eval_and_record(cfg.eval_batches)
                run.write_json("metrics.json", _metrics_json(metrics, history, step, False))
            if cfg.run.sample_every and step % cfg.run.sample_every == 0:
                _write_grid(run, model, grid, step)
            out_of_time = run.out_of_time()
            if step % cfg.run.save_every == 0 or step == total or out_of_time:
                save()
            if out_of_time:
                log.warning("run.max_minutes=%g reached at step %d", cfg.run.max_minutes, step)
                break
        pbar.close()
        if step == start_step and not (run.ckpt_dir / "train_state.pt").is_file():
            save()
        train_s = time.time() - start
        metrics = eval_and_record(0)  # the final evaluation reads the whole split
        _write_grid(run, model, grid, step)
        model.save_pretrained(run.dir / VQ_DIR)
        timing = {
            "steps": step,
            "train_seconds_this_process": train_s,
            "train_seconds_total": elapsed + train_s,
            "steps_per_s": (step - start_step) / max(train_s, 1e-9),
        }
        out = _metrics_json(metrics, history, step, step >= total) | {"timing": timing}
        run.write_json("metrics.json", out)
        return out
    finally:
        pbar.close()
        run.finish()


def _write_grid(run: Run, model: VQTokenizer, grid: torch.Tensor, step: int) -> None:
    was_training = model.training
    model.eval()
    recon = model.decode(model.encode(grid))
    model.train(was_training)
    path = save_recon_grid(grid, recon, run.dir / "samples" / f"recon_{step:06d}.png")
    run.log_image("recon", path, step, caption="top: original, bottom: reconstruction")


def _metrics_json(m: dict, history: list[dict], step: int, finished: bool) -> dict[str, Any]:
    return {"step": step, "finished": finished, **m, "history": history}


def _read_history(path: Path, step: int) -> list[dict]:
    """Evaluations of an earlier run up to `step` (a resumed run keeps its eval history)."""
    if not path.is_file():
        return []
    try:
        past = json.loads(path.read_text()).get("history", [])
    except (ValueError, AttributeError):
        return []
    return [h for h in past if isinstance(h, dict) and h.get("step", step + 1) <= step]


def _fmt(m: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in m.items())


def main(argv: list[str]) -> int:
    prog = "dalle-ar train vq"
    parsed = recipe_config(
        VQRecipeConfig, argv, prog, "Train the VQ-VAE image tokenizer.", "configs/vq_shapes.yaml"
    )
    if parsed is None:
        return 2
    cfg, resume = parsed
    last = Path(cfg.run.out_dir) / "ckpt" / "last" / "train_state.pt"
    if resume and not last.is_file():
        print(f"{prog}: --resume given but {last} does not exist", file=sys.stderr)
        return 2
    m = train(cfg, resume=resume)
    t = m["timing"]
    line = f"vq: {t['steps']} steps ({t['steps_per_s']:.2f} steps/s)"
    if "psnr" in m:
        line += (
            f", held-out PSNR {m['psnr']:.2f} dB, codebook usage {m['codebook_usage']:.1%},"
            f" perplexity {m['perplexity']:.1f}"
        )
    print(f"{line} -> {Path(cfg.run.out_dir) / VQ_DIR}")
    return 0
