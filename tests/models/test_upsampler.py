"""The cascade's upsampler (dalle_ar.models.upsampler) and its sampling loop
(dalle_ar.sampling.diffusion.upsample_images): the schedules' round trip, the small image
conditions the output, per-sample seeds, the folder, and wrong input refused by name."""

from __future__ import annotations

import pytest
import torch

from dalle_ar.config import ConfigError
from dalle_ar.models.upsampler import (
    Upsampler,
    UpsamplerConfig,
    downscale,
    sample_scheduler,
    train_scheduler,
)
from dalle_ar.sampling.diffusion import upsample_images
from dalle_ar.sampling.settings import UpsampleSampling

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(**kw) -> UpsamplerConfig:
    base = {"low_size": 8, "scale": 2, "channels": [8, 16], "norm_groups": 4,
            "mid_attention": False}  # fmt: skip
    return UpsamplerConfig(**{**base, **kw})


def _upsampler(seed: int = 0, **kw) -> Upsampler:
    torch.manual_seed(seed)
    up = Upsampler(_cfg(**kw)).eval()
    with torch.no_grad():  # a fresh U-Net's last conv is zero: give it an output to compare
        for p in up.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return up


def _low(n: int, seed: int, size: int = 8) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("prediction", ["v_prediction", "epsilon", "sample"])
@pytest.mark.parametrize("steps", [1, 4])
def test_ddim_with_the_true_prediction_lands_on_x0(prediction, steps):
    """The schedules' round trip: noise x0 with the training schedule, then let the sampling
    schedule step with the exact prediction the network should make; it ends on x0."""
    cfg = _cfg(prediction_type=prediction)
    ddpm, ddim = train_scheduler(cfg), sample_scheduler(cfg)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(2, 3, 16, 16, generator=g) * 1.6 - 0.8
    noise = torch.randn(2, 3, 16, 16, generator=g)
    ddim.set_timesteps(steps)
    x = ddpm.add_noise(x0, noise, ddim.timesteps[:1].repeat(2))
    abar = ddpm.alphas_cumprod
    for t in ddim.timesteps:
        a, s = abar[t].sqrt(), (1 - abar[t]).sqrt()
        eps = (x - a * x0) / s
        pred = {"v_prediction": a * eps - s * x0, "epsilon": eps, "sample": x0}[prediction]
        x = ddim.step(pred, t, x).prev_sample
    # epsilon-prediction divides by sqrt(alpha_bar) ~ 0.006 at the first trailing timestep, so
    # float32 rounding grows there (why the upsampler predicts x0, or v)
    tol = 1e-2 if prediction == "epsilon" else 1e-4
    assert torch.allclose(x, x0, atol=tol), (x - x0).abs().max()


def test_the_small_image_conditions_the_output():
    up = _upsampler()
    s = UpsampleSampling(upsample_steps=3, noise_level=0)
    a = upsample_images(up, _low(2, 1), s, [5, 6])
    b = upsample_images(up, _low(2, 2), s, [5, 6])  # same seeds, other small images
    assert a.shape == (2, 3, 16, 16) and a.abs().max() <= 1
    assert (a - b).abs().mean() > 1e-3
    # the noise level is an input too (the augmentation level, embedded as a timestep)
    c = upsample_images(up, _low(2, 1), UpsampleSampling(3, noise_level=400), [5, 6])
    assert (a - c).abs().mean() > 1e-4


def test_a_sample_is_the_same_alone_and_in_a_batch():
    up = _upsampler()
    low, seeds, s = _low(4, 3), [10, 11, 12, 13], UpsampleSampling(upsample_steps=2)
    batch = upsample_images(up, low, s, seeds, batch_size=4)
    for i in range(4):
        alone = upsample_images(up, low[i : i + 1], s, seeds[i : i + 1])
        assert torch.allclose(alone[0], batch[i], atol=1e-5), i
    other = upsample_images(up, low[:1], s, [99])
    assert not torch.allclose(other[0], batch[0], atol=1e-3)  # the seed matters


def test_caption_conditioning_reads_the_text():
    up = _upsampler(caption_dim=4)
    t1 = torch.nn.functional.normalize(
        torch.randn(2, 4, generator=torch.Generator().manual_seed(1))
    )
    t2 = torch.nn.functional.normalize(
        torch.randn(2, 4, generator=torch.Generator().manual_seed(2))
    )
    s = UpsampleSampling(upsample_steps=2)
    a, b = (upsample_images(up, _low(2, 0), s, [0, 1], text=t) for t in (t1, t2))
    assert (a - b).abs().mean() > 1e-4
    with pytest.raises(ValueError, match=r"reads the caption: expected text of shape \(2, 4\)"):
        upsample_images(up, _low(2, 0), s, [0, 1])
    with pytest.raises(ValueError, match="takes no caption"):
        upsample_images(_upsampler(), _low(2, 0), s, [0, 1], text=t1)


def test_wrong_input_is_refused_by_name():
    up = _upsampler()
    s = UpsampleSampling(upsample_steps=2)
    with pytest.raises(ValueError, match=r"takes 8x8 RGB images \(B, 3, 8, 8\), got a "
                                         r"batch of shape \(1, 3, 16, 16\)"):  # fmt: skip
        upsample_images(up, _low(1, 0, size=16), s, [0])
    with pytest.raises(ValueError, match=r"one seed per image \(2\), got 1"):
        upsample_images(up, _low(2, 0), s, [0])
    with pytest.raises(ValueError, match="noise_level=1000 must fit the upsampler's 1000"):
        upsample_images(up, _low(1, 0), UpsampleSampling(2, noise_level=1000), [0])
    with pytest.raises(ConfigError, match="upsample_steps"):
        upsample_images(up, _low(1, 0), UpsampleSampling(upsample_steps=0), [0])
    with pytest.raises(ConfigError, match="norm_groups"):
        Upsampler(_cfg(norm_groups=3))
    with pytest.raises(ConfigError, match="8 levels halve the side 7 times"):
        Upsampler(_cfg(channels=[8] * 8))


def test_the_folder_round_trips_and_refuses_another_shape(tmp_path):
    up = _upsampler()
    up.save_pretrained(tmp_path / "up")
    again = Upsampler.from_pretrained(tmp_path / "up")
    assert again.cfg == up.cfg
    s = UpsampleSampling(upsample_steps=2)
    assert torch.equal(upsample_images(up, _low(1, 0), s, [0]),
                       upsample_images(again, _low(1, 0), s, [0]))  # fmt: skip
    _upsampler(channels=[8, 24], norm_groups=4).save_pretrained(tmp_path / "wide")
    cfg = (tmp_path / "wide" / "config.json").read_text().replace("24", "16")
    (tmp_path / "wide" / "config.json").write_text(cfg)
    with pytest.raises(ValueError, match="does not fit this model"):
        Upsampler.from_pretrained(tmp_path / "wide")


def test_downscale_is_a_box_filter_in_8_bits():
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    small = downscale(x, 8)
    box = x.view(2, 3, 8, 2, 8, 2).mean((3, 5))
    assert small.shape == (2, 3, 8, 8)
    assert torch.allclose(small, box, atol=0.5 / 255 + 1e-6)
    assert torch.equal(small * 255, (small * 255).round())


def test_mid_attention_adds_self_attention_at_the_lowest_resolution():
    def attentions(flag: bool) -> int:
        up = Upsampler(_cfg(mid_attention=flag))
        return sum(type(m).__name__ == "Attention" for m in up.modules())

    assert attentions(False) == 0 and attentions(True) >= 2  # the down and the up block
