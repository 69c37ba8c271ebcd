"""Reranked batch generation throughput: candidate images per second when every candidate is
scored (by CLIP, by PMI, by both) against drawing the same candidates unscored, measured side by
side in one run, in turns. Prints one JSON object (and writes it with --out).

    python tools/bench_rerank.py --model runs/main/pipeline                 # 64 prompts x 16
    python tools/bench_rerank.py --model runs/main/pipeline --prompts 8 --candidates 4 --turns 1

Unscored: `pipe(prompts, num_samples=N, seed=s)`, every candidate decoded to a PIL image.
Scored: `pipe(prompts, candidates=N, keep=1, reranker=R, seed=s)`, the same N candidates per
prompt (candidate c of prompt j has seed j + c * P in both), scored as they are drawn and
only the kept one decoded. Both draw with the batch `--batch-size` (default: the pipeline's
memory-sized batch). The prompts are the shapes evaluation split's. Wall time; on a shared
machine it also counts the time other processes held the cores (load averages recorded).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

from dalle_ar.cli import print_report
from dalle_ar.data.shapes import prompts_for_eval
from dalle_ar.pipelines import Pipeline
from dalle_ar.runtime import set_threads


def _load() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="pipeline folder (with a clip component)")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--candidates", type=int, default=16)
    ap.add_argument("--rerankers", default="clip,pmi,clip+pmi")
    ap.add_argument("--turns", type=int, default=2, help="timed turns of every variant")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args(argv)
    set_threads(args.threads)
    pipe = Pipeline.from_pretrained(args.model)
    prompts = [p for p, _ in prompts_for_eval(args.prompts)]
    N, n = args.candidates, args.prompts * args.candidates
    P = args.prompts  # candidate c of prompt j: seed j + c * P in every variant
    variants = {"unscored": dict(num_samples=N, seeds=[j + c * P for j in range(P)
                                                       for c in range(N)])}  # fmt: skip
    for r in args.rerankers.split(","):
        variants[f"scored by {r}"] = dict(candidates=N, keep=1, reranker=r, seed=0)
    common = dict(batch_size=args.batch_size, temperature=0.7, guidance_scale=1.5)
    pipe(prompts[:2], num_samples=2, seed=0, **common)  # warm-up
    times: dict[str, list[float]] = {k: [] for k in variants}
    load = [_load()]
    for _ in range(args.turns):
        for name, kw in variants.items():
            t0 = time.perf_counter()
            pipe(prompts, **common, **kw)
            times[name].append(time.perf_counter() - t0)
    load.append(_load())
    best = {k: min(v) for k, v in times.items()}
    report = {
        "model": str(Path(args.model).resolve()),
        "prompts": args.prompts,
        "candidates": N,
        "images": n,
        "batch_size": args.batch_size or "memory-sized",
        "threads": args.threads,
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "load_before_after": load,
        },  # fmt: skip
        "seconds_turns": times,
        "images_per_s": {k: n / v for k, v in best.items()},
        "ratio_to_unscored": {k: best["unscored"] / v for k, v in best.items()},
    }
    return print_report(report, args.out)


if __name__ == "__main__":
    sys.exit(main())
