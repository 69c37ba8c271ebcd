"""The diffusion prior's sampling loop (DALL-E 2, Ramesh et al. 2022, section 2.1): caption text
embeddings -> CLIP image embeddings, by DDIM (Song et al. 2021, eta = 0) over the prior's
x0-predictions, with classifier-free guidance (Ho & Salimans 2022) and, per caption, the best
of `embed_candidates` drawn embeddings by cosine to the caption (the paper's section 2.1 and
appendix: "we generate two samples of z_i and select the one with a higher dot product with
z_t").

    img = sample_prior(prior, text_embeds, PriorSampling(prior_guidance=2.0), seeds=[0, 1, 2])

Every sample draws its initial noise from a CPU generator seeded from its own seed
(`prior_stream`, a stream apart from the transformer's), and the rest of the loop is
deterministic, so a sample is the same alone or in any batch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from dalle_ar.prior import DiffusionPrior, sample_scheduler
from dalle_ar.runtime import sample_generator
from dalle_ar.sampling.settings import PriorSampling


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
    """Unit CLIP image embeddings (N, D) for unit text embeddings (N, D), one per seed (N).

    ValueError for text embeddings of another shape or not unit, a seed count other than N, or
    impossible settings (`PriorSampling.validate`)."""
    settings = settings or PriorSampling()
    settings.validate()
    d = prior.cfg.embed_dim
    if text_embeds.ndim != 2 or text_embeds.shape[1] != d:
        raise ValueError(f"expected text embeddings of shape (N, {d}), got "
                         f"{tuple(text_embeds.shape)}")  # fmt: skip
    n, k = len(text_embeds), settings.embed_candidates
    if len(seeds) != n:
        raise ValueError(f"expected one seed per text embedding ({n}), got {len(seeds)}")
    check_unit(text_embeds, "expected unit text embeddings")
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


def check_unit(embeds: torch.Tensor, message: str) -> None:
    """ValueError "{message}, got norms in [lo, hi]" unless every row of embeds (N, D) is a unit
    vector (to 1e-3), as CLIP embeddings are where the prior and the transformer meet them."""
    norms = embeds.float().norm(dim=-1)
    if len(norms) and not bool(((norms - 1).abs() < 1e-3).all()):
        raise ValueError(f"{message}, got norms in [{norms.min():.4f}, {norms.max():.4f}]")


def prior_stream(seed: int) -> int:
    """The seed of a sample's prior noise: derived from its seed by a hash, so that the prior's
    draws and the transformer's (`runtime.uniforms(seed)`) are separate streams, and neither
    meets another sample's."""
    digest = hashlib.sha256(f"dalle_ar.prior/{seed}".encode()).digest()
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
