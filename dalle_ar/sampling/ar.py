"""Token-level sampling: prefill the text once, then decode one image code per step against the
transformer's static KV cache. A few free functions with no hidden state (gpt-fast style).

One call does it all:

    from dalle_ar.sampling import generate_image_tokens
    text = tok.encode(["a small red circle at the top left"])
    codes = generate_image_tokens(
        model, text.ids, text_lens=text.mask.sum(1), num_samples=4, temperature=1.0,
        top_k=64, top_p=0.95, guidance_scale=3.0, empty_ids=tok.encode([""]).ids[0], seeds=0,
    )  # (4, h, w) codes; vq.decode(codes) gives the pixels

Or drive the loop yourself with the pieces (here: plain sampling of B = 4 captions, no guidance):

    from dalle_ar.sampling import decode_one, logits_to_probs, prefill, sample_from_probs, uniforms
    text = tok.encode(["a red circle"] * 4)
    lens = text.mask.sum(1)
    model.setup_cache(4)
    u = uniforms([0, 1, 2, 3], model.cfg.image_len)        # (B, h*w): one stream per sample
    codes = []
    with torch.inference_mode():
        logits = prefill(model, text.ids, text_lens=lens)   # (B, image_vocab): the first code
        for i in range(model.cfg.image_len):
            code = sample_from_probs(logits_to_probs(logits, top_k=64), u[:, i])   # (B,)
            codes.append(code)
            if i + 1 < model.cfg.image_len:
                pos = torch.tensor([model.cfg.text_positions + i])
                logits = decode_one(model, code[:, None], pos, text_lens=lens)
    model.clear_cache()
    codes = torch.stack(codes, 1).view(4, model.cfg.grid_h, model.cfg.grid_w)

On a CPU, sample with one thread (torch.set_num_threads(1)): a decode step is a few small
matrix products, and on a machine shared with other work the extra threads mostly wait for
each other (on the 2-core development machine, 2 threads under load were 30x slower).

Randomness: sample b draws every code from its own stream of uniforms, a generator seeded with
its own seed (inverse-CDF sampling: one uniform per image position). A sample therefore depends
only on its seed, prompt and parameters, never on the batch it was generated in, and position j
uses the same uniform whether or not the rows before it were primed.

Classifier-free guidance (Ho & Salimans 2022) runs the conditional and the unconditional stream
(the empty caption [BOS, EOS, PAD..] and the model's learned null embedding,
`Transformer.null_cond`) in one batch of 2B and samples from
`uncond + scale * (cond - uncond)` on the logits. `guidance_scale=1` without parts is plain
conditional sampling: the unconditional stream is then not computed at all. A composed prompt
adds K part streams (captions naming part of the scene; a batch of (K + 2) B) and their weighted
pushes `part_k - uncond` (`generate_image_tokens`, `combine`). With an embedding-conditioned
model every part stream carries the prompt's embedding too.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch

from dalle_ar.models.transformer import Transformer
from dalle_ar.runtime import sample_seeds, uniforms
from dalle_ar.sampling.graph import GraphedStep
from dalle_ar.sampling.logits import combine, logits_to_probs, nonfinite_rows, sample_from_probs
from dalle_ar.sampling.settings import ARSampling, resolve

log = logging.getLogger(__name__)

# callback(filled, total, codes): `filled` image positions of codes (B, h, w) are sampled (or
# primed); the rest hold 0. Called once per sampled position.
Callback = Callable[[int, int, torch.Tensor], None]
MIN_GRAPH_STEPS = 16  # cuda_graph=None captures the decode step only for longer runs than this


# ----------------------------------------------------------------------------------------------
# Model steps (the KV cache must be set up: model.setup_cache(B)).


def prefill(
    model: Transformer,
    tokens: torch.Tensor,
    *,
    text_lens: torch.Tensor | None = None,
    cond: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run [text ‖ primed codes] tokens (B, L) through the model in one call, filling the KV
    cache; returns the logits (B, image_vocab) of the next image code."""
    pos = torch.arange(tokens.shape[1], device=tokens.device)
    return model(tokens, pos, text_lens=text_lens, cond=cond).image[:, -1]


def decode_one(
    model: Transformer,
    codes: torch.Tensor,
    input_pos: torch.Tensor,
    *,
    text_lens: torch.Tensor | None = None,
) -> torch.Tensor:
    """One step: codes (B, 1) at token position input_pos (1,) (= text positions + image index)
    -> logits (B, image_vocab) of the code after it."""
    return model(codes, input_pos, text_lens=text_lens).image[:, -1]


@torch.inference_mode()
def image_log_likelihood(
    model: Transformer,
    text_ids: torch.Tensor,
    codes: torch.Tensor,
    *,
    text_lens: torch.Tensor | None = None,
    cond: torch.Tensor | None = None,
    start_row: int = 0,
) -> torch.Tensor:
    """log p(codes | text) (B,): the summed log-probabilities of the image codes (B, h, w) from
    row `start_row` on, read off one teacher-forced forward pass (no KV cache; the model is
    expected in eval mode). The model's own score of a finished sample, e.g. for reranking
    (`dalle_ar.rerank`)."""
    if not 0 <= start_row < model.cfg.grid_h:
        raise ValueError(f"start_row must be in [0, {model.cfg.grid_h}), got {start_row}")
    device = next(model.parameters()).device
    flat = codes.flatten(1).to(device)
    text_ids = text_ids.to(device)
    tokens = torch.cat([text_ids, flat[:, :-1]], 1) if text_ids.shape[1] else flat[:, :-1]
    logits = model(tokens, text_lens=text_lens, cond=cond).image[:, start_row * model.cfg.grid_w :]
    target = flat[:, start_row * model.cfg.grid_w :, None]
    # log_softmax at the target alone: no second (B, h*w, V) tensor
    picked = logits.gather(-1, target)[..., 0].float() - logits.float().logsumexp(-1)
    return picked.sum(1)


# ----------------------------------------------------------------------------------------------
# The whole loop.


@torch.inference_mode()
def generate_image_tokens(
    model: Transformer,
    text_ids: torch.Tensor | None,
    settings: ARSampling | None = None,
    *,
    text_lens: torch.Tensor | None = None,
    num_samples: int = 1,
    empty_ids: torch.Tensor | None = None,
    empty_len: int = 2,
    prime_codes: torch.Tensor | None = None,
    seeds: int | Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    cond: torch.Tensor | None = None,
    use_cache: bool = True,
    parts: torch.Tensor | None = None,
    part_lens: torch.Tensor | None = None,
    part_weights: torch.Tensor | None = None,
    cuda_graph: bool | None = None,
    **overrides: Any,
) -> torch.Tensor:
    """Sample image codes for N prompts, `num_samples` each: returns (N * num_samples, h, w),
    prompt-major (all samples of prompt 0 first).

    settings: how each code is drawn (`ARSampling`: temperature, top_k, top_p, guidance_scale,
    part_scale; default `ARSampling()`); keyword overrides of its fields (`temperature=0.7`)
    replace them for this call. ValueError names an unknown or impossible setting, or the first
    sample and position whose probabilities are not finite (guidance or weights that overflow).

    text_ids (N, T) and text_lens (N,) come from `TextTokenizer.encode` (None for a model whose
    embedding replaces the text); cond (N, cond_dim) is the conditioning embedding of an
    embedding-conditioned model. prime_codes (N or N*num_samples, r, w) fixes the first r rows
    (image completion): they are prefilled with the text and returned unchanged. Guidance
    (guidance_scale != 1) needs empty_ids (T,), the empty caption, with empty_len valid ids.
    seeds / generator: see `sample_seeds`. use_cache=False recomputes the whole sequence every
    step instead of decoding against the KV cache (same tokens; the benchmark's baseline).
    cuda_graph: capture each decode step (the model, guidance, filtering and the draw) once in a
    CUDA graph and replay it per position, so that a step costs one launch instead of hundreds
    (same tokens). None: on for a CUDA model with the cache when more than MIN_GRAPH_STEPS
    positions are sampled.

    Composed prompts: parts (N, K, T) with part_lens (N, K) are K more captions per prompt, each
    naming part of the scene, with part_weights (N, K) (default 1; negative ones subtract);
    sampling then follows `uncond + guidance_scale * (cond - uncond)
    + part_scale * sum_k weight_k * (part_k - uncond)`, a product of experts that can draw pairs
    no single caption was trained on (`dalle_ar.data.shapes.composed_prompt`).
    """
    cfg = model.cfg
    dev = model.image_head.weight.device
    N = _check_inputs(model, text_ids, text_lens, cond, num_samples)
    s = resolve(settings or ARSampling(), **overrides)
    temperature, top_k, top_p = s.temperature, s.top_k, s.top_p
    guidance_scale, part_scale = s.guidance_scale, s.part_scale
    B, hw, w = N * num_samples, cfg.image_len, cfg.grid_w
    K = _check_parts(parts, part_lens, part_weights, N, cfg)
    guided = guidance_scale != 1.0 or K > 0
    if cuda_graph and (dev.type != "cuda" or not use_cache):
        raise ValueError(
            f"cuda_graph needs a CUDA model and use_cache=True, got a model on {dev} and "
            f"use_cache={use_cache}"
        )
    if guided and cfg.has_text and empty_ids is None:
        raise ValueError("guidance (scale != 1, or parts) needs empty_ids, the empty caption's ids")

    rep = lambda x: None if x is None else x.to(dev).repeat_interleave(num_samples, 0)  # noqa: E731
    text, lens, cnd = rep(text_ids), rep(text_lens), rep(cond)
    if K:  # streams [cond ‖ part 1 ‖ .. ‖ part K], each B rows
        text = torch.cat([text, *(rep(parts[:, k]) for k in range(K))])
        if lens is not None:
            lens = torch.cat([lens, *(rep(part_lens[:, k]) for k in range(K))])
        if cnd is not None:
            cnd = cnd.repeat(K + 1, 1)
    weights = torch.ones(N, K) if part_weights is None else part_weights.float()
    weights = (part_scale * weights.to(dev)).repeat_interleave(num_samples, 0)  # (B, K)
    scales = [guidance_scale, *weights.T]
    if text is None:
        text = torch.zeros(B, 0, dtype=torch.long, device=dev)
    codes = torch.zeros(B, hw, dtype=torch.long, device=dev)
    start = 0
    if prime_codes is not None:
        prime = _check_prime(prime_codes, N, num_samples, cfg).to(dev)
        start = prime.shape[1] * w
        codes[:, :start] = prime.flatten(1)
    if start == hw:
        return codes.view(B, cfg.grid_h, w)
    u = uniforms(sample_seeds(B, seeds, generator), hw, dev)  # (B, h*w)

    if guided:  # ... ‖ uncond]: all streams in one batch of (K + 2) * B
        if cfg.has_text:
            empty = _check_empty(empty_ids, cfg.text_positions).to(dev)
            text = torch.cat([text, empty.expand(B, -1)])
            if lens is not None:
                lens = torch.cat([lens, lens.new_full((B,), empty_len)])
        if cnd is not None:  # the learned null embedding: "no embedding"
            cnd = torch.cat([cnd, model.null_cond(B).to(cnd)])
    nb = (K + 2) * B if guided else B
    if not cfg.has_text:
        text = text.new_zeros(nb, 0)
    T = cfg.text_positions

    # Per sample, the first image position whose probabilities were not finite (hw: none yet).
    # Kept on the device and written in place, so a captured CUDA graph records it too.
    bad_at = torch.full((B,), hw, dtype=torch.long, device=dev)

    def draw(logits: torch.Tensor, u_j: torch.Tensor, j: torch.Tensor | int) -> torch.Tensor:
        """Logits (nb, V) of image position j -> its codes (B,)."""
        if guided:
            logits = combine(logits.view(nb // B, B, -1), scales)
        probs = logits_to_probs(logits, temperature, top_k, top_p)
        bad_at.copy_(torch.where(nonfinite_rows(probs) & (bad_at == hw), j, bad_at))
        return sample_from_probs(probs, u_j)

    def decode_step(last: torch.Tensor, pos: torch.Tensor, u_j: torch.Tensor) -> torch.Tensor:
        """Codes (B,) at the position after `pos` (1,), where `last` (B,) was drawn."""
        tokens = last.repeat(nb // B)[:, None]  # (nb, 1)
        return draw(decode_one(model, tokens, pos, text_lens=lens), u_j, pos + 1 - T)

    def from_sequence(j: int) -> torch.Tensor:
        """Codes (B,) at image position j from the text and all codes before it: the prefill,
        or every step without the cache."""
        seq = torch.cat([text, codes[:, :j].repeat(nb // B, 1)], 1)
        if use_cache:
            return draw(prefill(model, seq, text_lens=lens, cond=cnd), u[:, j], j)
        return draw(model(seq, text_lens=lens, cond=cnd).image[:, -1], u[:, j], j)

    was_training = model.training
    model.eval()
    positions = torch.arange(T, T + hw, device=dev)  # token position of each image code
    if use_cache:
        model.setup_cache(nb)
    if cuda_graph is None:  # a capture costs about as much as a few eager steps
        cuda_graph = use_cache and dev.type == "cuda" and hw - start > MIN_GRAPH_STEPS
    step = GraphedStep(decode_step) if cuda_graph else decode_step
    try:
        last = None
        for j in range(start, hw):
            if last is None or not use_cache:
                last = from_sequence(j)
            else:
                last = step(last, positions[j - 1 : j], u[:, j])
            codes[:, j] = last
            # A host check per step costs nothing on the CPU; on CUDA it would stall the launch
            # queue every step, so there the loop is checked once, at its end.
            if dev.type != "cuda":
                _check_finite(bad_at, hw, s)
            if callback is not None:
                callback(j + 1, hw, codes.view(B, cfg.grid_h, w))
        _check_finite(bad_at, hw, s)
    finally:
        if use_cache:
            model.clear_cache()
        model.train(was_training)
    return codes.view(B, cfg.grid_h, w)


def _check_finite(bad_at: torch.Tensor, hw: int, s: ARSampling) -> None:
    """ValueError naming the first sample and image position whose probabilities were not finite
    (`bad_at`, hw where none) and the settings that drew them."""
    first = int(bad_at.min())
    if first < hw:
        b = int(bad_at.argmin())
        raise ValueError(
            f"sampling step at image position {first} of sample {b}: the probabilities are not "
            f"finite (NaN or inf; temperature={s.temperature:g}, guidance_scale="
            f"{s.guidance_scale:g}, part_scale={s.part_scale:g}): the logits left float32's "
            "range; lower the guidance scale or raise the temperature"
        )


# ----------------------------------------------------------------------------------------------
# Checks (ValueError naming what was expected and what came).


def _check_inputs(model, text_ids, text_lens, cond, num_samples) -> int:
    cfg = model.cfg
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
    N = None
    if cfg.has_text:
        if text_ids is None:
            raise ValueError(f"this model reads text: expected text_ids (N, {cfg.text_len})")
        if text_ids.ndim != 2 or text_ids.dtype != torch.long:
            raise ValueError(
                f"text_ids must be a (N, T) long tensor, got {text_ids.dtype} "
                f"{tuple(text_ids.shape)}"
            )
        if text_ids.shape[1] != cfg.text_len:
            raise ValueError(
                f"text_ids must have the model's text_len {cfg.text_len} columns, "
                f"got {text_ids.shape[1]}"
            )
        N = text_ids.shape[0]
        if text_lens is not None:
            if text_lens.shape != (N,):
                raise ValueError(f"text_lens must have shape ({N},), got {tuple(text_lens.shape)}")
            _check_lens(text_lens, cfg.text_len, "text_lens")
    elif text_ids is not None and text_ids.numel():
        raise ValueError(
            "this model's embedding replaces the text (cond_mode=replace): no text_ids"
        )
    if cfg.takes_cond:
        if cond is None or cond.ndim != 2 or cond.shape[1] != cfg.cond_dim:
            got = None if cond is None else tuple(cond.shape)
            raise ValueError(f"this model needs cond (N, {cfg.cond_dim}), got {got}")
        if N is not None and cond.shape[0] != N:
            raise ValueError(f"cond must have one row per prompt ({N}), got {cond.shape[0]}")
        N = cond.shape[0]
    elif cond is not None:
        raise ValueError("cond was given but this model has cond_dim=0")
    if N == 0:
        raise ValueError("expected at least one prompt, got none")
    return N


def _check_lens(lens: torch.Tensor, T: int, name: str) -> None:
    """Caption lengths count BOS and EOS: each in [1, T]."""
    lo, hi = int(lens.min()), int(lens.max())
    if lo < 1 or hi > T:
        raise ValueError(f"{name} must be in [1, {T}], got [{lo}, {hi}]")


def _check_parts(parts, part_lens, part_weights, N: int, cfg) -> int:
    if parts is None:
        if part_lens is not None or part_weights is not None:
            raise ValueError("part_lens or part_weights were given without parts")
        return 0
    if not cfg.has_text:
        raise ValueError("parts are captions: this model reads no text")
    if parts.ndim != 3 or parts.dtype != torch.long or parts.shape[::2] != (N, cfg.text_len):
        raise ValueError(
            f"parts must be a (N={N}, K, T={cfg.text_len}) long tensor, got {parts.dtype} "
            f"{tuple(parts.shape)}"
        )
    if part_lens is None or part_lens.shape != parts.shape[:2]:
        got = None if part_lens is None else tuple(part_lens.shape)
        raise ValueError(f"part_lens must have shape {tuple(parts.shape[:2])}, got {got}")
    _check_lens(part_lens, cfg.text_len, "part_lens")
    if part_weights is not None and part_weights.shape != parts.shape[:2]:
        raise ValueError(
            f"part_weights must have shape {tuple(parts.shape[:2])}, got "
            f"{tuple(part_weights.shape)}"
        )
    return parts.shape[1]


def _check_prime(prime: torch.Tensor, N: int, num_samples: int, cfg) -> torch.Tensor:
    if prime.ndim != 3 or prime.dtype != torch.long:
        raise ValueError(f"prime_codes must be a (N, r, w) long tensor, got {prime.dtype} "
                         f"{tuple(prime.shape)}")  # fmt: skip
    if prime.shape[0] not in (N, N * num_samples):
        raise ValueError(
            f"prime_codes must have one grid per prompt ({N}) or per sample "
            f"({N * num_samples}), got {prime.shape[0]}"
        )
    if prime.shape[1] > cfg.grid_h or prime.shape[2] != cfg.grid_w:
        raise ValueError(
            f"prime_codes must be (N, r, {cfg.grid_w}) with r <= {cfg.grid_h}, "
            f"got {tuple(prime.shape)}"
        )
    if prime.numel():
        lo, hi = int(prime.min()), int(prime.max())
        if lo < 0 or hi >= cfg.image_vocab:
            raise ValueError(f"prime_codes must be in [0, {cfg.image_vocab}), got [{lo}, {hi}]")
    if prime.shape[0] == N and num_samples > 1:
        prime = prime.repeat_interleave(num_samples, 0)
    return prime


def _check_empty(empty_ids: torch.Tensor, T: int) -> torch.Tensor:
    if empty_ids.ndim == 2 and empty_ids.shape[0] == 1:
        empty_ids = empty_ids[0]
    if empty_ids.shape != (T,):
        raise ValueError(f"empty_ids must have shape ({T},), got {tuple(empty_ids.shape)}")
    return empty_ids.long()[None]
