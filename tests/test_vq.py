"""VQ-VAE tokenizer: shapes, codebook consistency, save/load, overfitting, bad input."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from dalle_ar.config import ConfigError, load_config
from dalle_ar.train import vq as vq_recipe
from dalle_ar.train.common import lr_at, schedule_step
from dalle_ar.train.vq import VQRecipeConfig, train
from dalle_ar.vq import VQConfig, VQTokenizer, drawn_masks

TINY = dict(width=8, num_res_blocks=1, latent_dim=8, codebook_size=32, kmeans_iters=2)
V1_VQ = Path(__file__).resolve().parent / "data" / "pipeline_v1" / "vq"  # saved without drawn_below


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


# ----------------------------------------------------------------------------------------------
# The recipe (`dalle-ar train vq`) on the shared shapes fixture with configs/vq_tiny.yaml.

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = ROOT / "configs" / "vq_tiny.yaml"


def _overrides(shards, out: Path, *extra: str) -> list[str]:
    return [f"data.train={shards.train}", f"data.eval={shards.eval}", f"run.out_dir={out}", *extra]


def test_recipe_trains_evaluates_and_writes_the_component(tmp_path, shapes_shards) -> None:
    out = tmp_path / "run"
    cfg = load_config(
        VQRecipeConfig, TINY_CONFIG, _overrides(shapes_shards, out, "run.eval_every=10")
    )
    m = train(cfg)
    assert m["finished"] and m["step"] == cfg.run.steps == 30
    assert 5 < m["psnr"] < 60 and 0 < m["codebook_usage"] <= 1
    assert 1 <= m["perplexity"] <= cfg.model.codebook_size
    assert m["eval_images"] == shapes_shards.num_eval  # the final evaluation reads everything
    assert [h["step"] for h in m["history"]] == [10, 20, 30]
    assert json.loads((out / "metrics.json").read_text())["psnr"] == m["psnr"]
    assert m["timing"]["steps_per_s"] > 0
    assert torch.load(out / "ckpt/last/train_state.pt", weights_only=True)["step"] == 30
    vq = VQTokenizer.from_pretrained(out / "vq")
    assert vq.config == cfg.model and bool(vq.quantizer._codebook.initted)
    # 4 images of 16 px, enlarged 4x: originals above reconstructions with 2 px gaps.
    grid = Image.open(out / "samples" / "recon_000030.png")
    assert grid.size == (4 * (64 + 2) + 2, 2 * 64 + 3 * 2)


def test_recipe_logs_to_wandb_offline(tmp_path, shapes_shards) -> None:
    out = tmp_path / "run"
    extra = ("run.wandb=offline", "run.steps=4", "run.sample_every=2", "run.log_every=2")
    train(load_config(VQRecipeConfig, TINY_CONFIG, _overrides(shapes_shards, out, *extra)))
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    assert sorted(p.name for p in (out / "samples").iterdir()) == [
        "recon_000002.png",
        "recon_000004.png",
    ]


def test_bad_config_is_rejected_before_any_work(tmp_path, shapes_shards, capsys) -> None:
    out = tmp_path / "run"
    argv = ["--config", str(TINY_CONFIG), *_overrides(shapes_shards, out)]
    assert vq_recipe.main([*argv, "model.bogus=1"]) == 2
    assert "unknown config key 'model.bogus'" in capsys.readouterr().err
    assert vq_recipe.main([*argv, "model.image_size=32"]) == 2
    assert "must equal data.image_size=16" in capsys.readouterr().err
    assert vq_recipe.main([*argv, "loss.recon=huber"]) == 2
    assert vq_recipe.main([*argv, "--resume"]) == 2
    assert "--resume given but" in capsys.readouterr().err
    assert not out.exists()


def test_sigkilled_run_resumes_to_the_same_step_count(tmp_path, shapes_shards) -> None:
    out = tmp_path / "run"
    steps, every = 60, 5
    argv = [sys.executable, "-m", "dalle_ar.cli", "train", "vq", "--config", str(TINY_CONFIG)]
    argv += _overrides(shapes_shards, out, f"run.steps={steps}", f"run.save_every={every}")
    state_file = out / "ckpt" / "last" / "train_state.pt"
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while not state_file.is_file() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stdout.read().decode()[-2000:]
    saved = torch.load(state_file, weights_only=True)["step"]
    assert 0 < saved < steps and saved % every == 0
    assert not (out / "vq").exists()  # killed before the end

    done = subprocess.run([*argv, "--resume"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert f"at step {saved}" in done.stderr  # continued from the last save, not from 0
    state = torch.load(state_file, weights_only=True)
    assert state["step"] == steps
    # AdamW's own step counter went on from the saved optimizer state.
    assert all(s["step"].item() == steps for s in state["optimizer"]["state"].values())
    cfg = load_config(VQRecipeConfig, TINY_CONFIG, _overrides(shapes_shards, out))
    last_lr = state["optimizer"]["param_groups"][0]["lr"]
    assert last_lr == pytest.approx(lr_at(steps - 1, cfg.optim, steps))
    assert json.loads((out / "metrics.json").read_text())["step"] == steps
    assert VQTokenizer.from_pretrained(out / "vq").codebook_size == cfg.model.codebook_size


def test_lr_schedule_can_follow_the_time_budget() -> None:
    extra = ["run.steps=100", "optim.warmup_steps=10", "run.max_minutes=10"]
    cfg = load_config(VQRecipeConfig, TINY_CONFIG, extra)
    assert schedule_step(cfg, 50, minutes=9.0) == 50  # off: the steps alone
    cfg.lr_follows_time = True
    assert schedule_step(cfg, 5, minutes=9.0) == 5  # warmup always counts steps
    assert schedule_step(cfg, 20, minutes=5.0) == 55  # half the time gone: half-way down
    assert schedule_step(cfg, 90, minutes=1.0) == 90  # steps ahead of the clock: steps rule
    assert schedule_step(cfg, 20, minutes=12.0) == 100  # out of time: the cosine's floor


# ----------------------------------------------------------------------------------------------
# The recipe on the shared loop: exact resume, non-finite steps, two processes.


def _final_weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "vq" / "model.safetensors"))


def test_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(tmp_path, shapes_shards):
    extra = ("run.steps=8", "run.save_every=100", "run.eval_every=4")
    whole = train(
        load_config(VQRecipeConfig, TINY_CONFIG, _overrides(shapes_shards, tmp_path / "a", *extra))
    )
    half = load_config(
        VQRecipeConfig,
        TINY_CONFIG,
        _overrides(shapes_shards, tmp_path / "b", *extra, "halt_after=4"),
    )
    train(half)
    assert not (tmp_path / "b" / "vq").exists()
    state = torch.load(tmp_path / "b" / "ckpt" / "last" / "train_state.pt", weights_only=True)
    assert state["step"] == 4 and state["extra"]["micro_batches"] == 4
    rest = load_config(
        VQRecipeConfig, TINY_CONFIG, _overrides(shapes_shards, tmp_path / "b", *extra)
    )
    resumed = train(rest, resume=True)
    a, b = _final_weights(tmp_path / "a"), _final_weights(tmp_path / "b")
    assert a.keys() == b.keys()
    for name in a:  # codebook buffers (k-means on the first batch, EMA, dead codes) included
        assert torch.equal(a[name], b[name]), name
    assert resumed["psnr"] == whole["psnr"]
    assert [h["step"] for h in resumed["history"]] == [4, 8]  # the first process's eval kept


def test_non_finite_steps_stop_the_cli_with_exit_code_1(tmp_path, shapes_shards, capsys):
    out = tmp_path / "run"
    argv = ["--config", str(TINY_CONFIG), *_overrides(shapes_shards, out)]
    # an absurd learning rate: the first step leaves weights that overflow in the next forward
    bad = ["optim.lr=1e30", "optim.warmup_steps=0", "max_bad_steps=3", "run.save_every=1"]
    assert vq_recipe.main([*argv, *bad]) == 1
    assert "3 non-finite losses in a row" in capsys.readouterr().err
    state = torch.load(out / "ckpt" / "last" / "train_state.pt", weights_only=True)
    assert state["step"] == 1 and state["extra"]["skipped"] == 0  # the last good checkpoint
    assert not (out / "vq").exists()


class MemoryImages:
    """A fixed global sequence of image batches (smooth random images); rank r of `world` takes
    its slice, so N processes see exactly what one process with the whole batch sees."""

    def __init__(self, batch: int, rank: int = 0, world: int = 1) -> None:
        self.batch, self.rank, self.world = batch, rank, world

    def _global(self, i: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(1000 + i)
        coarse = torch.rand(self.batch * self.world, 3, 4, 4, generator=g)
        image = torch.nn.functional.interpolate(coarse, size=16, mode="bilinear")
        return {"image": image[self.rank * self.batch : (self.rank + 1) * self.batch]}

    def train(self, skip: int):
        i = skip
        while True:
            yield self._global(i)
            i += 1

    def eval(self):
        return [self._global(10_000)]


def _vq_rank(rank: int, runs: list[tuple[str, int, list[str]]]) -> None:
    """Rank `rank` of two trains each (out_dir, images per rank or 0 for the shards, overrides)
    and keeps its final state as out_dir/rankR.pt."""
    from dalle_ar.train import dist

    check = dist.check_replicas
    for out, batch, extra in runs:

        def keep(model: torch.nn.Module, out: str = out) -> None:
            torch.save(model.state_dict(), Path(out) / f"rank{rank}.pt")
            check(model)

        dist.check_replicas = keep
        cfg = load_config(VQRecipeConfig, TINY_CONFIG, [f"run.out_dir={out}", *extra])
        train(cfg, MemoryImages(batch, rank, world=2) if batch else None)


def test_two_processes_hold_one_codebook(tmp_path, shapes_shards):
    from _spawn import run_ranks

    steps = ["run.steps=6", "run.precision=fp32", "optim.grad_accum=2"]
    # without sampling (uniform codebook init, no dead codes) two processes of 4 images follow
    # one process of 8: gradients and codebook sums are the global batch's
    plain = [*steps, "model.kmeans_init=false", "model.threshold_ema_dead_code=0"]
    shards = _overrides(shapes_shards, tmp_path / "two", *steps)
    run_ranks(
        _vq_rank, 2, [(str(tmp_path / "two"), 0, shards), (str(tmp_path / "plain2"), 4, plain)]
    )

    # on the shards (each rank reads its half) with k-means initialisation, EMA and dead-code
    # replacement: every rank ends with the same state
    r0, r1 = (torch.load(tmp_path / "two" / f"rank{r}.pt") for r in (0, 1))
    for name in r0:
        assert torch.equal(r0[name], r1[name]), name
    assert bool(r0["quantizer._codebook.initted"])
    metrics = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert metrics["eval_images"] == shapes_shards.num_eval  # the ranks' halves summed
    assert (tmp_path / "two" / "vq" / "model.safetensors").is_file()

    one = load_config(VQRecipeConfig, TINY_CONFIG, [f"run.out_dir={tmp_path / 'plain1'}", *plain])
    train(one, MemoryImages(8))
    for step, loss in _losses(tmp_path / "plain1").items():
        assert _losses(tmp_path / "plain2")[step] == pytest.approx(loss, rel=1e-5), step
    # (not every weight: the biases ahead of a GroupNorm get a zero gradient up to rounding,
    # which Adam scales up to full steps of different signs)
    a, b = _final_weights(tmp_path / "plain1"), _final_weights(tmp_path / "plain2")
    for name in [n for n in a if n.startswith("quantizer._codebook.")]:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-5, msg=name)


def _losses(out: Path) -> dict[int, float]:
    rows = [json.loads(r) for r in (out / "train_log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}
