"""Benchmark the Triton attention kernels against PyTorch, all in one run, and write JSON.

    python tools/bench_attention.py [--sweep] --out tools/results/h100/attention_h100.json

For each layout at the paper shape (256 text + 32x32 image = 1280 positions) and the small shape
(64 + 16x16 = 320), head dim 64, bf16: forward, backward and forward+backward wall time and
TFLOP/s of the project's kernels, of torch.nn.attention.flex_attention (compiled, block mask from
the same rule through create_block_mask) and of scaled_dot_product_attention (dense causal, its
fastest backend). FLOPs count only the visible (query, key) pairs of each method's own mask:
4 * D per pair forward, 2.5 times that backward (five matmuls, one of them recomputing the
scores). Times are GPU time, from CUDA graphs replaying ten calls (the host's launch overhead,
which dominates at the small shape, left out); `eager_fwdbwd_ms` / `eager_us` are the same work
launched from Python, as an eager training step sees it. SDPA is timed under each of its GPU
backends and the fastest kept. Then the decode step: microseconds per step and achieved memory
bandwidth (bytes of the keys and values it must read) for B in {1, 16, 128} at full cache length,
beside SDPA over the whole cache, and as a fraction of this card's device-to-device copy
bandwidth, measured in the same run. `targets` says which of the performance targets the run
met; with --sweep, `targets_best_of_sweep` does the same with each layout's fastest launch
settings. A method that fails is recorded with its error and the run goes on. GPU only: without
CUDA it exits with status 2 and writes nothing.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import traceback
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


def _bench(fn, grads=None, setup=None) -> float:
    """Median milliseconds of eager fn() (triton.testing.do_bench: warm-up, L2 flush per call),
    launch overhead included. With setup, fn(setup()) and setup runs once, untimed."""
    import triton.testing

    if setup is not None:
        fn = functools.partial(fn, setup())
    return float(triton.testing.do_bench(fn, grad_to_none=grads, return_mode="median"))


def _bench_graph(fn, grads=None, setup=None, inner: int = 10, reps: int = 25) -> float:
    """Median milliseconds of fn() replayed from a CUDA graph of `inner` calls: the GPU's time,
    without the host's launch overhead (which dominates at the small shape), and unlike
    `_bench` without an L2 flush between calls (the small shape's inputs stay in L2). Grads are
    reset before each captured call, so every backward writes fresh gradients. setup() (untimed)
    runs on the capture stream, as autograd replays a backward on its forward's stream."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        if setup is not None:
            fn = functools.partial(fn, setup())
        for _ in range(3):  # compiles, caches and the allocator's pools, outside the capture
            _reset(grads)
            fn()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side):
            for _ in range(inner):
                _reset(grads)
                fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / inner)
    del graph
    return float(statistics.median(times))


def _reset(grads) -> None:
    for t in grads or ():
        t.grad = None


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _guarded(label: str, fn, *args) -> dict:
    """fn(*args), or {"error": ...} when it raises: one failing method must not lose the run."""
    _log(f"[bench] {label}")
    try:
        return fn(*args)
    except Exception as e:  # recorded in the JSON, and the traceback on stderr
        traceback.print_exc()
        return {"error": _error_text(e)}


def _error_text(e: Exception) -> str:
    """An exception as one short line for the JSON."""
    return f"{type(e).__name__}: {e}"[:300]


def copy_bandwidth_gbps(nbytes: int = 2 << 30) -> float:
    """Device-to-device copy of nbytes, counting bytes read plus bytes written (GB/s)."""
    src = torch.empty(nbytes // 2, dtype=torch.float16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = _bench(lambda: dst.copy_(src))
    return 2 * nbytes / (ms * 1e-3) / 1e9


def _sdpa_backends():
    """(name, backend) for each SDPA GPU backend this PyTorch has."""
    from torch.nn.attention import SDPBackend

    names = ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION")
    return [(n.lower(), getattr(SDPBackend, n)) for n in names if hasattr(SDPBackend, n)]


def _sdpa_causal(q, k, v, do, pairs: int, bh: int, d: int) -> dict:
    """Dense causal SDPA timed under each backend; the fastest fwd+bwd is the baseline."""
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel

    def under(backend):
        def fn(q, k, v):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)

        return _rates(_time_training(fn, q, k, v, do), pairs, bh, d)

    per = {name: _guarded(f"sdpa {name}", under, b) for name, b in _sdpa_backends()}
    ok = {name: r for name, r in per.items() if "error" not in r}
    if not ok:
        return {"error": "no SDPA backend ran", "backends": per}
    best = min(ok, key=lambda name: ok[name]["fwdbwd_ms"])
    return dict(ok[best], backend=best, backends=per)


def _time_training(fn, q, k, v, do, eager: bool = True) -> dict:
    """Forward, backward and forward+backward milliseconds of o = fn(q, k, v), from CUDA graphs;
    with eager, also forward+backward launched from Python as a training step would be. If a
    method cannot be captured, all three are timed eagerly and `graph_error` says why."""
    grads = [q, k, v]
    fwd = lambda: fn(q, k, v)
    bwd = lambda o: o.backward(do, retain_graph=True)
    both = lambda: fn(q, k, v).backward(do)
    times = lambda bench: {
        "fwd_ms": bench(fwd),
        "bwd_ms": bench(bwd, grads, setup=fwd),
        "fwdbwd_ms": bench(both, grads),
    }
    try:
        out = dict(times(_bench_graph), timing="cuda_graph")
    except Exception as e:  # timed eagerly instead, and said so
        traceback.print_exc()
        out = dict(times(_bench), timing="eager", graph_error=_error_text(e))
    if eager:
        out["eager_fwdbwd_ms"] = _bench(both, grads)
    return out


def _rates(times: dict, pairs: int, bh: int, d: int) -> dict:
    fwd_flops = 4.0 * d * pairs * bh
    out = dict(times, visible_pairs=pairs)
    for key, flops in (("fwd", fwd_flops), ("bwd", 2.5 * fwd_flops), ("fwdbwd", 3.5 * fwd_flops)):
        out[f"{key}_tflops"] = flops / (times[f"{key}_ms"] * 1e-3) / 1e12
    return out


def _inputs(args: argparse.Namespace, n: int) -> tuple[torch.Tensor, ...]:
    """q, k, v (requiring grad) and dO, (batch, heads, n, head_dim) on the GPU, seeded."""
    g = torch.Generator(device="cuda").manual_seed(0)
    shape = (args.batch, args.heads, n, args.head_dim)
    dtype = DTYPES[args.dtype]
    q, k, v, do = (torch.randn(shape, device="cuda", dtype=dtype, generator=g) for _ in range(4))
    return (*(t.requires_grad_() for t in (q, k, v)), do)


def _training(args: argparse.Namespace, name: str) -> dict:
    import torch.nn.functional as F
    from dalle_ar.kernels.attention import attention
    from dalle_ar.kernels.blocks import block_sparsity
    from dalle_ar.kernels.launch import default_attention_config
    from dalle_ar.kernels.layouts import Layout

    text_len, gh, gw = SHAPES[name]
    dtype, d = DTYPES[args.dtype], args.head_dim
    B, H = args.batch, args.heads
    n = text_len + gh * gw
    q, k, v, do = _inputs(args, n)
    sdpa = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    causal_pairs = n * (n + 1) // 2
    res = {"n": n, "batch": B, "heads": H, "head_dim": d, "layouts": {}}
    res["sdpa_causal"] = _sdpa_causal(q, k, v, do, causal_pairs, B * H, d)
    flex = None if args.no_flex else _flex()
    for kind in KINDS:
        lay = Layout(kind, text_len, gh, gw, args.conv_kernel)
        cfg = default_attention_config(d, dtype, kind)
        pairs = int(lay.dense_mask().sum())
        ours = functools.partial(_ours, attention, lay, cfg)
        entry = {"triton": _guarded(f"{name} {kind} triton", _measure_ours, ours, q, k, v, do,
                                    pairs, B * H, d)}  # fmt: skip
        entry["triton"]["config"] = _config_lists(cfg)
        bs = block_sparsity(lay, n, cfg.fwd.block_m, cfg.fwd.block_n)
        total = bs.n_query_blocks * bs.n_key_blocks
        entry["triton"]["fwd_blocks_visited"] = bs.visited_pairs() / total
        if kind == "full":
            entry["triton"]["max_err_vs_sdpa"] = _guarded("check vs sdpa", _max_err, ours, sdpa,
                                                          q, k, v)  # fmt: skip
        if flex is not None:
            entry["flex"] = _guarded(f"{name} {kind} flex", _measure_flex, flex, lay, n, q, k, v,
                                     do, pairs, B * H, d)  # fmt: skip
            fn = entry["flex"].pop("fn", None)
            if fn is not None:
                entry["triton"]["max_err_vs_flex"] = _guarded("check vs flex", _max_err, ours, fn,
                                                              q, k, v)  # fmt: skip
        res["layouts"][kind] = entry
    _ratios(res)
    return res


def _ratios(shape: dict) -> None:
    """Each layout's fwd+bwd speedups over SDPA causal and FlexAttention, and its wall time over
    our own full (causal) layout, where both sides were measured."""
    own_full = shape["layouts"]["full"]["triton"]
    for entry in shape["layouts"].values():
        ours = entry["triton"]
        _speedup(entry, "speedup_fwdbwd_vs_sdpa_causal", shape["sdpa_causal"], ours)
        _speedup(entry, "speedup_fwdbwd_vs_flex", entry.get("flex", {}), ours)
        if "fwdbwd_ms" in own_full and "fwdbwd_ms" in ours:
            entry["wall_vs_own_full"] = ours["fwdbwd_ms"] / own_full["fwdbwd_ms"]


def _measure_ours(fn, q, k, v, do, pairs: int, bh: int, d: int) -> dict:
    return _rates(_time_training(fn, q, k, v, do), pairs, bh, d)


def _measure_flex(flex, lay, n, q, k, v, do, pairs: int, bh: int, d: int) -> dict:
    fn, mask = flex(lay, n)
    out = _rates(_time_training(fn, q, k, v, do), pairs, bh, d)
    return dict(out, blocks_visited=1.0 - mask.sparsity() / 100.0, fn=fn)


def _max_err(fn, other, q, k, v) -> float:
    with torch.no_grad():
        return (fn(q, k, v).float() - other(q, k, v).float()).abs().max().item()


def _speedup(entry: dict, key: str, base: dict, ours: dict) -> None:
    """entry[key] = base fwd+bwd time / ours, when both were measured."""
    if "fwdbwd_ms" in base and "fwdbwd_ms" in ours:
        entry[key] = base["fwdbwd_ms"] / ours["fwdbwd_ms"]


def _ours(attention, lay, cfg, q, k, v):
    return attention(q, k, v, lay, config=cfg)


def _flex():
    """(layout, n) -> (compiled flex_attention closure, its BlockMask), mask_mod = the rule."""
    import torch._dynamo
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    # every (shape, mask, grad mode) compiles anew; past the default limit of 8, flex_attention
    # silently falls back to its unfused eager path, which would time something else
    for knob in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 64)
    # the backward-only timing calls backward(retain_graph=True), which donated buffers forbid
    import torch._functorch.config

    torch._functorch.config.donated_buffer = False
    compiled = torch.compile(flex_attention)

    def make(lay, n):
        mask_mod = lambda b, h, q_idx, kv_idx: lay.allowed(q_idx, kv_idx)
        mask = create_block_mask(mask_mod, B=None, H=None, Q_LEN=n, KV_LEN=n, device="cuda")
        return (lambda q, k, v: compiled(q, k, v, block_mask=mask)), mask

    return make


def _sweeps(args: argparse.Namespace) -> dict:
    """Per shape and layout, the launch settings of `_sweep_configs` timed side by side."""
    from dalle_ar.kernels.layouts import Layout

    configs = _sweep_configs(args.head_dim)
    out = {}
    for name in args.shapes:
        text_len, gh, gw = SHAPES[name]
        n = text_len + gh * gw
        q, k, v, do = _inputs(args, n)
        for kind in KINDS:
            lay = Layout(kind, text_len, gh, gw, args.conv_kernel)
            pairs = int(lay.dense_mask().sum())
            _log(f"[bench] sweep {name} {kind}")
            bh = args.batch * args.heads
            out[f"{name}/{kind}"] = _sweep(lay, configs, q, k, v, do, pairs, bh, args.head_dim)
    return out


def _sweep(lay, configs, q, k, v, do, pairs, bh, d) -> list[dict]:
    from dalle_ar.kernels.attention import attention

    rows = []
    for cfg in configs:
        fn = functools.partial(_ours, attention, lay, cfg)
        try:
            rates = _rates(_time_training(fn, q, k, v, do, eager=False), pairs, bh, d)
        except Exception as e:  # a setting that does not fit (shared memory) is reported
            rates = {"error": _error_text(e)}
        rows.append({**_config_lists(cfg), **rates})
    return rows


def _config_lists(cfg) -> dict:
    """{"fwd": [block_m, block_n, num_warps, num_stages], "bwd": [...]} of an AttentionConfig."""
    as_list = lambda c: [c.block_m, c.block_n, c.num_warps, c.num_stages]
    return {"fwd": as_list(cfg.fwd), "bwd": as_list(cfg.bwd)}


def best_of_sweep(result: dict) -> dict:
    """A copy of result["training"] where each layout's Triton figures are its fastest sweep row
    (fwd+bwd), with the ratios recomputed: what per-layout settings from the sweep would give."""
    training = json.loads(json.dumps(result["training"]))
    for name, shape in training.items():
        for kind, entry in shape["layouts"].items():
            rows = [r for r in result["sweep"].get(f"{name}/{kind}", []) if "fwdbwd_ms" in r]
            if rows:
                entry["triton"] = min(rows, key=lambda r: r["fwdbwd_ms"])
        _ratios(shape)
    return training


def _sweep_configs(d: int) -> list:
    from dalle_ar.kernels.launch import AttentionConfig, BlockConfig

    pairs = [
        ((128, 64, 4, 3), (64, 64, 4, 2)),  # the fp16/bf16 default
        ((128, 32, 4, 3), (32, 64, 4, 2)),
        ((128, 64, 8, 3), (64, 64, 4, 2)),
        ((128, 32, 8, 2), (32, 64, 4, 2)),
        ((64, 64, 4, 3), (64, 32, 4, 2)),
        ((128, 64, 4, 3), (32, 64, 4, 2)),
        ((128, 32, 4, 3), (64, 64, 4, 2)),  # col's default
    ]
    if d >= 128:
        pairs = [((128, 32, 8, 2), (64, 16, 8, 2)), ((64, 32, 8, 2), (32, 32, 8, 2))]
    return [AttentionConfig(BlockConfig(*f), BlockConfig(*b)) for f, b in pairs]


def _decode(args: argparse.Namespace, copy_gbps: float | None) -> list[dict]:
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
        dense_ms = _bench_graph(functools.partial(F.scaled_dot_product_attention, q, kc, vc))
        dense_bytes = 2 * B * H * n * d * elt
        for kind in KINDS:
            lay = Layout(kind, text_len, gh, gw, args.conv_kernel)
            keys = int(decode_tables(lay, n, "cuda").count[n - 1])  # keys the last query reads
            step = functools.partial(decode_attention, q, kc, vc, lengths, lay)
            row = dict(layout=kind, batch=B, heads=H, cache_len=n, keys_read=keys)
            row |= _guarded(f"decode {kind} B={B}", _measure_decode, step, lay, q, kc, vc)
            if "ms" in row:
                gbps = 2 * B * H * keys * d * elt / (row.pop("ms") * 1e-3) / 1e9
                row["gbps"] = gbps
                if copy_gbps:
                    row["fraction_of_copy_bw"] = gbps / copy_gbps
            row["sdpa_dense_us"] = dense_ms * 1e3
            row["sdpa_dense_gbps"] = dense_bytes / (dense_ms * 1e-3) / 1e9
            rows.append(row)
    return rows


def _measure_decode(step, lay, q, kc, vc) -> dict:
    import torch.nn.functional as F

    n = kc.shape[2]
    ms = _bench_graph(step)
    eager_us = _bench(step) * 1e3
    mask = lay.mask_row(torch.tensor([n - 1], device="cuda"), n)
    want = F.scaled_dot_product_attention(q.float(), kc.float(), vc.float(), attn_mask=mask)
    err = (step().float() - want).abs().max().item()
    return {"ms": ms, "us": ms * 1e3, "eager_us": eager_us, "max_err_vs_fp32": err}


def targets(result: dict) -> dict:
    """The issue's performance targets, each with the measured figure and whether it is met
    (None when a figure is missing)."""
    out = {}

    def put(name, value, bar, higher_is_better=True):
        met = None if value is None else (value >= bar if higher_is_better else value <= bar)
        out[name] = {"value": value, "bar": bar, "met": met}

    for shape, res in result["training"].items():
        lays = res["layouts"]
        put(f"{shape}: full fwd+bwd speedup vs SDPA causal",
            lays["full"].get("speedup_fwdbwd_vs_sdpa_causal"), 1.0)  # fmt: skip
        for kind in ("row", "conv"):
            put(f"{shape}: {kind} wall time / own full", lays[kind].get("wall_vs_own_full"), 0.5,
                higher_is_better=False)  # fmt: skip
        for kind in ("row", "col", "conv"):
            put(f"{shape}: {kind} fwd+bwd speedup vs flex",
                lays[kind].get("speedup_fwdbwd_vs_flex"), 1.2)  # fmt: skip
    for r in result["decode"]:
        if r["batch"] == 128 and r["layout"] == "full":
            put("decode full B=128: fraction of copy bandwidth", r.get("fraction_of_copy_bw"), 0.6)
    return out


def _fmt(x, spec: str) -> str:
    return format(x, spec) if isinstance(x, float) else "n/a"


def _summary(result: dict) -> None:
    for name, shape in result["training"].items():
        s = shape["sdpa_causal"]
        print(
            f"{name} N={shape['n']}: sdpa causal ({s.get('backend', 'n/a')}) fwd+bwd "
            f"{_fmt(s.get('fwdbwd_ms'), '.3f')} ms ({_fmt(s.get('fwdbwd_tflops'), '.1f')} TFLOP/s)"
        )
        for kind, e in shape["layouts"].items():
            t, f = e["triton"], e.get("flex", {})
            tf = [_fmt(t.get(f"{x}_tflops"), "6.1f") for x in ("fwd", "bwd")]
            ms = _fmt(t.get("fwdbwd_ms"), ".3f")
            line = f"  {kind:5s} triton TFLOP/s fwd {tf[0]} bwd {tf[1]} fwd+bwd {ms} ms"
            line += f" (eager {_fmt(t.get('eager_fwdbwd_ms'), '.3f')})"
            line += f" | flex fwd+bwd {_fmt(f.get('fwdbwd_ms'), '.3f')} ms"
            print(line + (f"  ERROR {t['error']}" if "error" in t else ""))
    for r in result["decode"]:
        print(
            f"decode {r['layout']:5s} B={r['batch']:4d}: {_fmt(r.get('us'), '8.1f')} us "
            f"{_fmt(r.get('gbps'), '7.1f')} GB/s (eager {_fmt(r.get('eager_us'), '.1f')} us; "
            f"sdpa dense {r['sdpa_dense_us']:.1f} us)"
        )
    _print_targets(result["targets"], "target")


def _print_targets(targets: dict, label: str) -> None:
    for name, t in targets.items():
        print(f"{label} {name}: {_fmt(t['value'], '.3f')} (bar {t['bar']}) met={t['met']}")


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

    copy_gbps = copy_bandwidth_gbps()
    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "dtype": args.dtype,
        "conv_kernel": args.conv_kernel,
        "copy_gbps": copy_gbps,
        "training": {name: _training(args, name) for name in args.shapes},
        "decode": _decode(args, copy_gbps),
    }
    result["targets"] = targets(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    _summary(result)
    print(f"wrote {args.out}")
    if args.sweep:  # after the main figures are safe on disk
        result["sweep"] = _sweeps(args)
        best = {"training": best_of_sweep(result), "decode": result["decode"]}
        result["targets_best_of_sweep"] = targets(best)
        args.out.write_text(json.dumps(result, indent=2))
        _sweep_summary(result["sweep"])
        _print_targets(result["targets_best_of_sweep"], "best-of-sweep target")
        print(f"wrote {args.out} (with the sweep)")
    return 0


def _sweep_summary(sweep: dict) -> None:
    for key, rows in sweep.items():
        timed = [r for r in rows if "fwdbwd_ms" in r]
        if timed:
            best = min(timed, key=lambda r: r["fwdbwd_ms"])
            first = f"{rows[0].get('fwdbwd_ms', float('nan')):.3f}"
            print(f"sweep {key}: fastest fwd {best['fwd']} bwd {best['bwd']} "
                  f"{best['fwdbwd_ms']:.3f} ms (first setting {first} ms)")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
