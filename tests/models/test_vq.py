"""VQ-VAE tokenizer: shapes, codebook, drawn masks, save/load, overfitting, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from _pipeline_fixtures import V1_PIPELINE

from dalle_ar.config import ConfigError
from dalle_ar.models.vq import VQConfig, VQTokenizer, drawn_masks

TINY = dict(width=8, num_res_blocks=1, latent_dim=8, codebook_size=32, kmeans_iters=2)
V1_VQ = V1_PIPELINE / "vq"  # saved without drawn_below


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(seed: int = 0, **kw) -> VQTokenizer:
    torch.manual_seed(seed)
    return VQTokenizer(VQConfig(**{**TINY, **kw}))


def _images(n: int = 4, size: int = 16, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g)


def _warm(model: VQTokenizer, x: torch.Tensor) -> VQTokenizer:
    """One training-mode pass: k-means initialises the codebook from these latents."""
    model.train()
    with torch.no_grad():
        model(x)
    return model.eval()


@pytest.mark.parametrize(
    ("downsample", "size", "grid", "encoder"),
    [(4, 16, 4, "conv"), (8, 16, 2, "conv"), (4, 32, 8, "conv"), (8, 64, 8, "conv"),
     (2, 16, 8, "conv"), (4, 32, 8, "patch"), (2, 16, 8, "patch")],
)  # fmt: skip
def test_encode_decode_shapes(downsample: int, size: int, grid: int, encoder: str) -> None:
    model = _model(downsample=downsample, image_size=16, encoder=encoder)
    model = _warm(model, _images(2, size))
    codes = model.encode(_images(2, size))
    assert codes.shape == (2, grid, grid) and codes.dtype == torch.int64
    assert model.grid_size(size) == (grid, grid)
    assert model.grid_size((size, 2 * size)) == (grid, 2 * grid)
    assert 0 <= codes.min() and codes.max() < model.codebook_size
    out = model.decode(codes)
    assert out.shape == (2, 3, size, size)
    assert out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"codebook_dim": 4, "use_cosine_sim": True},
        {"quantizer": "fsq", "fsq_levels": [4, 3, 3], "codebook_size": 36},
    ],
    ids=["vq", "vq-lowdim-cosine", "fsq"],
)
def test_decode_of_encode_is_the_codebook_lookup(kw: dict) -> None:
    x = _images(3)
    model = _warm(_model(**kw), x)
    codes = model.encode(x)
    q = model.quantizer
    idx = codes.reshape(3, -1)
    if kw.get("quantizer") == "fsq":
        lookup = q.project_out(q.implicit_codebook[idx])
    else:
        lookup = q.project_out(q.codebook[idx])
    lookup = lookup.reshape(3, 4, 4, -1).permute(0, 3, 1, 2)
    expected = (model.decoder(lookup) * 0.5 + 0.5).clamp(0, 1)
    torch.testing.assert_close(model.decode(codes), expected, rtol=0, atol=1e-6)
    # The eval-mode training path is the same computation.
    recon, _, codes_fwd = model(x)
    assert torch.equal(codes_fwd, codes)
    torch.testing.assert_close(recon.clamp(0, 1), expected, rtol=0, atol=1e-6)


def test_round_trip_is_the_decoded_codes_on_8_bit_levels() -> None:
    x = _images(3)
    model = _warm(_model(), x)
    got = model.round_trip(x)
    assert got.shape == x.shape
    assert torch.equal(got, model.decode_8bit(model.encode(x)))
    assert torch.equal(got * 255, (got * 255).round())  # what a saved PNG holds
    assert (got - model.decode(model.encode(x))).abs().max() <= 0.5 / 255 + 1e-6
    assert not torch.equal(got, x)  # a reconstruction, not the picture


def test_codebook_size_and_fsq_levels() -> None:
    assert _model(quantizer="fsq", fsq_levels=[4, 3, 3], codebook_size=36).codebook_size == 36
    with pytest.raises(ConfigError, match=r"prod\(fsq_levels\) = 36"):
        VQConfig(**{**TINY, "quantizer": "fsq", "fsq_levels": [4, 3, 3]}).validate()
    with pytest.raises(ConfigError, match="downsample"):
        VQConfig(downsample=3).validate()
    with pytest.raises(ConfigError, match="channel_mult"):
        VQConfig(downsample=8, channel_mult=[1, 2]).validate()


def test_patch_encoder_codes_depend_on_their_own_patch_only() -> None:
    model = _warm(_model(encoder="patch", downsample=4), _images(8, 16))
    a, b = _images(2, 16, seed=5)
    b[:, :4, 4:8] = a[:, :4, 4:8]  # patch (0, 1) equal, everything else differs
    codes = model.encode(torch.stack([a, b]))
    assert codes[0, 0, 1] == codes[1, 0, 1]
    assert not torch.equal(codes[0], codes[1])
    z = model.encoder(torch.stack([a, b]) * 2 - 1)
    torch.testing.assert_close(z[0, :, 0, 1], z[1, :, 0, 1])  # the latent too, not just the code


def test_code_pixels_draw_each_code() -> None:
    model = _warm(_model(encoder="patch", downsample=4), _images(8, 16))
    pix = model.code_pixels()
    assert pix.shape == (32, 3 * 4 * 4) and pix.min() >= -1 and pix.max() <= 1
    grid = torch.full((1, 3, 3), 7)
    centre = model.decode(grid)[0, :, 4:8, 4:8] * 2 - 1
    torch.testing.assert_close(pix[7], centre.reshape(-1))


def _old_drawn_rule(pixels: torch.Tensor) -> torch.Tensor:
    """The rule as it was written in the transformer before it moved to the VQ."""
    rgb = pixels.view(*pixels.shape[:-1], 3, -1)
    return (rgb.amin(-2) < 0.7).to(pixels.dtype)


def test_drawn_masks_by_default_are_the_old_rule_bit_for_bit() -> None:
    g = torch.Generator().manual_seed(0)
    pix = torch.rand(64, 3 * 16, generator=g) * 2 - 1
    edge = torch.tensor(0.7)  # the threshold itself and its float32 neighbours
    near = torch.stack([edge, edge.nextafter(torch.tensor(1.0)), edge.nextafter(-edge)])
    pix[:3, :16] = near[:, None]
    pix[:3, 16:] = 1.0  # the other two channels white: the first channel decides
    masks = drawn_masks(pix)
    assert masks.shape == (64, 16) and masks.dtype == torch.float32
    assert torch.equal(masks, _old_drawn_rule(pix))
    assert masks[:3, 0].tolist() == [0.0, 0.0, 1.0]
    with pytest.raises(ValueError, match=r"\(n, 3\*k\)"):
        drawn_masks(pix[:, :5])
    with pytest.raises(ValueError, match=r"\(n, 3\*k\)"):
        drawn_masks(pix.long())


def test_a_folder_saved_without_drawn_below_gets_the_old_rule() -> None:
    assert "drawn_below" not in json.loads((V1_VQ / "config.json").read_text())["config"]
    vq = VQTokenizer.from_pretrained(V1_VQ)
    assert vq.config.drawn_below == 0.85
    pix = vq.code_pixels()
    masks = vq.code_masks()
    assert masks.shape == (32, 16) and masks.dtype == torch.float32
    assert torch.equal(masks, _old_drawn_rule(pix))


def test_drawn_below_sets_which_pixels_count_and_is_saved(tmp_path) -> None:
    vq = VQTokenizer.from_pretrained(V1_VQ)
    vq.config.drawn_below = 0.5  # threshold 0.0 in the [-1, 1] pixels
    pix = vq.code_pixels()
    masks = vq.code_masks()
    assert torch.equal(masks, (pix.view(32, 3, -1).amin(-2) < 0.0).float())
    assert not torch.equal(masks, VQTokenizer.from_pretrained(V1_VQ).code_masks())
    vq.save_pretrained(tmp_path / "vq")
    loaded = VQTokenizer.from_pretrained(tmp_path / "vq")
    assert loaded.config.drawn_below == 0.5 and torch.equal(loaded.code_masks(), masks)
    for bad in (0.0, 1.5):
        with pytest.raises(ConfigError, match="drawn_below"):
            VQConfig(drawn_below=bad).validate()


def test_encode_never_updates_the_codebook() -> None:
    x = _images(4)
    model = _warm(_model(), x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()  # even in training mode, encode is read-only
    model.encode(_images(4, seed=7))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_training_pass_updates_the_ema_codebook() -> None:
    x = _images(4)
    model = _warm(_model(), x).train()
    embed = model.quantizer._codebook.embed.clone()
    with torch.no_grad():
        model(_images(4, seed=3))
    assert not torch.equal(embed, model.quantizer._codebook.embed)


@pytest.mark.parametrize(
    "kw", [{}, {"quantizer": "fsq", "fsq_levels": [4, 3, 3], "codebook_size": 36}]
)
def test_save_load_gives_identical_codes(tmp_path, kw: dict) -> None:
    x = _images(4)
    model = _warm(_model(**kw), x)
    codes = model.encode(_images(4, seed=5))
    model.save_pretrained(tmp_path / "vq")
    assert sorted(p.name for p in (tmp_path / "vq").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]
    loaded = VQTokenizer.from_pretrained(tmp_path / "vq")
    assert loaded.config == model.config and not loaded.training
    assert torch.equal(loaded.encode(_images(4, seed=5)), codes)
    torch.testing.assert_close(loaded.decode(codes), model.decode(codes), rtol=0, atol=0)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_loaded_model_keeps_its_kmeans_init(tmp_path) -> None:
    # Slow EMA and no dead-code replacement: a training pass may only nudge the codebook.
    kw = {"ema_decay": 0.999, "threshold_ema_dead_code": 0.0}
    model = _warm(_model(**kw), _images(4))
    model.save_pretrained(tmp_path / "vq")
    loaded = VQTokenizer.from_pretrained(tmp_path / "vq").train()
    assert torch.equal(loaded.quantizer._codebook.initted, torch.tensor(True))
    embed = loaded.quantizer._codebook.embed.clone()
    with torch.no_grad():
        loaded(_images(4, seed=9))
    moved = (loaded.quantizer._codebook.embed - embed).abs().max()
    # A fresh k-means on that batch would give a different codebook altogether.
    fresh = _warm(_model(**kw), _images(4, seed=9)).quantizer._codebook.embed
    assert moved < 0.05 * (fresh - embed).abs().max()


def test_tiny_model_overfits_one_batch() -> None:
    torch.manual_seed(0)
    x = _images(8, 16)
    model = _model(width=16, latent_dim=16).train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):
        recon, terms, _ = model(x)
        loss = (recon - x).pow(2).mean() + 0.25 * terms["commit"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])


def test_bad_images_raise_clearly() -> None:
    model = _warm(_model(), _images(2))
    cases = [
        (torch.rand(3, 16, 16), r"rank 4 .*got shape \(3, 16, 16\)"),
        (torch.rand(2, 1, 16, 16), r"3 channels .*got shape \(2, 1, 16, 16\)"),
        (torch.rand(2, 3, 18, 18), r"multiples of 4, got 18x18"),
        (torch.rand(2, 3, 16, 16) * 255, r"values in \[0, 1\], got range"),
        (torch.randint(0, 2, (2, 3, 16, 16)), r"floating-point .*got torch.int64"),
    ]
    for bad, msg in cases:
        with pytest.raises(ValueError, match=msg):
            model.encode(bad)
        with pytest.raises(ValueError, match=msg):
            model(bad)
    with pytest.raises(ValueError, match="expected images as a torch.Tensor"):
        model.encode([[0.0]])
    with pytest.raises(ValueError, match="multiple of 4, got 18"):
        model.grid_size(18)


def test_bad_codes_raise_clearly() -> None:
    model = _warm(_model(), _images(2))
    cases = [
        (torch.zeros(2, 4, dtype=torch.long), r"rank 3 .*got shape \(2, 4\)"),
        (torch.full((1, 4, 4), 32), r"codes in \[0, 32\), got range \[32, 32\]"),
        (torch.full((1, 4, 4), -1), r"codes in \[0, 32\), got range \[-1, -1\]"),
        (torch.zeros(1, 4, 4), r"integer codes, got torch.float32"),
    ]
    for bad, msg in cases:
        with pytest.raises(ValueError, match=msg):
            model.decode(bad)
