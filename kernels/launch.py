"""Launch settings and input checks shared by the attention and decode kernels.

Kernel modules hold only kernels, their autograd.Function and one public function (STYLE.md);
the block sizes they launch with and the checks on user tensors live here.
"""

from __future__ import annotations

import dataclasses
import os

import torch
import triton

from .layouts import Layout

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
HEAD_DIMS = (16, 32, 64, 128)


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    block_m: int  # queries per program
    block_n: int  # keys per inner step
    num_warps: int
    num_stages: int

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"{name} must be a power of two >= 16, got {v}")
        if self.block_n > 64:  # a partial block's mask row is one int64 word (blocks.py)
            raise ValueError(f"block_n must be <= 64, got {self.block_n}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"num_warps must be one of 1, 2, 4, 8, 16, got {self.num_warps}")
        if self.num_stages < 1:
            raise ValueError(f"num_stages must be >= 1, got {self.num_stages}")


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    fwd: BlockConfig  # forward kernel
    bwd: BlockConfig  # dK/dV and dQ kernels (one block shape: they share the block lists)


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    block_n: int = 64  # keys per inner step
    num_splits: int | None = None  # key-range splits per (batch, head); None = by occupancy
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self) -> None:
        if self.block_n < 16 or self.block_n & (self.block_n - 1):
            raise ValueError(f"block_n must be a power of two >= 16, got {self.block_n}")
        if self.num_splits is not None and self.num_splits < 1:
            raise ValueError(f"num_splits must be >= 1 or None, got {self.num_splits}")


def default_attention_config(
    head_dim: int, dtype: torch.dtype, kind: str = "full"
) -> AttentionConfig:
    """Launch settings for an H100 (SM90) by dtype, head dim and layout kind, chosen so that no
    kernel spills registers when compiled for sm_90 by Triton 3.6 or 3.9
    (tests/kernels/test_kernel_compile.py checks every layout's settings, with and without padding).

    fp16/bf16: 128 queries per program reuse each loaded key block across many rows; the backward
    holds k, v and their fp32 gradients in registers for its whole loop, hence 64 x 64. `col`
    reads rows through its permutation (blocks.py), whose gathered row addresses cost registers:
    its forward takes 32-key steps (with 64, Triton 3.6 spills when the text is padded; on an
    H200 this costs col 6%: 0.33 against 0.31 ms fwd+bwd at the paper shape). D=128 needs 8
    warps, 32-key forward steps and 16-key backward blocks to keep its (128, 128) fp32
    accumulators. fp32 runs exact (non-tensor-core) dots, which hold whole tiles in registers:
    much smaller tiles. The settings against the others tried: tools/results/h200/.
    """
    if dtype == torch.float32:
        fwd = BlockConfig(32, 16, 8, 2) if head_dim >= 128 else BlockConfig(32, 16, 4, 2)
        return AttentionConfig(fwd, BlockConfig(16, 16, 4, 2))
    if head_dim >= 128:
        return AttentionConfig(BlockConfig(128, 32, 8, 2), BlockConfig(64, 16, 8, 2))
    if kind == "col":
        return AttentionConfig(BlockConfig(128, 32, 4, 3), BlockConfig(64, 64, 4, 2))
    return AttentionConfig(BlockConfig(128, 64, 4, 3), BlockConfig(64, 64, 4, 2))


def default_decode_config(head_dim: int) -> DecodeConfig:
    """64 keys per step; D=128 takes 8 warps to hold its (64, 128) key tile without spilling."""
    return DecodeConfig(block_n=64, num_warps=8 if head_dim >= 128 else 4)


def decode_splits(config: DecodeConfig, n_bh: int, n_blocks: int, device: torch.device) -> int:
    """How many programs share one (batch, head)'s key list (flash-decoding): enough for about
    two programs per SM, never more than the list has blocks."""
    if config.num_splits is not None:
        want = config.num_splits
    elif device.type == "cuda":  # about two programs per SM
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        want = triton.cdiv(2 * sms, n_bh)
    else:  # the interpreter: a few splits, so the merge path runs
        want = 4
    per_split = triton.cdiv(n_blocks, max(1, min(want, n_blocks)))
    return triton.cdiv(n_blocks, per_split)


def strides(t: torch.Tensor) -> tuple[int, int, int]:
    """Batch, head and position strides of a (B, H, N, D) tensor (D is unit-stride)."""
    return t.stride(0), t.stride(1), t.stride(2)


def interpreting() -> bool:
    """Whether Triton's CPU interpreter is on (read at call time, not import time)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_device(t: torch.Tensor, name: str) -> None:
    if t.is_cuda:
        return
    if interpreting() and t.device.type == "cpu":
        return
    raise ValueError(
        f"{name} must be a CUDA tensor (or a CPU tensor with TRITON_INTERPRET=1), "
        f"got device {t.device}"
    )


def check_qkv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, names: tuple[str, str, str]
) -> None:
    """Rank 4 (B, H, N, D), one floating dtype and device, D in HEAD_DIMS, unit last stride."""
    for t, name in zip((q, k, v), names):
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape (B, H, N, D), got {tuple(t.shape)}")
        if t.dtype not in DTYPES:
            raise ValueError(f"{name} dtype must be one of {DTYPES}, got {t.dtype}")
        if t.dtype != q.dtype:
            raise ValueError(f"{name} dtype must match {names[0]} ({q.dtype}), got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on {q.device} like {names[0]}, got {t.device}")
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dim, got {t.stride()}")
        check_device(t, name)
    if q.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"head dim must be one of {HEAD_DIMS}, got {q.shape[-1]}")
    if k.shape != v.shape:
        raise ValueError(f"{names[1]} and {names[2]} shapes differ: {k.shape} vs {v.shape}")
    if q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"{names[0]} {tuple(q.shape)} and {names[1]} {tuple(k.shape)} must agree in B, H, D"
        )


def check_layout(layout: Layout) -> None:
    if not isinstance(layout, Layout):
        raise ValueError(f"layout must be a dalle_ar.kernels.layouts.Layout, got {type(layout)}")


def check_lens(t: torch.Tensor | None, batch: int, device: torch.device, name: str) -> None:
    """A (B,) integer tensor on the device of the inputs (values are not read: no sync)."""
    if t is None:
        return
    if t.dim() != 1 or t.shape[0] != batch:
        raise ValueError(f"{name} must have shape ({batch},), got {tuple(t.shape)}")
    if t.dtype.is_floating_point or t.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} must be on {device}, got {t.device}")
