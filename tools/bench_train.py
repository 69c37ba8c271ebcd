"""Training throughput of the transformer (forward + backward + AdamW) against this machine's
fp32 matmul peak, both measured in the same run. Prints one JSON object.

    python tools/bench_train.py                      # benchmark shape S on the CPU
    python tools/bench_train.py --config configs/transformer_bench_s.yaml model.layouts=full
    python tools/bench_train.py --compare-bf16       # fp32 and bf16 autocast, side by side
    python tools/bench_train.py --recipe --config configs/shapes/transformer.yaml \
        --data runs/main run.precision=fp32      # the recipe as trained, variants side by side

Model FLOPs count the matmuls a step must do (Transformer.flops_per_token: 3x the forward, with
attention counted over the pairs each layer's layout lets a query see). The peak is the best of
several square fp32 matmuls, so the fraction is of what the BLAS reaches here, not of a data sheet.
The machine may be shared: every timed step is paired with a short peak measurement just before
it, and `fraction_of_peak_paired` is the median of the per-step ratios (load that comes and goes
hits both sides of a pair alike); the plain medians are reported too. With --compare-bf16 the
same steps also run under bf16 autocast (its fractions stay relative to the fp32 peak), and
`bf16_speedup` is the ratio of the two step times.

--recipe times the training recipe itself: the batches read from the token shards of a main-job
folder (`--data`: its tokenizer, VQ and tokens), the loop's own step (`dalle_ar.train.loop.Loop`:
the batch, forward, backward, clipping, AdamW, the finiteness check), with each variant's threads,
prefetching and compilation. The variants (`--variant "NAME: key=value ..."`, default `today` and
`config`) are built side by side and timed in turns, `--turn-steps` steps each per turn, so a load
that comes and goes hits them alike; `samples_per_s` is each one's median over turns, and
`speedup` the median of the per-turn ratios to the first variant. `--busy N` keeps N other
processes spinning meanwhile (a shared machine).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import tempfile
import time

import torch

from dalle_ar.config import load_config
from dalle_ar.models.transformer import Transformer
from dalle_ar.runtime import autocast_context, describe_machine, pick_device, uses_bf16
from dalle_ar.train.common import build_optimizer
from dalle_ar.train.objectives import lm_loss
from dalle_ar.train.transformer import TrainTransformerConfig

DEFAULT_CONFIG = "configs/transformer_bench_s.yaml"
# The recipe as the main job trained it before budgets in steps: torch's default threads (2
# here), batches read inline, eager PyTorch.
TODAY = "today: run.threads=2 prefetch=0 run.compile=false"


def matmul_peak(device: torch.device, n: int = 1024, reps: int = 5, inner: int = 10) -> float:
    """Best achieved fp32 GFLOP/s of an (n, n) @ (n, n) matmul."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    best = 0.0
    for _ in range(reps + 1):
        _sync(device)
        t = time.perf_counter()
        for _ in range(inner):
            a @ b
        _sync(device)
        best = max(best, 2 * n**3 * inner / (time.perf_counter() - t) / 1e9)
    return best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_train(cfg: TrainTransformerConfig, steps: int, warmup: int) -> dict:
    device = pick_device(cfg.run.device)
    torch.manual_seed(0)
    model = Transformer(cfg.model).to(device).train()
    opt = build_optimizer(model, cfg.optim, fused=True)
    m, B = cfg.model, cfg.data.batch_size
    g = torch.Generator().manual_seed(0)
    text = torch.randint(0, m.text_vocab, (B, m.text_len), generator=g).to(device)
    image = torch.randint(0, m.image_vocab, (B, m.image_len), generator=g).to(device)
    lens = torch.randint(2, m.text_len + 1, (B,), generator=g).to(device)
    tokens = torch.cat([text, image[:, :-1]], 1)
    times, ratios = [], []
    flops_sample = model.flops_per_token() * tokens.shape[1]
    for i in range(warmup + steps):
        peak = matmul_peak(device, reps=1, inner=3) if i >= warmup else 0.0
        _sync(device)
        t = time.perf_counter()
        with autocast_context(device, cfg.run.precision, cpu_auto=True):
            out = model(tokens, text_lens=lens)
        loss, _ = lm_loss(out, text, image, lens)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip or 1e9)
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t)
            ratios.append(B * flops_sample / times[-1] / 1e9 / peak)
    times.sort()
    ratios.sort()
    median = times[len(times) // 2]
    return {
        "fraction_of_peak_paired": ratios[len(ratios) // 2],
        "step_s_median": median,
        "step_s_best": times[0],
        "samples_per_s": B / median,
        "model_gflop_per_sample": flops_sample / 1e9,
        "achieved_gflops": B * flops_sample / median / 1e9,
        "params": model.num_params(),
        "layouts": cfg.model.layout_kinds(),
        "attention": model.backend.name,
        "device": str(device),
        "bf16_autocast": uses_bf16(device, cfg.run.precision, cpu_auto=True),
    }


def _spin() -> None:
    while True:
        pass


def recipe_overrides(folder: str) -> list[str]:
    """The transformer stage's paths and sizes in a main-job folder (dalle_ar.jobs.stages)."""
    from dalle_ar.models.vq import VQTokenizer
    from dalle_ar.text import TextTokenizer

    vq = VQTokenizer.from_pretrained(f"{folder}/vq_run/vq")
    h, w = vq.grid_size(vq.config.image_size)
    tok = TextTokenizer.from_pretrained(f"{folder}/tokenizer_run/tokenizer")
    return [
        f"data.train={folder}/tokens/train-*.tar", f"data.eval={folder}/tokens/eval-*.tar",
        f"text_tokenizer={folder}/tokenizer_run/tokenizer", f"vq={folder}/vq_run/vq",
        f"model.text_vocab={tok.vocab_size}", f"model.image_vocab={vq.codebook_size}",
        f"model.grid_h={h}", f"model.grid_w={w}", "run.wandb=disabled",
    ]  # fmt: skip


def bench_recipe(args: argparse.Namespace) -> dict:
    """The recipe's own training steps for each variant, timed in turns (see the docstring)."""
    from dalle_ar.runtime import pick_threads
    from dalle_ar.train import transformer
    from dalle_ar.train.common import Run
    from dalle_ar.train.loop import Loop, Position

    base = [*recipe_overrides(args.data), *args.overrides]
    # the other processes spin before the variants are built, so threads=0 sees them
    spinners = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(args.busy)]
    for p in spinners:
        p.start()
    time.sleep(0.5 if spinners else 0)
    variants = []
    for spec in args.variant or [TODAY, "config:"]:
        name, _, rest = spec.partition(":")
        tmp = tempfile.mkdtemp(prefix=f"bench_{name.strip()}_")
        over = [*base, *rest.split(), f"run.out_dir={tmp}"]
        cfg = load_config(TrainTransformerConfig, args.config, over)
        task, info = transformer.build(cfg)
        threads = pick_threads(cfg.run.threads)
        loop = Loop(cfg, task, info, Run(cfg, cfg.run), Position())
        variants.append({"name": name.strip(), "overrides": rest.split(), "cfg": cfg,
                         "loop": loop, "batches": loop.batches(), "threads": threads,
                         "times": [], "warmup": []})  # fmt: skip
    try:
        for turn in range(args.turns + 1):  # turn 0 warms up (and compiles)
            for v in variants:
                torch.set_num_threads(v["threads"])
                t = time.perf_counter()
                for _ in range(args.turn_steps):
                    v["loop"].step(v["batches"])
                v["times" if turn else "warmup"].append(time.perf_counter() - t)
    finally:
        for p in spinners:
            p.terminate()
        for v in variants:
            v["batches"].close()
    first = variants[0]
    out = {}
    for v in variants:
        B = v["cfg"].data.batch_size * v["cfg"].optim.grad_accum
        rates = [B * args.turn_steps / t for t in v["times"]]
        ratios = [t0 / t * B / (first["cfg"].data.batch_size * first["cfg"].optim.grad_accum)
                  for t0, t in zip(first["times"], v["times"])]  # fmt: skip
        out[v["name"]] = {
            "overrides": v["overrides"],
            "samples_per_s": statistics.median(rates),
            "samples_per_s_turns": [round(r, 1) for r in rates],
            "speedup": statistics.median(ratios),
            "warmup_seconds": round(v["warmup"][0], 2),  # turn 0: compilation, allocator
            "threads": v["threads"],
            "batch_size": B,
            "precision": v["loop"].task.precision,
        }
    return {
        "config": args.config, "data": args.data, "overrides": args.overrides,
        "turns": args.turns, "turn_steps": args.turn_steps, "busy_processes": args.busy,
        "variants": out,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=DEFAULT_CONFIG)
    ap.add_argument("--steps", type=int, default=10, help="timed steps")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    ap.add_argument(
        "--compare-bf16", action="store_true", help="also time bf16 autocast, side by side"
    )
    ap.add_argument("--recipe", action="store_true", help="time the training recipe's steps")
    ap.add_argument("--data", default="runs/main", help="--recipe: a main-job folder")
    ap.add_argument(
        "--variant",
        action="append",
        help=f'--recipe: "NAME: key=value ..." (repeated; default "{TODAY}", "config:")',
    )
    ap.add_argument("--turns", type=int, default=5, help="--recipe: timed turns")
    ap.add_argument("--turn-steps", type=int, default=20, help="--recipe: steps per turn")
    ap.add_argument("--busy", type=int, default=0, help="--recipe: spinning processes meanwhile")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = ap.parse_args(argv)
    if args.recipe:
        result = bench_recipe(args)
        result["machine"] = describe_machine()
        print(json.dumps(result, indent=2))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    fp32 = ["run.precision=fp32"] if args.compare_bf16 else []  # the baseline is fp32 there
    cfg = load_config(TrainTransformerConfig, args.config, [*args.overrides, *fp32])
    device = pick_device(cfg.run.device)
    peak_before = matmul_peak(device)
    result = bench_train(cfg, args.steps, args.warmup)
    if args.compare_bf16:
        cfg_bf16 = load_config(
            TrainTransformerConfig, args.config, [*args.overrides, "run.precision=bf16"]
        )
        bf16 = bench_train(cfg_bf16, args.steps, args.warmup)
        result["bf16"] = bf16
        result["bf16_speedup"] = result["step_s_median"] / bf16["step_s_median"]
    peak_after = matmul_peak(device)
    # the machine is shared: the peak is taken on both sides of the timing, the higher counts
    peak = max(peak_before, peak_after)
    result.update(
        matmul_peak_gflops=peak,
        matmul_peak_gflops_before_after=[peak_before, peak_after],
        fraction_of_peak=result["achieved_gflops"] / peak,
        batch_size=cfg.data.batch_size,
        threads=torch.get_num_threads(),
        machine=describe_machine(),
    )
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
