"""Querybank normalisation of CLIP scores (QB-Norm with an inverted softmax, Bogolin et al.,
CVPR 2022) against plain CLIPScore as the reranker of 16 candidates: does dividing out how well a
candidate matches a bank of training captions pick a right image more often?

    python tools/rerank_qbnorm.py draw --model runs/main/pipeline --threads 2 --draw draw.pt \
        --num 400
    python tools/rerank_qbnorm.py score --model runs/main/pipeline --threads 2 --draw draw.pt \
        --bank 2000 --out tools/results/cpu/rerank_qbnorm_every_mode_job.json

`draw`: the candidates of `dalle-ar eval fidelity --num 400 --guidance 1.5 --temperature 0.7
--candidates 16` (same prompts, seeds), their codes, the sampling settings and the shapes
checker's verdicts, to a torch file of tensors, lists and numbers (read back with
weights_only). `score`: every candidate's unit CLIP embedding against its prompt's and against a
bank of training-split captions (never evaluation captions), and each variant's pick:
s - lam * LSE_bank(beta * s') / beta for beta in 10, 30, the CLIP's own logit scale and 100, and
the hubness variant s - lam * mean of the top-k bank similarities. Prints and writes the
checker's figures (all, seen, held-out) per variant.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

from dalle_ar.cli import add_pipeline_arguments, load_pipeline, print_report
from dalle_ar.data.evaluate import score
from dalle_ar.data.shapes import caption, prompts_for_eval, sample_spec
from dalle_ar.eval.fidelity import candidates_by_prompt, split_mean

CANDIDATES, GUIDANCE, TEMPERATURE = 16, 1.5, 0.7  # the reranking bar's draw


def draw(
    pipe,
    path: Path,
    pairs: list[tuple[str, dict]],
    seed: int,
    drawn_from: list[str] | None = None,
    mode: str = "ar",
) -> None:
    """16 candidates for each (caption, spec) pair at the bar's settings in generation mode
    `mode`, drawn from its caption (or from `drawn_from`'s, one per pair), each checked against
    the pair's spec; their codes, verdicts and the settings to `path` under the pairs'
    captions."""
    prompts, specs = [p for p, _ in pairs], [s for _, s in pairs]
    t0 = time.perf_counter()
    res = pipe(drawn_from or prompts, seed=seed, progress=True, candidates=CANDIDATES,
               keep=CANDIDATES, reranker="clip", guidance_scale=GUIDANCE,
               temperature=TEMPERATURE, mode=mode)  # fmt: skip
    secs = time.perf_counter() - t0
    right = [bool(score(res.images[i], specs[m["prompt_index"]])["exact"])
             for i, m in enumerate(res.samples)]  # fmt: skip
    torch.save({"codes": res.codes, "prompt_index": [m["prompt_index"] for m in res.samples],
                "right": right, "held": [bool(s["held_out"]) for s in specs],
                "prompts": prompts, "candidates": CANDIDATES, "guidance_scale": GUIDANCE,
                "temperature": TEMPERATURE, "seed": seed, "mode": mode,
                "seconds": secs}, path)  # fmt: skip
    print("drew", len(right), "candidates,", sum(right), "right, in", round(secs, 1), "s")


def bank_captions(n: int, seed: int = 0) -> list[str]:
    """`n` training-split captions (the bank: never an evaluation caption)."""
    rng = random.Random(f"bank-{seed}")
    return [caption(sample_spec(rng, "train"), rng) for _ in range(n)]


@torch.no_grad()
def candidate_pixels(pipe, clip, codes: torch.Tensor) -> torch.Tensor:
    """`clip`'s pixel values (N, 3, S, S) of the drawn codes (N, h, w), decoded by the pipeline's
    VQ on 8-bit levels, as `Pipeline.clip_scores` reads them."""
    vq = pipe.components["vq"]
    pixels = [clip.pixels_from_tensor(vq.decode_8bit(c.to(pipe.device))) for c in codes.split(256)]
    return torch.cat(pixels)


def by_prompt(d: dict) -> list[list[int]]:
    """The indices of each prompt's candidates in a draw, prompt by prompt."""
    return candidates_by_prompt([{"prompt_index": p} for p in d["prompt_index"]])


def any_right(d: dict) -> dict:
    """How often a right image is among a prompt's candidates (all, seen, held-out)."""
    right = torch.tensor(d["right"])
    return split_mean([bool(right[idx].any()) for idx in by_prompt(d)], d["held"])


def picks_by(d: dict, scores: torch.Tensor) -> list[int]:
    """Each prompt's best candidate by `scores` (N,), an index into the draw; ties go to the
    earlier candidate, as `best_by`."""
    return [idx[int(scores[idx].argmax())] for idx in by_prompt(d)]


def best_of(d: dict, scores: torch.Tensor) -> dict:
    """How often each prompt's best candidate by `scores` (N,) is right (all, seen, held-out)."""
    right = torch.tensor(d["right"])
    return split_mean([bool(right[i]) for i in picks_by(d, scores)], d["held"])


@torch.inference_mode()
def seen_misses(pipe, d: dict, scores: torch.Tensor) -> dict[str, int]:
    """What the checker refuses in each wrong pick by `scores` (`picks_by`) for a seen-pair
    prompt: "count" (more or fewer objects than asked), else the first wrong of colour, shape,
    size and the cell (one object) or the relation (two), or "read as right" where the checker
    passes it now (another VQ than the draw's). A draw's prompts are those of
    `prompts_for_eval(num, seed=0)` (`draw` by `main`); ValueError for another draw."""
    pairs = prompts_for_eval(len(d["prompts"]), seed=0)
    if [p for p, _ in pairs] != list(d["prompts"]):
        raise ValueError("the draw's prompts are not prompts_for_eval(num, seed=0)'s")
    out: dict[str, int] = {}
    for p, i in enumerate(picks_by(d, scores)):
        if d["right"][i] or d["held"][p]:
            continue
        x = pipe.components["vq"].decode_8bit(d["codes"][i : i + 1].to(pipe.device))[0]
        spec = pairs[p][1]
        verdict = score(x.mul(255).round().byte().permute(1, 2, 0).cpu().numpy(), spec)
        place = "position" if spec.get("relation") is None else "relation"
        kinds = ("color", "shape", "size", place)
        # "right" on re-reading: the pipeline's VQ is not the one that drew the codes
        first = next((k for k in kinds if not verdict[k]), "read as right")
        kind = "count" if not verdict["count"] else first
        out[kind] = out.get(kind, 0) + 1
    return dict(sorted(out.items()))


@torch.inference_mode()
def embeddings(pipe, d: dict, nbank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unit CLIP embeddings of the candidates (`candidate_pixels`), of their prompts' scenes and
    of the bank's captions."""
    clip = pipe.components["clip"]
    img = clip.image_embeds(candidate_pixels(pipe, clip, d["codes"]))
    caps = bank_captions(nbank)
    bank = [clip.text_embeds(*clip.encode_text(caps[i : i + 256])) for i in range(0, nbank, 256)]
    return img, pipe.scene_embeds(d["prompts"]), torch.cat(bank)


def rescore(pipe, d: dict, nbank: int) -> dict:
    t0 = time.perf_counter()
    img, txt, bank = embeddings(pipe, d, nbank)
    temp = float(pipe.components["clip"].model.logit_scale.exp())
    s = (img * txt[torch.tensor(d["prompt_index"])]).sum(-1)  # each candidate's cosine
    sb = img @ bank.T  # (N, bank)
    report = {"clip_temperature": temp, "bank": len(bank), "num": len(d["held"]),
              **{k: d[k] for k in ("candidates", "guidance_scale", "temperature", "seed")},
              "draw_seconds": d["seconds"]}  # fmt: skip
    report["any_of_16"] = any_right(d)
    report["plain"] = best_of(d, s)
    for beta in (10, 30, temp, 100):
        lse = torch.logsumexp(beta * sb, 1) / beta  # over the bank alone: the inverted softmax
        for lam in (0.25, 0.5, 1.0):
            report[f"qbnorm b{beta:.3g} l{lam}"] = best_of(d, s - lam * lse)
    for k in (1, 5, 20, 100):  # hubness: mean of top-k bank similarities (CSLS-like)
        top = sb.topk(k, 1).values.mean(1)
        for lam in (0.5, 1.0):
            report[f"topk{k} l{lam}"] = best_of(d, s - lam * top)
    report["score_seconds"] = time.perf_counter() - t0
    return report


def draw_score_parser(doc: str, seed: int = 0) -> argparse.ArgumentParser:
    """The options of a tool that draws candidates once (`draw`) and scores them again
    (`score`): the command, the pipeline folder, the draw's file, the evaluation prompts and the
    sampling seed (this tool's and rerank_parts.py's)."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("command", choices=("draw", "score"))
    add_pipeline_arguments(ap, "pipeline folder: its generator draws, its CLIP scores")
    ap.add_argument("--draw", type=Path, required=True, help="the draw's torch file")
    ap.add_argument("--num", type=int, default=400, help="evaluation prompts (draw)")
    ap.add_argument("--seed", type=int, default=seed, help="sampling seed (draw)")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = draw_score_parser(__doc__)
    ap.add_argument(
        "--mode", default="ar", choices=("ar", "prior", "masked"), help="generation mode (draw)"
    )
    ap.add_argument("--bank", type=int, default=2000, help="training captions in the bank")
    ap.add_argument("--out", type=Path, help="also write the JSON here (score)")
    args = ap.parse_args(argv)
    pipe = load_pipeline(args)
    if args.command == "draw":
        draw(pipe, args.draw, prompts_for_eval(args.num, seed=0), args.seed, mode=args.mode)
        return 0
    report = rescore(pipe, torch.load(args.draw, weights_only=True), args.bank)
    return print_report(report, args.out)


if __name__ == "__main__":
    sys.exit(main())
