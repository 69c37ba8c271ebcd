"""What the Triton kernels iterate, derived from the one rule `Layout.allowed`.

Nothing here restates a layout: every structure is computed by evaluating the rule (vectorised
torch) on positions and reducing over blocks, then cached per (layout, n, block sizes, device).

- `kernel_order`: the order in which the kernels visit positions. Identity, except for `col`:
  there the image grid is visited column-major, so an image query's column (the keys it may see
  besides text) becomes one contiguous, causal run, exactly as a row is in raster order. Column
  attention then gets row-like block sparsity (DALL-E, Ramesh et al. 2021, B.1, computes column
  attention on the transposed grid for the same reason). The kernels read and write rows through
  this permutation (an indirect row load, no copy of q, k, v), and the rule is evaluated on the
  original positions `order[p]`, so the masks stay those of the raster order.
- `BlockSparsity`: per query block the key blocks that are fully visible (no element mask) or
  partially visible (with the precomputed mask tile), as CSR arrays; the same pairs grouped per
  key block (the transposed lists the dK/dV backward kernel iterates). Fully masked blocks appear
  in neither list and are never loaded. A mask tile is stored as one int64 bit row per query
  (bit j: key j of the block), so a kernel loads block_m words instead of a block_m x block_n
  tile: a tile of pointers costs the registers the matmul accumulators need (at 128 x 64 it made
  the SM90 forward spill), and the same words serve the transposed (key-major) view.
- `DecodeTables`: per query position, the keys the decode step reads (the decode-step mask as
  a list of allowed keys).
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from .layouts import Layout

# Entries kept per cache: a model has few distinct (layout, n, blocks, device) keys; the bound
# only protects a long-lived process that sweeps many shapes (the benchmark).
_CACHE_SIZE = 256


def kernel_order(layout: Layout, n: int) -> torch.Tensor:
    """(n,) int64: the original position the kernels visit at each step (see module docstring).

    Text positions stay first and in order (key padding relies on that); for `col` the image
    positions present among the first n are sorted by (column, row).
    """
    pos = torch.arange(n)
    if layout.kind != "col":
        return pos
    img = (pos - layout.text_len).clamp(min=0)
    row, col = img.div(layout.grid_w, rounding_mode="floor"), img.remainder(layout.grid_w)
    key = torch.where(pos < layout.text_len, pos, layout.text_len + col * n + row)
    return torch.argsort(key, stable=True)


def _block_view(mask: torch.Tensor, block_m: int, block_n: int) -> torch.Tensor:
    """(n, n) bool -> (n_m, n_n, block_m, block_n), padded with False past n."""
    n = mask.shape[0]
    n_m, n_n = -(-n // block_m), -(-n // block_n)
    padded = torch.zeros(n_m * block_m, n_n * block_n, dtype=torch.bool)
    padded[:n, :n] = mask
    return padded.view(n_m, block_m, n_n, block_n).permute(0, 2, 1, 3)


def classify_blocks(
    layout: Layout, n: int, block_m: int, block_n: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(full, partial, tiles): which (query block, key block) pairs are fully or partly visible in
    kernel order, and the (n_m, n_n, block_m, block_n) bool mask tiles. Positions past n count as
    not allowed, so a block over the sequence's tail is never full and its tile masks the tail."""
    order = kernel_order(layout, n)
    mask = layout.allowed(order[:, None], order[None, :])  # (n, n), kernel order
    tiles = _block_view(mask, block_m, block_n)
    count = tiles.sum(dim=(-1, -2))  # (n_m, n_n)
    full = count == block_m * block_n
    partial = (count > 0) & ~full
    return full, partial, tiles


def _csr(sel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise CSR of a bool matrix: (ptr (rows+1,), column indices), both int32."""
    ptr = torch.zeros(sel.shape[0] + 1, dtype=torch.int64)
    ptr[1:] = sel.sum(dim=1).cumsum(0)
    return ptr.int(), sel.nonzero()[:, 1].int()


def _pack_bits(tiles: torch.Tensor) -> torch.Tensor:
    """(t, block_m, block_n <= 64) bool -> (t, block_m) int64 words, bit j = column j. The bits
    are disjoint, so their sum is their bitwise or (bit 63 wraps to the sign, as intended)."""
    shifts = torch.arange(tiles.shape[-1], dtype=torch.int64)
    return (tiles.to(torch.int64) << shifts).sum(dim=-1).contiguous()


@dataclasses.dataclass(frozen=True)
class BlockSparsity:
    """The block lists of one (layout, n, block_m, block_n), on one device.

    Row-wise (per query block m; forward and dQ kernels): key blocks
    `full_idx[full_ptr[m]:full_ptr[m+1]]` and `part_idx[part_ptr[m]:part_ptr[m+1]]`; the mask
    tile of partial entry t is `tile(t)`, stored as bits in `tile_bits[t]`. Column-wise (per key
    block; dK/dV kernel): query blocks `t_full_idx[t_full_ptr[j]:...]`, `t_part_idx[...]` with
    tile ids `t_part_tile[...]`.
    """

    block_m: int  # queries per block
    block_n: int  # keys per block
    n: int  # sequence length
    order: torch.Tensor  # (n,) int32 original position at each kernel step
    permuted: bool  # whether `order` is not the identity (the kernels then read through it)
    full_ptr: torch.Tensor  # (n_m + 1,) int32
    full_idx: torch.Tensor  # (n_full,) int32 key blocks
    part_ptr: torch.Tensor  # (n_m + 1,) int32
    part_idx: torch.Tensor  # (n_part,) int32 key blocks
    tile_bits: torch.Tensor  # (n_part, block_m) int64: bit j of word i = query i sees key j
    t_full_ptr: torch.Tensor  # (n_n + 1,) int32
    t_full_idx: torch.Tensor  # (n_full,) int32 query blocks
    t_part_ptr: torch.Tensor  # (n_n + 1,) int32
    t_part_idx: torch.Tensor  # (n_part,) int32 query blocks
    t_part_tile: torch.Tensor  # (n_part,) int32 index into `tile_bits`

    @property
    def n_query_blocks(self) -> int:
        return self.full_ptr.numel() - 1

    @property
    def n_key_blocks(self) -> int:
        return self.t_full_ptr.numel() - 1

    def tile(self, t: int) -> torch.Tensor:
        """(block_m, block_n) bool mask tile of partial entry t, unpacked from its bits."""
        bits = self.tile_bits[t].cpu()
        return (bits[:, None] >> torch.arange(self.block_n)[None, :]) & 1 == 1

    def visited_pairs(self) -> int:
        """(query block, key block) pairs the kernels load, out of n_m * n_n."""
        return self.full_idx.numel() + self.part_idx.numel()


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _block_sparsity(layout: Layout, n: int, block_m: int, block_n: int, device: str):
    full, partial, tiles = classify_blocks(layout, n, block_m, block_n)
    full_ptr, full_idx = _csr(full)
    part_ptr, part_idx = _csr(partial)
    tile_id = torch.full(partial.shape, -1, dtype=torch.int64)
    tile_id[partial] = torch.arange(int(partial.sum()))  # row-major, matching part_idx
    t_full_ptr, t_full_idx = _csr(full.T)
    t_part_ptr, t_part_idx = _csr(partial.T)
    order = kernel_order(layout, n)
    to = functools.partial(torch.Tensor.to, device=device)
    return BlockSparsity(
        block_m=block_m,
        block_n=block_n,
        n=n,
        order=to(order.int()),
        permuted=bool((order != torch.arange(n)).any()),
        full_ptr=to(full_ptr),
        full_idx=to(full_idx),
        part_ptr=to(part_ptr),
        part_idx=to(part_idx),
        tile_bits=to(_pack_bits(tiles[partial])),
        t_full_ptr=to(t_full_ptr),
        t_full_idx=to(t_full_idx),
        t_part_ptr=to(t_part_ptr),
        t_part_idx=to(t_part_idx),
        t_part_tile=to(tile_id.T[partial.T].int()),
    )


def block_sparsity(
    layout: Layout, n: int, block_m: int, block_n: int, device: torch.device | str = "cpu"
) -> BlockSparsity:
    """The cached block lists for `layout` over n positions with the given block sizes."""
    if n < 1 or block_m < 1 or not 1 <= block_n <= 64:
        raise ValueError(
            f"need n >= 1, block_m >= 1, 1 <= block_n <= 64 (one int64 mask word per query), "
            f"got {n}, {block_m}, {block_n}"
        )
    return _block_sparsity(layout, n, block_m, block_n, str(torch.device(device)))


@dataclasses.dataclass(frozen=True)
class DecodeTables:
    """Decode-step key lists for queries at any position < n_max over a cache of n_max keys.

    Decoding is bound by reading the cache, so the step reads only the keys its query may see:
    row p of `keys` lists them (ascending, `count[p]` of them, padding 0). For col that is
    T + h keys instead of every earlier one; a layout where every position sees all earlier
    keys (`contiguous`) needs no list: the kernel reads keys 0..p directly.
    """

    keys: (
        torch.Tensor
    )  # (n_max, width) int32 allowed keys per query position (unused if contiguous)
    count: torch.Tensor  # (n_max,) int32 allowed keys per query position
    width: int  # the most keys any position sees
    contiguous: bool  # every position p sees exactly keys 0..p


def pack_allowed(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rule rows (n, n_keys) bool -> (keys, real), each (n, width): per row the allowed keys,
    ascending and packed to the front of a row as wide as the widest one, and which entries are
    real (the rest point at key 0). Shared by the decode kernel's tables and the CPU decode step."""
    count = mask.sum(dim=1)
    width = int(count.max())
    # A stable sort of "not allowed" brings the allowed keys to the front, in key order.
    keys = torch.sort((~mask).to(torch.uint8), dim=1, stable=True).indices[:, :width]
    real = torch.arange(width, device=mask.device)[None, :] < count[:, None]
    return torch.where(real, keys, 0), real


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _decode_tables(layout: Layout, n_max: int, device: str) -> DecodeTables:
    pos = torch.arange(n_max)
    mask = layout.mask_row(pos, n_max)  # (n_max, n_max), the rule
    count = mask.sum(dim=1)
    contiguous = bool(torch.equal(count, pos + 1))  # causal rule: all j <= p are allowed
    width = int(count.max())
    if contiguous:
        keys = torch.zeros(1, 1, dtype=torch.int32)
    else:
        keys = pack_allowed(mask)[0].int()
    return DecodeTables(
        keys=keys.contiguous().to(device),
        count=count.int().to(device),
        width=width,
        contiguous=contiguous,
    )


def decode_tables(layout: Layout, n_max: int, device: torch.device | str = "cpu") -> DecodeTables:
    """The cached decode-step key lists for `layout` over a cache of n_max positions."""
    if n_max < 1:
        raise ValueError(f"need n_max >= 1, got {n_max}")
    return _decode_tables(layout, n_max, str(torch.device(device)))
