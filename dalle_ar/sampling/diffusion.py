"""The continuous-diffusion sampling loops: the prior's and the upsampler's.

The prior (DALL-E 2, Ramesh et al. 2022, section 2.1): caption text embeddings -> CLIP image
embeddings, by DDIM (Song et al. 2021, eta = 0) over the prior's
x0-predictions, with classifier-free guidance (Ho & Salimans 2022) and, per caption, the best
of `embed_candidates` drawn embeddings by cosine to the caption (the paper's section 2.1 and
appendix: "we generate two samples of z_i and select the one with a higher dot product with
z_t").

    img = sample_prior(prior, text_embeds, PriorSampling(prior_guidance=2.0), seeds=[0, 1, 2])

The upsampler (SR3 / Imagen): small images -> large ones by DDIM over the upsampler's
predictions, the small image noised to the settings' augmentation level.

    big = upsample_images(upsampler, small, UpsampleSampling(upsample_steps=5), seeds=[0, 1])

Every sample draws its noise from a CPU generator seeded from its own seed (`stream`: the
prior's, the upsampler's and the transformer's are separate streams), and the rest of each loop
is deterministic, so a sample is the same alone or in any batch (up to the float rounding of
batched convolutions in the upsampler).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

from dalle_ar.models import upsampler as up
from dalle_ar.models.prior import DiffusionPrior, sample_scheduler
from dalle_ar.runtime import sample_generator
from dalle_ar.sampling.settings import PriorSampling, UpsampleSampling

log = logging.getLogger(__name__)


def guided_x0(
    prior: DiffusionPrior, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, guidance: float
) -> torch.Tensor:
    """The prior's x0 for x (B, D) at timestep t (a scalar) under classifier-free guidance:
    uncond + g * (cond - uncond), the unconditional rows (zero text) run in the same batch; with
    g == 1 they are not run at all."""
    ts = t.to(x.device, torch.long).expand(len(x))  # (B,)
    if guidance == 1:
        return prior(x, ts, text)
    both = prior(torch.cat([x, x]), torch.cat([ts, ts]), torch.cat([text, torch.zeros_like(text)]))
    cond, uncond = both.chunk(2)  # (B, D) each
    return uncond + guidance * (cond - uncond)


@torch.inference_mode()
def sample_prior(
    prior: DiffusionPrior,
    text_embeds: torch.Tensor,
    settings: PriorSampling | None = None,
    seeds: Sequence[int] = (),
) -> torch.Tensor:
    """Unit CLIP image embeddings (N, D) for unit text embeddings (N, D), one per seed (N); a
    zero row is "no caption", the unconditional draw the prior learnt from its dropped captions.

    ValueError for text embeddings of another shape or neither unit nor zero, a seed count
    other than N, or impossible settings (`PriorSampling.validate`)."""
    settings = settings or PriorSampling()
    settings.validate()
    d = prior.cfg.embed_dim
    if text_embeds.ndim != 2 or text_embeds.shape[1] != d:
        raise ValueError(f"expected text embeddings of shape (N, {d}), got "
                         f"{tuple(text_embeds.shape)}")  # fmt: skip
    n, k = len(text_embeds), settings.embed_candidates
    if len(seeds) != n:
        raise ValueError(f"expected one seed per text embedding ({n}), got {len(seeds)}")
    given = text_embeds.float().norm(dim=-1) > 0  # zero rows: no caption
    check_unit(text_embeds[given], "expected unit text embeddings (or zero rows: no caption)")
    if settings.prior_steps > prior.cfg.num_train_timesteps:
        raise ValueError(f"prior_steps={settings.prior_steps} exceeds the prior's "
                         f"{prior.cfg.num_train_timesteps} training timesteps")  # fmt: skip
    device = prior.net.clip_mean.device
    cond = text_embeds.float().to(device)
    text = cond.repeat_interleave(k, 0)  # (N*K, D), caption-major
    noise = [torch.randn(k, d, generator=sample_generator(prior_stream(int(s)))) for s in seeds]
    x = torch.cat(noise).to(device) if noise else torch.zeros(0, d, device=device)  # (N*K, D)

    was_training = prior.training
    prior.eval()
    try:
        scheduler = sample_scheduler(prior.cfg)
        scheduler.set_timesteps(settings.prior_steps)
        for t in scheduler.timesteps:
            x0 = guided_x0(prior, x, t, text, settings.prior_guidance)
            x = scheduler.step(x0, t, x).prev_sample  # eta = 0: no noise added
    finally:
        prior.train(was_training)

    emb = F.normalize(prior.denormalise(x), dim=-1).view(n, k, d)
    best = (emb @ cond[:, :, None]).squeeze(-1).argmax(1)  # (N,): the closest to its caption
    return emb[torch.arange(n, device=device), best]


def check_upsample_settings(
    cfg: up.UpsamplerConfig, settings: UpsampleSampling | None
) -> UpsampleSampling:
    """The settings (default `UpsampleSampling()`), checked against the upsampler's training
    schedule before any work: ValueError for an impossible field, more steps than training
    timesteps or a noise level past them; a warning for a level past the training range
    (`max_noise_level`)."""
    settings = settings or UpsampleSampling()
    settings.validate()
    steps, level, T = settings.upsample_steps, settings.noise_level, cfg.num_train_timesteps
    if steps > T or level >= T:
        raise ValueError(f"upsample_steps={steps} and noise_level={level} must fit the "
                         f"upsampler's {T} training timesteps")  # fmt: skip
    if level > cfg.max_noise_level:
        log.warning("noise_level=%d is past the levels the upsampler was trained on (up to %d)",
                    level, cfg.max_noise_level)  # fmt: skip
    return settings


def check_unit(embeds: torch.Tensor, message: str) -> None:
    """ValueError "{message}, got norms in [lo, hi]" unless every row of embeds (N, D) is a unit
    vector (to 1e-3), as CLIP embeddings are where the prior and the transformer meet them."""
    norms = embeds.float().norm(dim=-1)
    if len(norms) and not bool(((norms - 1).abs() < 1e-3).all()):
        raise ValueError(f"{message}, got norms in [{norms.min():.4f}, {norms.max():.4f}]")


def prior_stream(seed: int) -> int:
    """The seed of a sample's prior noise (`stream("prior", seed)`)."""
    return stream("prior", seed)


def stream(component: str, seed: int) -> int:
    """The seed of a sample's noise in `component`: derived from its seed by a hash, so that the
    prior's, the upsampler's and the transformer's (`runtime.uniforms(seed)`) draws are separate
    streams, and none meets another sample's."""
    digest = hashlib.sha256(f"dalle_ar.{component}/{seed}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def slerp(a: torch.Tensor, b: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
    """Spherical interpolation between unit vectors a and b (..., D) at t in [0, 1] (Shoemake
    1985): t = 0 gives a, t = 1 gives b, every point in between is a unit vector on the great
    circle through them (DALL-E 2's image-embedding interpolations, section 3.2)."""
    if a.shape != b.shape:
        raise ValueError(f"expected a and b of one shape, got {tuple(a.shape)}, {tuple(b.shape)}")
    t = torch.as_tensor(t, dtype=a.dtype, device=a.device)
    if t.ndim:
        t = t[..., None]
    cos = (a * b).sum(-1, keepdim=True).clamp(-1, 1)
    omega = torch.arccos(cos)
    sin = torch.sin(omega)
    near = sin.abs() < 1e-6  # (nearly) the same direction: a straight line is as good
    safe = torch.where(near, torch.ones_like(sin), sin)
    wa = torch.where(near, 1 - t, torch.sin((1 - t) * omega) / safe)
    wb = torch.where(near, t, torch.sin(t * omega) / safe)
    return F.normalize(wa * a + wb * b, dim=-1)


@torch.inference_mode()
def upsample_images(
    upsampler: up.Upsampler,
    low: torch.Tensor,
    settings: UpsampleSampling | None = None,
    seeds: Sequence[int] = (),
    text: torch.Tensor | None = None,
    batch_size: int = 16,
    progress: bool = False,
) -> torch.Tensor:
    """Large images (N, 3, H, W) in [-1, 1] for small ones low (N, 3, h, w) in [-1, 1], one per
    seed (N); text (N, D) unit CLIP text embeddings of the captions when the upsampler reads
    them. Drawn `batch_size` at a time (`progress`: a tqdm bar over the batches).

    ValueError for small images of another size, a seed count other than N, text the upsampler
    does not take (or lacks), or impossible settings (`UpsampleSampling.validate`, a noise level
    or step count past the upsampler's training schedule)."""
    cfg = upsampler.cfg
    settings = check_upsample_settings(cfg, settings)
    n, s = len(low), cfg.high_size
    up.check_small(cfg, tuple(low.shape))
    if len(seeds) != n:
        raise ValueError(f"expected one seed per image ({n}), got {len(seeds)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if text is not None:
        if len(text) != n:
            raise ValueError(f"expected one caption embedding per image ({n}), got {len(text)}")
        check_unit(text, "expected unit CLIP text embeddings")
    device = next(upsampler.parameters()).device
    out = torch.empty(n, 3, s, s)
    scheduler = up.sample_scheduler(cfg)  # DDIM's step keeps no state between samples
    scheduler.set_timesteps(settings.upsample_steps)
    was_training = upsampler.training
    upsampler.eval()
    try:
        for i in tqdm(range(0, n, batch_size), desc="upsample", unit="batch",
                      disable=not progress):  # fmt: skip
            rows = slice(i, min(i + batch_size, n))
            gens = [sample_generator(stream("upsampler", int(q))) for q in seeds[rows]]
            x = torch.stack([torch.randn(3, s, s, generator=g) for g in gens]).to(device)
            aug = torch.stack([torch.randn(3, s, s, generator=g) for g in gens]).to(device)
            level = torch.full((len(x),), settings.noise_level, device=device, dtype=torch.long)
            cond = upsampler.condition(low[rows].float().to(device), level, aug)
            txt = None if text is None else text[rows].float().to(device)
            for t in scheduler.timesteps:
                ts = t.to(device, torch.long).expand(len(x))
                pred = upsampler(x, ts, cond, level, txt)
                x = scheduler.step(pred, t, x).prev_sample  # eta = 0: no noise added
            out[rows] = x.clamp(-1, 1).cpu()
    finally:
        upsampler.train(was_training)
    return out
