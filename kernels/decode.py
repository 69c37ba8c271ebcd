"""One decode step: a single new query per sequence against a static KV cache.

The query of sequence b sits at position lengths[b] - 1 and reads only the cache entries its
layout allows, listed per position by `blocks.decode_tables` (derived from `Layout.allowed`):
for col that is T + h keys instead of every earlier one; a layout that sees all earlier keys
reads them directly. Decoding is bound by reading the cache, and with few (batch, head) pairs
there are too few programs to use the GPU's memory bandwidth, so the key list is split across
programs (flash-decoding, Dao et al. 2023): each split writes its normalised partial output and
log-sum-exp, and a second kernel merges them. The grid depends only on shapes, never on the
lengths' values, so the step needs no host sync and can be captured in a CUDA graph.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .blocks import decode_tables
from .launch import (
    DecodeConfig,
    check_layout,
    check_lens,
    check_qkv,
    decode_splits,
    default_decode_config,
)
from .layouts import Layout


@triton.jit
def _decode_split_kernel(Q, K, V, Out, O_PART, LSE_PART, LENGTHS, TEXT_LENS, KEYS, COUNT,
                         stride_qb, stride_qh, stride_kb, stride_kh, stride_kn,
                         stride_vb, stride_vh, stride_vn, stride_ob, stride_oh,
                         H, N_MAX, WIDTH, BLOCKS_PER_SPLIT, T, qk_scale,
                         HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, INDEXED: tl.constexpr,
                         HAS_PAD: tl.constexpr, FINAL: tl.constexpr):  # fmt: skip
    split = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    # lengths must lie in [1, N_MAX]; clamping keeps a bad value from reading out of bounds
    pos = tl.minimum(tl.maximum(tl.load(LENGTHS + b).to(tl.int32), 1), N_MAX) - 1
    if INDEXED:
        count = tl.load(COUNT + pos)
    else:
        count = pos + 1
    offs_d = tl.arange(0, HEAD_DIM)
    offs_j = tl.arange(0, BLOCK_N)
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_d).to(tl.float32)
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    tlen = tl.load(TEXT_LENS + b) if HAS_PAD else 0
    # 0-d fp32 tensors, so the loop-carried types match after the first update
    m_i = tl.max(tl.full((BLOCK_N,), float("-inf"), tl.float32), 0)
    l_i = tl.sum(tl.zeros((BLOCK_N,), tl.float32), 0)
    acc = tl.zeros((HEAD_DIM,), tl.float32)
    lo = split * BLOCKS_PER_SPLIT
    hi = tl.minimum(lo + BLOCKS_PER_SPLIT, tl.cdiv(count, BLOCK_N))
    for blk in range(lo, hi):
        offs = blk * BLOCK_N + offs_j
        ok = offs < count
        keys = offs
        if INDEXED:
            keys = tl.load(KEYS + pos.to(tl.int64) * WIDTH + offs, mask=ok, other=0)
        allowed = ok
        if HAS_PAD:
            allowed = allowed & ((keys >= T) | (keys < tlen))
        k = tl.load(K + keys[:, None] * stride_kn + offs_d[None, :], mask=ok[:, None], other=0.0)
        s = tl.sum(q[None, :] * k.to(tl.float32), 1) * qk_scale  # (BLOCK_N,), log2 units
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe)
        alpha = tl.math.exp2(m_i - m_safe)
        v = tl.load(V + keys[:, None] * stride_vn + offs_d[None, :], mask=ok[:, None], other=0.0)
        l_i = l_i * alpha + tl.sum(p, 0)
        acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), 0)
        m_i = m_new
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    if FINAL:  # a single split: write the output directly
        o = acc / l_safe
        tl.store(Out + b * stride_ob + h * stride_oh + offs_d, o.to(Out.dtype.element_ty))
    else:
        n_bh = tl.num_programs(1)
        tl.store(O_PART + (split * n_bh + bh).to(tl.int64) * HEAD_DIM + offs_d, acc / l_safe)
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.math.log2(l_safe))
        tl.store(LSE_PART + split * n_bh + bh, lse)


@triton.jit
def _decode_merge_kernel(Out, O_PART, LSE_PART, stride_ob, stride_oh, H, NUM_SPLITS,
                         HEAD_DIM: tl.constexpr, SPLITS_P2: tl.constexpr):  # fmt: skip
    bh = tl.program_id(0)
    n_bh = tl.num_programs(0)
    offs_s = tl.arange(0, SPLITS_P2)
    offs_d = tl.arange(0, HEAD_DIM)
    ok = offs_s < NUM_SPLITS
    lse = tl.load(LSE_PART + offs_s * n_bh + bh, mask=ok, other=float("-inf"))
    m = tl.max(lse, 0)
    w = tl.math.exp2(lse - tl.where(m == float("-inf"), 0.0, m))  # empty splits weigh 0
    parts = tl.load(O_PART + (offs_s[:, None] * n_bh + bh).to(tl.int64) * HEAD_DIM
                    + offs_d[None, :], mask=ok[:, None], other=0.0)  # fmt: skip
    den = tl.sum(w, 0)
    o = tl.sum(w[:, None] * parts, 0) / tl.where(den == 0.0, 1.0, den)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    tl.store(Out + b * stride_ob + h * stride_oh + offs_d, o.to(Out.dtype.element_ty))


class _DecodeAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k_cache, v_cache, lengths, layout, text_lens, scale, config):
        B, H, _, D = q.shape
        n_max = k_cache.shape[2]
        tables = decode_tables(layout, n_max, q.device)
        n_blocks = triton.cdiv(tables.width, config.block_n)
        splits = decode_splits(config, B * H, n_blocks, q.device)
        per_split = triton.cdiv(n_blocks, splits)
        o = torch.empty((B, H, 1, D), dtype=q.dtype, device=q.device)
        final = splits == 1
        o_part = torch.empty((splits, B * H, D) if not final else (1,), device=q.device)
        lse_part = torch.empty((splits, B * H) if not final else (1,), device=q.device)
        # the kernel indexes these by batch: an expanded (stride 0) tensor must be materialised
        lengths = lengths.contiguous()
        lens = lengths if text_lens is None else text_lens.contiguous()
        _decode_split_kernel[(splits, B * H)](
            q, k_cache, v_cache, o, o_part, lse_part, lengths, lens, tables.keys, tables.count,
            q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), o.stride(0), o.stride(1),
            H, n_max, tables.width, per_split, layout.text_len, scale * math.log2(math.e),
            HEAD_DIM=D, BLOCK_N=config.block_n, INDEXED=not tables.contiguous,
            HAS_PAD=text_lens is not None, FINAL=final, num_warps=config.num_warps,
            num_stages=config.num_stages,
        )  # fmt: skip
        if not final:
            p2 = triton.next_power_of_2(splits)
            _decode_merge_kernel[(B * H,)](
                o, o_part, lse_part, o.stride(0), o.stride(1), H, splits, HEAD_DIM=D, SPLITS_P2=p2
            )
        ctx.mark_non_differentiable(o)
        return o

    @staticmethod
    def backward(ctx, do):
        raise RuntimeError("decode_attention has no backward; train with attention()")


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    lengths: torch.Tensor,
    layout: Layout,
    text_lens: torch.Tensor | None = None,
    scale: float | None = None,
    config: DecodeConfig | None = None,
) -> torch.Tensor:
    """Attention of one query per sequence, q (B, H, 1, D) at position lengths[b] - 1, over the
    first lengths[b] entries of a static cache k_cache, v_cache (B, H, N_max, D).

    lengths: (B,) integers in [1, N_max]; text_lens: (B,) valid text lengths or None.
    Returns (B, H, 1, D) in q's dtype. CUDA tensors, or CPU tensors when TRITON_INTERPRET=1.
    """
    check_layout(layout)
    check_qkv(q, k_cache, v_cache, ("q", "k_cache", "v_cache"))
    if q.shape[2] != 1:
        raise ValueError(f"q must hold one query per sequence (B, H, 1, D), got {tuple(q.shape)}")
    check_lens(lengths, q.shape[0], q.device, "lengths")
    check_lens(text_lens, q.shape[0], q.device, "text_lens")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    config = default_decode_config(q.shape[-1]) if config is None else config
    return _DecodeAttention.apply(q, k_cache, v_cache, lengths, layout, text_lens, scale, config)
