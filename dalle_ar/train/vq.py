"""Recipe: train the VQ-VAE image tokenizer on image shards.

    dalle-ar train vq --config configs/shapes/vq.yaml [--resume] [key=value ...]
    torchrun --nproc_per_node=N -m dalle_ar.cli train vq --config ...   (DDP)

Loss: reconstruction (L1 or MSE on [0, 1] pixels) + `commitment_weight` * ||z - sg(q)||^2 (the
commitment term of the VQ-VAE paper, arXiv 1711.00937 eq. 3; the codebook itself follows the
latents by EMA, so it has no loss term). bf16 autocast where the run asks for it (the quantizer
always runs in fp32). Under DDP the codebook statistics (k-means initialisation, EMA sums,
dead-code replacement) are taken over every rank's latents, so all ranks hold one codebook.

The loop (`dalle_ar.train.loop`) does the rest and writes into `run.out_dir`: `config.yaml`,
`ckpt/last`, `train_log.jsonl`, `samples/recon_STEP.png` (originals above reconstructions),
`metrics.json` (held-out PSNR, codebook usage, code perplexity, history, timing) and `vq/`, the
component folder the pipeline loads. `--resume` continues exactly: the same data order (the
consumed batches are skipped), LR schedule, RNG and minutes spent.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from dalle_ar.config import DataConfig, require
from dalle_ar.grid import image_grid
from dalle_ar.models.vq import COMPONENT, VQConfig, VQTokenizer
from dalle_ar.runtime import autocast_context, precision_name
from dalle_ar.train import dist
from dalle_ar.train.common import ShardImages, build_optimizer, run_recipe
from dalle_ar.train.loop import LoopConfig, Source, Task, fit, setup

log = logging.getLogger(__name__)


@dataclasses.dataclass
class VQLossConfig:
    recon: Literal["l1", "mse"] = "l1"  # reconstruction loss on [0, 1] pixels
    commitment_weight: float = 0.25  # beta of the commitment term ||z - sg(q)||^2

    def validate(self) -> None:
        require(self.commitment_weight >= 0, "commitment_weight", "must be >= 0")


@dataclasses.dataclass
class VQRecipeConfig(LoopConfig):  # optim, run, lr_follows_time, max_bad_steps, halt_after
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: VQConfig = dataclasses.field(default_factory=VQConfig)
    loss: VQLossConfig = dataclasses.field(default_factory=VQLossConfig)
    eval_batches: int = 0  # held-out batches per periodic evaluation (0 = all); the final reads all
    grid_images: int = 8  # images per reconstruction grid

    def validate(self) -> None:
        super().validate()
        require(not self.run.compile, "run.compile", "is for the transformer recipe, got true")
        require(bool(self.data.train), "data.train", "must name the training shards, got ''")
        require(
            self.data.image_size == self.model.image_size,
            "model.image_size",
            f"must equal data.image_size={self.data.image_size}, got {self.model.image_size}",
        )
        require(self.eval_batches >= 0, "eval_batches", "must be >= 0")
        require(self.grid_images >= 1, "grid_images", "must be >= 1")


def recon_loss(recon: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "l1":
        return F.l1_loss(recon, target)
    return F.mse_loss(recon, target)


# ----------------------------------------------------------------------------------------------
# Evaluation and pictures.


@torch.no_grad()
def evaluate(
    model: VQTokenizer,
    batches: Iterable[dict[str, Any]],
    device: torch.device,
    max_batches: int = 0,
) -> dict[str, float]:
    """Held-out PSNR (of the mean squared error over all pixels, and the mean of per-image PSNR),
    codebook usage (fraction of codes used at least once) and code perplexity, over the first
    `max_batches` batches of each rank (0 = all), summed over ranks. ValueError when no rank
    read an image."""
    was_training = model.training
    model.eval()
    counts = torch.zeros(model.codebook_size, dtype=torch.float64, device=device)
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # squared error, pixels, images, PSNR
    for i, batch in enumerate(batches):
        if max_batches and i >= max_batches:
            break
        x = batch["image"].to(device)
        codes = model.encode(x)
        err = (model.decode(codes) - x).double().pow(2)  # (B, 3, H, W)
        mse_img = err.flatten(1).mean(1).clamp_min(1e-10)
        psnr = (10 * torch.log10(1 / mse_img)).sum()
        sums += torch.stack(
            [err.sum(), sums.new_tensor(err.numel()), sums.new_tensor(len(x)), psnr]
        )
        counts += torch.bincount(codes.flatten(), minlength=model.codebook_size).double()
    model.train(was_training)
    sq_sum, pixels, images, per_image_psnr = dist.all_reduce_sum(sums).tolist()
    counts = dist.all_reduce_sum(counts).cpu()
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
        "eval_images": int(images),
    }


def save_recon_grid(originals: torch.Tensor, recons: torch.Tensor, path: Path) -> Path:
    """PNG with the originals in the top row and their reconstructions below (2 px gaps)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(torch.cat([originals, recons]), ncols=originals.shape[0]).save(path)
    return path


# ----------------------------------------------------------------------------------------------
# The recipe.


def train(
    cfg: VQRecipeConfig, source: Source | None = None, resume: bool = False
) -> dict[str, Any]:
    """Run the recipe with a validated config on `source` (default: the config's shards);
    returns the final metrics (also metrics.json). Raises what `loop.fit` raises."""
    source = source or ShardImages(cfg, captions=False)  # a VQ reads no caption
    info = setup(cfg)
    # Built after the process group exists, so that the quantizer shares its codebook statistics
    # across ranks (k-means, EMA sums, dead-code samples: vector-quantize-pytorch's DDP mode).
    model = VQTokenizer(cfg.model).to(info.device).train()
    wrapped = dist.wrap_model(model, info, "ddp")
    if info.is_main:
        log.info("vq: %d parameters, %s", sum(p.numel() for p in model.parameters()), info.device)

    def loss(batch: dict[str, Any], micro: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x = batch["image"]
        with autocast_context(info.device, cfg.run.precision):
            recon, terms, codes = wrapped(x)
        rec = recon_loss(recon.float(), x, cfg.loss.recon)
        used = codes.unique().numel() / model.codebook_size
        parts = {"recon": rec, "commit": terms["commit"], "batch_code_usage": torch.tensor(used)}
        return rec + cfg.loss.commitment_weight * terms["commit"], parts

    def evaluate_split(final: bool) -> dict[str, float]:
        batches = source.eval()
        if batches is None:
            return {}
        return evaluate(model, batches, info.device, 0 if final else cfg.eval_batches)

    grid: list[torch.Tensor] = []  # the images of every picture, read when first needed

    def pictures(step: int) -> tuple[Path, str]:
        if not grid:
            first = next(iter(source.eval() or source.train(0)))["image"]
            grid.append(first[: cfg.grid_images].to(info.device))
        path = Path(cfg.run.out_dir) / "samples" / f"recon_{step:06d}.png"
        model.eval()
        save_recon_grid(grid[0], model.decode(model.encode(grid[0])), path)
        return path, "top: original, bottom: reconstruction"

    opt = build_optimizer(model, cfg.optim)
    precision = precision_name(info.device, cfg.run.precision)
    task = Task(COMPONENT, wrapped, cfg.model, opt, loss, source.train, evaluate_split, pictures,
                precision=precision)  # fmt: skip
    return fit(cfg, task, info, resume)


def _report(m: dict[str, Any]) -> str:
    t = m["timing"]
    line = f"vq: {t['steps']} steps ({t['steps_per_s']:.2f} steps/s)"
    if "psnr" in m:
        line += (
            f", held-out PSNR {m['psnr']:.2f} dB, codebook usage {m['codebook_usage']:.1%},"
            f" perplexity {m['perplexity']:.1f}"
        )
    return f"{line} -> {m.get('component', 'no component yet (halt_after)')}"


def main(argv: list[str]) -> int:
    return run_recipe(
        VQRecipeConfig, train, argv, "dalle-ar train vq", "Train the VQ-VAE image tokenizer.",
        "configs/shapes/vq.yaml", _report,
    )  # fmt: skip
