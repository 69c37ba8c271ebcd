"""The layout rule and everything derived from it: dense masks, kernel order, block lists, decode
tables. Block lists are checked against the rule itself, for random layouts and block sizes."""

from __future__ import annotations

import pytest
import torch
from dalle_ar.kernels.blocks import (
    block_sparsity,
    classify_blocks,
    decode_tables,
    kernel_order,
)
from dalle_ar.kernels.layouts import CAUSAL_KINDS, LAYOUT_KINDS, Layout, key_padding
from hypothesis import given, settings
from hypothesis import strategies as st


def _img(layout: Layout, r: int, c: int) -> int:
    return layout.text_len + r * layout.grid_w + c


@pytest.mark.parametrize("kind", LAYOUT_KINDS)
def test_text_is_causal_and_image_sees_all_text(kind: str) -> None:
    lay = Layout(kind, text_len=3, grid_h=3, grid_w=4)
    mask = lay.dense_mask()
    assert torch.equal(mask[:3, :3], torch.ones(3, 3, dtype=torch.bool).tril())
    assert not mask[:3, 3:].any()
    assert mask[3:, :3].all()
    assert mask.diagonal().all()  # every position sees itself
    if kind in CAUSAL_KINDS:
        assert not mask.triu(1).any()  # nothing sees the future
    else:  # bidir: an image query sees every image position, earlier or later
        assert mask[3:, 3:].all()


def test_image_rules() -> None:
    T, h, w = 2, 4, 5
    q = _img(Layout("full", T, h, w), 2, 3)
    row = Layout("row", T, h, w).dense_mask()[q]
    assert row[_img(Layout("row", T, h, w), 2, 0)] and not row[_img(Layout("row", T, h, w), 1, 3)]
    col = Layout("col", T, h, w).dense_mask()[q]
    assert col[_img(Layout("col", T, h, w), 0, 3)] and not col[_img(Layout("col", T, h, w), 2, 2)]
    conv = Layout("conv", T, h, w, conv_kernel=3)
    cm = conv.dense_mask()[q]
    assert cm[_img(conv, 1, 4)] and cm[_img(conv, 1, 2)] and cm[_img(conv, 2, 2)]
    assert not cm[_img(conv, 0, 3)] and not cm[_img(conv, 1, 1)]
    assert Layout("full", T, h, w).dense_mask()[q, T:q + 1].all()  # fmt: skip


def test_invalid_layouts_raise() -> None:
    with pytest.raises(ValueError, match="layout kind"):
        Layout("diag", 1, 2, 2)
    with pytest.raises(ValueError, match="conv_kernel"):
        Layout("conv", 1, 2, 2, conv_kernel=4)
    with pytest.raises(ValueError, match=">= 1"):
        Layout("row", 0, 2, 2)


def test_key_padding() -> None:
    pad = key_padding(torch.tensor([1, 3]), text_len=3, n_keys=5)
    assert pad.tolist() == [[True, False, False, True, True], [True] * 5]
    assert key_padding(None, 3, 5) is None


@pytest.mark.parametrize("n", [7, 12, 30])
def test_kernel_order_is_a_permutation_keeping_text_in_place(n: int) -> None:
    for kind in LAYOUT_KINDS:
        lay = Layout(kind, text_len=3, grid_h=3, grid_w=4)
        order = kernel_order(lay, n)
        assert sorted(order.tolist()) == list(range(n))
        assert order[:3].tolist() == [0, 1, 2]
        if kind != "col":
            assert torch.equal(order, torch.arange(n))


def test_col_order_is_column_major() -> None:
    lay = Layout("col", text_len=2, grid_h=3, grid_w=4)
    order = kernel_order(lay, lay.seq_len)
    assert order[2:].tolist() == [2 + r * 4 + c for c in range(4) for r in range(3)]


def test_col_has_the_block_sparsity_of_row_on_the_transposed_grid() -> None:
    # The point of the column-major kernel order: col over h x w visits the same blocks as row
    # over w x h, instead of nearly every block below the diagonal.
    col = Layout("col", text_len=8, grid_h=12, grid_w=6)
    row_t = Layout("row", text_len=8, grid_h=6, grid_w=12)
    for bm, bn in [(16, 16), (16, 8)]:
        fc, pc, _ = classify_blocks(col, col.seq_len, bm, bn)
        fr, pr, _ = classify_blocks(row_t, row_t.seq_len, bm, bn)
        assert torch.equal(fc, fr) and torch.equal(pc, pr)
    sparse = block_sparsity(col, col.seq_len, 16, 16).visited_pairs()
    n_b = -(-col.seq_len // 16)
    assert sparse < n_b * (n_b + 1) // 2  # fewer than the causal triangle


def _pairs(ptr: torch.Tensor, idx: torch.Tensor) -> set[tuple[int, int]]:
    return {(r, int(idx[t])) for r in range(ptr.numel() - 1) for t in range(ptr[r], ptr[r + 1])}


def _check_block_lists(lay: Layout, n: int, bm: int, bn: int) -> None:
    bs = block_sparsity(lay, n, bm, bn)
    order = kernel_order(lay, n)
    allowed = lay.allowed(order[:, None], order[None, :])  # the rule, in kernel order
    n_m, n_n = -(-n // bm), -(-n // bn)
    padded = torch.zeros(n_m * bm, n_n * bn, dtype=torch.bool)
    padded[:n, :n] = allowed
    full, part = _pairs(bs.full_ptr, bs.full_idx), _pairs(bs.part_ptr, bs.part_idx)
    assert not full & part
    covered = torch.zeros_like(padded)
    tile_of = {}
    for t, (m, j) in enumerate(sorted(part)):
        tile_of[(m, j)] = t
    for m in range(n_m):
        for j in range(n_n):
            blk = padded[m * bm : (m + 1) * bm, j * bn : (j + 1) * bn]
            if (m, j) in full:
                assert blk.all()
                covered[m * bm : (m + 1) * bm, j * bn : (j + 1) * bn] = True
            elif (m, j) in part:
                assert blk.any() and not blk.all()
                tile = bs.tile(tile_of[(m, j)])
                assert torch.equal(tile, blk)
                covered[m * bm : (m + 1) * bm, j * bn : (j + 1) * bn] = tile
            else:
                assert not blk.any()
    assert torch.equal(covered, padded)  # the union is exactly the allowed pairs
    # transposed lists: the same pairs, and each partial entry names the right tile
    t_full = {(m, j) for j, m in _pairs(bs.t_full_ptr, bs.t_full_idx)}
    assert t_full == full
    for j in range(n_n):
        for t in range(bs.t_part_ptr[j], bs.t_part_ptr[j + 1]):
            m = int(bs.t_part_idx[t])
            assert (m, j) in part and int(bs.t_part_tile[t]) == tile_of[(m, j)]
    assert bs.t_part_idx.numel() == len(part)
    assert bs.permuted == (lay.kind == "col" and not torch.equal(order, torch.arange(n)))


@settings(max_examples=60, deadline=None)
@given(
    kind=st.sampled_from(LAYOUT_KINDS),
    text_len=st.integers(1, 9),
    grid_h=st.integers(1, 7),
    grid_w=st.integers(1, 7),
    conv_kernel=st.sampled_from([1, 3, 5]),
    bm=st.sampled_from([1, 2, 3, 4, 8, 16]),
    bn=st.sampled_from([1, 2, 4, 5, 8, 16]),
    cut=st.integers(0, 10),
)
def test_block_lists_cover_exactly_the_allowed_pairs(
    kind: str, text_len: int, grid_h: int, grid_w: int, conv_kernel: int, bm: int, bn: int, cut: int
) -> None:
    lay = Layout(kind, text_len, grid_h, grid_w, conv_kernel)
    n = max(1, lay.seq_len - cut)  # also prefixes of the sequence (prefill of a partial stream)
    _check_block_lists(lay, n, bm, bn)


def test_64_key_blocks_use_every_bit_of_the_mask_word() -> None:
    # bit 63 is the sign bit of the int64 word: a 64-wide tile must survive the round trip
    lay = Layout("conv", text_len=5, grid_h=9, grid_w=11, conv_kernel=5)
    _check_block_lists(lay, lay.seq_len, 32, 64)
    bs = block_sparsity(lay, lay.seq_len, 32, 64)
    assert (bs.tile_bits < 0).any()


def test_block_sparsity_is_cached_and_checks_sizes() -> None:
    lay = Layout("row", 4, 5, 5)
    assert block_sparsity(lay, 29, 16, 16) is block_sparsity(lay, 29, 16, 16)
    with pytest.raises(ValueError, match="block_m"):
        block_sparsity(lay, 29, 0, 16)
    with pytest.raises(ValueError, match="block_n <= 64"):
        block_sparsity(lay, 29, 16, 128)


@pytest.mark.parametrize("kind", CAUSAL_KINDS)
def test_decode_tables_list_exactly_the_allowed_keys(kind: str) -> None:
    lay = Layout(kind, text_len=3, grid_h=4, grid_w=5, conv_kernel=3)
    n = lay.seq_len
    tables = decode_tables(lay, n)
    mask = lay.mask_row(torch.arange(n), n)
    assert torch.equal(tables.count, mask.sum(1).int())
    assert tables.width == int(mask.sum(1).max())
    assert tables.contiguous == (kind == "full")
    for p in range(n):
        want = mask[p].nonzero()[:, 0].tolist()
        got = list(range(p + 1)) if tables.contiguous else tables.keys[p, : len(want)].tolist()
        assert got == want
    if kind == "col":  # the point of the lists: T + (rows so far) keys, not every earlier one
        assert tables.width == 3 + 4
