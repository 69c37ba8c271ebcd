"""The Triton attention kernels against the fp32 PyTorch reference.

Without CUDA the kernels run in Triton's interpreter on CPU tensors (tiny shapes); the variable
must be set before the kernel modules are decorated, so it is set here, before their import.
With CUDA the same small tests run compiled on the GPU, and the `gpu` tests add full sizes.
Tolerance (STYLE.md): the kernel's error against the fp32 reference is at most twice the error of
PyTorch computing the same thing in the kernel's dtype.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

CUDA = torch.cuda.is_available()
# Triton decides interpreter or compiler when a function is decorated, its own library included:
# if another test module imported triton first, this process cannot interpret, and the file
# reruns itself in a fresh process instead (test_in_a_fresh_interpreter).
LATE = not CUDA and "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
if not CUDA and not LATE:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from dalle_ar.kernels.attention import attention  # noqa: E402
from dalle_ar.kernels.blocks import classify_blocks  # noqa: E402
from dalle_ar.kernels.decode import decode_attention  # noqa: E402
from dalle_ar.kernels.launch import AttentionConfig, BlockConfig, DecodeConfig  # noqa: E402
from dalle_ar.kernels.layouts import CAUSAL_KINDS, LAYOUT_KINDS, Layout  # noqa: E402
from dalle_ar.kernels.reference import attention_reference, decode_reference  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"
RUNS_HERE = CUDA or os.environ.get("TRITON_INTERPRET") == "1"


@pytest.fixture(autouse=True)
def _kernels_run_here(request: pytest.FixtureRequest) -> None:
    if not RUNS_HERE and request.node.originalname != "test_in_a_fresh_interpreter":
        pytest.skip("no CUDA and no Triton interpreter in this process")


needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")

# Small blocks so that tiny sequences already have full, partial and skipped blocks; forward
# and backward differ in shape so the transposed tile reads of the dK/dV kernel are exercised.
SMALL = AttentionConfig(BlockConfig(32, 16, 4, 2), BlockConfig(16, 32, 4, 2))

# fp32 has no lower-precision PyTorch run to compare with (it is the reference itself), so a
# floor stands in: the kernel sums in another order and uses exp2, each step O(1e-7) relative;
# over a few hundred terms of magnitude <= ~10 (scores, gradients) that stays below 1e-5 times
# the magnitude of the result (_assert_close scales it).
FP32_FLOOR = 1e-5


def _inputs(lay: Layout, b: int, h: int, d: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shape = (b, h, lay.seq_len, d)
    q, k, v, do = (torch.randn(shape, generator=g).to(DEVICE, dtype) for _ in range(4))
    return q, k, v, do


def _fwd_bwd(fn, q, k, v, do, **kw):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    o = fn(q, k, v, **kw)
    o.backward(do)
    return [o.detach(), q.grad, k.grad, v.grad]


def _errors(lay, q, k, v, do, text_lens, config=SMALL):
    """(kernel error, PyTorch-in-dtype error) for o, dq, dk, dv, both against fp32."""
    ref = _fwd_bwd(attention_reference, q.float(), k.float(), v.float(), do.float(), layout=lay,
                   text_lens=text_lens)  # fmt: skip
    low = _fwd_bwd(attention_reference, q, k, v, do, layout=lay, text_lens=text_lens,
                   upcast=False)  # fmt: skip
    got = _fwd_bwd(attention, q, k, v, do, layout=lay, text_lens=text_lens, config=config)
    err = [(g.float() - r).abs().max().item() for g, r in zip(got, ref)]
    base = [(w.float() - r).abs().max().item() for w, r in zip(low, ref)]
    scale = [r.abs().max().item() for r in ref]
    return err, base, scale


def _assert_close(err, base, scale, dtype, factor=None):
    """fp32's floor is relative: its rounding grows with the magnitude of what is summed (at
    N = 1280 some dV entries sum over a thousand rows). `factor`: per gradient, another bound
    than 2x PyTorch's error in the dtype, where a test says why."""
    for name, e, b, s in zip(("o", "dq", "dk", "dv"), err, base, scale):
        floor = FP32_FLOOR * max(1.0, s) if dtype == torch.float32 else 0.0
        f = (factor or {}).get(name, 2)
        assert e <= f * b + floor, f"{name}: kernel error {e:.3g} > {f} x {b:.3g} + {floor:.3g}"


def _text_lens(b: int, text_len: int) -> torch.Tensor:
    return (torch.arange(b) % text_len + 1).to(DEVICE)  # 1, 2, ... valid text tokens


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("pad", [False, True])
@pytest.mark.parametrize("kind", LAYOUT_KINDS)
def test_forward_backward_odd_length(kind: str, pad: bool, dtype: torch.dtype) -> None:
    lay = Layout(kind, text_len=4, grid_h=5, grid_w=5, conv_kernel=3)  # N = 29
    q, k, v, do = _inputs(lay, 2, 2, 16, dtype)
    err, base, scale = _errors(lay, q, k, v, do, _text_lens(2, 4) if pad else None)
    # bidir: every image query's dS row spans all keys, and dS is rounded to the dtype before the
    # dQ product (as FlashAttention-2 does); in fp16 that measured 2.3x PyTorch's error on dQ
    factor = {"dq": 3} if kind == "bidir" and dtype == torch.float16 else None
    _assert_close(err, base, scale, dtype, factor)


@pytest.mark.parametrize(
    ("kind", "d", "conv_kernel"), [("full", 32, 3), ("col", 64, 3), ("conv", 128, 5)]
)
def test_head_dims_with_sparsity(kind: str, d: int, conv_kernel: int) -> None:
    lay = Layout(kind, text_len=6, grid_h=7, grid_w=6, conv_kernel=conv_kernel)  # N = 48
    q, k, v, do = _inputs(lay, 1, 2, d, torch.float16, seed=d)
    err, base, scale = _errors(lay, q, k, v, do, _text_lens(1, 6) + 2)
    _assert_close(err, base, scale, torch.float16)


@pytest.mark.parametrize("kind", LAYOUT_KINDS)
def test_block_sparse_grid(kind: str) -> None:
    # 16 text + 8 x 8 image: every layout has full, partial and skipped blocks at these sizes
    lay = Layout(kind, text_len=16, grid_h=8, grid_w=8, conv_kernel=3)
    cfg = AttentionConfig(BlockConfig(16, 16, 4, 2), BlockConfig(16, 16, 4, 2))
    full, part, _ = classify_blocks(lay, lay.seq_len, 16, 16)
    assert full.any() and part.any() and (~full & ~part).any()
    q, k, v, do = _inputs(lay, 2, 1, 16, torch.float32, seed=7)
    err, base, scale = _errors(lay, q, k, v, do, _text_lens(2, 16) + 3, config=cfg)
    _assert_close(err, base, scale, torch.float32)


def test_strided_inputs_and_default_config() -> None:
    # (B, N, H, D) projections viewed as (B, H, N, D): no copy needed
    lay = Layout("row", text_len=4, grid_h=5, grid_w=5)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, lay.seq_len, 2, 16, generator=g).transpose(1, 2) for _ in range(3))
    assert not q.is_contiguous()
    q, k, v = q.to(DEVICE), k.to(DEVICE), v.to(DEVICE)
    got = attention(q, k, v, lay)
    ref = attention_reference(q, k, v, lay)
    assert (got - ref).abs().max().item() <= FP32_FLOOR


def test_row_without_visible_text_gives_zero_not_nan() -> None:
    lay = Layout("full", text_len=4, grid_h=3, grid_w=3)
    q, k, v, do = _inputs(lay, 2, 1, 16, torch.float32)
    lens = torch.tensor([0, 4], device=DEVICE)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    o = attention(q, k, v, lay, lens, config=SMALL)
    o.backward(do)
    assert o[0, :, :4].abs().max().item() == 0.0  # text queries of an empty caption see nothing
    assert all(torch.isfinite(t).all() for t in (o, q.grad, k.grad, v.grad))
    ref = attention_reference(q, k, v, lay, lens)
    assert (o[:, :, 4:] - ref[:, :, 4:]).abs().max().item() <= FP32_FLOOR


@pytest.mark.parametrize("kind", CAUSAL_KINDS)
@pytest.mark.parametrize("num_splits", [None, 1, 3])
def test_decode_equals_rows_of_full_attention(kind: str, num_splits: int | None) -> None:
    lay = Layout(kind, text_len=4, grid_h=5, grid_w=5, conv_kernel=3)
    q, k, v, _ = _inputs(lay, 3, 2, 32, torch.float16, seed=3)
    lengths = torch.tensor([lay.seq_len, 5, 17], device=DEVICE)
    lens = torch.tensor([4, 2, 3], device=DEVICE)
    full = attention_reference(q.float(), k.float(), v.float(), lay, lens)  # (B, H, N, D)
    q_now = torch.stack([q[b, :, int(n) - 1] for b, n in enumerate(lengths)])[:, :, None]
    want = torch.stack([full[b, :, int(n) - 1] for b, n in enumerate(lengths)])[:, :, None]
    got = decode_attention(q_now, k, v, lengths, lay, lens, config=DecodeConfig(16, num_splits))
    low = decode_reference(q_now, k, v, lengths, lay, lens, upcast=False)
    err = (got.float() - want).abs().max().item()
    base = (low.float() - want).abs().max().item()
    assert err <= 2 * base, f"decode error {err:.3g} > 2 x {base:.3g}"


@pytest.mark.parametrize("kind", ["full", "conv"])
def test_decode_fp32_shared_length(kind: str) -> None:
    # the transformer passes one position for the whole batch as an expanded (stride 0) tensor
    lay = Layout(kind, text_len=3, grid_h=4, grid_w=6, conv_kernel=3)
    q, k, v, _ = _inputs(lay, 3, 1, 16, torch.float32, seed=4)
    lengths = torch.tensor([20], device=DEVICE).expand(3)
    text_lens = torch.tensor([2], dtype=torch.int32, device=DEVICE).expand(3)
    q_now = q[:, :, :1]
    got = decode_attention(q_now, k, v, lengths, lay, text_lens)
    want = decode_reference(q_now, k, v, lengths, lay, text_lens)
    assert (got - want).abs().max().item() <= FP32_FLOOR
    got = attention(q, k, v, lay, text_lens, config=SMALL)
    want = attention_reference(q, k, v, lay, text_lens)
    assert (got - want).abs().max().item() <= FP32_FLOOR


def test_bad_inputs_raise() -> None:
    lay = Layout("row", text_len=4, grid_h=5, grid_w=5)
    q, k, v, _ = _inputs(lay, 1, 1, 16, torch.float32)
    with pytest.raises(ValueError, match="shape"):
        attention(q[0], k, v, lay)
    with pytest.raises(ValueError, match="dtype"):
        attention(q, k.half(), v, lay)
    with pytest.raises(ValueError, match="head dim"):
        attention(q[..., :8], k[..., :8], v[..., :8], lay)
    with pytest.raises(ValueError, match="last dim"):
        attention(q.transpose(2, 3), k, v, lay)
    with pytest.raises(ValueError, match="same length"):
        attention(q, k[:, :, :-1], v[:, :, :-1], lay)
    with pytest.raises(ValueError, match="text_lens"):
        attention(q, k, v, lay, torch.ones(2, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match="one query"):
        decode_attention(q, k, v, torch.ones(1, dtype=torch.long, device=DEVICE), lay)
    with pytest.raises(ValueError, match="block_m"):
        BlockConfig(24, 16, 4, 2)


@pytest.mark.skipif(CUDA, reason="CPU-only check of the device rule")
def test_cpu_tensors_need_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    lay = Layout("full", text_len=2, grid_h=2, grid_w=2)
    q, k, v, _ = _inputs(lay, 1, 1, 16, torch.float32)
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # read at call time
    with pytest.raises(ValueError, match="CUDA"):
        attention(q, k, v, lay)


@pytest.mark.skipif(not LATE, reason="only when triton was imported before this module")
def test_in_a_fresh_interpreter() -> None:
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:]


# ---- full size, GPU only -------------------------------------------------------------------

PAPER = dict(text_len=256, grid_h=32, grid_w=32, conv_kernel=11)  # N = 1280


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("kind", LAYOUT_KINDS)
@pytest.mark.parametrize("pad", [False, True])
@pytest.mark.gpu
@needs_cuda
def test_gpu_paper_shape(kind: str, dtype: torch.dtype, pad: bool) -> None:
    lay = Layout(kind, **PAPER)
    q, k, v, do = _inputs(lay, 2, 4, 64, dtype, seed=5)
    lens = torch.tensor([256, 37], device=DEVICE) if pad else None
    err, base, scale = _errors(lay, q, k, v, do, lens, config=None)
    _assert_close(err, base, scale, dtype)


@pytest.mark.parametrize("d", [16, 32, 128])
@pytest.mark.gpu
@needs_cuda
def test_gpu_head_dims_small_shape(d: int) -> None:
    lay = Layout("conv", text_len=64, grid_h=16, grid_w=16, conv_kernel=5)  # N = 320
    q, k, v, do = _inputs(lay, 2, 4, d, torch.bfloat16, seed=d)
    err, base, scale = _errors(lay, q, k, v, do, _text_lens(2, 64), config=None)
    _assert_close(err, base, scale, torch.bfloat16)


@pytest.mark.parametrize("kind", CAUSAL_KINDS)
@pytest.mark.parametrize("batch", [1, 16])
@pytest.mark.gpu
@needs_cuda
def test_gpu_decode_paper_shape(kind: str, batch: int) -> None:
    lay = Layout(kind, **PAPER)
    q, k, v, _ = _inputs(lay, batch, 4, 64, torch.bfloat16, seed=6)
    lengths = torch.randint(1, lay.seq_len + 1, (batch,), device=DEVICE)
    lengths[0] = lay.seq_len
    lens = torch.randint(1, 257, (batch,), device=DEVICE)
    q_now = q[:, :, :1]
    want = decode_reference(q_now.float(), k.float(), v.float(), lengths, lay, lens)
    low = decode_reference(q_now, k, v, lengths, lay, lens, upcast=False)
    got = decode_attention(q_now, k, v, lengths, lay, lens)
    err = (got.float() - want).abs().max().item()
    base = (low.float() - want).abs().max().item()
    assert err <= 2 * base, f"decode error {err:.3g} > 2 x {base:.3g}"


@pytest.mark.parametrize("kind", LAYOUT_KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_a_chunk_after_a_cached_prefix_equals_those_rows_of_full_attention(
    kind: str, dtype: torch.dtype
) -> None:
    # the masked sampler's pass: image queries only, against the prefix's cached keys and theirs
    lay = Layout(kind, text_len=5, grid_h=4, grid_w=4, conv_kernel=3)
    q, k, v, _ = _inputs(lay, 2, 2, 16, dtype, seed=5)
    lens = torch.tensor([5, 2], device=DEVICE)
    T = lay.text_len
    want = attention_reference(q.float(), k.float(), v.float(), lay, lens)[:, :, T:]
    got = attention(q[:, :, T:], k, v, lay, lens, config=SMALL, q_start=T)
    assert got.shape == (2, 2, lay.seq_len - T, 16)
    low = attention_reference(q[:, :, T:], k, v, lay, lens, upcast=False, q_start=T)
    err, base = (got.float() - want).abs().max().item(), (low.float() - want).abs().max().item()
    _assert_close([err], [base], [want.abs().max().item()], dtype)
    with pytest.raises(ValueError, match="needs 16 queries"):
        attention(q[:, :, T + 1 :], k, v, lay, lens, q_start=T)
