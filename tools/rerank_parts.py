"""CLIP reranking with the caption's parts: does scoring each candidate also against the caption
without each object's colour and without its shape (the parts of `shapes.composed_prompt`) pick
a right image more often than CLIPScore on the caption alone, on held-out colour-shape pairs?

A held-out pair is a caption the CLIP never read; the caption without its colour ("a big diamond
at the top") is one it has read with every other colour, so its score judges the shape apart
from the colour. The idea is the decomposition of text-to-image metrics into the prompt's facts
(TIFA, Hu et al. 2023; Davidsonian scene graphs, Cho et al. 2024), with CLIP as the judge of
each fact.

    python tools/rerank_qbnorm.py draw --model runs/main/pipeline --threads 2 --draw draw.pt \
        --num 400
    python tools/rerank_parts.py draw --model runs/main/pipeline --threads 2 --draw check.pt \
        --first 400 --num 400 --seed 1
    python tools/rerank_parts.py score --model runs/main/pipeline --threads 2 \
        --draw draw.pt --check check.pt --out F.json

`draw`: as rerank_qbnorm's, on `prompts_for_eval(first + num)[first:]` (prompts the first draw
does not hold) and another sampling seed, for a check of the weights chosen on the first draw.
`score`: every variant on both draws (all / seen / held-out): the caption alone, the caption plus
lam times the mean of its parts, the parts' mean alone, the minimum of the caption's score and
the two parts' means. The caption's score is the cosine, which ranks as the pipeline's CLIPScore
(100 x cosine, floored at 0) does.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from rerank_qbnorm import any_right, best_of, candidate_pixels, draw, draw_score_parser

from dalle_ar.cli import load_pipeline, print_report
from dalle_ar.data.shapes import composed_prompt, prompts_for_eval
from dalle_ar.prompts import split_prompt

LAMBDAS = (0.25, 0.5, 1.0, 2.0)


@torch.inference_mode()
def part_scores(pipe, d: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per candidate: its cosine with the caption (N,), and the mean cosine with the caption's
    shape parts (colour left out) and with its colour parts (shape left out), (N,) each."""
    clip = pipe.components["clip"]
    img = clip.image_embeds(candidate_pixels(pipe, clip, d["codes"]))
    caps, shape_parts, colour_parts = [], [], []
    for p in d["prompts"]:
        _, parts = split_prompt(composed_prompt(p))
        texts = [t for t, _ in parts]  # per pair: without the colour, then without the shape
        caps.append(p)
        shape_parts.append(texts[0::2] or [p])
        colour_parts.append(texts[1::2] or [p])

    def embed(texts: list[str]) -> torch.Tensor:
        return torch.cat([clip.text_embeds(*clip.encode_text(texts[i : i + 256]))
                          for i in range(0, len(texts), 256)])  # fmt: skip

    idx = torch.tensor(d["prompt_index"])
    s_cap = (img * embed(caps)[idx]).sum(-1)
    out = []
    for groups in (shape_parts, colour_parts):
        per_prompt = embed([t for g in groups for t in g]).split([len(g) for g in groups])
        # each candidate's cosine with each part of its prompt, averaged over the parts
        out.append(torch.stack([(img[j] @ per_prompt[p].T).mean() for j, p in
                                enumerate(idx.tolist())]))  # fmt: skip
    return s_cap, out[0], out[1]


def variants(d: dict, s_cap, s_shape, s_colour) -> dict:
    parts = (s_shape + s_colour) / 2
    lowest = torch.minimum(s_cap, torch.minimum(s_shape, s_colour))
    report = {"any_of_16": any_right(d), "caption": best_of(d, s_cap),
              "parts mean": best_of(d, parts), "shape parts": best_of(d, s_shape),
              "min(caption, parts)": best_of(d, lowest)}  # fmt: skip
    for lam in LAMBDAS:
        report[f"caption + {lam} parts"] = best_of(d, s_cap + lam * parts)
        report[f"caption + {lam} shape parts"] = best_of(d, s_cap + lam * s_shape)
    return report


def main(argv: list[str] | None = None) -> int:
    ap = draw_score_parser(__doc__, seed=1)
    ap.add_argument("--check", type=Path, help="a second draw, to check the chosen weights")
    ap.add_argument("--first", type=int, default=400, help="evaluation prompts skipped (draw)")
    ap.add_argument("--out", type=Path, help="also write the JSON here (score)")
    args = ap.parse_args(argv)
    pipe = load_pipeline(args)
    if args.command == "draw":
        pairs = prompts_for_eval(args.first + args.num, seed=0)[args.first :]
        draw(pipe, args.draw, pairs, args.seed)
        return 0
    t0 = time.perf_counter()
    report = {}
    for name, path in (("draw", args.draw), ("check", args.check)):
        if path is not None:
            d = torch.load(path, weights_only=True)
            report[name] = variants(d, *part_scores(pipe, d))
    report["score_seconds"] = time.perf_counter() - t0
    return print_report(report, args.out)


if __name__ == "__main__":
    sys.exit(main())
