"""Fused block-sparse attention, forward and backward, for the DALL-E layouts.

Flash-attention style (Dao 2023, FlashAttention-2): the forward keeps a running max and sum per
query (online softmax) and saves only the log-sum-exp; the backward recomputes the probabilities
block by block, one kernel for dK/dV (per key block, over the query blocks that see it) and one
for dQ (per query block, over the key blocks it sees), after delta = rowsum(dO * O). No N x N
matrix is ever held in memory.

Which blocks are visited comes from `blocks.block_sparsity` (derived from `Layout.allowed`):
fully visible blocks run without any element mask, partially visible ones apply their
precomputed mask tile, fully masked ones are never loaded. Rows are read and written through
the kernel order (identity, or column-major image positions for `col`, see blocks.py).
Scores are kept in log2 units (scale * log2(e) folded in) so the kernels use exp2.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .blocks import BlockSparsity, block_sparsity
from .launch import (
    AttentionConfig,
    check_layout,
    check_lens,
    check_qkv,
    default_attention_config,
    strides,
)
from .layouts import Layout, check_chunk


@triton.jit
def _rows(ORDER, offs, ok, PERMUTED: tl.constexpr):
    # Original position of each kernel-order position (see blocks.kernel_order). One return
    # statement per helper: Triton types every return of a function alike, taken or not.
    rows = offs
    if PERMUTED:
        rows = tl.load(ORDER + offs, mask=ok, other=0)
    return rows


@triton.jit
def _load_rows(PTR, rows, ok, stride, offs_d, MASKED: tl.constexpr):
    # (len(rows), HEAD_DIM) tile of rows `rows`; a block inside the sequence needs no bounds mask.
    ptrs = PTR + rows[:, None] * stride + offs_d[None, :]
    if MASKED:
        tile = tl.load(ptrs, mask=ok[:, None], other=0.0)
    else:
        tile = tl.load(ptrs)
    return tile


@triton.jit
def _tile(TILE_BITS, tile_id, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
          TRANSPOSED: tl.constexpr):  # fmt: skip
    # One int64 word per query row, bit j = key j (blocks.py); int32 offsets suffice.
    bits = tl.load(TILE_BITS + tile_id * BLOCK_M + tl.arange(0, BLOCK_M))  # (BM,)
    offs_j = tl.arange(0, BLOCK_N).to(tl.int64)
    if TRANSPOSED:  # (BLOCK_N, BLOCK_M) for the dK/dV kernel
        allowed = ((bits[None, :] >> offs_j[:, None]) & 1) != 0
    else:
        allowed = ((bits[:, None] >> offs_j[None, :]) & 1) != 0
    return allowed


@triton.jit
def _fwd_step(acc, l_i, m_i, q, K, V, ORDER, TILE_BITS, tile_id, kb, N, T, tlen, qk_scale,
              stride_kn, stride_vn, offs_d,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PARTIAL: tl.constexpr,
              PERMUTED: tl.constexpr, HAS_PAD: tl.constexpr, DOT_PREC: tl.constexpr):  # fmt: skip
    offs_n = kb * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    rows_n = _rows(ORDER, offs_n, n_ok, PERMUTED)
    k = _load_rows(K, rows_n, n_ok, stride_kn, offs_d, PARTIAL)
    v = _load_rows(V, rows_n, n_ok, stride_vn, offs_d, PARTIAL)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale  # (BM, BN)
    if PARTIAL:
        s = tl.where(_tile(TILE_BITS, tile_id, BLOCK_M, BLOCK_N, False), s, float("-inf"))
    if HAS_PAD:  # text keys are in place in kernel order, so offs_n < T means a text key
        key_ok = (offs_n >= T) | (offs_n < tlen)
        s = tl.where(key_ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw nothing yet
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return acc, l_i, m_new


@triton.jit
def _fwd_kernel(Q, K, V, Out, LSE, ORDER, TEXT_LENS, FULL_PTR, FULL_IDX, PART_PTR, PART_IDX,
                TILE_BITS,
                stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
                H, N, T, qk_scale,
                HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                PERMUTED: tl.constexpr, HAS_PAD: tl.constexpr, DOT_PREC: tl.constexpr):  # fmt: skip
    # Later query blocks see more keys: launch them first, so the short ones fill the tail.
    mb = tl.num_programs(0) - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    Out += b * stride_ob + h * stride_oh
    offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    m_ok = offs_m < N
    rows_m = _rows(ORDER, offs_m, m_ok, PERMUTED)
    q = _load_rows(Q, rows_m, m_ok, stride_qn, offs_d, True)
    tlen = tl.load(TEXT_LENS + b) if HAS_PAD else 0
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)
    for t in range(tl.load(FULL_PTR + mb), tl.load(FULL_PTR + mb + 1)):
        kb = tl.load(FULL_IDX + t)
        acc, l_i, m_i = _fwd_step(acc, l_i, m_i, q, K, V, ORDER, TILE_BITS, t, kb, N, T, tlen,
                                  qk_scale, stride_kn, stride_vn, offs_d, BLOCK_M, BLOCK_N,
                                  False, PERMUTED, HAS_PAD, DOT_PREC)  # fmt: skip
    for t in range(tl.load(PART_PTR + mb), tl.load(PART_PTR + mb + 1)):
        kb = tl.load(PART_IDX + t)
        acc, l_i, m_i = _fwd_step(acc, l_i, m_i, q, K, V, ORDER, TILE_BITS, t, kb, N, T, tlen,
                                  qk_scale, stride_kn, stride_vn, offs_d, BLOCK_M, BLOCK_N,
                                  True, PERMUTED, HAS_PAD, DOT_PREC)  # fmt: skip
    # A row that sees no key (only possible with text_lens == 0) gives 0 and lse = +inf, so the
    # backward's exp2(s - lse) is 0 there instead of NaN.
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    o = acc / l_safe[:, None]
    tl.store(Out + rows_m[:, None] * stride_on + offs_d[None, :], o.to(Out.dtype.element_ty),
             mask=m_ok[:, None])  # fmt: skip
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(l_safe))
    tl.store(LSE + bh * N + rows_m, lse, mask=m_ok)


@triton.jit
def _bwd_delta_kernel(Out, DO, DELTA, stride_ob, stride_oh, stride_on,
                      stride_db, stride_dh, stride_dn, H, N,
                      HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):  # fmt: skip
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    ok = offs_m < N
    o = _load_rows(Out + b * stride_ob + h * stride_oh, offs_m, ok, stride_on, offs_d, True)
    do = _load_rows(DO + b * stride_db + h * stride_dh, offs_m, ok, stride_dn, offs_d, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh * N + offs_m, delta, mask=ok)


@triton.jit
def _dkdv_step(dk, dv, k, v, key_ok, Q, DO, LSE, DELTA, ORDER, TILE_BITS, tile_id, qb, N, qk_scale,
               stride_qn, stride_dn, offs_d,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PARTIAL: tl.constexpr,
               PERMUTED: tl.constexpr, HAS_PAD: tl.constexpr, DOT_PREC: tl.constexpr):  # fmt: skip
    offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < N
    rows_m = _rows(ORDER, offs_m, m_ok, PERMUTED)
    q = _load_rows(Q, rows_m, m_ok, stride_qn, offs_d, PARTIAL)
    do = _load_rows(DO, rows_m, m_ok, stride_dn, offs_d, PARTIAL)
    if PARTIAL:
        lse = tl.load(LSE + rows_m, mask=m_ok, other=float("inf"))
        delta = tl.load(DELTA + rows_m, mask=m_ok, other=0.0)
    else:
        lse = tl.load(LSE + rows_m)
        delta = tl.load(DELTA + rows_m)
    s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale  # (BN, BM)
    p_t = tl.math.exp2(s_t - lse[None, :])
    if PARTIAL:
        p_t = tl.where(_tile(TILE_BITS, tile_id, BLOCK_M, BLOCK_N, True), p_t, 0.0)
    if HAS_PAD:
        p_t = tl.where(key_ok[:, None], p_t, 0.0)
    dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PREC)
    dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)  # (BN, BM)
    ds_t = p_t * (dp_t - delta[None, :])
    dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PREC)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA, ORDER, TEXT_LENS,
                     T_FULL_PTR, T_FULL_IDX, T_PART_PTR, T_PART_IDX, T_PART_TILE, TILE_BITS,
                     stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                     stride_vb, stride_vh, stride_vn, stride_db, stride_dh, stride_dn,
                     stride_gb, stride_gh, stride_gn,
                     H, N, T, sm_scale, qk_scale,
                     HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     PERMUTED: tl.constexpr, HAS_PAD: tl.constexpr,
                     DOT_PREC: tl.constexpr):  # fmt: skip
    kb = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    Q += b * stride_qb + h * stride_qh
    DO += b * stride_db + h * stride_dh
    LSE += bh * N
    DELTA += bh * N
    offs_n = kb * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    n_ok = offs_n < N
    rows_n = _rows(ORDER, offs_n, n_ok, PERMUTED)
    k = _load_rows(K + b * stride_kb + h * stride_kh, rows_n, n_ok, stride_kn, offs_d, True)
    v = _load_rows(V + b * stride_vb + h * stride_vh, rows_n, n_ok, stride_vn, offs_d, True)
    key_ok = n_ok
    if HAS_PAD:
        tlen = tl.load(TEXT_LENS + b)
        key_ok = (offs_n >= T) | (offs_n < tlen)
    dk = tl.zeros((BLOCK_N, HEAD_DIM), tl.float32)
    dv = tl.zeros((BLOCK_N, HEAD_DIM), tl.float32)
    for t in range(tl.load(T_FULL_PTR + kb), tl.load(T_FULL_PTR + kb + 1)):
        qb = tl.load(T_FULL_IDX + t)
        dk, dv = _dkdv_step(dk, dv, k, v, key_ok, Q, DO, LSE, DELTA, ORDER, TILE_BITS, 0, qb, N,
                            qk_scale, stride_qn, stride_dn, offs_d, BLOCK_M, BLOCK_N, False,
                            PERMUTED, HAS_PAD, DOT_PREC)  # fmt: skip
    for t in range(tl.load(T_PART_PTR + kb), tl.load(T_PART_PTR + kb + 1)):
        qb = tl.load(T_PART_IDX + t)
        tile_id = tl.load(T_PART_TILE + t)
        dk, dv = _dkdv_step(dk, dv, k, v, key_ok, Q, DO, LSE, DELTA, ORDER, TILE_BITS, tile_id, qb,
                            N, qk_scale, stride_qn, stride_dn, offs_d, BLOCK_M, BLOCK_N, True,
                            PERMUTED, HAS_PAD, DOT_PREC)  # fmt: skip
    g_offs = b * stride_gb + h * stride_gh + rows_n[:, None] * stride_gn + offs_d[None, :]
    tl.store(DK + g_offs, (dk * sm_scale).to(DK.dtype.element_ty), mask=n_ok[:, None])
    tl.store(DV + g_offs, dv.to(DV.dtype.element_ty), mask=n_ok[:, None])


@triton.jit
def _dq_step(dq, q, do, lse, delta, K, V, ORDER, TILE_BITS, tile_id, kb, N, T, tlen, qk_scale,
             stride_kn, stride_vn, offs_d,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PARTIAL: tl.constexpr,
             PERMUTED: tl.constexpr, HAS_PAD: tl.constexpr, DOT_PREC: tl.constexpr):  # fmt: skip
    offs_n = kb * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    rows_n = _rows(ORDER, offs_n, n_ok, PERMUTED)
    k = _load_rows(K, rows_n, n_ok, stride_kn, offs_d, PARTIAL)
    v = _load_rows(V, rows_n, n_ok, stride_vn, offs_d, PARTIAL)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale  # (BM, BN)
    p = tl.math.exp2(s - lse[:, None])
    if PARTIAL:
        p = tl.where(_tile(TILE_BITS, tile_id, BLOCK_M, BLOCK_N, False), p, 0.0)
    if HAS_PAD:
        key_ok = (offs_n >= T) | (offs_n < tlen)
        p = tl.where(key_ok[None, :], p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)  # (BM, BN)
    ds = p * (dp - delta[:, None])
    dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
    return dq


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, DQ, LSE, DELTA, ORDER, TEXT_LENS,
                   FULL_PTR, FULL_IDX, PART_PTR, PART_IDX, TILE_BITS,
                   stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                   stride_vb, stride_vh, stride_vn, stride_db, stride_dh, stride_dn,
                   stride_gb, stride_gh, stride_gn,
                   H, N, T, sm_scale, qk_scale,
                   HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   PERMUTED: tl.constexpr, HAS_PAD: tl.constexpr,
                   DOT_PREC: tl.constexpr):  # fmt: skip
    mb = tl.num_programs(0) - 1 - tl.program_id(0)  # longest first, as in the forward
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    m_ok = offs_m < N
    rows_m = _rows(ORDER, offs_m, m_ok, PERMUTED)
    q = _load_rows(Q + b * stride_qb + h * stride_qh, rows_m, m_ok, stride_qn, offs_d, True)
    do = _load_rows(DO + b * stride_db + h * stride_dh, rows_m, m_ok, stride_dn, offs_d, True)
    lse = tl.load(LSE + bh * N + rows_m, mask=m_ok, other=float("inf"))
    delta = tl.load(DELTA + bh * N + rows_m, mask=m_ok, other=0.0)
    tlen = tl.load(TEXT_LENS + b) if HAS_PAD else 0
    dq = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)
    for t in range(tl.load(FULL_PTR + mb), tl.load(FULL_PTR + mb + 1)):
        kb = tl.load(FULL_IDX + t)
        dq = _dq_step(dq, q, do, lse, delta, K, V, ORDER, TILE_BITS, t, kb, N, T, tlen, qk_scale,
                      stride_kn, stride_vn, offs_d, BLOCK_M, BLOCK_N, False, PERMUTED, HAS_PAD,
                      DOT_PREC)  # fmt: skip
    for t in range(tl.load(PART_PTR + mb), tl.load(PART_PTR + mb + 1)):
        kb = tl.load(PART_IDX + t)
        dq = _dq_step(dq, q, do, lse, delta, K, V, ORDER, TILE_BITS, t, kb, N, T, tlen, qk_scale,
                      stride_kn, stride_vn, offs_d, BLOCK_M, BLOCK_N, True, PERMUTED, HAS_PAD,
                      DOT_PREC)  # fmt: skip
    tl.store(DQ + b * stride_gb + h * stride_gh + rows_m[:, None] * stride_gn + offs_d[None, :],
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=m_ok[:, None])  # fmt: skip


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, layout, text_lens, scale, config):
        B, H, N, D = q.shape
        cfg = config.fwd
        bs = block_sparsity(layout, N, cfg.block_m, cfg.block_n, q.device)
        # indexed by batch in the kernels: materialise an expanded (stride 0) tensor
        lens = bs.order if text_lens is None else text_lens.to(torch.int32).contiguous()
        o = torch.empty((B, H, N, D), dtype=q.dtype, device=q.device)
        lse = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
        prec = "ieee" if q.dtype == torch.float32 else "tf32"
        _fwd_kernel[(bs.n_query_blocks, B * H)](
            q, k, v, o, lse, bs.order, lens, bs.full_ptr, bs.full_idx, bs.part_ptr,
            bs.part_idx, bs.tile_bits, *strides(q), *strides(k), *strides(v), *strides(o),
            H, N, layout.text_len, scale * math.log2(math.e),
            HEAD_DIM=D, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, PERMUTED=bs.permuted,
            HAS_PAD=text_lens is not None, DOT_PREC=prec,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip
        ctx.save_for_backward(q, k, v, o, lse, lens)
        ctx.layout, ctx.scale, ctx.config = layout, scale, config
        ctx.has_pad, ctx.prec = text_lens is not None, prec
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, lens = ctx.saved_tensors
        B, H, N, D = q.shape
        cfg = ctx.config.bwd
        bs: BlockSparsity = block_sparsity(ctx.layout, N, cfg.block_m, cfg.block_n, q.device)
        if do.stride(-1) != 1:
            do = do.contiguous()
        delta = torch.empty_like(lse)
        _bwd_delta_kernel[(triton.cdiv(N, cfg.block_m), B * H)](
            o, do, delta, *strides(o), *strides(do), H, N, HEAD_DIM=D, BLOCK_M=cfg.block_m
        )
        qk_scale = ctx.scale * math.log2(math.e)
        dk = torch.empty((B, H, N, D), dtype=k.dtype, device=k.device)
        dv = torch.empty_like(dk)
        common = dict(
            HEAD_DIM=D, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, PERMUTED=bs.permuted,
            HAS_PAD=ctx.has_pad, DOT_PREC=ctx.prec, num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )  # fmt: skip
        _bwd_dkdv_kernel[(bs.n_key_blocks, B * H)](
            q, k, v, do, dk, dv, lse, delta, bs.order, lens, bs.t_full_ptr, bs.t_full_idx,
            bs.t_part_ptr, bs.t_part_idx, bs.t_part_tile, bs.tile_bits, *strides(q), *strides(k),
            *strides(v), *strides(do), *strides(dk), H, N, ctx.layout.text_len, ctx.scale,
            qk_scale, **common,
        )  # fmt: skip
        dq = None
        if ctx.needs_input_grad[0]:
            dq = torch.empty((B, H, N, D), dtype=q.dtype, device=q.device)
            _bwd_dq_kernel[(bs.n_query_blocks, B * H)](
                q, k, v, do, dq, lse, delta, bs.order, lens, bs.full_ptr, bs.full_idx,
                bs.part_ptr, bs.part_idx, bs.tile_bits, *strides(q), *strides(k), *strides(v),
                *strides(do), *strides(dq), H, N, ctx.layout.text_len, ctx.scale, qk_scale,
                **common,
            )  # fmt: skip
        return dq, dk, dv, None, None, None, None


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: Layout,
    text_lens: torch.Tensor | None = None,
    scale: float | None = None,
    config: AttentionConfig | None = None,
    q_start: int = 0,
) -> torch.Tensor:
    """Block-sparse attention of positions 0..N-1 over keys 0..N-1 under `layout`.

    q, k, v: (B, H, N, D), fp16 / bf16 / fp32, D in {16, 32, 64, 128}, any N; any strides with a
    unit last stride. text_lens: (B,) valid text length per sample (key padding), or None.
    Returns (B, H, N, D) in the inputs' dtype; differentiable in q, k, v. CUDA tensors, or CPU
    tensors when TRITON_INTERPRET=1.

    q_start > 0: a chunk after a cached prefix, q (B, H, N - q_start, D) at positions
    q_start..N-1 against k, v (B, H, N, D); returns (B, H, N - q_start, D). The kernels run the
    full N rows with zero queries for the prefix, whose query blocks see only the prefix's keys
    (the layouts keep text causal), and the prefix rows are dropped.
    """
    check_layout(layout)
    check_qkv(q, k, v, ("q", "k", "v"))
    check_chunk(q_start, q.shape[2], k.shape[2])
    if q_start:
        pad = q.new_zeros(q.shape[0], q.shape[1], q_start, q.shape[3])
        return attention(torch.cat([pad, q], 2), k, v, layout, text_lens, scale, config)[
            :, :, q_start:
        ]
    check_qkv(q, k, v, ("q", "k", "v"))
    if k.shape[2] != q.shape[2]:
        raise ValueError(f"q and k must have the same length N, got {q.shape[2]} and {k.shape[2]}")
    check_lens(text_lens, q.shape[0], q.device, "text_lens")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if config is None:
        config = default_attention_config(q.shape[-1], q.dtype, layout.kind)
    return _Attention.apply(q, k, v, layout, text_lens, scale, config)
