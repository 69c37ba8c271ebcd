"""The diffusion prior (dalle_ar.models.prior): diffusers' PriorTransformer under a config, the
normalised embedding space, its folder, the CLIP it belongs to, and its noise schedules."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from diffusers import PriorTransformer

from dalle_ar.config import ConfigError
from dalle_ar.identity import CLIPIdentity
from dalle_ar.models.prior import (
    DiffusionPrior,
    PriorConfig,
    check_clip,
    sample_scheduler,
    train_scheduler,
)

pytestmark = pytest.mark.usefixtures("one_thread")

D = 16


def _cfg(**kw) -> PriorConfig:
    return PriorConfig(**{"embed_dim": D, "width": 32, "heads": 2, "layers": 1, **kw})


def _prior(seed: int = 0, **kw) -> DiffusionPrior:
    torch.manual_seed(seed)
    return DiffusionPrior(_cfg(**kw)).eval()


def _inputs(b: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, D, generator=g)
    t = torch.randint(0, 1000, (b,), generator=g)
    text = F.normalize(torch.randn(b, D, generator=g), dim=-1)
    return x, t, text


def _ident(c: str = "c" * 64, w: str = "w" * 64, d: int = D) -> dict:
    return {"config_sha256": c, "weights_sha256": w, "embed_dim": d}


@pytest.mark.parametrize(
    "kw, key",
    [({"heads": 3}, "heads"), ({"layers": 0}, "layers"), ({"beta_schedule": "cosine"},
     "beta_schedule"), ({"clip": CLIPIdentity(embed_dim=8)}, "clip.embed_dim")],
)  # fmt: skip
def test_impossible_configs_are_refused_by_name(kw, key):
    with pytest.raises(ConfigError, match=rf"'{key}'"):
        _cfg(**kw).validate()


def test_the_network_is_diffusers_prior_transformer_and_predicts_b_by_d():
    prior = _prior()
    assert isinstance(prior.net, PriorTransformer)
    assert prior.net.config.num_embeddings == 0 and prior.net.config.additional_embeddings == 4
    x, t, text = _inputs()
    out = prior(x, t, text)
    assert out.shape == (3, D)
    # each row depends on its own inputs only; the text and the timestep both matter
    assert torch.allclose(prior(x[1:2], t[1:2], text[1:2]), out[1:2], atol=1e-6)
    assert not torch.allclose(prior(x, t, torch.zeros_like(text)), out)
    assert not torch.allclose(prior(x, (t + 500) % 1000, text), out)
    with pytest.raises(ValueError, match=r"\(B, 16\)"):
        prior(x[:, :8], t, text[:, :8])


def test_normalisation_is_per_dimension_and_undone_exactly():
    prior = _prior()
    e = F.normalize(torch.randn(50, D, generator=torch.Generator().manual_seed(1)), dim=-1)
    mean, std = e.mean(0), e.std(0)
    prior.set_stats(mean, std)
    x = prior.normalise(e)
    assert torch.allclose(x.mean(0), torch.zeros(D), atol=1e-5)
    assert torch.allclose(x.std(0), torch.ones(D), atol=1e-4)
    assert torch.allclose(prior.denormalise(x), e, atol=1e-6)
    assert not any(p.requires_grad for p in (prior.net.clip_mean, prior.net.clip_std))
    with pytest.raises(ValueError, match="std must be > 0"):
        prior.set_stats(mean, torch.zeros(D))


def test_save_load_round_trip_keeps_weights_stats_and_clip(tmp_path):
    prior = _prior(clip=CLIPIdentity.from_identity(_ident()))
    prior.set_stats(torch.linspace(-0.1, 0.1, D), torch.linspace(0.01, 0.1, D))
    prior.save_pretrained(tmp_path / "prior")
    assert json.loads((tmp_path / "prior" / "config.json").read_text())["component"] == "prior"
    again = DiffusionPrior.from_pretrained(tmp_path / "prior")
    assert again.cfg == prior.cfg
    x, t, text = _inputs()
    assert torch.equal(again(x, t, text), prior(x, t, text))
    assert torch.equal(again.denormalise(x), prior.denormalise(x))
    assert again.net.causal_attention_mask.device.type == "cpu"  # rebuilt, not left on meta


def test_a_folder_of_another_shape_is_refused_by_name(tmp_path):
    _prior().save_pretrained(tmp_path / "prior")
    meta_path = tmp_path / "prior" / "config.json"
    meta = json.loads(meta_path.read_text())
    meta["config"]["layers"] = 2
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"missing: net\.transformer_blocks\.1\."):
        DiffusionPrior.from_pretrained(tmp_path / "prior")
    meta["component"] = "transformer"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="holds a 'transformer' component, expected 'prior'"):
        DiffusionPrior.from_pretrained(tmp_path / "prior")


def test_check_clip_refuses_another_clip_naming_both():
    prior = _prior(clip=CLIPIdentity.from_identity(_ident()))
    check_clip(prior, _ident() | {"folder": "runs/clip"})  # the same CLIP: accepted
    with pytest.raises(ValueError, match=r"another CLIP \(content hash wwwwwwwwwwww\) than this "
                       r"one \(vvvvvvvvvvvv\)"):  # fmt: skip
        check_clip(prior, _ident(w="v" * 64))
    with pytest.raises(ValueError, match=r"another CLIP config \(content hash cccccccccccc\) "
                       r"than this one \(dddddddddddd\)"):  # fmt: skip
        check_clip(prior, _ident(c="d" * 64))
    check_clip(prior, _ident(c="d" * 64), allow_mismatch=True)  # a warning only
    with pytest.raises(ValueError, match="takes 16-dim CLIP embeddings, the CLIP gives 32"):
        check_clip(prior, _ident(d=32))
    with pytest.raises(ValueError, match="needs"):
        check_clip(prior, {"config_sha256": "c" * 64})


def test_ddpm_add_noise_at_the_first_timestep_is_nearly_the_identity():
    sched = train_scheduler(_cfg())
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(64, D, generator=g), torch.randn(64, D, generator=g)
    first = sched.add_noise(x0, noise, torch.zeros(64, dtype=torch.long))
    assert (first - x0).std() < 0.01  # sqrt(1 - alpha_bar_0) of unit noise: about 0.006
    last = sched.add_noise(x0, noise, torch.full((64,), 999, dtype=torch.long))
    assert torch.allclose(last, noise, atol=1e-3)  # and the last is (nearly) pure noise


def test_ddim_given_the_true_x0_lands_on_it():
    sched = sample_scheduler(_cfg())
    sched.set_timesteps(25)
    assert len(sched.timesteps) == 25 and int(sched.timesteps[0]) == 999
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(8, D, generator=g)
    x = torch.randn(8, D, generator=g)
    for t in sched.timesteps:  # a "model" that always returns the true x0
        x = sched.step(x0, t, x).prev_sample
    assert torch.allclose(x, x0, atol=1e-5)
