"""A reward model for the reranker (the recipe of ImageReward, Xu et al. 2023, with the shapes
checker standing in for human raters): the pipeline's CLIP fine-tuned on the generator's own
candidates for training-split prompts, each labelled right or wrong by the checker, then set
against the plain CLIP as the reranker of 16 candidates for the evaluation prompts.

    python tools/rerank_reward.py draw --model runs/main/pipeline --threads 2 \
        --draw own.pt --num 1000
    python tools/rerank_reward.py foil-draw --model runs/main/pipeline --threads 2 \
        --draw foils.pt --num 1000
    python tools/rerank_reward.py tune --model runs/main/pipeline --threads 2 \
        --draw own.pt foils.pt --steps 300 --lr 2e-5 --clip-out reward_clip --out T.json
    python tools/rerank_qbnorm.py draw --model runs/main/pipeline --threads 2 --draw eval.pt
    python tools/rerank_reward.py score --model runs/main/pipeline --threads 2 \
        --draw eval.pt --clips runs/main/pipeline/clip reward_clip --out F.json

`draw`: `--num` training-split prompts (seen colour-shape pairs only, never an evaluation
caption), 16 candidates each at the reranking bar's settings (`tools/rerank_qbnorm.py`'s draw),
their codes and the checker's verdicts. `foil-draw`: the same prompts, each candidate drawn from
the caption of a scene that differs in one attribute a picture shows (`shapes.foil_scene`, seen
pairs only) and checked against the prompt's own scene: the generator's near misses, nearly all
wrong. `tune`: the candidates of each prompt (of every draw given) form a group; the loss is
ImageReward's pairwise one, -log sigmoid(s_right - s_wrong) over every right and wrong pair of a
group (s: the CLIP's logit scale times the cosine with the prompt), plus CLIP's symmetric
contrastive loss between each group's prompt and its first right candidate across the batch,
which keeps the captions of different scenes apart. `score`: each CLIP's pick among each
evaluation prompt's 16 candidates as the checker reads it (all, seen, held-out), what the
checker refuses in its wrong seen-pair picks, and how often a right one is among them.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from rerank_qbnorm import (  # this folder's
    any_right,
    best_of,
    by_prompt,
    candidate_pixels,
    draw,
    seen_misses,
)
from tqdm import tqdm

from dalle_ar.cli import add_pipeline_arguments, load_pipeline, print_report
from dalle_ar.data.shapes import caption, foil_scene, sample_spec
from dalle_ar.models.clip import CLIP, LOGIT_SCALE_MAX
from dalle_ar.train.clip import contrastive_loss


def training_pairs(n: int, seed: int = 0) -> list[tuple[str, dict]]:
    """`n` training-split (caption, spec) pairs, worded like training captions."""
    rng = random.Random(f"reward-train-{seed}")
    out = []
    for _ in range(n):
        spec = sample_spec(rng, "train")
        out.append((caption(spec, rng), spec))
    return out


def foil_prompts(pairs: list[tuple[str, dict]], seed: int = 0) -> list[str]:
    """For each pair, the caption of a scene that differs from it in one attribute a picture
    shows, with seen colour-shape pairs only (`shapes.foil_scene`); the pair's own caption where
    its scene has none."""
    rng = random.Random(f"reward-foils-{seed}")
    out = []
    for text, spec in pairs:
        foil = foil_scene(spec, rng)
        out.append(text if foil is None else caption(foil, rng))
    return out


def merged(draws: list[dict]) -> dict:
    """Draws of the same prompts as one: every candidate under its prompt's index."""
    first = draws[0]
    for d in draws[1:]:
        if d["prompts"] != first["prompts"]:
            raise ValueError("the draws are not of the same prompts")
    return {
        **first,
        "codes": torch.cat([d["codes"] for d in draws]),
        **{k: [x for d in draws for x in d[k]] for k in ("prompt_index", "right")},
    }


def tune(
    pipe, d: dict, out: Path, steps: int, lr: float, groups_per_step: int, seed: int
) -> tuple[list[list[float]], int]:
    """Fine-tune the pipeline's CLIP on the draw's groups and save it to `out`; the per-step
    losses (group, total) and the number of groups that train (neither all right nor all wrong)."""
    clip = pipe.components["clip"]
    model = clip.model.train().requires_grad_(True)
    right = torch.tensor(d["right"])
    groups = [idx for idx in by_prompt(d) if 0 < int(right[idx].sum()) < len(idx)]
    print(len(groups), "mixed groups of", len(d["prompts"]), "prompts")
    pix = candidate_pixels(pipe, clip, d["codes"])
    ids, mask = clip.encode_text(d["prompts"])
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    log = []
    for step in tqdm(range(steps), desc="tune"):
        pick = torch.randperm(len(groups), generator=gen)[:groups_per_step].tolist()
        sizes = [len(groups[g]) for g in pick]
        cand = torch.tensor([i for g in pick for i in groups[g]])
        pidx = torch.tensor([d["prompt_index"][groups[g][0]] for g in pick])  # (G,)
        img = clip.image_embeds(pix[cand])  # (sum of sizes, D)
        txt = clip.text_embeds(ids[pidx], mask[pidx])  # (G, D)
        scale = model.logit_scale.clamp(max=LOGIT_SCALE_MAX).exp()
        # every (right, wrong) pair of a group: -log sigmoid(s_right - s_wrong), ImageReward's
        # pairwise loss, averaged over the pairs of each group, then over the groups
        losses, pos = [], []
        for im, t, ok in zip(img.split(sizes), txt, right[cand].split(sizes)):
            s_ = scale * im @ t
            pair = (ok[:, None] & ~ok[None, :]).float()
            losses.append((-F.logsigmoid(s_[:, None] - s_[None, :]) * pair).sum() / pair.sum())
            pos.append(im[int(ok.float().argmax())])  # the group's first right candidate
        group_loss = torch.stack(losses).mean()
        loss = group_loss + contrastive_loss(torch.stack(pos), txt, model.logit_scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        log.append([float(group_loss), float(loss)])
        if step % 50 == 0:
            tqdm.write(f"step {step} group {log[-1][0]:.3f} total {log[-1][1]:.3f}")
    model.eval()
    clip.save_pretrained(out)
    return log, len(groups)


@torch.inference_mode()
def picks(pipe, clip: CLIP, d: dict) -> dict:
    """How often `clip`'s pick among each prompt's candidates is right (all, seen, held-out),
    and what the checker refuses in its wrong seen-pair picks (`seen_misses`)."""
    img = clip.image_embeds(candidate_pixels(pipe, clip, d["codes"]))
    txt = clip.text_embeds(*clip.encode_text(d["prompts"]))
    scores = (img * txt[torch.tensor(d["prompt_index"])]).sum(-1)
    return best_of(d, scores) | {"seen_misses": seen_misses(pipe, d, scores)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=("draw", "foil-draw", "tune", "score"))
    add_pipeline_arguments(ap, "pipeline folder: its generator draws, its CLIP is tuned")
    ap.add_argument(
        "--draw",
        type=Path,
        nargs="+",
        required=True,
        help="the draw's torch file (tune: several, of the same prompts)",
    )
    ap.add_argument("--num", type=int, default=1000, help="training prompts (draw, foil-draw)")
    ap.add_argument("--seed", type=int, default=0, help="sampling / training seed")
    ap.add_argument("--steps", type=int, default=300, help="fine-tuning steps (tune)")
    ap.add_argument("--lr", type=float, default=2e-5, help="AdamW learning rate (tune)")
    ap.add_argument("--groups", type=int, default=16, help="groups per step (tune)")
    ap.add_argument("--clip-out", type=Path, help="the tuned CLIP's folder (tune)")
    ap.add_argument("--clips", type=Path, nargs="*", default=[], help="CLIP folders (score)")
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    args = ap.parse_args(argv)
    if args.command == "tune" and args.clip_out is None:
        ap.error("tune needs --clip-out, the tuned CLIP's folder")
    pipe = load_pipeline(args)
    if args.command == "draw":
        draw(pipe, args.draw[0], training_pairs(args.num, args.seed), args.seed)
        return 0
    if args.command == "foil-draw":
        pairs = training_pairs(args.num, args.seed)
        draw(pipe, args.draw[0], pairs, args.seed + 1, foil_prompts(pairs, args.seed))
        return 0
    d = merged([torch.load(f, weights_only=True) for f in args.draw])
    if args.command == "tune":
        t0 = time.perf_counter()
        log, mixed = tune(pipe, d, args.clip_out, args.steps, args.lr, args.groups, args.seed)
        report = {
            "steps": args.steps,
            "lr": args.lr,
            "groups": args.groups,
            "seed": args.seed,
            "mixed_groups": mixed,
            "seconds": time.perf_counter() - t0,
            "loss": log[:: max(1, len(log) // 20)],
        }
    else:
        report = {"any_of_16": any_right(d)}
        for folder in args.clips:
            report[str(folder)] = picks(pipe, CLIP.from_pretrained(folder, args.device), d)
    return print_report(report, args.out)


if __name__ == "__main__":
    sys.exit(main())
