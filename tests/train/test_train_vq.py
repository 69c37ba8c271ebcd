"""The VQ-VAE recipe (`dalle-ar train vq`) on the shared shapes fixture with configs/tiny/vq.yaml:
training, wandb offline, bad configs, kill and resume, the time-following LR, exact resume,
non-finite steps and two processes on the shared loop."""

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

from dalle_ar.config import load_config
from dalle_ar.models.vq import VQTokenizer
from dalle_ar.train import vq as vq_recipe
from dalle_ar.train.common import lr_at, schedule_step
from dalle_ar.train.vq import VQRecipeConfig, train

TINY = dict(width=8, num_res_blocks=1, latent_dim=8, codebook_size=32, kmeans_iters=2)

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------
# The recipe (`dalle-ar train vq`) on the shared shapes fixture with configs/tiny/vq.yaml.

ROOT = Path(__file__).resolve().parents[2]
TINY_CONFIG = ROOT / "configs" / "tiny" / "vq.yaml"


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


def test_a_run_the_safety_cap_stops_is_called_under_trained(
    tmp_path, shapes_shards, capsys, step_clock
):
    argv = _overrides(shapes_shards, tmp_path, "run.steps=8")
    start, resume = ["--config", str(TINY_CONFIG)], ["--config", str(TINY_CONFIG), "--resume"]
    assert vq_recipe.main([*start, *argv, "run.max_minutes=2.5"]) == 0  # a minute a step
    err = capsys.readouterr().err
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["step"] == 3 and m["under_trained"] in err and "--resume" in err
    assert vq_recipe.main([*resume, *argv, "run.max_minutes=3"]) == 2  # the cap is spent
    assert "is already spent" in capsys.readouterr().err
    assert vq_recipe.main([*resume, *argv, "run.max_minutes=0"]) == 0
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["step"] == 8 and m["finished"] and "under_trained" not in m


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


def test_missing_shards_exit_2_with_a_message(tmp_path, capsys):
    from dalle_ar.train.vq import main

    argv = ["--config", str(TINY_CONFIG), f"data.train={tmp_path}/none-*.tar",
            f"run.out_dir={tmp_path / 'run'}", "run.wandb=disabled"]  # fmt: skip
    assert main(argv) == 2
    assert "dalle-ar train vq: " in capsys.readouterr().err
    assert main([*argv, "--resume"]) == 2
    assert "holds no checkpoint" in capsys.readouterr().err


def test_a_resumed_run_continues_the_clock_schedule_and_data_order(tmp_path, shapes_shards,
                                                                    step_clock):  # fmt: skip
    # the LR follows the clock (a minute a step), a DataLoader worker reads the shards and the
    # pictures read held-out images before the interruption
    plan = ("run.steps=100", "run.max_minutes=5.5", "lr_follows_time=true", "run.save_every=100",
            "data.num_workers=1", "run.sample_every=1", "run.eval_every=0")  # fmt: skip
    whole = train(load_config(VQRecipeConfig, TINY_CONFIG,
                              _overrides(shapes_shards, tmp_path / "a", *plan)))  # fmt: skip
    argv = ["--config", str(TINY_CONFIG), *_overrides(shapes_shards, tmp_path / "b", *plan)]
    assert vq_recipe.main([*argv, "halt_after=3"]) == 0
    assert vq_recipe.main([*argv, "--resume"]) == 0
    resumed = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert resumed["step"] == whole["step"] == 6 and resumed["lr"] == whole["lr"]
    a, b = _final_weights(tmp_path / "a"), _final_weights(tmp_path / "b")
    for name in a:
        assert torch.equal(a[name], b[name]), name


def _shard(folder: Path, image: bytes | None, caption: str | None) -> str:
    """One training shard of 16 records of that image (PNG bytes, or none) and caption."""
    from dalle_ar.data.shards import write_samples

    members = {"png": image, "txt": caption}
    records = [{"__key__": f"r{i:03d}", **{k: v for k, v in members.items() if v is not None}}
               for i in range(16)]  # fmt: skip
    write_samples(records, folder, "train", 16)
    return str(folder / "train-000000.tar")


def _png() -> bytes:
    import io

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("caption", ["   ", None], ids=["blank_captions", "image_only"])
def test_the_vq_trains_on_images_without_captions(tmp_path, caption):
    shard = _shard(tmp_path / "data", _png(), caption)
    out = tmp_path / "run"
    argv = ["--config", str(TINY_CONFIG), f"data.train={shard}", "data.eval=",
            f"run.out_dir={out}", "run.steps=3"]  # fmt: skip
    assert vq_recipe.main(argv) == 0
    assert json.loads((out / "metrics.json").read_text())["step"] == 3


def _train_rank_keeping_its_error(rank: int, argv: list[str], out: str) -> None:
    try:
        train(load_config(VQRecipeConfig, TINY_CONFIG, argv))
    except ValueError as e:
        (Path(out) / f"rank{rank}.txt").write_text(str(e))


def test_a_rank_whose_data_yields_nothing_stops_every_rank(tmp_path):
    from _spawn import run_ranks

    # two shards, one per rank: one rank reads 16 pictures, the other 16 undecodable records
    good, bad = _shard(tmp_path / "a", _png(), "a red square"), _shard(tmp_path / "b", b"x", "x")
    Path(bad).rename(Path(good).with_name("train-000001.tar"))
    argv = [f"data.train={Path(good).parent}/train-*.tar", "data.eval=", "run.steps=3",
            f"run.out_dir={tmp_path / 'run'}", "data.shuffle_buffer=0"]  # fmt: skip
    # before, the rank without data raised alone and the other waited for it in a collective
    run_ranks(_train_rank_keeping_its_error, 2, argv, str(tmp_path), timeout=300)
    said = sorted((tmp_path / f"rank{r}.txt").read_text() for r in (0, 1))
    assert said[0].startswith("a whole pass over the training shards") and "bad_image" in said[0]
    assert said[1].startswith("another rank failed (rank ")
    assert said[0] in said[1]  # the others name the failed rank's reason


@pytest.mark.parametrize(
    "kind, reason",
    [("undecodable", "bad_image: 16"), ("not_a_tar", "unreadable_shard: 1")],
)
def test_training_data_that_yields_nothing_is_an_error_naming_why(tmp_path, capsys, caplog,
                                                                   kind, reason):  # fmt: skip
    if kind == "undecodable":
        shard = _shard(tmp_path / "data", b"not a picture", "a red square")
    else:
        shard = str(tmp_path / "train-000000.tar")
        Path(shard).write_text("a text file, not a tar\n")
    argv = ["--config", str(TINY_CONFIG), f"data.train={shard}", "data.eval=",
            f"run.out_dir={tmp_path / 'run'}", "run.steps=3"]  # fmt: skip
    assert vq_recipe.main(argv) == 2  # not a loop that never takes a step
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("dalle-ar train vq: a whole pass over the training shards")
    assert "yielded no record" in err and reason in err
    assert caplog.text.count("data pass") == 1  # the pass's report, said once
