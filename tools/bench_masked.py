"""Masked against autoregressive sampling: images per second of the masked generator at its
default steps (`MaskedSampling.steps`) against the transformer's KV-cached autoregressive loop,
same-size models (the shapes transformer's width, depth and heads, random weights), same batch,
same machine, side by side in one run (best of `--repeats` turns each, the modes taking turns),
at 8x8, 16x16 and 32x32 grids. Each mode in its default precision: the autoregressive loop in
fp32, the masked passes under `MaskedSampling.precision` "auto" (bf16 where the device has it);
where that is bf16, the masked passes in fp32 and the autoregressive loop in bf16 too, beside
them. Prints and writes one JSON object. `masked_whole_passes_images_per_s`: the masked passes as
they ran before the text prefix was cached (each pass over text and image), the same draw.

    python tools/bench_masked.py --out tools/results/cpu/bench_masked.json
    python tools/bench_masked.py --grids 8 --batch 4 --repeats 1      # seconds-long smoke run
    python tools/bench_masked.py --device cuda --batch 1 --repeats 3   # on a GPU (gpu_check.sh)

On a GPU both models attend through the Triton kernels (`attn_impl="auto"`), each turn ends with
a device synchronisation, and the first turn (kernel compilation) is left out by taking the best.

The autoregressive cost grows with the grid's positions (one decode step per code, each
attending to all before it); the masked cost with the number of passes times the cost of one
full pass (attention over every position), so the ratio grows with the grid.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import torch

from dalle_ar.cli import print_report
from dalle_ar.models.transformer import Transformer, TransformerConfig
from dalle_ar.runtime import describe_machine, set_threads
from dalle_ar.sampling import generate_image_tokens
from dalle_ar.sampling.masked import generate_masked, masked_precision
from dalle_ar.sampling.settings import MaskedSampling

# the shapes transformer's size (configs/shapes/transformer.yaml), grid set per run
BASE = TransformerConfig(text_vocab=1000, text_len=24, image_vocab=512, dim=192, depth=4,
                         heads=3, head_dim=64, layouts="full", attn_impl="torch")  # fmt: skip


def _best(fns: list, repeats: int, device: torch.device) -> list[float]:
    """Best seconds of each function over `repeats` turns, the functions taking turns (A, B, A,
    B, ...), so that a slow spell of the machine falls on all of them; on a GPU each turn is
    timed to the end of its kernels."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


def _ar_bf16(model: Transformer, ids: torch.Tensor, seeds: list[int]) -> None:
    """The autoregressive loop under bf16 autocast (not its default: its one-code decode steps
    are matrix-vector work)."""
    with torch.autocast(ids.device.type, dtype=torch.bfloat16):
        generate_image_tokens(model, ids, seeds=seeds)


class WholePasses:
    """The masked generator as the sampler ran it before the prefix was cached: every pass over
    the whole stream, the caption included (its prefill only remembers the text). For the
    side-by-side column `masked_whole_passes_images_per_s`."""

    def __init__(self, model: Transformer) -> None:
        self.model, self.text = model, None

    def __getattr__(self, name: str):
        return getattr(self.model, name)

    def __call__(self, text: torch.Tensor, input_pos: torch.Tensor, **_) -> None:
        self.text = text

    def forward_image(self, codes: torch.Tensor, *, text_lens: torch.Tensor | None = None):
        return self.model(torch.cat([self.text, codes], 1), text_lens=text_lens).image


def run(
    grids: list[int], batch: int, repeats: int, steps: int | None, device: torch.device
) -> dict:
    s = MaskedSampling() if steps is None else MaskedSampling(steps=steps)
    impl = "auto" if device.type == "cuda" else BASE.attn_impl  # the Triton kernels on a GPU
    rows = []
    for g in grids:
        ar_cfg = dataclasses.replace(BASE, grid_h=g, grid_w=g, attn_impl=impl)
        m_cfg = dataclasses.replace(ar_cfg, layouts="bidir", objective="masked")
        torch.manual_seed(0)
        ar, masked = Transformer(ar_cfg).eval().to(device), Transformer(m_cfg).eval().to(device)
        ids = torch.randint(3, 300, (batch, BASE.text_len), device=device)
        ids[:, 0], ids[:, -1] = 1, 2
        seeds = list(range(batch))
        whole = WholePasses(masked)
        t_ar, t_m, t_w = _best([lambda: generate_image_tokens(ar, ids, seeds=seeds),  # noqa: B023
                                lambda: generate_masked(masked, ids, s, seeds=seeds),  # noqa: B023
                                lambda: generate_masked(whole, ids, s, seeds=seeds)],  # noqa: B023
                               repeats, device)  # fmt: skip
        auto = masked_precision(ids.device, s.precision)
        rows.append({"grid": f"{g}x{g}", "positions": g * g, "batch": batch,
                     "ar_images_per_s": batch / t_ar, "masked_images_per_s": batch / t_m,
                     "masked_precision": auto, "masked_steps": s.steps, "speedup": t_ar / t_m,
                     "ar_seconds": t_ar, "masked_seconds": t_m,
                     "masked_whole_passes_images_per_s": batch / t_w,
                     "cached_prefix_over_whole_passes": t_w / t_m})  # fmt: skip
        if auto == "bf16":  # the passes in fp32 and the decode steps in bf16, beside them
            fp32 = dataclasses.replace(s, precision="fp32")
            t_f, t_ab = _best([lambda: generate_masked(masked, ids, fp32, seeds=seeds),  # noqa: B023
                               lambda: _ar_bf16(ar, ids, seeds)], repeats, device)  # noqa: B023  # fmt: skip
            rows[-1].update(masked_fp32_images_per_s=batch / t_f, bf16_over_fp32=t_f / t_m,
                            ar_bf16_images_per_s=batch / t_ab)  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    return {"machine": describe_machine(), "device": str(device),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "threads": torch.get_num_threads(), "attn_impl": impl,
            "model": {k: getattr(BASE, k) for k in ("dim", "depth", "heads", "head_dim")},
            "repeats": repeats, "rows": rows}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--grids", default="8,16,32", help="comma-separated grid sides")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--steps", type=int, default=None, help="default: MaskedSampling's")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--out", help="write the JSON here")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here")
    set_threads(args.threads)
    with torch.inference_mode():
        report = run([int(g) for g in args.grids.split(",")], args.batch, args.repeats,
                     args.steps, device)  # fmt: skip
    return print_report(report, args.out)


if __name__ == "__main__":
    sys.exit(main())
