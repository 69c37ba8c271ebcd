"""Reranking: draw several candidates per prompt, score each against its prompt, keep the best.

The scorer needs no model beyond the transformer: the pointwise mutual information between the
caption and the image, as the transformer sees it,

    score = log p(codes | caption) - weight * log p(codes | empty caption),

read off two teacher-forced passes (`sampling.image_log_likelihood`). The first term alone
prefers plain, likely images whatever the caption says; the second takes away what the model
expects with no caption, so what is left is how much the caption explains the image. This is
classifier-free guidance (`uncond + scale * (cond - uncond)`, token by token) applied to whole
samples: guidance steers each code, reranking picks among finished images. On the shapes it
lifts held-out colour-shape pairs the most (docs/experiments/reranking.md).

    pipe(prompts, candidates=8)   # 8 candidates per sample, the best-scoring one is kept

`pmi_scores` and `keep_best` are the pieces, for a loop of your own.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dalle_ar.models.transformer import Transformer
from dalle_ar.sampling import RERANK_WEIGHT, RerankSettings, image_log_likelihood
from dalle_ar.text import TextTokenizer


def pmi_scores(
    model: Transformer,
    tokenizer: TextTokenizer,
    prompts: Sequence[str],
    codes: torch.Tensor,
    *,
    weight: float = RERANK_WEIGHT,
    start_row: int = 0,
    batch_size: int = 64,
) -> torch.Tensor:
    """Score (n,) of each image codes[i] (n, h, w) for prompts[i]: log p(codes | prompt) -
    weight * log p(codes | empty caption), over the rows from `start_row` on (primed rows are
    given, not drawn). Higher is better. A model with a conditioning embedding is scored in text
    mode (its learned null embedding, `Transformer.null_cond`), whatever embedding drew the
    image: the caption's information about the codes, the same for every mode."""
    if len(prompts) != codes.shape[0]:
        raise ValueError(f"expected one prompt per image, got {len(prompts)} and {codes.shape[0]}")
    check_weight(weight)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()  # no dropout in a score
    out = []
    for s in range(0, len(prompts), batch_size):
        chunk = codes[s : s + batch_size].to(device)
        texts = [list(prompts[s : s + batch_size])] + ([[""] * len(chunk)] if weight else [])
        logps = []
        for batch in texts:
            text = tokenizer.encode(batch)
            ids, lens = text.ids.to(device), text.mask.sum(1).to(device)
            cond = model.null_cond(len(chunk)) if model.cfg.takes_cond else None
            logps.append(image_log_likelihood(model, ids, chunk, text_lens=lens, cond=cond,
                                              start_row=start_row))  # fmt: skip
        out.append(logps[0] - weight * logps[1] if weight else logps[0])
    model.train(was_training)
    return torch.cat(out).cpu()


def check_weight(weight: float) -> None:
    """A rerank weight is a finite number >= 0 (ValueError otherwise; `RerankSettings`)."""
    RerankSettings(rerank_weight=weight).validate()


def keep_best(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """scores (P, K) of K candidates per prompt -> (P, keep) indices of the best ones, best
    first (ties: the earlier candidate)."""
    if scores.ndim != 2 or not 1 <= keep <= scores.shape[1]:
        raise ValueError(
            f"need scores (P, K) and 1 <= keep <= K, got {tuple(scores.shape)}, {keep}"
        )
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    return order[:, :keep]
