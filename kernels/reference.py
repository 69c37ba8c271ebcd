"""Plain PyTorch attention with the layout masks: the test oracle and the CPU path.

Shapes: q, k, v (B, H, N, D). Masks come from `Layout` (the one rule) and `key_padding`.
Computed in fp32 when `upcast` is set (the oracle), otherwise in the inputs' dtype.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from .layouts import Layout, key_padding


def _mask(
    layout: Layout, q_pos: torch.Tensor, n_keys: int, text_lens: torch.Tensor | None
) -> torch.Tensor:
    mask = layout.mask_row(q_pos, n_keys)[None, None]  # (1, 1, Nq, Nk)
    pad = key_padding(text_lens, layout.text_len, n_keys)
    if pad is not None:
        mask = mask & pad[:, None, None, :]  # (B, 1, Nq, Nk)
    return mask


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
) -> torch.Tensor:
    """Attention of positions 0..N-1 over keys 0..N-1 under `layout` (training / prefill)."""
    n = q.shape[2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    mask = _mask(layout, torch.arange(n, device=q.device), k.shape[2], text_lens)
    return _attend(q, k, v, mask, scale, upcast)


@functools.lru_cache(maxsize=64)
def _layout_mask(layout: Layout, n: int, device: str) -> torch.Tensor:
    return layout.dense_mask(n, device=device)


def attention_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: Layout,
    text_lens: torch.Tensor | None = None,
) -> torch.Tensor:
    """`attention_reference(..., upcast=False)` through PyTorch's fused
    scaled_dot_product_attention, with the layout mask built once per (layout, n, device): the
    fast CPU path (the reference rebuilds the mask and materialises the scores every call)."""
    n = q.shape[2]
    mask = _layout_mask(layout, n, str(q.device))[None, None]  # (1, 1, N, N)
    pad = key_padding(text_lens, layout.text_len, n)
    if pad is not None:
        mask = mask & pad[:, None, None, :]  # (B, 1, N, N)
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
    mask = mask & (keys[None, :] < lengths[:, None])
    pad = key_padding(text_lens, layout.text_len, n_max)
    if pad is not None:
        mask = mask & pad
    return _attend(q, k_cache, v_cache, mask[:, None, None, :], scale, upcast)


@functools.lru_cache(maxsize=64)
def _decode_keys(layout: Layout, n_keys: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query position p < n_keys: the keys the layout lets it see, packed to the front of a
    row as wide as the widest one, and which entries are real (the rest point at key 0).
    (n_keys, K) each; K is T + a row for `row`, all n_keys for `full`."""
    pos = torch.arange(n_keys)
    allowed = layout.allowed(pos[:, None], pos[None, :])  # (N, N)
    width = int(allowed.sum(1).max())
    # A stable sort of "not allowed" moves the allowed keys to the front, in key order.
    keys = torch.sort((~allowed).to(torch.uint8), dim=1, stable=True).indices[:, :width]
    real = torch.gather(allowed, 1, keys)
    keys = torch.where(real, keys, 0)
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
