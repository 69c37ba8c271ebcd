"""Recipe: train the cascade's upsampler (`dalle_ar.models.upsampler`) on image shards.

    dalle-ar train upsampler --config configs/shapes/upsampler.yaml [--resume] [key=value ...]
    torchrun --nproc_per_node=N -m dalle_ar.cli train upsampler --config ...   (DDP)

Data: image shards at the large size (`data.image_size` = `model.low_size * model.scale`; for
the shapes, `dalle-ar data shapes --size 64` renders the same scenes larger). Each pair is a
large image and its small version (`small_from`): "box" (`dalle_ar.models.upsampler.downscale`, a
box filter rounded to 8 bits, as SR3 and Imagen train) or "render" (shapes records only: the
record's scene drawn again at the small size, `dalle_ar.data.shapes.render`: the hard-edged
pictures a generator trained on the small scenes draws, which a box-filtered picture is not).
With `model.caption_dim` > 0 the captions' CLIP text embeddings (the CLIP folder `clip`)
condition it too.

Loss (Ho et al. 2020; the target is the clean image by default, `model.prediction_type`): the
mean squared error between the network's prediction and its target at uniform timesteps, the
small image noised to a uniform augmentation level in [0, `model.max_noise_level`] (Imagen's
noise conditioning augmentation). run.precision=auto trains under bf16 autocast on a CPU with bf16
instructions too (1.7x the steps/s of fp32 at the shapes config's size; sampling runs in fp32).
The timesteps, noise and levels of a micro-batch are drawn for the
global batch from one seeded CPU generator, so DDP and resume draw what one process would.

The loop (`dalle_ar.train.loop`) does the rest and writes into `run.out_dir`: `config.yaml`,
`ckpt/last`, `train_log.jsonl`, `samples/upsample_STEP.png` (rows: the small image, bicubic,
the upsampler, the truth), `metrics.json` (held-out over at most `eval_images` images at the
default `UpsampleSampling`: `psnr`, `ssim`, `sharpness` and the same of bicubic resizing,
`psnr_gain` = psnr - bicubic_psnr) and `upsampler/`, the component folder.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from dalle_ar.config import DataConfig, require
from dalle_ar.data.shapes import MIN_SIZE, is_scene, rendered
from dalle_ar.eval.metrics import image_metrics, pil_resize
from dalle_ar.grid import image_grid
from dalle_ar.identity import CLIPIdentity
from dalle_ar.models.upsampler import (
    COMPONENT,
    Upsampler,
    UpsamplerConfig,
    downscale,
    train_scheduler,
)
from dalle_ar.runtime import autocast_context, precision_name
from dalle_ar.sampling.diffusion import upsample_images
from dalle_ar.sampling.settings import UpsampleSampling
from dalle_ar.train import dist
from dalle_ar.train.common import ShardImages, build_optimizer, run_recipe
from dalle_ar.train.loop import LoopConfig, Task, fit, setup

log = logging.getLogger(__name__)
METRICS = ("psnr", "ssim", "sharpness")
SMALL_FROM = ("box", "render")  # how a large training image gets its small version


@dataclasses.dataclass
class UpsamplerRecipeConfig(LoopConfig):  # optim, run, lr_follows_time, max_bad_steps, halt_after
    data: DataConfig = dataclasses.field(default_factory=DataConfig)  # large-size image shards
    model: UpsamplerConfig = dataclasses.field(default_factory=UpsamplerConfig)
    clip: str = ""  # the CLIP folder whose text embeddings condition it (model.caption_dim > 0)
    small_from: str = "box"  # box: the large image box-filtered; render: its shapes scene, small
    eval_images: int = 64  # held-out images each evaluation upsamples (0 = all)
    grid_images: int = 8  # columns of the picture

    def validate(self) -> None:
        super().validate()
        require(not self.run.compile, "run.compile", "is for the transformer recipe, got true")
        require(bool(self.data.train), "data.train", "must name the training shards, got ''")
        s = self.model.high_size
        require(self.data.image_size == s, "data.image_size",
                f"must be the large size model.low_size * model.scale = {s}, got "
                f"{self.data.image_size}")  # fmt: skip
        caption = self.model.caption_dim > 0
        require(bool(self.clip) == caption, "clip",
                "must name a CLIP folder exactly when model.caption_dim > 0, got "
                f"clip={self.clip!r}, caption_dim={self.model.caption_dim}")  # fmt: skip
        require(self.small_from in SMALL_FROM, "small_from",
                f"must be one of {SMALL_FROM}, got {self.small_from!r}")  # fmt: skip
        if self.small_from == "render":
            require(not self.data.random_crop, "data.random_crop",
                    "must be false with small_from='render': the scene is drawn whole")  # fmt: skip
            require(self.model.low_size >= MIN_SIZE, "model.low_size",
                    f"must be >= {MIN_SIZE} with small_from='render' (the smallest canvas a "
                    f"scene is drawn on), got {self.model.low_size}")  # fmt: skip
        require(self.eval_images >= 0, "eval_images", "must be >= 0")
        require(self.grid_images >= 1, "grid_images", "must be >= 1")


def small_images(batch: dict[str, Any], size: int, small_from: str = "box") -> torch.Tensor:
    """The small versions (B, 3, size, size) float32 in [0, 1] of a loader batch's large images
    ("image" (B, 3, H, W) in [0, 1], "meta", "key"): box-filtered (`downscale`, on the images'
    device), or with small_from="render" each record's shapes scene (its "meta",
    `shapes.rendered`, on the CPU) drawn at `size` pixels. ValueError for another small_from, or
    naming the first record that carries no scene."""
    if small_from not in SMALL_FROM:
        raise ValueError(f"small_from must be one of {SMALL_FROM}, got {small_from!r}")
    if small_from == "box":
        return downscale(batch["image"], size)
    for key, spec in zip(batch["key"], batch["meta"]):
        if not is_scene(spec):
            raise ValueError(f"small_from='render' draws each record's shapes scene small, and "
                             f"record {key!r} carries none: shards of `dalle-ar data shapes` "
                             "only (small_from='box' for any other pictures)")  # fmt: skip
    return rendered(batch["meta"], size)


def check_renders(batch: dict[str, Any], size: int) -> None:
    """ValueError unless every large image of a loader batch ("image" (B, 3, size, size) in
    [0, 1], "meta", "key") is exactly its record's scene rendered at `size` pixels: small_from=
    'render' pairs it with the same scene drawn small, which is its small version only when the
    shards hold the scenes at the large size, losslessly (PNG), neither resized nor cropped."""
    drawn = small_images(batch, size, "render")
    for key, a, b in zip(batch["key"], drawn, batch["image"]):
        if a.shape != b.shape or not torch.equal(a, b.cpu()):
            raise ValueError(f"small_from='render': record {key!r} is not its scene rendered at "
                             f"{size} px (shards of another size, resized by the loader, or a "
                             f"lossy format?); render the data at data.image_size: dalle-ar data "
                             f"shapes --size {size}")  # fmt: skip


def check_large(data: DataConfig) -> None:
    """ValueError when the first picture of data.train or data.eval is stored smaller than
    data.image_size: the loader would stretch it, and an upsampler would learn to undo a blur
    instead of drawing the detail of a true large picture."""
    from dalle_ar.data.shards import first_image_size  # the data stage; imported when used

    for key, urls in (("data.train", data.train), ("data.eval", data.eval)):
        size = first_image_size(urls) if urls else None
        if size is not None and min(size) < data.image_size:
            raise ValueError(f"{key}: its pictures are {size[0]}x{size[1]}, smaller than "
                             f"data.image_size {data.image_size}; an upsampler learns from true "
                             f"large pictures (shapes: dalle-ar data shapes --size "
                             f"{data.image_size})")  # fmt: skip


def upsampler_loss(
    model: torch.nn.Module,
    upsampler: Upsampler,
    ddpm: DDPMScheduler,
    images: torch.Tensor,
    text: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    rank: int = 0,
    world: int = 1,
    low: torch.Tensor | None = None,
) -> torch.Tensor:
    """The upsampler's loss on large images (B, 3, H, W) in [0, 1]: MSE between the prediction
    and its target (`prediction_type`) at uniform timesteps, their small versions `low`
    (B, 3, low_size, low_size) in [0, 1] (default box-filtered, `downscale`; ValueError for
    another shape) noised to a uniform level in [0, max_noise_level]. `model`: `upsampler` as
    trained (maybe DDP-wrapped). Timesteps, noise and levels are drawn on the CPU from
    `generator` (default torch's global one) for the global batch (`world` ranks of B rows) and
    this `rank`'s rows taken (`dist.rank_rows`), so N processes draw what one process with the
    whole batch would."""
    cfg = upsampler.cfg
    x0 = images * 2 - 1
    b, dev, shape = len(x0), x0.device, x0.shape[1:]
    n, rows = dist.rank_rows(b, rank, world)
    t = torch.randint(0, cfg.num_train_timesteps, (n,), generator=generator)[rows]
    level = torch.randint(0, cfg.max_noise_level + 1, (n,), generator=generator)[rows]
    noise = torch.randn(n, *shape, generator=generator)[rows]
    aug = torch.randn(n, *shape, generator=generator)[rows]
    t, level, noise, aug = t.to(dev), level.to(dev), noise.to(dev), aug.to(dev)
    want = (b, 3, cfg.low_size, cfg.low_size)
    if low is not None and tuple(low.shape) != want:
        raise ValueError(f"low must be {want}, the small versions of images, got "
                         f"{tuple(low.shape)}")  # fmt: skip
    low = (downscale(images, cfg.low_size) if low is None else low.to(dev)) * 2 - 1
    cond = upsampler.condition(low, level, aug)
    pred = model(ddpm.add_noise(x0, noise, t), t, cond, level, text)
    if cfg.prediction_type == "v_prediction":
        target = ddpm.get_velocity(x0, noise, t)
    else:
        target = noise if cfg.prediction_type == "epsilon" else x0
    return F.mse_loss(pred.float(), target)


@torch.no_grad()
def evaluate(
    upsampler: Upsampler,
    batches: Iterable[dict[str, Any]],
    max_images: int = 0,
    settings: UpsampleSampling | None = None,
    text_of: Any = None,
    small_from: str = "box",
) -> dict[str, float]:
    """Held-out figures over the first `max_images` images of each rank (0 = all), summed over
    ranks: the upsampler's mean `psnr`, `ssim` and `sharpness` (`dalle_ar.eval.metrics`) against
    the true large image, from its small version (`small_images` by `small_from`; image i seeded
    with i), those of bicubic resizing (`bicubic_*`), and `psnr_gain`. `text_of(captions)`: their
    unit CLIP text embeddings, for an upsampler that reads captions. ValueError when no rank held
    an image."""
    device = next(upsampler.parameters()).device
    low_size = upsampler.cfg.low_size
    sums = torch.zeros(2 * len(METRICS) + 1, dtype=torch.float64)
    n = 0
    for batch in batches:
        truth = batch["image"][: (max_images - n) if max_images else None]
        if not len(truth):
            break
        low = small_images(batch, low_size, small_from)[: len(truth)]
        text = None if text_of is None else text_of(batch["caption"][: len(truth)])
        seeds = list(range(n, n + len(truth)))
        big = upsample_images(upsampler, low * 2 - 1, settings, seeds, text).add(1).div(2)
        ours = image_metrics(big, truth)
        plain = image_metrics(pil_resize(low, truth.shape[-1], "bicubic"), truth)
        figures = [ours[k].sum() for k in METRICS] + [plain[k].sum() for k in METRICS]
        sums += torch.stack(figures + [torch.tensor(float(len(truth)))]).double()
        n += len(truth)
        if max_images and n >= max_images:
            break
    total = dist.all_reduce_sum(sums.to(device)).cpu()
    if total[-1] == 0:
        raise ValueError("the held-out split held no image")
    names = list(METRICS) + [f"bicubic_{k}" for k in METRICS]
    out = {k: float(total[j] / total[-1]) for j, k in enumerate(names)}
    out["psnr_gain"] = out["psnr"] - out["bicubic_psnr"]
    return out


def comparison_grid(
    upsampler: Upsampler, truth: torch.Tensor, text: Any = None, low: torch.Tensor | None = None
) -> Any:
    """A PIL grid with one column per image of truth (N, 3, H, W) in [0, 1] and four rows: the
    small version `low` (N, 3, h, w) in [0, 1] (default box-filtered; shown with
    nearest-neighbour pixels), bicubic, the upsampler, the truth."""
    low = downscale(truth, upsampler.cfg.low_size) if low is None else low
    size = truth.shape[-1]
    big = upsample_images(upsampler, low * 2 - 1, None, list(range(len(truth))), text)
    rows = [pil_resize(low, size, "nearest"), pil_resize(low, size, "bicubic"), big.add(1).div(2),
            truth.cpu()]  # fmt: skip
    return image_grid(torch.cat(rows), ncols=len(truth), scale=1)


def train(
    cfg: UpsamplerRecipeConfig, source: ShardImages | None = None, resume: bool = False
) -> dict[str, Any]:
    """Run the recipe with a validated config on `source` (default: the config's shards);
    returns the final metrics (also metrics.json). Raises what `loop.fit` raises, and ValueError
    for a CLIP whose embedding size is not model.caption_dim, shards whose pictures are smaller
    than data.image_size (`check_large`) or, with small_from='render', shards that do not hold
    shapes scenes rendered at the large size (`check_renders`)."""
    source = source or ShardImages(cfg, captions=cfg.model.caption_dim > 0)
    low_size = cfg.model.low_size
    check_large(cfg.data)
    if cfg.small_from == "render":  # before any work: the first batch of each split
        for batches in (source.train(0), source.eval()):
            if batches is not None:
                check_renders(next(iter(batches)), cfg.model.high_size)

    def small(batch: dict[str, Any]) -> torch.Tensor:
        return small_images(batch, low_size, cfg.small_from)

    clip = None
    if cfg.clip:
        from dalle_ar.models.clip import CLIP

        clip = CLIP.from_pretrained(cfg.clip)
        ident = CLIPIdentity.from_identity(clip.identity())
        if ident.embed_dim != cfg.model.caption_dim:
            raise ValueError(f"the CLIP {cfg.clip} has embed_dim {ident.embed_dim}, model."
                             f"caption_dim is {cfg.model.caption_dim}: expected equal")  # fmt: skip
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, clip=ident))
    info = setup(cfg)
    upsampler = Upsampler(cfg.model).to(info.device).train()
    wrapped = dist.wrap_model(upsampler, info, "ddp")
    ddpm = train_scheduler(cfg.model)
    if clip is not None:
        clip.to(info.device)
    if info.is_main:
        log.info("upsampler: %d parameters, %s", sum(p.numel() for p in upsampler.parameters()),
                 info.device)  # fmt: skip

    def text_of(captions: list[str]) -> torch.Tensor | None:
        if clip is None:
            return None
        with torch.no_grad():
            return clip.text_embeds(*clip.encode_text(captions, truncate=True))

    def loss(batch: dict[str, Any], micro: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        g = torch.Generator().manual_seed(cfg.run.seed * 1_000_003 + micro)
        text = text_of(batch["caption"])
        with autocast_context(info.device, cfg.run.precision, cpu_auto=True):
            value = upsampler_loss(wrapped, upsampler, ddpm, batch["image"], text, g, info.rank,
                                   info.world, small(batch))  # fmt: skip
        return value, {"mse": value.detach()}

    def evaluate_split(final: bool) -> dict[str, float]:
        batches = source.eval()
        if batches is None:
            return {}
        return evaluate(upsampler, batches, cfg.eval_images, None, text_of if clip else None,
                        cfg.small_from)  # fmt: skip

    grid: list[dict[str, Any]] = []  # the images of every picture, read when first needed

    def pictures(step: int) -> tuple[Path, str]:
        if not grid:
            first = next(iter(source.eval() or source.train(0)))
            grid.append({k: first[k][: cfg.grid_images] for k in ("image", "caption")})
            grid[0]["low"] = small(first)[: cfg.grid_images]
        path = Path(cfg.run.out_dir) / "samples" / f"upsample_{step:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        g = grid[0]
        comparison_grid(upsampler, g["image"], text_of(g["caption"]), g["low"]).save(path)
        return path, "rows: small, bicubic, upsampler, truth"

    opt = build_optimizer(upsampler, cfg.optim, fused=not info.distributed)
    precision = precision_name(info.device, cfg.run.precision, cpu_auto=True)
    task = Task(COMPONENT, wrapped, cfg.model, opt, loss, source.train, evaluate_split, pictures,
                precision=precision)  # fmt: skip
    return fit(cfg, task, info, resume)


def _report(m: dict[str, Any]) -> str:
    t = m["timing"]
    line = f"upsampler: {t['steps']} steps ({t['steps_per_s']:.2f} steps/s)"
    if "psnr" in m:
        line += (f", held-out PSNR {m['psnr']:.2f} dB (bicubic {m['bicubic_psnr']:.2f}), SSIM "
                 f"{m['ssim']:.3f} (bicubic {m['bicubic_ssim']:.3f})")  # fmt: skip
    return f"{line} -> {m.get('component', 'no component yet (halt_after)')}"


def main(argv: list[str]) -> int:
    return run_recipe(
        UpsamplerRecipeConfig, train, argv, "dalle-ar train upsampler",
        "Train the cascade's diffusion upsampler (small image -> large image).",
        "configs/shapes/upsampler.yaml", _report,
    )  # fmt: skip
