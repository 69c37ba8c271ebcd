"""Querybank normalisation of CLIP scores (QB-Norm with an inverted softmax, Bogolin et al.,
CVPR 2022) against plain CLIPScore as the reranker of 16 candidates: does dividing out how well a
candidate matches a bank of training captions pick a right image more often?

    python tools/rerank_qbnorm.py draw  --model runs/main/pipeline --out draw.pt --num 400
    python tools/rerank_qbnorm.py score --model runs/main/pipeline --draw draw.pt --bank 2000 \
        --out tools/results/cpu/rerank_qbnorm_every_mode_job.json

`draw`: the candidates of `dalle-ar eval fidelity --num 400 --guidance 1.5 --temperature 0.7
--candidates 16` (same prompts, seeds), their codes and the shapes checker's verdicts, to a torch
file of tensors and lists (read back with weights_only). `score`: every candidate's unit CLIP
embedding against its prompt's and against a bank of training-split captions (never evaluation
captions), and each variant's pick: s - lam * LSE_bank(beta * s') / beta for beta in 10, 30,
the CLIP's own logit scale and 100, and the hubness variant s - lam * mean of the top-k bank
similarities. Prints and writes the checker's figures (all, seen, held-out) per variant.
"""

import json
import random
import sys
import time

import torch

from dalle_ar.cli import load_pipeline
from dalle_ar.data.evaluate import score
from dalle_ar.data.shapes import caption, prompts_for_eval, sample_spec
from dalle_ar.eval.fidelity import split_mean


class A:  # load_pipeline's args
    def __init__(self, model):
        self.model, self.device, self.threads, self.allow_mismatch = model, "cpu", 2, False


def draw(model, out, num, prompt_seed):
    pipe = load_pipeline(A(model))
    pairs = prompts_for_eval(num, seed=prompt_seed)
    prompts, specs = [p for p, _ in pairs], [s for _, s in pairs]
    t0 = time.perf_counter()
    res = pipe(
        prompts,
        seed=0,
        progress=True,
        candidates=16,
        keep=16,
        reranker="clip",
        guidance_scale=1.5,
        temperature=0.7,
    )
    secs = time.perf_counter() - t0
    right = [
        bool(score(res.images[i], specs[m["prompt_index"]])["exact"])
        for i, m in enumerate(res.samples)
    ]
    torch.save(
        {
            "codes": res.codes,
            "prompt_index": [m["prompt_index"] for m in res.samples],
            "candidate_index": [m["candidate_index"] for m in res.samples],
            "clip_score": [m["clip_score"] for m in res.samples],
            "right": right,
            "held": [bool(s["held_out"]) for s in specs],
            "prompts": prompts,
            "seconds": secs,
        },
        out,
    )
    print("drew", len(right), "in", secs)


def bank_captions(n, seed=0):
    rng = random.Random(f"bank-{seed}")
    return [caption(sample_spec(rng, "train"), rng) for _ in range(n)]


@torch.inference_mode()
def scored(model, d, nbank):
    pipe = load_pipeline(A(model))
    clip = pipe.components["clip"]
    img = []
    for i in range(0, len(d["codes"]), 256):
        x = pipe.components["vq"].decode_8bit(d["codes"][i : i + 256])
        img.append(clip.image_embeds(clip.pixels_from_tensor(x)))
    img = torch.cat(img)
    txt = pipe.scene_embeds(d["prompts"])
    bank = []
    caps = bank_captions(nbank)
    for i in range(0, nbank, 256):
        bank.append(clip.text_embeds(*clip.encode_text(caps[i : i + 256])))
    bank = torch.cat(bank)
    temp = float(clip.model.logit_scale.exp())
    return img, txt, bank, temp


def main():
    cmd = sys.argv[1]
    args = dict(zip(sys.argv[2::2], sys.argv[3::2]))
    if cmd == "draw":
        draw(
            args["--model"],
            args["--out"],
            int(args.get("--num", 400)),
            int(args.get("--prompt-seed", 0)),
        )
        return
    t0 = time.perf_counter()
    d = torch.load(args["--draw"], weights_only=True)
    img, txt, bank, temp = scored(args["--model"], d, int(args.get("--bank", 2000)))
    pidx = torch.tensor(d["prompt_index"])
    right = torch.tensor(d["right"])
    held = d["held"]
    n = len(held)
    s = (img * txt[pidx]).sum(-1)  # cosine of each candidate with its prompt
    sb = img @ bank.T  # (N, B)
    report = {
        "clip_temperature": temp,
        "bank": len(bank),
        "num": n,
        "candidates": 16,
        "guidance_scale": 1.5,
        "temperature": 0.7,
        "seed": 0,
        "draw_seconds": d["seconds"],
        "score_seconds": time.perf_counter() - t0,
    }

    def pick(scores):
        ok = []
        for p in range(n):
            idx = (pidx == p).nonzero().flatten()
            ok.append(bool(right[idx[scores[idx].argmax()]]))
        return split_mean(ok, held)

    report["any_of_16"] = split_mean([bool(right[pidx == p].any()) for p in range(n)], held)
    report["plain"] = pick(s)
    for beta in (10, 30, temp, 100):
        lse = torch.logsumexp(beta * sb, 1) / beta  # over the bank alone: the inverted softmax
        for lam in (0.25, 0.5, 1.0):
            report[f"qbnorm b{beta:.3g} l{lam}"] = pick(s - lam * lse)
    for k in (1, 5, 20, 100):  # hubness: mean of top-k bank similarities (CSLS-like)
        top = sb.topk(k, 1).values.mean(1)
        for lam in (0.5, 1.0):
            report[f"topk{k} l{lam}"] = pick(s - lam * top)
    print(json.dumps(report, indent=1))
    if "--out" in args:
        with open(args["--out"], "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
