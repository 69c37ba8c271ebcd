"""Shared fixtures: data (tiny, written once per test session, reused by every test file) and
one torch thread for the modules that ask for it."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch

# Without CUDA the Triton kernels run in Triton's interpreter, which must be chosen before Triton is
# first imported, by whichever test imports it first (tests/kernels/test_kernels.py).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@dataclasses.dataclass(frozen=True)
class ShapesShards:
    dir: Path  # folder with train-*.tar, eval-*.tar and info.json
    train: str  # brace glob of the training shards (a data.train value)
    eval: str  # the evaluation shard (a data.eval value)
    num_train: int  # records in the training shards
    num_eval: int  # records in the evaluation shards
    image_size: int  # rendered side in pixels


@pytest.fixture(scope="session")
def shapes_shards(tmp_path_factory: pytest.TempPathFactory) -> ShapesShards:
    """256 training scenes in 4 shards of 64 and 64 evaluation scenes in 1 shard, 32x32 PNG,
    written by `dalle-ar data shapes` (seed 0)."""
    from dalle_ar.data.build import main

    out = tmp_path_factory.mktemp("shapes_shards")
    argv = ["shapes", "--out", str(out), "--num-train", "256", "--num-eval", "64"]
    if main([*argv, "--seed", "0", "--size", "32", "--shard-size", "64"]) != 0:
        raise RuntimeError("building the shapes fixture shards failed")
    return ShapesShards(
        dir=out,
        train=str(out / "train-{000000..000003}.tar"),
        eval=str(out / "eval-000000.tar"),
        num_train=256,
        num_eval=64,
        image_size=32,
    )


@pytest.fixture(scope="session")
def shapes_captions() -> list[str]:
    """300 deterministic training captions (seed 0), e.g. for fitting a small tokenizer."""
    from dalle_ar.data.shapes import generate

    return [cap for _, cap, _ in generate(300, seed=0, split="train")]


@pytest.fixture
def one_thread():
    """One torch thread for the test (`pytestmark = pytest.mark.usefixtures("one_thread")`): the
    test machine is shared, where two threads run several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def step_clock(monkeypatch):
    """A training run's clock counts its steps: each optimizer step takes one minute
    (`Loop.minutes`), so `run.max_minutes=2.5` stops a fresh run after step 3 on any machine."""
    from dalle_ar.train.loop import Loop

    def minutes(self: Loop) -> float:
        return self.run.minutes_before + self.pos.step - self.start_step

    monkeypatch.setattr(Loop, "minutes", minutes)
