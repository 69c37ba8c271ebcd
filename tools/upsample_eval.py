"""The cascade's upsampler against plain resizing, on true large evaluation images.

    python tools/upsample_eval.py --upsampler runs/upsampler_shapes/upsampler \
        --data "data/shapes64/eval-*.tar" --num 200 --out DIR
        # -> DIR/upsample.json, DIR/upsample.png

Each of the first `--num` evaluation images (the true large picture) is made small with the
upsampler's own box filter (`dalle_ar.models.upsampler.downscale`) and brought back to the large
size by nearest-neighbour, bicubic and Lanczos resizing (PIL) and by the upsampler, at each of
`--steps` DDIM step counts (at the default noise level) and each of `--noise-levels` (at the
default step count); image i always gets seed i. Reported per method: mean PSNR (dB), SSIM and edge
sharpness (mean gradient magnitude over the truth's; `dalle_ar.eval.metrics`), and for the
upsampler the milliseconds per image on this machine (`--threads`, one batch of `--batch-size` at a
time). Shapes records (their scene spec in the JSON) are also made small by rendering the scene at
the small size, the pictures the generator learns from ("from_renders"; what an upsampler trained
with `small_from: render` learned from). The picture shows the box-filtered small images, or with
`--grid-from render` the renders."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from dalle_ar.data.loader import make_loader
from dalle_ar.data.shapes import is_scene, rendered
from dalle_ar.eval.metrics import image_metrics, pil_resize
from dalle_ar.grid import image_grid
from dalle_ar.models.upsampler import Upsampler, downscale
from dalle_ar.sampling.diffusion import upsample_images
from dalle_ar.sampling.settings import UpsampleSampling

PLAIN = ("nearest", "bicubic", "lanczos")


def _means(m: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: round(float(v.mean()), 4) for k, v in m.items()}


def _upsampled(up: Upsampler, low: torch.Tensor, s: UpsampleSampling, batch: int):
    """(images (N, 3, H, W) in [0, 1], ms per image)."""
    t0 = time.perf_counter()
    big = upsample_images(up, low * 2 - 1, s, list(range(len(low))), batch_size=batch)
    return big.add(1).div(2), 1000 * (time.perf_counter() - t0) / len(low)


def evaluate(up: Upsampler, truth: torch.Tensor, low: torch.Tensor, args) -> dict:
    size = truth.shape[-1]
    out: dict = {p: _means(image_metrics(pil_resize(low, size, p), truth)) for p in PLAIN}
    default = UpsampleSampling()
    for steps in args.steps:
        s = UpsampleSampling(upsample_steps=steps, noise_level=default.noise_level)
        big, ms = _upsampled(up, low, s, args.batch_size)
        out[f"upsampler steps={steps}"] = {**_means(image_metrics(big, truth)), "ms_per_image":
                                           round(ms, 1)}  # fmt: skip
    for level in args.noise_levels:
        s = UpsampleSampling(upsample_steps=default.upsample_steps, noise_level=level)
        big, ms = _upsampled(up, low, s, args.batch_size)
        out[f"upsampler noise_level={level}"] = {**_means(image_metrics(big, truth)),
                                                 "ms_per_image": round(ms, 1)}  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--upsampler", required=True, help="an upsampler folder")
    ap.add_argument("--data", required=True, help="evaluation shards at the large size")
    ap.add_argument("--num", type=int, default=200)
    ap.add_argument("--steps", default="5,10,25,50", help="DDIM step counts")
    ap.add_argument("--noise-levels", default="0,50,100,200", help="augmentation levels")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--grid", type=int, default=8, help="images in the picture")
    ap.add_argument(
        "--grid-from",
        choices=("box", "render"),
        default="box",
        help="the small images of the picture (render: shapes records only)",
    )
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    args.steps = [int(x) for x in args.steps.split(",") if x]
    args.noise_levels = [int(x) for x in args.noise_levels.split(",") if x]
    torch.set_num_threads(args.threads)
    up = Upsampler.from_pretrained(args.upsampler)
    cfg = up.cfg
    images, specs = [], []
    for batch in make_loader(args.data, cfg.high_size, 64, train=False):
        if "image" not in batch:
            continue  # the loader's per-pass report
        images.append(batch["image"])
        specs += batch["meta"]
        if sum(len(x) for x in images) >= args.num:
            break
    truth = torch.cat(images)[: args.num]
    specs = specs[: args.num]
    if not len(truth):
        raise SystemExit(f"{args.data} holds no image")
    shapes = all(map(is_scene, specs))
    if args.grid_from == "render" and not shapes:
        raise SystemExit(f"--grid-from render: {args.data} holds no shapes scenes")
    low = downscale(truth, cfg.low_size)
    report = {
        "upsampler": str(Path(args.upsampler).resolve()),
        "data": args.data,
        "images": len(truth),
        "sizes": [cfg.low_size, cfg.high_size],
        "threads": args.threads,
        "defaults": UpsampleSampling().__dict__,
        "from_box_filter": evaluate(up, truth, low, args),
    }
    renders = rendered(specs, cfg.low_size) if shapes else None  # each scene drawn small
    if renders is not None:
        report["from_renders"] = evaluate(up, truth, renders, args)
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    k = min(args.grid, len(truth))
    low = renders if args.grid_from == "render" else low
    big, _ = _upsampled(up, low[:k], UpsampleSampling(), args.batch_size)
    rows = [pil_resize(low[:k], cfg.high_size, "nearest"), pil_resize(low[:k], cfg.high_size,
            "bicubic"), pil_resize(low[:k], cfg.high_size, "lanczos"), big, truth[:k]]  # fmt: skip
    image_grid(torch.cat(rows), ncols=k, scale=1).save(folder / "upsample.png")
    (folder / "upsample.json").write_text(json.dumps(report, indent=2))
    for name, rows_ in report.items():
        if isinstance(rows_, dict) and name.startswith("from_"):
            print(name)
            for method, m in rows_.items():
                print(f"  {method:>28}: PSNR {m['psnr']:.2f}  SSIM {m['ssim']:.3f}  sharpness "
                      f"{m['sharpness']:.2f}  {m.get('ms_per_image', '')}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
