"""Sampling: settings defined once (`settings`), logits to tokens (`logits`) and the
autoregressive loop over the transformer's static KV cache (`ar`). See `dalle_ar.sampling.ar` for
the whole loop and for driving it step by step with the free functions re-exported here."""

from dalle_ar.runtime import SEED_SPACE, sample_seeds, uniforms
from dalle_ar.sampling.ar import (
    MIN_GRAPH_STEPS,
    Callback,
    decode_one,
    generate_image_tokens,
    image_log_likelihood,
    prefill,
)
from dalle_ar.sampling.logits import (
    combine,
    filter_logits,
    guide,
    logits_to_probs,
    sample_from_probs,
)
from dalle_ar.sampling.settings import (
    RERANK_WEIGHT,
    ARSampling,
    MaskedSampling,
    PriorSampling,
    RerankSettings,
)

__all__ = [
    "ARSampling",
    "Callback",
    "MIN_GRAPH_STEPS",
    "MaskedSampling",
    "PriorSampling",
    "RERANK_WEIGHT",
    "RerankSettings",
    "SEED_SPACE",
    "combine",
    "decode_one",
    "filter_logits",
    "generate_image_tokens",
    "guide",
    "image_log_likelihood",
    "logits_to_probs",
    "prefill",
    "sample_from_probs",
    "sample_seeds",
    "uniforms",
]
