"""Masked (absorbing-state) discrete diffusion sampling, MaskGIT style (Chang et al. 2022): start
from an image of [MASK] codes and, in `steps` parallel passes of the bidirectional generator,
draw every masked code and keep the most confident ones, until none is masked. The number still
masked after pass t of T is floor(n0 * cos(pi/2 * (t+1)/T)) (the cosine schedule), n0 the
sample's masked count at the start (all h*w, or an inpainting mask's).

    codes = generate_masked(model, text.ids, MaskedSampling(steps=12), text_lens=lens,
                            empty_ids=empty.ids[0], empty_len=2, seeds=[0, 1])   # (2, h, w)

The scheduler (`MaskGITScheduler`: `set_timesteps`, `step`) is apart from the network, as in
diffusers. diffusers' `AmusedScheduler` implements the same rule but draws the codes and the
Gumbel noise from one generator for the whole batch, so a sample would depend on its batch;
here every sample draws from its own stream (`runtime.uniforms(seed)`: one uniform per position
and pass for the code, one for the Gumbel noise, then one per position for the corrector's order
and one per position and corrector pass for its draw), so a sample is the same alone or in any
batch, and the corrector (`MaskedSampling.corrector_steps`) leaves the passes before it alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from dalle_ar.models.transformer import Transformer
from dalle_ar.runtime import precision_name, sample_seeds, uniforms
from dalle_ar.sampling.logits import check_probs, combine, logits_to_probs, sample_from_probs
from dalle_ar.sampling.settings import MaskedSampling, resolve


class MaskGITScheduler:
    """The unmasking rule of `generate_masked`, apart from the network.

    set_timesteps(steps); then per pass t: step(logits, t, codes, u_code, u_gumbel) -> codes with
    fewer masked, the count `still_masked(t)` after it."""

    def __init__(self, mask_id: int, confidence_temperature: float = 4.5) -> None:
        self.mask_id, self.confidence_temperature = mask_id, confidence_temperature
        self.timesteps = torch.zeros(0, dtype=torch.long)
        self.start: torch.Tensor | None = None  # (B,) masked codes at the start

    def set_timesteps(self, steps: int, codes: torch.Tensor) -> None:
        """`steps` passes over codes (B, n) whose masked positions hold `mask_id`."""
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self.timesteps = torch.arange(steps)
        self.start = (codes == self.mask_id).sum(1)

    def still_masked(self, t: int) -> torch.Tensor:
        """(B,) codes left masked after pass t (0 after the last)."""
        frac = math.cos(math.pi / 2 * (t + 1) / len(self.timesteps))
        return (self.start.double() * frac).floor().long().clamp(min=0)

    def step(
        self,
        probs: torch.Tensor,
        t: int,
        codes: torch.Tensor,
        u_code: torch.Tensor,
        u_gumbel: torch.Tensor,
    ) -> torch.Tensor:
        """probs (B, n, V) of every position's code, codes (B, n) long, u_code and u_gumbel (B, n)
        uniforms in [0, 1) -> codes (B, n): every masked code drawn (inverse CDF), the
        `still_masked(t)` least confident of them masked again. Kept codes never change."""
        B, n, V = probs.shape
        masked = codes == self.mask_id
        drawn = sample_from_probs(probs.reshape(B * n, V), u_code.reshape(-1)).view(B, n)
        logp = probs.gather(-1, drawn[..., None])[..., 0].clamp(min=1e-30).log().double()
        gumbel = -torch.log(-torch.log(u_gumbel.clamp(1e-12, 1 - 1e-12)))
        scale = self.confidence_temperature * (1 - (t + 1) / len(self.timesteps))
        conf = torch.where(masked, logp + scale * gumbel, torch.inf)  # kept: never re-masked
        rank = conf.argsort(dim=1, stable=True).argsort(dim=1)  # 0 = least confident
        again = rank < self.still_masked(t).to(codes.device)[:, None]
        return torch.where(again, self.mask_id, torch.where(masked, drawn, codes))


def corrector_groups(drawn: torch.Tensor, u: torch.Tensor, k: int) -> torch.Tensor:
    """(B, n) long: each drawn position's corrector group in [0, k), the drawn positions (drawn
    (B, n) bool) of a sample split into k groups of sizes within one of each other in the random
    order of its uniforms u (B, n); k (never a group) where not drawn."""
    rank = torch.where(drawn, u, 2.0).argsort(1).argsort(1)  # 0 = first drawn position in order
    group = rank * k // drawn.sum(1, keepdim=True).clamp(min=1)
    return torch.where(drawn, group, k)


def masked_precision(device: torch.device, precision: str) -> str:
    """What the masked generator's passes run in on `device` for `MaskedSampling.precision`:
    "bf16" for bf16, and for auto where the device has bf16, a CPU's bf16 instructions included
    (`runtime.uses_bf16` with cpu_auto: a whole pass is matrix-matrix work that bf16 speeds up
    there); else "fp32". The pipeline records this, not "auto"."""
    return precision_name(device, precision, cpu_auto=True)


def _autocast(device: torch.device, precision: str) -> torch.autocast:
    """bf16 autocast, or autocast off (fp32 even inside a caller's autocast)."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


@torch.inference_mode()
def generate_masked(
    model: Transformer,
    text_ids: torch.Tensor,
    settings: MaskedSampling | None = None,
    *,
    text_lens: torch.Tensor | None = None,
    empty_ids: torch.Tensor | None = None,
    empty_len: int = 2,
    seeds: int | Sequence[int] | None = None,
    init_codes: torch.Tensor | None = None,
    callback: Callable[[int, int, torch.Tensor], None] | None = None,
    **overrides,
) -> torch.Tensor:
    """Codes (B, h, w) for B captions text_ids (B, T) (`TextTokenizer.encode`), one sample each,
    sample b drawn from seeds[b]'s stream. `init_codes` (B, h, w): start from these, where they
    hold `model.cfg.mask_id` the codes are drawn and elsewhere kept exactly (inpainting); default
    all masked. Guidance (guidance_scale != 1) runs the empty caption `empty_ids` (T,) in the
    same batch: uncond + g * (cond - uncond) on the logits, g the pass's scale
    (`MaskedSampling.guidance_at`). The network runs in `masked_precision` (bf16 autocast, or
    fp32 with autocast off); its logits are cast to fp32 before guidance and the softmax.
    callback(t, steps, codes) after each unmasking pass (not after the corrector's). The call
    sets up the model's KV cache for its batch (the captions' keys and values, computed once)
    and releases it at the end. ValueError
    for a model that is not a masked generator, inputs of the wrong shape, or a pass whose
    probabilities are not finite (`logits.check_probs`)."""
    cfg = model.cfg
    if not cfg.masked:
        raise ValueError("generate_masked needs a masked generator (objective='masked')")
    s = resolve(settings or MaskedSampling(), **overrides)
    if text_ids.ndim != 2 or text_ids.shape[1] != cfg.text_len:
        raise ValueError(f"text_ids must be (B, {cfg.text_len}), got {tuple(text_ids.shape)}")
    B, n, dev = text_ids.shape[0], cfg.image_len, model.image_head.weight.device
    if init_codes is None:
        codes = torch.full((B, n), cfg.mask_id, dtype=torch.long, device=dev)
    else:
        if init_codes.shape != (B, cfg.grid_h, cfg.grid_w):
            raise ValueError(f"init_codes must be ({B}, {cfg.grid_h}, {cfg.grid_w}), got "
                             f"{tuple(init_codes.shape)}")  # fmt: skip
        codes = init_codes.reshape(B, n).long().to(dev)
        if int(codes.min()) < 0 or int(codes.max()) > cfg.mask_id:
            raise ValueError(f"init_codes must be codes in [0, {cfg.image_vocab}) or the mask "
                             f"id {cfg.mask_id}")  # fmt: skip
    guided = s.guidance_scale != 1
    if guided and empty_ids is None:
        raise ValueError("guidance (scale != 1) needs empty_ids, the empty caption's ids")
    K = s.corrector_steps  # per sample: 2 uniforms per position and pass, then the corrector's
    u_all = uniforms(sample_seeds(B, seeds), (2 * s.steps + 1 + K) * n, dev)
    u = u_all[:, : 2 * s.steps * n].view(B, 2, s.steps, n)
    u_order, u_fix = u_all[:, 2 * s.steps * n :].split([n, K * n], dim=1)
    text, lens = text_ids.to(dev), None if text_lens is None else text_lens.to(dev)
    if guided:
        text = torch.cat([text, empty_ids.to(dev).view(1, -1).expand(B, -1)])
        if lens is not None:
            lens = torch.cat([lens, lens.new_full((B,), empty_len)])
    precision = masked_precision(dev, s.precision)
    sched = MaskGITScheduler(cfg.mask_id, s.confidence_temperature)
    sched.set_timesteps(s.steps, codes)
    drawn = codes == cfg.mask_id  # the positions this call draws; the corrector redraws only these
    group = corrector_groups(drawn, u_order, K)

    def probs_at(codes: torch.Tensor, t: int, name: str) -> torch.Tensor:
        image = codes.repeat(2, 1) if guided else codes
        with _autocast(dev, precision):
            logits = model.forward_image(image, text_lens=lens).float()
        if guided:  # a pass at scale 1 (a rising schedule's first) is the conditional half
            g, pair = s.guidance_at(t), logits.view(2, B, n, -1)
            logits = pair[0] if g == 1 else combine(pair, [g])
        probs = logits_to_probs(logits, s.temperature, s.top_k)
        check_probs(probs, f"masked sampling, {name}")
        return probs

    was_training = model.training
    model.eval()
    try:
        # The caption sees no image position: computed once here, read from the KV cache by
        # every pass (in the precision of the passes).
        model.setup_cache(text.shape[0], dtype=torch.bfloat16 if precision == "bf16" else None)
        with _autocast(dev, precision):
            model(text, torch.arange(text.shape[1], device=dev), text_lens=lens)
        for t in sched.timesteps.tolist():
            # a pass that unmasks no code in any row would give the codes back: not run (the
            # schedule's first passes round down so at times; an inpainting of a few codes with
            # many steps, mostly). Its uniforms are its own, so the others draw as before
            if not bool((sched.still_masked(t) == (codes == cfg.mask_id).sum(1)).all()):
                probs = probs_at(codes, t, f"pass {t + 1} of {s.steps}")
                codes = sched.step(probs, t, codes, u[:, 0, t], u[:, 1, t])
            if callback is not None:
                callback(t + 1, s.steps, codes.view(B, cfg.grid_h, cfg.grid_w))
        for k in range(K):  # the corrector: group k masked again and redrawn given the rest
            again = drawn & (group == k)
            probs = probs_at(codes.masked_fill(again, cfg.mask_id), s.steps - 1,
                             f"corrector pass {k + 1} of {K}")  # fmt: skip
            u_k = u_fix[:, k * n : (k + 1) * n].reshape(-1)
            redrawn = sample_from_probs(probs.reshape(B * n, -1), u_k).view(B, n)
            codes = torch.where(again, redrawn, codes)
    finally:
        model.clear_cache()
        model.train(was_training)
    return codes.view(B, cfg.grid_h, cfg.grid_w)
