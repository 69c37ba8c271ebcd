"""The kernels compile for an H100 (sm_90) without one: Triton's full pipeline down to a cubin runs
on the CPU. This catches what the interpreter lets through (e.g. type rules of the compiler) and
checks the default launch settings: no register spills, shared memory within the SM's limit.

The interpreter tests in the same session set TRITON_INTERPRET=1 before the kernels are
decorated, so the compilation runs in a fresh interpreter with the variable removed.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

SM90_SMEM = 232448  # bytes of shared memory one block may use on an H100
DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}
# (dtype, head dim): the paper's setting, the largest head dim, fp32 (about 10 s each, cold)
CASES = [("bf16", 64), ("fp16", 128), ("fp32", 64)]


def _compile(dtype: str, head_dim: int) -> list[dict]:
    """Compile every kernel of one (dtype, head dim) with its default settings; resources each."""
    import torch
    import triton
    from dalle_ar.kernels import attention as att
    from dalle_ar.kernels import decode as dec
    from dalle_ar.kernels.launch import default_attention_config, default_decode_config
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    tool = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
    dt = getattr(torch, DTYPES[dtype])
    dcfg = default_decode_config(head_dim)
    el = "*" + dtype
    ptr = {"ORDER": "*i32", "TILE_BITS": "*i64", "LSE": "*fp32", "DELTA": "*fp32"}
    ptr |= {n: "*i32" for n in ("FULL_PTR", "FULL_IDX", "PART_PTR", "PART_IDX", "T_PART_TILE")}
    ptr |= {n: "*i32" for n in ("T_FULL_PTR", "T_FULL_IDX", "T_PART_PTR", "T_PART_IDX")}
    ptr |= {"O_PART": "*fp32", "LSE_PART": "*fp32", "KEYS": "*i32", "COUNT": "*i32"}
    ptr |= {"LENGTHS": "*i64", "TEXT_LENS": "*i32"}
    prec = "ieee" if dtype == "fp32" else "tf32"
    jobs, delta_blocks = [], set()
    # col reads rows through its permutation; the other layouts share the unpermuted kernels
    for kind, permuted in (("full", False), ("col", True)):
        cfg = default_attention_config(head_dim, dt, kind)
        delta_blocks.add(cfg.bwd.block_m)
        for pad in (False, True):
            flags = dict(PERMUTED=permuted, HAS_PAD=pad, DOT_PREC=prec, HEAD_DIM=head_dim)
            fwd = dict(flags, BLOCK_M=cfg.fwd.block_m, BLOCK_N=cfg.fwd.block_n)
            bwd = dict(flags, BLOCK_M=cfg.bwd.block_m, BLOCK_N=cfg.bwd.block_n)
            jobs += [(att._fwd_kernel, fwd, cfg.fwd), (att._bwd_dkdv_kernel, bwd, cfg.bwd)]
            jobs += [(att._bwd_dq_kernel, bwd, cfg.bwd)]
    for block_m in sorted(delta_blocks):
        jobs.append((att._bwd_delta_kernel, dict(HEAD_DIM=head_dim, BLOCK_M=block_m), None))
    for indexed, final in [(False, True), (True, False)]:
        consts = dict(HEAD_DIM=head_dim, BLOCK_N=dcfg.block_n, INDEXED=indexed, HAS_PAD=True,
                      FINAL=final)  # fmt: skip
        jobs.append((dec._decode_split_kernel, consts, dcfg))
    jobs.append((dec._decode_merge_kernel, dict(HEAD_DIM=head_dim, SPLITS_P2=8), None))
    out = []
    for fn, consts, launch in jobs:
        sig = {}
        for name in fn.arg_names:
            if name in consts:
                sig[name] = "constexpr"
            elif name in ptr:
                sig[name] = ptr[name]
            elif name in ("Q", "K", "V", "Out", "DO", "DK", "DV", "DQ"):
                sig[name] = el
            else:
                sig[name] = "fp32" if "scale" in name else "i32"
        opts = {"num_warps": launch.num_warps, "num_stages": launch.num_stages} if launch else {}
        kernel = triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32),
                                options=opts)  # fmt: skip
        path = f"/tmp/dalle_ar_{os.getpid()}.cubin"
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        res = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True)
        os.remove(path)
        m = re.search(r"REG:(\d+) STACK:(\d+)", res.stdout)
        out.append(
            dict(kernel=fn.__name__, consts={k: str(v) for k, v in consts.items()},
                 regs=int(m.group(1)), stack=int(m.group(2)), smem=kernel.metadata.shared)
        )  # fmt: skip
    return out


def _have_toolchain() -> bool:
    try:
        import triton
        from triton.backends.compiler import GPUTarget  # noqa: F401
    except Exception:
        return False
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin")
    return all(os.path.exists(os.path.join(bin_dir, t)) for t in ("ptxas", "cuobjdump"))


@pytest.fixture(scope="module")
def report() -> dict[str, list[dict]]:
    """All cases compiled in one fresh interpreter (one torch import)."""
    if not _have_toolchain():
        pytest.skip("Triton's NVIDIA toolchain is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, __file__], env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(("dtype", "head_dim"), CASES)
def test_kernels_compile_for_sm90_without_spills(
    report: dict[str, list[dict]], dtype: str, head_dim: int
) -> None:
    kernels = report[f"{dtype}-{head_dim}"]
    # fwd, dkdv and dq, each (un)permuted x (un)padded; delta; the decode split (two) and merge
    variants = {
        (r["kernel"], r["consts"].get("PERMUTED"), r["consts"].get("HAS_PAD")) for r in kernels
    }
    for name in ("_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel"):
        assert {v[1:] for v in variants if v[0] == name} == {
            (p, h) for p in ("False", "True") for h in ("False", "True")
        }
    assert sum(r["kernel"].startswith("_decode") for r in kernels) == 3
    for r in kernels:
        assert r["stack"] == 0, f"register spill: {r}"
        assert r["smem"] <= SM90_SMEM, f"too much shared memory: {r}"


if __name__ == "__main__":
    print(json.dumps({f"{dt}-{d}": _compile(dt, d) for dt, d in CASES}))
