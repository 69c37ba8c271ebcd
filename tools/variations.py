"""Image variations (DALL-E 2): new pictures drawn from a given picture's CLIP image embedding,
and how often the shape checker reads in them what it reads in the source.

    python tools/variations.py --model runs/main/pipeline --data "runs/main/data/eval-*.tar" \
        --out docs/images/variations            # -> variations.png, variations.json

The grid: `--grid-images` evaluation scenes (half with a held-out colour-shape pair), each row
the source then its `--num` variations. The figures, over `--images` scenes: for each attribute
of the source scene's spec (colour, shape, size, position, relation) and for the whole scene
(exact), the fraction of variations the checker finds it in (`dalle_ar.data.evaluate.score`
against the source's spec), beside how often the checker reads the source itself right (the
checker's own ceiling). JSON a script can read.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from dalle_ar.data.evaluate import score_batch
from dalle_ar.data.loader import make_loader
from dalle_ar.data.shapes import is_scene
from dalle_ar.grid import captioned_grid, stack_vertical, to_uint8
from dalle_ar.pipelines import Pipeline
from dalle_ar.sampling.settings import ARSampling, add_arguments, from_args


def scenes(shards: str, size: int, n: int) -> list[tuple[torch.Tensor, dict, str]]:
    """The first `n` evaluation scenes with a shapes spec: (image (3, S, S) in [0, 1], spec,
    caption), alternating seen and held-out pairs where both are there."""
    seen, held = [], []
    for batch in make_loader(shards, size, 64, train=False):
        for img, meta, cap in zip(batch["image"], batch["meta"], batch["caption"]):
            if is_scene(meta):
                (held if meta["held_out"] else seen).append((img, meta, cap))
        if len(seen) >= n and len(held) >= n:
            break
    out = []
    for a, b in zip(seen, held):
        out += [a, b]
    return (out + seen[len(held) :] + held[len(seen) :])[:n]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="pipeline folder with clip and prior parts")
    ap.add_argument("--data", required=True, help="evaluation image shards (shapes)")
    ap.add_argument("--num", type=int, default=4, help="variations per scene")
    ap.add_argument("--grid-images", type=int, default=6, help="scenes in the grid")
    ap.add_argument("--images", type=int, default=100, help="scenes in the figures")
    ap.add_argument("--seed", type=int, default=0)
    add_arguments(ap, ARSampling)  # the sampling settings; not given: the pipeline folder's
    ap.add_argument("--out", required=True, help="output folder")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    pipe = Pipeline.from_pretrained(args.model)
    size = pipe.vq.config.image_size
    picked = scenes(args.data, size, max(args.images, args.grid_images))
    sources = [img for img, _, _ in picked]
    t0 = time.perf_counter()
    settings = from_args(args, ARSampling)
    out = pipe.variations(sources, num_samples=args.num, seed=args.seed, progress=True, **settings)
    seconds = time.perf_counter() - t0
    specs = [spec for _, spec, _ in picked]
    per_variation = [specs[m["prompt_index"]] for m in out.samples]
    report = {
        "model": str(Path(args.model).resolve()),
        "images": len(picked),
        "variations_per_image": args.num,
        "settings": out.settings,
        "seconds": round(seconds, 1),
        "variations": score_batch(out.images, per_variation),
        "sources": score_batch(list(to_uint8(torch.stack(sources))), specs),
    }
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(min(args.grid_images, len(picked))):
        mine = [im for im, m in zip(out.images, out.samples) if m["prompt_index"] == i]
        tag = "held-out pair" if specs[i]["held_out"] else "seen pair"
        caption = f"source ({tag}): {picked[i][2]} | {args.num} variations"
        rows.append(captioned_grid([to_uint8(sources[i][None])[0], *mine], caption))
    stack_vertical(rows).save(folder / "variations.png")
    (folder / "variations.json").write_text(json.dumps(report, indent=2))
    print(json.dumps({k: report[k] for k in ("images", "seconds")}, indent=2))
    v, s = report["variations"], report["sources"]
    for key in v:
        if key.startswith(("exact", "color", "shape", "size", "position", "relation")):
            print(f"{key:>18}: variations {v[key]} | source read {s.get(key)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
