"""The diffusion prior's sampling loop (dalle_ar.sampling.diffusion): guidance, per-sample seeds,
the best of several candidates, slerp, and the checks on its inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dalle_ar.config import ConfigError
from dalle_ar.models.prior import DiffusionPrior, PriorConfig, sample_scheduler
from dalle_ar.runtime import sample_generator
from dalle_ar.sampling.diffusion import prior_stream, sample_prior, slerp
from dalle_ar.sampling.settings import PriorSampling

pytestmark = pytest.mark.usefixtures("one_thread")

D = 16


@pytest.fixture(scope="module")
def prior() -> DiffusionPrior:
    torch.manual_seed(0)
    p = DiffusionPrior(PriorConfig(embed_dim=D, width=32, heads=2, layers=1)).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # away from zero, so that the text conditioning matters
        for q in (p.net.positional_embedding, p.net.prd_embedding):
            q.copy_(torch.randn(q.shape, generator=g))
    p.set_stats(0.05 * torch.randn(D, generator=g), 0.1 + torch.rand(D, generator=g) / 10)
    return p


def _text(n: int, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(n, D, generator=torch.Generator().manual_seed(seed)), dim=-1)


def _manual(prior, text, seeds, steps, guidance):
    """The loop written out: one candidate per sample, guided rows run apart."""
    sched = sample_scheduler(prior.cfg)
    sched.set_timesteps(steps)
    x = torch.cat([torch.randn(1, D, generator=sample_generator(prior_stream(s))) for s in seeds])
    with torch.no_grad():
        for t in sched.timesteps:
            ts = torch.full((len(x),), int(t))
            x0 = prior(x, ts, text)
            if guidance != 1:
                uncond = prior(x, ts, torch.zeros_like(text))
                x0 = uncond + guidance * (x0 - uncond)
            x = sched.step(x0, t, x).prev_sample
    return F.normalize(prior.denormalise(x), dim=-1)


def test_guidance_one_is_plain_conditional_sampling(prior):
    text, seeds = _text(3), [5, 6, 7]
    s = PriorSampling(prior_steps=10, prior_guidance=1.0, embed_candidates=1)
    got = sample_prior(prior, text, s, seeds)
    assert torch.allclose(got, _manual(prior, text, seeds, 10, 1.0), atol=1e-5)
    assert torch.allclose(got.norm(dim=-1), torch.ones(3), atol=1e-5)


def test_guidance_mixes_conditional_and_unconditional_rows(prior):
    text, seeds = _text(3), [5, 6, 7]
    s = PriorSampling(prior_steps=10, prior_guidance=3.0, embed_candidates=1)
    got = sample_prior(prior, text, s, seeds)
    assert torch.allclose(got, _manual(prior, text, seeds, 10, 3.0), atol=1e-5)
    assert not torch.allclose(got, _manual(prior, text, seeds, 10, 1.0), atol=1e-3)


def test_a_sample_is_the_same_alone_and_in_a_batch(prior):
    text, seeds = _text(4), [11, 12, 13, 14]
    s = PriorSampling(prior_steps=8)
    batch = sample_prior(prior, text, s, seeds)
    for i in range(4):
        alone = sample_prior(prior, text[i : i + 1], s, seeds[i : i + 1])
        assert torch.allclose(alone[0], batch[i], atol=1e-6), i
    other = sample_prior(prior, text[:1], s, [99])  # and the seed is what sets it
    assert not torch.allclose(other[0], batch[0], atol=1e-3)


def test_candidates_keep_the_one_closest_to_the_caption(prior):
    text, seeds = _text(6, seed=3), list(range(6))
    cos = {}
    for k in (1, 4):
        s = PriorSampling(prior_steps=8, prior_guidance=1.0, embed_candidates=k)
        cos[k] = (sample_prior(prior, text, s, seeds) * text).sum(-1)
    # candidate 0 of a seed is the same noise at k=1 and k=4: the best of 4 is never worse
    assert bool((cos[4] >= cos[1] - 1e-6).all())
    assert bool((cos[4] > cos[1] + 1e-4).any())


def test_bad_inputs_are_refused():
    p = DiffusionPrior(PriorConfig(embed_dim=D, width=32, heads=2, layers=1))
    with pytest.raises(ValueError, match="one seed per text embedding"):
        sample_prior(p, _text(2), PriorSampling(), [0])
    with pytest.raises(ValueError, match="unit text embeddings"):
        sample_prior(p, 2 * _text(2), PriorSampling(), [0, 1])
    with pytest.raises(ValueError, match=r"shape \(N, 16\)"):
        sample_prior(p, _text(2)[:, :8], PriorSampling(), [0, 1])
    with pytest.raises(ConfigError, match="'embed_candidates'"):
        sample_prior(p, _text(2), PriorSampling(embed_candidates=0), [0, 1])
    with pytest.raises(ConfigError, match="'prior_guidance'"):
        PriorSampling(prior_guidance=float("nan")).validate()


def test_slerp_stays_on_the_sphere_between_its_ends():
    a, b = _text(2, seed=4)
    assert torch.allclose(slerp(a, b, 0.0), a, atol=1e-6)
    assert torch.allclose(slerp(a, b, 1.0), b, atol=1e-6)
    ts = torch.linspace(0, 1, 5)
    path = slerp(a.expand(5, D), b.expand(5, D), ts)
    assert torch.allclose(path.norm(dim=-1), torch.ones(5), atol=1e-6)
    angle = torch.arccos((a * b).sum().clamp(-1, 1))
    # constant angular speed: the angle from a grows linearly in t
    from_a = torch.arccos((path * a).sum(-1).clamp(-1, 1))
    assert torch.allclose(from_a, ts * angle, atol=2e-3)  # arccos near 1 is coarse in fp32
    assert torch.allclose(slerp(a, a, 0.3), a, atol=1e-6)  # the same point: no NaN
