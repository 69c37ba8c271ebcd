"""Benchmark the Triton attention kernels against PyTorch, all in one run, and write JSON.

    python tools/bench_attention.py --out tools/results/attention_h100.json

For each layout at the paper shape (256 text + 32x32 image = 1280 positions) and the small shape
(64 + 16x16 = 320), head dim 64, bf16: forward, backward and forward+backward wall time and
TFLOP/s of the project's kernels, of torch.nn.attention.flex_attention (compiled, block mask from
the same rule through create_block_mask) and of scaled_dot_product_attention (dense causal, its
fastest backend). FLOPs count only the visible (query, key) pairs of each method's own mask:
4 * D per pair forward, 2.5 times that backward (five matmuls, one of them recomputing the
scores). Then the decode step: microseconds per step and achieved memory bandwidth (bytes of
the keys and values it must read) for B in {1, 16, 128} at full cache length, beside SDPA over
the whole cache. GPU only: without CUDA it exits with status 2 and writes nothing.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import torch

SHAPES = {"paper": (256, 32, 32), "small": (64, 16, 16)}  # text_len, grid_h, grid_w
KINDS = ("full", "row", "col", "conv")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("tools/results/bench_attention.json"))
    p.add_argument("--batch", type=int, default=8, help="training batch (B*H >= 64)")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--conv-kernel", type=int, default=11, help="k of the conv layout")
    p.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=["paper", "small"])
    p.add_argument("--decode-batches", type=int, nargs="+", default=[1, 16, 128])
    p.add_argument("--no-flex", action="store_true", help="skip flex_attention (no compile)")
    p.add_argument("--sweep", action="store_true", help="also time a list of launch settings")
    return p.parse_args(argv)


def _bench(fn, grads=None) -> float:
    """Median milliseconds of fn() (triton.testing.do_bench: warm-up, L2 flush per call)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, grad_to_none=grads, return_mode="median"))


def _time_training(fn, q, k, v, do) -> dict[str, float]:
    """Forward, backward and forward+backward milliseconds of o = fn(q, k, v)."""
    grads = [q, k, v]
    fwd = _bench(lambda: fn(q, k, v))
    o = fn(q, k, v)
    bwd = _bench(lambda: o.backward(do, retain_graph=True), grads)
    both = _bench(lambda: fn(q, k, v).backward(do), grads)
    return {"fwd_ms": fwd, "bwd_ms": bwd, "fwdbwd_ms": both}


def _rates(times: dict[str, float], pairs: int, bh: int, d: int) -> dict[str, float]:
    fwd_flops = 4.0 * d * pairs * bh
    out = dict(times, visible_pairs=pairs)
    for key, flops in (("fwd", fwd_flops), ("bwd", 2.5 * fwd_flops), ("fwdbwd", 3.5 * fwd_flops)):
        out[f"{key}_tflops"] = flops / (times[f"{key}_ms"] * 1e-3) / 1e12
    return out


def _training(args: argparse.Namespace, name: str, configs: list | None) -> dict:
    import torch.nn.functional as F
    from dalle_ar.kernels.attention import attention
    from dalle_ar.kernels.blocks import block_sparsity
    from dalle_ar.kernels.launch import default_attention_config
    from dalle_ar.kernels.layouts import Layout

    text_len, gh, gw = SHAPES[name]
    dtype, d = DTYPES[args.dtype], args.head_dim
    B, H = args.batch, args.heads
    n = text_len + gh * gw
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = (
        torch.randn(B, H, n, d, device="cuda", dtype=dtype, generator=g) for _ in range(4)
    )
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    sdpa = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    causal_pairs = n * (n + 1) // 2
    res = {"n": n, "batch": B, "heads": H, "head_dim": d, "layouts": {}}
    res["sdpa_causal"] = _rates(_time_training(sdpa, q, k, v, do), causal_pairs, B * H, d)
    flex = None if args.no_flex else _flex()
    cfg = default_attention_config(d, dtype)
    for kind in KINDS:
        lay = Layout(kind, text_len, gh, gw, args.conv_kernel)
        pairs = int(lay.dense_mask().sum())
        ours = functools.partial(_ours, attention, lay, cfg)
        entry = {"triton": _rates(_time_training(ours, q, k, v, do), pairs, B * H, d)}
        bs = block_sparsity(lay, n, cfg.fwd.block_m, cfg.fwd.block_n)
        total = bs.n_query_blocks * bs.n_key_blocks
        entry["triton"]["fwd_blocks_visited"] = bs.visited_pairs() / total
        with torch.no_grad():
            out = ours(q, k, v).float()
        if kind == "full":
            with torch.no_grad():
                entry["triton"]["max_err_vs_sdpa"] = (
                    (out - sdpa(q, k, v).float()).abs().max().item()
                )
        if flex is not None:
            fn, mask = flex(lay, n)
            entry["flex"] = _rates(_time_training(fn, q, k, v, do), pairs, B * H, d)
            entry["flex"]["blocks_visited"] = 1.0 - mask.sparsity() / 100.0
            with torch.no_grad():
                entry["triton"]["max_err_vs_flex"] = (out - fn(q, k, v).float()).abs().max().item()
        entry["speedup_fwdbwd_vs_sdpa_causal"] = (
            res["sdpa_causal"]["fwdbwd_ms"] / entry["triton"]["fwdbwd_ms"]
        )
        if "flex" in entry:
            entry["speedup_fwdbwd_vs_flex"] = (
                entry["flex"]["fwdbwd_ms"] / entry["triton"]["fwdbwd_ms"]
            )
        if configs:
            entry["sweep"] = _sweep(lay, configs, q, k, v, do, pairs, B * H, d)
        res["layouts"][kind] = entry
    return res


def _ours(attention, lay, cfg, q, k, v):
    return attention(q, k, v, lay, config=cfg)


def _flex():
    """(layout, n) -> (compiled flex_attention closure, its BlockMask), mask_mod = the rule."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    compiled = torch.compile(flex_attention)

    def make(lay, n):
        mask_mod = lambda b, h, q_idx, kv_idx: lay.allowed(q_idx, kv_idx)
        mask = create_block_mask(mask_mod, B=None, H=None, Q_LEN=n, KV_LEN=n, device="cuda")
        return (lambda q, k, v: compiled(q, k, v, block_mask=mask)), mask

    return make


def _sweep(lay, configs, q, k, v, do, pairs, bh, d) -> list[dict]:
    from dalle_ar.kernels.attention import attention

    rows = []
    for cfg in configs:
        fn = functools.partial(_ours, attention, lay, cfg)
        try:
            rates = _rates(_time_training(fn, q, k, v, do), pairs, bh, d)
        except Exception as e:  # a setting that does not fit (shared memory) is reported
            rates = {"error": f"{type(e).__name__}: {e}"[:200]}
        f, b = cfg.fwd, cfg.bwd
        fwd = [f.block_m, f.block_n, f.num_warps, f.num_stages]
        rows.append({"fwd": fwd, "bwd": [b.block_m, b.block_n, b.num_warps, b.num_stages], **rates})
    return rows


def _sweep_configs(d: int) -> list:
    from dalle_ar.kernels.launch import AttentionConfig, BlockConfig

    fwd = [(128, 64, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 8, 2), (64, 32, 4, 3)]
    bwd = [(64, 64, 4, 2), (64, 64, 8, 2), (64, 32, 8, 2), (32, 64, 4, 2), (32, 32, 4, 2)]
    if d >= 128:
        fwd, bwd = fwd[1:], bwd[1:]
    return [AttentionConfig(BlockConfig(*f), BlockConfig(*b)) for f, b in zip(fwd, bwd)]


def _decode(args: argparse.Namespace) -> list[dict]:
    import torch.nn.functional as F
    from dalle_ar.kernels.blocks import decode_tables
    from dalle_ar.kernels.decode import decode_attention
    from dalle_ar.kernels.layouts import Layout

    text_len, gh, gw = SHAPES["paper"]
    n = text_len + gh * gw
    dtype, d, H = DTYPES[args.dtype], args.head_dim, args.heads
    elt = torch.finfo(dtype).bits // 8
    rows = []
    for B in args.decode_batches:
        g = torch.Generator(device="cuda").manual_seed(B)
        q = torch.randn(B, H, 1, d, device="cuda", dtype=dtype, generator=g)
        kc, vc = (torch.randn(B, H, n, d, device="cuda", dtype=dtype, generator=g) for _ in "kv")
        lengths = torch.full((B,), n, device="cuda", dtype=torch.long)  # full cache
        dense_ms = _bench(functools.partial(F.scaled_dot_product_attention, q, kc, vc))
        dense_bytes = 2 * B * H * n * d * elt
        for kind in KINDS:
            lay = Layout(kind, text_len, gh, gw, args.conv_kernel)
            keys = int(decode_tables(lay, n, "cuda").count[n - 1])  # keys the last query reads
            step = functools.partial(decode_attention, q, kc, vc, lengths, lay)
            ms = _bench(step)
            want = F.scaled_dot_product_attention(
                q, kc, vc, attn_mask=lay.mask_row(torch.tensor([n - 1], device="cuda"), n)
            )
            err = (step().float() - want.float()).abs().max()
            nbytes = 2 * B * H * keys * d * elt
            rows.append(
                dict(
                    layout=kind,
                    batch=B,
                    heads=H,
                    cache_len=n,
                    keys_read=keys,
                    us=ms * 1e3,
                    gbps=nbytes / (ms * 1e-3) / 1e9,
                    sdpa_dense_us=dense_ms * 1e3,
                    sdpa_dense_gbps=dense_bytes / (dense_ms * 1e-3) / 1e9,
                    max_err_vs_sdpa=err.item(),
                )
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if not torch.cuda.is_available():
        print("bench_attention: needs a CUDA GPU (none found); nothing written", file=sys.stderr)
        return 2
    if args.batch * args.heads < 64:
        print(
            f"bench_attention: need batch * heads >= 64, got {args.batch * args.heads}",
            file=sys.stderr,
        )
        return 2
    import triton

    configs = _sweep_configs(args.head_dim) if args.sweep else None
    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "dtype": args.dtype,
        "conv_kernel": args.conv_kernel,
        "training": {name: _training(args, name, configs) for name in args.shapes},
        "decode": _decode(args),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    for name, shape in result["training"].items():
        s = shape["sdpa_causal"]
        print(
            f"{name} N={shape['n']}: sdpa causal fwd+bwd {s['fwdbwd_ms']:.3f} ms "
            f"({s['fwdbwd_tflops']:.1f} TFLOP/s)"
        )
        for kind, e in shape["layouts"].items():
            t = e["triton"]
            line = (
                f"  {kind:5s} triton TFLOP/s fwd {t['fwd_tflops']:6.1f} bwd {t['bwd_tflops']:6.1f}"
                f" fwd+bwd {t['fwdbwd_ms']:.3f} ms ({t['fwdbwd_tflops']:.1f} TFLOP/s)"
            )
            if "flex" in e:
                line += f" | flex fwd+bwd {e['flex']['fwdbwd_ms']:.3f} ms"
            print(line)
    for r in result["decode"]:
        print(
            f"decode {r['layout']:5s} B={r['batch']:4d}: {r['us']:8.1f} us "
            f"{r['gbps']:7.1f} GB/s (sdpa dense {r['sdpa_dense_us']:.1f} us)"
        )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
