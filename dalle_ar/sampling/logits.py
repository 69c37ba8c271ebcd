"""Logits -> probabilities -> tokens: temperature, top-k, top-p (nucleus), inverse-CDF draws
from per-sample uniforms, and classifier-free guidance over several streams. Free functions, no
state; shapes (..., V) or (B, V)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

# ----------------------------------------------------------------------------------------------
# Logits -> probabilities -> tokens.


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set logits outside the top-k (0 = off) and outside the nucleus (top-p: the smallest set of
    most likely tokens whose probability reaches `top_p`; 1 = off) to -inf. (..., V)."""
    V = logits.shape[-1]
    if top_k and top_k < V:
        vals, idx = torch.topk(logits, top_k, dim=-1)
        # Scatter instead of thresholding: exactly k survive even when logits tie.
        logits = torch.full_like(logits, float("-inf")).scatter_(-1, idx, vals)
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits.float(), dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # mass of the more likely tokens
        drop_sorted = before >= top_p  # the first token always stays (before = 0)
        drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def logits_to_probs(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
) -> torch.Tensor:
    """Logits (..., V) -> fp32 probabilities after temperature, top-k, then top-p."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    return torch.softmax(filter_logits(logits, top_k, top_p), dim=-1)


def sample_from_probs(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: probs (B, V), uniforms u (B,) in [0, 1) -> token ids (B,).
    A token of probability 0 is never chosen; top-k 1 gives the argmax."""
    cdf = torch.cumsum(probs.double(), dim=-1)  # (B, V); fp64 keeps u * total < total
    target = (u.to(cdf.device, torch.float64) * cdf[:, -1]).unsqueeze(1)
    idx = torch.searchsorted(cdf, target, right=True).squeeze(1)
    return idx.clamp_(max=probs.shape[-1] - 1)


def nonfinite_rows(probs: torch.Tensor) -> torch.Tensor:
    """(..., V) probabilities -> (...) bool: True where a row holds a NaN or an infinity (logits
    that left float32's range, through guidance or temperature, or a model that gives NaN). The
    inverse-CDF draw of such a row picks the last token whatever the model says, so a sampler
    stops on it (`check_probs`) instead of drawing."""
    return ~probs.isfinite().all(-1)


def check_probs(probs: torch.Tensor, where: str) -> None:
    """ValueError naming `where` and the first row of probs (B, ..., V) that is not finite
    (`nonfinite_rows`)."""
    bad = nonfinite_rows(probs).flatten(1) if probs.ndim > 2 else nonfinite_rows(probs)[:, None]
    rows = bad.any(1).nonzero()
    if len(rows):
        raise ValueError(
            f"{where}: the probabilities of sample {int(rows[0])} are not finite (NaN or inf): "
            "the logits left float32's range; lower the guidance scale or raise the temperature"
        )


def guide(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance on logits: uncond + scale * (cond - uncond)."""
    return uncond + scale * (cond - uncond)


def combine(streams: torch.Tensor, scales: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Guidance over several conditions: streams (S, B, V) are the logits under S - 1 captions and,
    last, the empty one; returns uncond + sum_i scales[i] * (streams[i] - uncond). A scale is a
    number, or a (B,) tensor with one weight per row."""
    if len(scales) != streams.shape[0] - 1:
        raise ValueError(f"expected {streams.shape[0] - 1} scales, got {len(scales)}")
    uncond = streams[-1]
    out = uncond.clone()
    for stream, scale in zip(streams[:-1], scales):
        if isinstance(scale, torch.Tensor) and scale.ndim:
            if scale.shape != stream.shape[:1]:
                raise ValueError(
                    f"a tensor scale needs one weight per row {tuple(stream.shape[:1])}, "
                    f"got {tuple(scale.shape)}"
                )
            scale = scale.to(stream)[:, None]
        out += scale * (stream - uncond)
    return out
