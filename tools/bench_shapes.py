"""Measure the shapes data set: generation speed and how well the checker reads scenes back.

    python tools/bench_shapes.py                      # 20,000 images timed, 2,000 checked
    python tools/bench_shapes.py --gen 50000 --check 5000 --blur

Prints one JSON object: images/s for full samples (spec + render + caption) and for render
alone, and the checker's accuracies on ground-truth evaluation-split renders (and on blurred
renders with --blur, a stand-in for VQ reconstructions).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time

import numpy as np

from dalle_ar.data import evaluate, shapes


def blur(img: np.ndarray) -> np.ndarray:
    """Separable [1, 2, 1] / 4 blur with replicated edges."""
    f = np.pad(img.astype(np.float32), ((1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = img.shape[:2]
    k = (0.25, 0.5, 0.25)
    g = sum(k[i] * f[i : i + h] for i in range(3))
    g = sum(k[j] * g[:, j : j + w] for j in range(3))
    return (g + 0.5).astype(np.uint8)


def time_generation(n: int, size: int, seed: int) -> dict[str, float]:
    t0 = time.perf_counter()
    for _ in shapes.generate(n, seed, "train", size):
        pass
    full = n / (time.perf_counter() - t0)
    rng = random.Random(seed)
    specs = [shapes.sample_spec(rng, "train") for _ in range(n)]
    t0 = time.perf_counter()
    for spec in specs:
        shapes.render(spec, size)
    return {
        "images_per_s": round(full, 1),
        "render_only_per_s": round(n / (time.perf_counter() - t0), 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gen", type=int, default=20_000, help="images to time")
    p.add_argument("--check", type=int, default=2_000, help="eval-split images to score (0 = skip)")
    p.add_argument("--blur", action="store_true", help="also score blurred renders")
    p.add_argument("--size", type=int, default=32, help="canvas side in pixels")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    out: dict = {
        "size": args.size,
        "n_timed": args.gen,
        "machine": platform.processor() or platform.machine(),
    }
    out.update(time_generation(args.gen, args.size, args.seed))
    if args.check:
        data = list(shapes.generate(args.check, args.seed, "eval", args.size))
        specs = [d[2] for d in data]
        t0 = time.perf_counter()
        out["checker"] = evaluate.score_batch([d[0] for d in data], specs)
        out["checker"]["images_per_s"] = round(args.check / (time.perf_counter() - t0), 1)
        if args.blur:
            out["checker_blurred"] = evaluate.score_batch([blur(d[0]) for d in data], specs)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
