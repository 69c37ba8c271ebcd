"""Plain PyTorch attention with the layout masks: the test oracle and the CPU path.

Shapes: q, k, v (B, H, N, D). Masks come from `Layout` (the one rule) and `key_padding`.
Computed in fp32 when `upcast` is set (the oracle), otherwise in the inputs' dtype.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from .blocks import pack_allowed
from .layouts import Layout, check_chunk, key_padding


def _padded(mask: torch.Tensor, layout: Layout, text_lens: torch.Tensor | None) -> torch.Tensor:
    """A (1 | B, 1, Nq, Nk) layout mask with the per-sample key padding applied: (B, 1, Nq, Nk)."""
    pad = key_padding(text_lens, layout.text_len, mask.shape[-1])
    return mask if pad is None else mask & pad[:, None, None, :]


def _attend(q, k, v, mask, scale, upcast):  # (B, H, Nq, D), (B, H, Nk, D) -> (B, H, Nq, D)
    dtype = q.dtype
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    scores = (q @ k.transpose(-1, -2)) * scale  # (B, H, Nq, Nk)
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return (probs @ v).to(dtype)


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: Layout,
    text_lens: torch.Tensor | None = None,
    scale: float | None = None,
    upcast: bool = True,
    q_start: int = 0,
) -> torch.Tensor:
    """Attention of positions q_start..q_start+Nq-1 over keys 0..Nk-1 under `layout`: q (B, H, Nq,
    D), k, v (B, H, Nk, D). q_start 0 and Nq == Nk: training / prefill; q_start > 0: a chunk of
    queries after a cached prefix (`Transformer.forward_image`)."""
    check_chunk(q_start, q.shape[2], k.shape[2])
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    pos = torch.arange(q_start, q_start + q.shape[2], device=q.device)
    rows = layout.mask_row(pos, k.shape[2])  # (Nq, Nk)
    mask = _padded(rows[None, None], layout, text_lens)
    return _attend(q, k, v, mask, scale, upcast)


@functools.lru_cache(maxsize=64)
def _layout_rows(layout: Layout, start: int, n_q: int, n_k: int, device: str) -> torch.Tensor:
    """The layout's mask rows (n_q, n_k) for queries start..start+n_q-1, built once."""
    return layout.mask_row(torch.arange(start, start + n_q, device=device), n_k)


def attention_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: Layout,
    text_lens: torch.Tensor | None = None,
    q_start: int = 0,
) -> torch.Tensor:
    """`attention_reference(..., upcast=False)` through PyTorch's fused
    scaled_dot_product_attention, with the layout mask built once per (layout, shape, device):
    the fast CPU path (the reference rebuilds the mask and materialises the scores every call).
    A chunk (q_start > 0) computes only its own query rows."""
    check_chunk(q_start, q.shape[2], k.shape[2])
    rows = _layout_rows(layout, q_start, q.shape[2], k.shape[2], str(q.device))
    mask = _padded(rows[None, None], layout, text_lens)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def decode_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    lengths: torch.Tensor,
    layout: Layout,
    text_lens: torch.Tensor | None = None,
    scale: float | None = None,
    upcast: bool = True,
) -> torch.Tensor:
    """One query per sequence, q (B, H, 1, D), at position lengths[b]-1, against a static cache
    (B, H, N_max, D) of which the first lengths[b] entries are filled."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    n_max = k_cache.shape[2]
    keys = torch.arange(n_max, device=q.device)
    q_pos = (lengths - 1).to(keys.device)  # (B,)
    mask = layout.allowed(q_pos[:, None], keys[None, :])  # (B, N_max)
    mask = (mask & (keys[None, :] < lengths[:, None]))[:, None, None, :]  # (B, 1, 1, N_max)
    return _attend(q, k_cache, v_cache, _padded(mask, layout, text_lens), scale, upcast)


@functools.lru_cache(maxsize=64)
def _decode_keys(layout: Layout, n_keys: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query position p < n_keys: the keys the layout lets it see and which entries are real
    (`blocks.pack_allowed`). (n_keys, K) each; K is T + a row for `row`, all n_keys for `full`."""
    keys, real = pack_allowed(layout.mask_row(torch.arange(n_keys), n_keys))
    return keys.to(device), real.to(device)


def decode_sdpa(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    lengths: torch.Tensor,
    layout: Layout,
    text_lens: torch.Tensor | None = None,
) -> torch.Tensor:
    """`decode_reference(..., upcast=False)` that reads only the keys the layout lets the query
    see (a table per (layout, cache length), built once from the rule) and runs the fused
    scaled_dot_product_attention on them: the fast CPU decode step. A sparse layout reads T + w
    keys instead of the whole cache, and no mask is rebuilt per step."""
    B, H, _, D = q.shape
    n_max = k_cache.shape[2]
    table, real = _decode_keys(layout, n_max, str(q.device))
    q_pos = (lengths - 1).to(table.device)  # (B,)
    keys, mask = table[q_pos], real[q_pos]  # (B, K)
    if text_lens is not None:
        mask = mask & ((keys >= layout.text_len) | (keys < text_lens[:, None]))
    # Rows of the cache seen as (B*H*N, D): one index_select per tensor, far cheaper than gather.
    base = torch.arange(0, B * H * n_max, n_max, device=keys.device).view(B, H, 1)
    rows = (base + keys[:, None, :]).flatten()
    K = keys.shape[1]
    k = k_cache.reshape(B * H * n_max, D).index_select(0, rows).view(B, H, K, D)
    v = v_cache.reshape(B * H * n_max, D).index_select(0, rows).view(B, H, K, D)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
