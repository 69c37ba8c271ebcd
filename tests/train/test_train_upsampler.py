"""The upsampler's recipe (dalle_ar.train.upsampler): its loss overfits a handful of pairs, and
the recipe on the tiny shapes shards (metrics against bicubic, the picture, the folder, exact
resume, the config checks)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dalle_ar.config import ConfigError, load_config
from dalle_ar.data.shapes import generate
from dalle_ar.eval.metrics import image_metrics, pil_resize
from dalle_ar.models.upsampler import Upsampler, UpsamplerConfig, downscale, train_scheduler
from dalle_ar.sampling.diffusion import upsample_images
from dalle_ar.sampling.settings import UpsampleSampling
from dalle_ar.train import upsampler as recipe
from dalle_ar.train.upsampler import UpsamplerRecipeConfig, upsampler_loss

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[2]
TINY_CONFIG = ROOT / "configs" / "tiny" / "upsampler.yaml"


def test_a_tiny_upsampler_overfits_a_handful_of_pairs():
    """Four 16-px shapes scenes: after training, drawing them back from their 8-px versions beats
    bicubic resizing of the same small images on every one."""
    images = torch.from_numpy(np.stack([im for im, _, _ in generate(4, 3, "train", 16)]))
    images = images.permute(0, 3, 1, 2).float() / 255  # (4, 3, 16, 16)
    torch.manual_seed(0)
    up = Upsampler(UpsamplerConfig(low_size=8, channels=[16, 32], norm_groups=8,
                                   mid_attention=False, max_noise_level=50))  # fmt: skip
    ddpm = train_scheduler(up.cfg)
    opt = torch.optim.AdamW(up.parameters(), lr=3e-3, weight_decay=0)
    losses = []
    for _ in range(300):
        loss = upsampler_loss(up, up, ddpm, images.repeat(2, 1, 1, 1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    assert last < first / 5, (first, last)
    low = downscale(images, 8)
    big = upsample_images(up, low * 2 - 1, UpsampleSampling(10, noise_level=0), [0, 1, 2, 3])
    ours = image_metrics(big.add(1).div(2), images)["psnr"]
    bicubic = image_metrics(pil_resize(low, 16, "bicubic"), images)["psnr"]
    assert bool((ours > bicubic).all()), (ours, bicubic)


def _args(shards, out, *extra) -> list[str]:
    return [f"data.train={shards.train}", f"data.eval={shards.eval}", f"run.out_dir={out}",
            *extra]  # fmt: skip


def test_recipe_trains_evaluates_and_resumes_exactly(tmp_path, shapes_shards):
    whole = tmp_path / "whole"
    m = recipe.train(load_config(UpsamplerRecipeConfig, TINY_CONFIG, _args(shapes_shards, whole)))
    assert m["finished"] and m["step"] == 6
    saved = json.loads((whole / "metrics.json").read_text())
    for k in ("psnr", "bicubic_psnr"):
        assert 5 < saved[k] < 60, (k, saved[k])
    for k in ("ssim", "bicubic_ssim"):
        assert -1 <= saved[k] <= 1
    assert saved["psnr_gain"] == pytest.approx(saved["psnr"] - saved["bicubic_psnr"])
    assert len(saved["history"]) == 2  # step 3 and the final one
    assert (whole / "samples" / "upsample_000006.png").is_file()
    up = Upsampler.from_pretrained(whole / "upsampler")
    assert up.cfg.low_size == 16 and up.cfg.high_size == 32

    halted = tmp_path / "halted"
    argv = ["--config", str(TINY_CONFIG), *_args(shapes_shards, halted)]
    assert recipe.main([*argv, "halt_after=3"]) == 0
    assert not (halted / "upsampler").exists()
    assert recipe.main(["--resume", *argv]) == 0
    again = Upsampler.from_pretrained(halted / "upsampler")
    for (name, a), b in zip(up.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name  # the resumed run ends where the whole one did


def test_render_pairs_draw_each_scene_small(tmp_path, shapes_shards):
    """small_from='render': each 32-px scene is paired with the same scene drawn at 16 px (not its
    box-filtered version), and the recipe trains on those pairs."""
    from dalle_ar.data.loader import make_loader
    from dalle_ar.data.shapes import render

    batch = next(b for b in make_loader(shapes_shards.eval, 32, 8, train=False) if "image" in b)
    small = recipe.small_images(batch, 16, "render")
    for spec, got in zip(batch["meta"], small):
        want = torch.from_numpy(render(spec, 16)).permute(2, 0, 1).float() / 255
        assert torch.equal(got, want)
    assert not torch.equal(small, recipe.small_images(batch, 16, "box"))
    recipe.check_renders(batch, 32)  # the shards hold the scenes at 32 px
    out = tmp_path / "render"
    cfg = load_config(UpsamplerRecipeConfig, TINY_CONFIG,
                      _args(shapes_shards, out, "small_from=render"))  # fmt: skip
    m = recipe.train(cfg)
    assert m["finished"] and (out / "samples" / "upsample_000006.png").is_file()
    truth = next(b for b in make_loader(shapes_shards.eval, 32, cfg.eval_images, train=False)
                 if "image" in b)  # fmt: skip
    plain = pil_resize(recipe.small_images(truth, 16, "render"), 32, "bicubic")
    want = image_metrics(plain, truth["image"])["psnr"].mean().item()
    assert m["bicubic_psnr"] == pytest.approx(want, abs=1e-4)  # evaluated on render pairs too
    boxed = pil_resize(recipe.small_images(truth, 16, "box"), 32, "bicubic")
    assert image_metrics(boxed, truth["image"])["psnr"].mean().item() != pytest.approx(want)


def test_render_pairs_refuse_other_pictures_by_name(tmp_path, shapes_shards):
    """Before any step: shards whose pictures are not the scenes at the large size (here 32-px
    scenes read at 24), in either split, and records that carry no scene."""
    argv = _args(shapes_shards, tmp_path / "run", "small_from=render", "model.low_size=12",
                 "data.image_size=24")  # fmt: skip
    cfg = load_config(UpsamplerRecipeConfig, TINY_CONFIG, argv)
    with pytest.raises(ValueError, match=r"is not its scene rendered at 24 px.*--size 24"):
        recipe.train(cfg)
    without_eval = load_config(UpsamplerRecipeConfig, TINY_CONFIG, [*argv, "data.eval="])
    with pytest.raises(ValueError, match=r"is not its scene rendered at 24 px"):
        recipe.train(without_eval)  # the training split is probed too
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match=r"small_from must be one of \('box', 'render'\)"):
        recipe.small_images({"image": torch.zeros(1, 3, 32, 32)}, 16, "area")
    batch = {"image": torch.zeros(1, 3, 32, 32), "meta": [{}], "key": ["pic_0"]}
    with pytest.raises(ValueError, match=r"record 'pic_0' carries none.*small_from='box'"):
        recipe.small_images(batch, 16, "render")


def test_pictures_smaller_than_the_large_size_are_refused(tmp_path, shapes_shards):
    """32-px shards for a 32 -> 64 upsampler: the loader would stretch them, so the recipe stops
    before any step, naming the split and both sizes (box pairs too)."""
    argv = _args(shapes_shards, tmp_path / "run", "model.low_size=32", "data.image_size=64")
    cfg = load_config(UpsamplerRecipeConfig, TINY_CONFIG, argv)
    with pytest.raises(ValueError, match=r"data.train: its pictures are 32x32, smaller than "
                                         r"data.image_size 64.*--size 64"):  # fmt: skip
        recipe.train(cfg)
    assert not (tmp_path / "run").exists()


def test_config_checks_name_the_field(tmp_path, shapes_shards):
    with pytest.raises(ConfigError, match=r"data.image_size.*low_size \* model.scale = 32, got 16"):
        load_config(UpsamplerRecipeConfig, TINY_CONFIG,
                    _args(shapes_shards, tmp_path, "data.image_size=16"))  # fmt: skip
    with pytest.raises(ConfigError, match="clip.*exactly when model.caption_dim > 0"):
        load_config(UpsamplerRecipeConfig, TINY_CONFIG,
                    _args(shapes_shards, tmp_path, "model.caption_dim=16"))  # fmt: skip
    with pytest.raises(ConfigError, match=r"small_from.*\('box', 'render'\), got 'area'"):
        load_config(UpsamplerRecipeConfig, TINY_CONFIG,
                    _args(shapes_shards, tmp_path, "small_from=area"))  # fmt: skip
    with pytest.raises(ConfigError, match=r"model.low_size.*>= 12 with small_from='render'"):
        load_config(UpsamplerRecipeConfig, TINY_CONFIG,
                    _args(shapes_shards, tmp_path, "small_from=render", "model.low_size=8",
                          "data.image_size=16"))  # fmt: skip
    with pytest.raises(ConfigError, match="data.random_crop.*small_from='render'"):
        load_config(UpsamplerRecipeConfig, TINY_CONFIG,
                    _args(shapes_shards, tmp_path, "small_from=render",
                          "data.random_crop=true"))  # fmt: skip


def test_upsample_eval_tool_compares_with_plain_resizing(tmp_path, shapes_shards):
    import importlib.util

    spec = importlib.util.spec_from_file_location("upsample_eval", ROOT / "tools" /
                                                  "upsample_eval.py")  # fmt: skip
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    torch.manual_seed(0)
    Upsampler(UpsamplerConfig(low_size=16, channels=[8, 16], norm_groups=4,
                              mid_attention=False)).save_pretrained(tmp_path / "up")  # fmt: skip
    argv = ["--upsampler", str(tmp_path / "up"), "--data", shapes_shards.eval, "--num", "6",
            "--steps", "2,3", "--noise-levels", "0", "--threads", "1", "--grid", "3",
            "--grid-from", "render", "--out", str(tmp_path / "out")]  # fmt: skip
    assert tool.main(argv) == 0
    rep = json.loads((tmp_path / "out" / "upsample.json").read_text())
    assert rep["images"] == 6 and rep["sizes"] == [16, 32]
    for part in ("from_box_filter", "from_renders"):  # shapes records are rendered small too
        rows = rep[part]
        assert set(rows) == {"nearest", "bicubic", "lanczos", "upsampler steps=2",
                             "upsampler steps=3", "upsampler noise_level=0"}  # fmt: skip
        assert rows["bicubic"]["psnr"] > 15 and rows["upsampler steps=2"]["ms_per_image"] > 0
    grid = Image.open(tmp_path / "out" / "upsample.png")
    assert grid.size[1] > 5 * 32  # five rows: small, bicubic, Lanczos, upsampler, truth


def test_each_rank_draws_its_rows_of_the_global_batch():
    """The loss of each of 2 ranks' halves, averaged, is the one process's loss on the whole
    batch: the same timesteps, levels and noise per row (DDP and resume draw alike)."""
    torch.manual_seed(0)
    up = Upsampler(UpsamplerConfig(low_size=8, channels=[8, 16], norm_groups=4,
                                   mid_attention=False)).eval()  # fmt: skip
    ddpm = train_scheduler(up.cfg)
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        whole = upsampler_loss(up, up, ddpm, x, None, torch.Generator().manual_seed(7))
        halves = [
            upsampler_loss(up, up, ddpm, x[2 * r : 2 * r + 2], None,
                           torch.Generator().manual_seed(7), r, 2)
            for r in (0, 1)
        ]  # fmt: skip
    assert torch.allclose(whole, sum(halves) / 2, atol=1e-6)
