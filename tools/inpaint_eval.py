"""Inpainting on the shapes: repaint one object of each evaluation scene with a new caption, and
read the result back with the shape checker.

    python tools/inpaint_eval.py --model runs/main/pipeline --num 200 --out DIR
        # -> DIR/inpaint.json, DIR/inpaint.png (source | repainted region | result)

For each of `--num` evaluation-split scenes (`shapes.sample_spec(rng, "eval")`), the last object
gets another colour-shape pair drawn from the seen pairs (same size and cell); its box, widened
to whole code patches, is the mask, and the new scene's caption (`shapes.plain_caption`) the
prompt. The masked mode repaints the mask (`pipe.inpaint`). Reported: how often the checker reads
the new scene exactly as asked (`score(...)["exact"]`), over scenes whose pairs are all seen and
over those that keep a held-out pair in the other object; per attribute; and the share of codes
outside the mask that stayed bit-identical (1.0 by construction, checked).
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from dalle_ar.data.evaluate import score_batch
from dalle_ar.data.shapes import (
    SEEN_COMBOS,
    cell_box,
    is_held_out,
    object_px,
    plain_caption,
    render,
    sample_spec,
)
from dalle_ar.grid import captioned_grid, stack_vertical
from dalle_ar.pipelines import Pipeline


def cases(n: int, size: int, patch: int, seed: int = 0) -> list[dict]:
    """`n` (source image, mask, new spec, prompt) cases; see the module docstring."""
    rng = random.Random(f"inpaint-{seed}")
    out = []
    while len(out) < n:
        spec = sample_spec(rng, "eval")
        new = copy.deepcopy(spec)
        obj = new["objects"][-1]
        old = (obj["color"], obj["shape"])
        choices = [c for c in SEEN_COMBOS if c != old and c[1] != old[1]]
        obj["color"], obj["shape"] = rng.choice(choices)
        obj["held_out"] = is_held_out(obj["color"], obj["shape"])
        new["held_out"] = any(o["held_out"] for o in new["objects"])
        d = object_px(obj["size"], size)
        y0, x0 = cell_box(obj["row"], obj["col"], d, size)
        mask = np.zeros((size, size), dtype=bool)
        ys, xs = (y0 // patch) * patch, (x0 // patch) * patch
        ye, xe = -(-(y0 + d) // patch) * patch, -(-(x0 + d) // patch) * patch
        mask[max(0, ys) : ye, max(0, xs) : xe] = True
        out.append({"image": render(spec, size), "mask": mask, "spec": new,
                    "prompt": plain_caption(new)})  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="pipeline folder with a masked component")
    ap.add_argument("--num", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0, help="sampling seed of case 0 (then +1 ...)")
    ap.add_argument("--steps", type=int, default=None, help="default: the folder's")
    ap.add_argument("--guidance", type=float, default=None, help="default: the folder's")
    ap.add_argument("--temperature", type=float, default=None, help="default: the folder's")
    ap.add_argument("--grid", type=int, default=8, help="cases in the picture")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    pipe = Pipeline.from_pretrained(args.model)
    size, patch = pipe.vq.config.image_size, pipe.vq.config.downsample
    todo = cases(args.num, size, patch)
    t0 = time.perf_counter()
    out = pipe.inpaint([c["image"] for c in todo], [c["mask"] for c in todo],
                       [c["prompt"] for c in todo], seed=args.seed, progress=True,
                       steps=args.steps, guidance_scale=args.guidance,
                       temperature=args.temperature)  # fmt: skip
    seconds = time.perf_counter() - t0
    init = pipe.inpaint_codes([c["image"] for c in todo], [c["mask"] for c in todo])
    keep = init != pipe.components["masked"].cfg.mask_id
    kept_same = float((out.codes[keep] == init[keep]).double().mean())
    specs = [c["spec"] for c in todo]
    held = [s["held_out"] for s in specs]
    report = {
        "model": str(Path(args.model).resolve()),
        "cases": len(todo),
        "settings": out.settings,
        "seconds": round(seconds, 1),
        "kept_codes_identical": kept_same,
        "all": score_batch(out.images, specs),
        "seen": score_batch(
            [im for im, h in zip(out.images, held) if not h],
            [s for s, h in zip(specs, held) if not h],
        ),  # fmt: skip
    }
    if any(held):
        report["held_out"] = score_batch([im for im, h in zip(out.images, held) if h],
                                         [s for s, h in zip(specs, held) if h])  # fmt: skip
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for c, img in list(zip(todo, out.images))[: args.grid]:
        shown = c["image"].copy()
        shown[c["mask"]] = (shown[c["mask"]] * 0.4 + 0.6 * np.array([255, 0, 255])).astype(np.uint8)
        rows.append(captioned_grid([c["image"], shown, np.asarray(img)], c["prompt"]))
    stack_vertical(rows).save(folder / "inpaint.png")
    (folder / "inpaint.json").write_text(json.dumps(report, indent=2))
    print(json.dumps({k: report[k] for k in ("cases", "seconds", "kept_codes_identical")}))
    for split in ("all", "seen", "held_out"):
        if split in report:
            r = report[split]
            print(f"{split:>9}: exact {r['exact']:.3f} (n={r['n']}), colour {r.get('color')}, "
                  f"shape {r.get('shape')}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
