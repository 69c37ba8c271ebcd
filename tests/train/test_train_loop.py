"""The shared training loop (dalle_ar.train.loop) on a toy task: the time budget counted over
resumes, gradient accumulation, non-finite steps skipped with the model's buffers restored."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dalle_ar import runtime
from dalle_ar.config import load_config
from dalle_ar.runtime import idle_between, pick_threads
from dalle_ar.train.common import lr_at, schedule_step
from dalle_ar.train.loop import LoopConfig, NonFiniteLoss, Prefetch, Task, fit, setup

pytestmark = pytest.mark.usefixtures("one_thread")


@dataclasses.dataclass
class ToyModelConfig:
    dim: int = 4  # input width


class Toy(torch.nn.Module):
    """A linear map plus a buffer its forward updates (as an EMA codebook does)."""

    def __init__(self, cfg: ToyModelConfig) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(cfg.dim, 1)
        self.register_buffer("seen", torch.zeros(cfg.dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.seen.mul_(0.9).add_(0.1 * x.mean(0))
        return self.proj(x).squeeze(-1)


@dataclasses.dataclass
class ToyConfig(LoopConfig):
    model: ToyModelConfig = dataclasses.field(default_factory=ToyModelConfig)
    batch_size: int = 4  # samples per micro-batch


def toy_config(out: Path, *extra: str) -> ToyConfig:
    base = ["run.steps=6", "run.log_every=1", "run.save_every=100", "run.wandb=disabled",
            "run.threads=1",
            "run.device=cpu", f"run.out_dir={out}", "optim.lr=0.1",
            "optim.warmup_steps=0"]  # fmt: skip
    return load_config(ToyConfig, None, [*base, *extra])


def samples(start: int, n: int, poison: frozenset[int] = frozenset()) -> dict[str, torch.Tensor]:
    """Samples start..start+n-1 of a fixed sequence; sample i comes from seed i (a poisoned one
    is NaN)."""
    rows = [
        torch.randn(5, generator=torch.Generator().manual_seed(i)) for i in range(start, start + n)
    ]
    x = torch.stack(rows)
    for i in range(start, start + n):
        if i in poison:
            x[i - start] = float("nan")
    return {"x": x[:, :4], "y": x[:, 4]}


def toy_fit(cfg: ToyConfig, resume: bool = False, poison: frozenset[int] = frozenset()) -> dict:
    info = setup(cfg)
    model = Toy(cfg.model)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr)
    B = cfg.batch_size

    def batches(skip: int):
        i = skip
        while True:
            yield samples(i * B, B, poison)
            i += 1

    def loss(batch: dict, micro: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        err = (model(batch["x"]) - batch["y"]).pow(2).mean()
        return err, {"mse": err}

    return fit(cfg, Task("toy", model, cfg.model, opt, loss, batches), info, resume)


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "toy" / "model.safetensors"))


def test_accumulation_equals_one_larger_batch(tmp_path):
    # SGD on a mean loss: two micro-batches of 4 make the step one batch of 8 makes
    toy_fit(toy_config(tmp_path / "a", "optim.grad_accum=2", "batch_size=4", "optim.grad_clip=0"))
    toy_fit(toy_config(tmp_path / "b", "optim.grad_accum=1", "batch_size=8", "optim.grad_clip=0"))
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    for name in ("proj.weight", "proj.bias"):
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)
    rows = [json.loads(r) for r in (tmp_path / "a" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6] and rows[0]["samples_per_s"] > 0


def test_time_budget_counts_the_minutes_of_earlier_processes(tmp_path):
    toy_fit(toy_config(tmp_path, "halt_after=2"))
    state_file = tmp_path / "ckpt" / "last" / "train_state.pt"
    state = torch.load(state_file, weights_only=True)
    assert state["step"] == 2 and state["extra"]["micro_batches"] == 2
    assert 0 < state["extra"]["minutes"] < 1
    assert not (tmp_path / "toy").exists()  # halted, not finished: no component yet
    state["extra"]["minutes"] = 5.0  # as if the first process had run for five minutes
    torch.save(state, state_file)

    # the schedule follows the run's minutes (5 of 6 spent), not this process's
    cfg = toy_config(tmp_path, "halt_after=3", "run.max_minutes=6", "lr_follows_time=true",
                     "run.steps=100")  # fmt: skip
    m = toy_fit(cfg, resume=True)
    assert m["step"] == 3 and m["minutes"] >= 5.0
    lr_late, lr_early = (lr_at(schedule_step(cfg, 2, t), cfg.optim, 100) for t in (5.5, 5.0))
    assert lr_late < m["lr"] <= lr_early

    # a run resumed with no time left is refused by name, before any step
    with pytest.raises(ValueError, match=r"run.max_minutes=5 is already spent .*step 3 of 6"):
        toy_fit(toy_config(tmp_path, "run.max_minutes=5"), resume=True)
    assert torch.load(state_file, weights_only=True)["step"] == 3


def test_a_run_the_safety_cap_stops_says_so_and_resumes_to_its_planned_steps(tmp_path, step_clock):
    plain = toy_fit(toy_config(tmp_path / "plain", "run.steps=6"))
    out = tmp_path / "capped"
    m = toy_fit(toy_config(out, "run.steps=6", "run.max_minutes=2.5"))  # a minute a step
    said = "under-trained: stopped by max_minutes at step 3 of 6"
    assert m["step"] == 3 and not m["finished"] and m["under_trained"] == said
    assert json.loads((out / "metrics.json").read_text())["under_trained"] == said
    assert (out / "toy").is_dir()  # the component, flagged, is there to use

    m = toy_fit(toy_config(out, "run.steps=6", "run.max_minutes=0"), resume=True)
    assert m["step"] == 6 and m["finished"] and "under_trained" not in m
    assert m["planned_steps"] == plain["planned_steps"] == 6
    for name, w in weights(out).items():  # the same weights as the run nothing stopped
        assert torch.equal(w, weights(tmp_path / "plain")[name]), name


def test_non_finite_steps_are_skipped_with_buffers_restored(tmp_path):
    clean = toy_fit(toy_config(tmp_path / "clean", "run.steps=2"))
    # micro-batch 1 (samples 4..7) is poisoned: its step is skipped, the next batch takes it
    m = toy_fit(toy_config(tmp_path / "bad", "run.steps=2"), poison=frozenset({5}))
    assert m["step"] == 2 and m["skipped_steps"] == 1 and clean["skipped_steps"] == 0
    seen = weights(tmp_path / "bad")["seen"]
    assert torch.isfinite(seen).all()  # the forward's update of the buffer was undone

    out = tmp_path / "stop"
    poison = frozenset(range(12, 1000))  # from micro-batch 3 on
    with pytest.raises(NonFiniteLoss, match="3 non-finite losses in a row"):
        toy_fit(toy_config(out, "max_bad_steps=3", "run.save_every=2"), poison=poison)
    assert torch.load(out / "ckpt" / "last" / "train_state.pt", weights_only=True)["step"] == 2
    assert not (out / "toy").exists()  # no component from a run that stopped on bad steps


def test_prefetching_keeps_the_order_and_the_result(tmp_path):
    inline = toy_fit(toy_config(tmp_path / "inline", "prefetch=0"))
    ahead = toy_fit(toy_config(tmp_path / "ahead", "prefetch=3"))
    assert inline["loss"] == ahead["loss"]
    for name, w in weights(tmp_path / "inline").items():
        assert torch.equal(w, weights(tmp_path / "ahead")[name]), name


def test_prefetch_raises_the_sources_error_and_ends_with_it():
    def source():
        yield {"x": torch.zeros(1)}
        raise OSError("shard 3 is unreadable")

    batches = Prefetch(source(), depth=2)
    assert torch.equal(next(batches)["x"], torch.zeros(1))
    for _ in range(2):  # raised again, never a hang
        with pytest.raises(OSError, match="shard 3 is unreadable"):
            next(batches)
    batches.close()
    finite = Prefetch(iter([1, 2, 3]), depth=1)
    assert list(finite) == [1, 2, 3] and list(finite) == []
    endless = Prefetch(iter(range(10**9)), depth=2)
    assert next(endless) == 0
    endless.close()  # stops its thread though the source never ends
    assert not endless.thread.is_alive()
    with pytest.raises(ValueError, match="prefetch depth must be >= 0, got -1"):
        Prefetch(iter([1]), depth=-1)


def test_threads_follow_the_free_cpus(monkeypatch):
    # /proc/stat: user nice system idle iowait irq softirq steal; cpu0 90% idle, cpu1 10%
    before = "cpu 0 0 0 0 0 0 0 0\ncpu0 100 0 0 90 10 0 0 0\ncpu1 50 0 0 40 10 0 0 0\n"
    after = "cpu 0 0 0 0 0 0 0 0\ncpu0 110 0 0 180 10 0 0 0\ncpu1 140 0 0 50 10 0 0 0\n"
    assert idle_between(before, after, {0, 1}) == pytest.approx(1.0)
    assert idle_between(before, after, {0}) == pytest.approx(0.9)
    assert pick_threads(3) == 3  # as given
    cpus = len(os.sched_getaffinity(0))
    assert 0 <= runtime.free_cpus(0.05) <= cpus  # this machine, now
    for free, want in ((0.3, 1), (1.0, 1), (2.0, min(2, cpus)), (64.0, cpus)):
        monkeypatch.setattr(runtime, "free_cpus", lambda free=free: free)
        assert pick_threads(0) == want, free
    assert pick_threads(0, share=128) == 1  # split among many processes: still at least one


def test_a_run_follows_the_cpus_other_processes_leave_it(monkeypatch):
    # two CPUs; each reading: (seconds, this process's CPU seconds, /proc/stat)
    def stat(ticks: int, idle0: int, idle1: int) -> str:
        return (f"cpu0 {ticks - idle0} 0 0 {idle0} 0 0 0 0\n"
                f"cpu1 {ticks - idle1} 0 0 {idle1} 0 0 0 0\n")  # fmt: skip

    readings = iter([
        (0.0, 0.0, stat(0, 0, 0)),
        (10.0, 10.0, stat(1000, 0, 0)),  # both CPUs busy, one of them by this process: 1 thread
        (20.0, 20.0, stat(2000, 0, 1000)),  # the other process ended: 2 free, not yet
        (30.0, 30.0, stat(3000, 0, 2000)),  # ... a second window agrees: 2 threads
        (40.0, 50.0, stat(4000, 0, 2000)),  # still 2 (this process kept both busy)
        (50.0, 60.0, stat(5000, 0, 2000)),  # another process came: 1 thread at once
        (60.0, 70.0, stat(6000, 0, 3000)),  # a short pause of it: no change ...
        (70.0, 80.0, stat(7000, 0, 3000)),  # ... and it is back: still 1
        (80.0, 90.0, stat(8000, 0, 3500)),  # half a core free, twice: no rise to 2
        (90.0, 100.0, stat(9000, 0, 4000)),
    ])  # fmt: skip
    monkeypatch.setattr(runtime, "_affinity", lambda: {0, 1})
    monkeypatch.setattr(runtime.CPUShare, "_read", lambda self: next(readings))
    share = runtime.CPUShare(threads=2, every=0.0)
    assert [share.poll() for _ in range(9)] == [1, None, 2, None, 1, None, None, None, None]
    assert share.threads == 1
    # two processes of one job (DDP) split the idle CPUs: one idle CPU is half of one each
    assert runtime.cpus_left(stat(0, 0, 0), stat(100, 0, 100), {0, 1}, 1.0, share=2) == 1.5
    assert runtime.cpus_left("cpu0 1 2\n", "cpu0 x\n", {0}, 1.0) is None  # unreadable
    # between windows no change; off Linux (no /proc/stat, no affinity set) never one
    monkeypatch.setattr(runtime.CPUShare, "_read", lambda self: (0.0, 0.0, stat(0, 0, 0)))
    assert runtime.CPUShare(threads=1, every=3600).poll() is None
    monkeypatch.undo()  # the real readings
    monkeypatch.setattr(runtime, "_affinity", set)
    assert runtime.CPUShare(threads=2, every=0.0).poll() is None


# A write of ckpt/last killed by SIGKILL at its worst moment: the old folder moved aside, the new
# one (whole) not yet renamed into place. argv: this folder, the run folder.
KILLED_BETWEEN_RENAMES = """
import os, pathlib, signal, sys
sys.path.insert(0, sys.argv[1])
import test_train_loop as t
rename = pathlib.Path.rename
def rename_or_die(self, target):
    if ".tmp-" in self.name:
        os.kill(os.getpid(), signal.SIGKILL)
    return rename(self, target)
pathlib.Path.rename = rename_or_die
t.toy_fit(t.toy_config(pathlib.Path(sys.argv[2]), "halt_after=4"), resume=True)
"""


def test_a_checkpoint_write_killed_between_its_renames_resumes_from_the_new_one(tmp_path, caplog):
    import subprocess
    import sys

    from dalle_ar.checkpoint import load_train_state
    from dalle_ar.train import common

    toy_fit(toy_config(tmp_path / "plain"))
    out = tmp_path / "run"
    toy_fit(toy_config(out, "halt_after=2"))
    here = str(Path(__file__).parent)
    killed = subprocess.run([sys.executable, "-c", KILLED_BETWEEN_RENAMES, here, str(out)])
    assert killed.returncode == -9
    left = sorted(p.name.split("-")[0] for p in (out / "ckpt").iterdir())
    assert left == [".last.old", ".last.tmp"]  # no ckpt/last: step 2 aside, step 4 not in place
    assert common.has_checkpoint(out)
    assert load_train_state(common.last_checkpoint(out))["step"] == 4

    caplog.set_level("INFO", logger="dalle_ar.train.common")
    m = toy_fit(toy_config(out), resume=True)
    assert "at step 4" in caplog.text and m["step"] == 6
    for name, w in weights(out).items():
        assert torch.equal(w, weights(tmp_path / "plain")[name]), name
    assert [p.name for p in (out / "ckpt").iterdir()] == ["last"]  # the leftovers are gone


def test_a_resumed_run_continues_the_schedule_and_the_clock(tmp_path, step_clock):
    # the LR follows the clock (a minute a step): 4.5 minutes end the run after step 5
    plan = ["run.steps=100", "run.max_minutes=4.5", "lr_follows_time=true",
            "optim.warmup_steps=1"]  # fmt: skip
    whole = toy_fit(toy_config(tmp_path / "whole", *plan))
    out = tmp_path / "run"
    toy_fit(toy_config(out, *plan, "halt_after=2"))
    m = toy_fit(toy_config(out, *plan), resume=True)
    assert m["step"] == whole["step"] == 5 and m["lr"] == whole["lr"]
    spent = [torch.load(d / "ckpt" / "last" / "train_state.pt", weights_only=True)["extra"]
             ["minutes"] for d in (out, tmp_path / "whole")]  # fmt: skip
    assert spent == [5, 5]  # the minutes of the run, not of the process
    for name, w in weights(out).items():
        assert torch.equal(w, weights(tmp_path / "whole")[name]), name
    rows = [json.loads(r) for r in (out / "train_log.jsonl").read_text().splitlines()]
    lrs = [json.loads(r)["lr"] for r in (tmp_path / "whole" / "train_log.jsonl").read_text()
           .splitlines()]  # fmt: skip
    assert [r["lr"] for r in rows] == lrs  # one cosine, not a second one after the resume


def test_a_run_stopped_before_its_first_checkpoint_says_none_was_written(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLoss, match="no checkpoint was written") as e:
        toy_fit(toy_config(out, "max_bad_steps=2"), poison=frozenset(range(1000)))
    assert "intact" not in str(e.value) and "kept" not in str(e.value)
    assert not (out / "ckpt").exists() and not (out / "toy").exists()


def test_a_torn_log_line_is_dropped_on_resume(tmp_path, caplog):
    toy_fit(toy_config(tmp_path / "plain"))
    out = tmp_path / "run"
    toy_fit(toy_config(out, "halt_after=2"))
    log_file = out / "train_log.jsonl"
    with open(log_file, "a") as f:
        f.write('{"kind": "train", "step": 3, "lo')  # the disk filled during an append
    m = toy_fit(toy_config(out), resume=True)
    assert m["step"] == 6 and "torn line" in caplog.text
    rows = [json.loads(r) for r in log_file.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for name, w in weights(out).items():
        assert torch.equal(w, weights(tmp_path / "plain")[name]), name


def test_a_refused_resume_writes_nothing(tmp_path):
    out = tmp_path / "run"
    toy_fit(toy_config(out, "halt_after=2"))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match="shape mismatch"):
        toy_fit(toy_config(out, "model.dim=3"), resume=True)
    with pytest.raises(ValueError, match="is already spent"):
        toy_fit(toy_config(out, "run.max_minutes=1e-9"), resume=True)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
