"""Training objectives of the transformer's stream: the weighted next-token loss and the
classifier-free guidance dropout of the conditioning. Used by the transformer recipe
(dalle_ar/train/transformer.py), the training benchmark and the tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dalle_ar.models.transformer import Logits
from dalle_ar.train import dist


def lm_loss(
    logits: Logits,
    text: torch.Tensor | None,
    image: torch.Tensor,
    text_lens: torch.Tensor | None,
    text_weight: float = 1 / 8,
    image_weight: float = 7 / 8,
    text_count: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted next-token cross-entropy (paper, section 2.2: 1/8 text, 7/8 image).

    Each part is a mean over its own valid targets: text targets are text[:, 1:] up to the
    sample's length (padding excluded), image targets all h*w codes. `text_count` replaces the
    local number of valid text targets as the text normaliser: data-parallel training passes
    global count / world size, so the averaged gradients equal those of one big batch.
    Returns (loss, parts)."""
    B = image.shape[0]
    codes = image.reshape(B, -1)
    if logits.image.shape[:2] != codes.shape:
        raise ValueError(
            f"image logits cover {tuple(logits.image.shape[:2])} positions, "
            f"targets {tuple(codes.shape)}"
        )
    img_loss = F.cross_entropy(logits.image.float().flatten(0, 1), codes.flatten())
    parts = {"image_loss": img_loss.detach()}
    loss = image_weight * img_loss
    if text is not None and logits.text.shape[1] > 0:
        targets = text[:, 1 : 1 + logits.text.shape[1]]  # (B, n)
        valid = torch.ones_like(targets, dtype=torch.bool)
        if text_lens is not None:
            idx = torch.arange(1, 1 + targets.shape[1], device=targets.device)
            valid = idx[None, :] < text_lens[:, None]
        ce = F.cross_entropy(logits.text.float().flatten(0, 1), targets.flatten(), reduction="none")
        count = valid.sum() if text_count is None else text_count
        txt_loss = (ce * valid.flatten()).sum() / count.clamp(min=1)
        parts["text_loss"] = txt_loss.detach()
        loss = loss + text_weight * txt_loss
    return loss, parts


def drop_conditioning(
    text: torch.Tensor,
    text_lens: torch.Tensor,
    empty_ids: torch.Tensor,
    empty_len: int,
    drop: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Classifier-free guidance dropout of the caption: where `drop` (B,) is True a sample's text
    becomes the empty caption (`empty_ids` (T,), e.g. [BOS, EOS, PAD...], `empty_len` valid ids),
    the same unconditional input guidance uses when sampling. (A conditioning embedding is
    dropped apart, to the model's learned null embedding: `Transformer.forward(null_rows=)`.)
    The caller draws `drop` (probability p), so data-parallel ranks can slice one global draw."""
    if empty_ids.shape != text.shape[1:]:
        raise ValueError(
            f"empty_ids must have shape {tuple(text.shape[1:])}, got {tuple(empty_ids.shape)}"
        )
    if drop.shape != text.shape[:1] or drop.dtype != torch.bool:
        raise ValueError(
            f"drop must be a bool tensor of shape ({text.shape[0]},), got "
            f"{drop.dtype} {tuple(drop.shape)}"
        )
    drop = drop.to(text.device)
    text = torch.where(drop[:, None], empty_ids.to(text.device)[None, :], text)
    text_lens = torch.where(drop, text_lens.new_tensor(empty_len), text_lens)
    return text, text_lens


def mask_codes(
    image: torch.Tensor,
    mask_id: int,
    generator: torch.Generator,
    rank: int = 0,
    world: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The masked generator's training input: image codes (B, h*w) with a random share of each
    sample's positions replaced by `mask_id`, the share cos(pi/2 * u) for u ~ U(0, 1) (MaskGIT's
    cosine schedule, Chang et al. 2022, section 3.2; at least one position). Returns (input codes,
    masked (B, h*w) bool). Drawn on the CPU from `generator` for the global batch (`world` ranks
    of B rows) and this `rank`'s rows taken (`dist.rank_rows`), so N processes draw what one
    process with the whole batch would."""
    B, n = image.shape
    total, rows = dist.rank_rows(B, rank, world)
    share = torch.cos(torch.pi / 2 * torch.rand(total, generator=generator))
    count = (share * n).ceil().clamp(1, n).long()[rows]  # (B,)
    order = torch.rand(total, n, generator=generator)[rows].argsort(1).argsort(1)  # ranks
    masked = (order < count[:, None]).to(image.device)
    return torch.where(masked, torch.full_like(image, mask_id), image), masked


def masked_loss(
    logits: torch.Tensor, image: torch.Tensor, masked: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Cross-entropy of image logits (B, h*w, V) against the true codes (B, h*w) at the masked
    positions only (B, h*w) bool, their mean. Returns (loss, parts)."""
    if logits.shape[:2] != image.shape or masked.shape != image.shape:
        raise ValueError(f"logits {tuple(logits.shape)}, codes {tuple(image.shape)} and mask "
                         f"{tuple(masked.shape)} must agree on (B, h*w)")  # fmt: skip
    ce = F.cross_entropy(logits.float().flatten(0, 1), image.flatten(), reduction="none")
    loss = (ce * masked.flatten()).sum() / masked.sum().clamp(min=1)
    return loss, {"image_loss": loss.detach(), "masked_share": masked.float().mean()}
