"""Run a test function in N processes joined in a gloo process group on this machine, as
torchrun would start a recipe (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)."""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(fn: Callable[..., Any], world: int, *args: Any, timeout: float = 900) -> None:
    """Call `fn(rank, *args)` in `world` fresh processes (one torch thread each) and wait for
    all; an exception in any of them fails the caller, and so do ranks still running after
    `timeout` seconds (killed: TimeoutError), where ranks wait for each other forever. `fn` must
    be a module-level function."""
    ranks = mp.spawn(_entry, args=(world, free_port(), fn, args), nprocs=world, join=False)
    deadline = time.monotonic() + timeout
    while not ranks.join(timeout=max(0.0, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for process in ranks.processes:
                process.kill()
            raise TimeoutError(f"{fn.__name__}: {world} ranks still running after {timeout} s")


def _entry(rank: int, world: int, port: int, fn: Callable[..., Any], args: tuple) -> None:
    from dalle_ar.train import dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))  # fmt: skip
    try:
        fn(rank, *args)
    finally:
        dist.cleanup()
    # The work is done and checked by the caller. Leave without the interpreter's teardown: one CI
    # run saw a finished rank abort there ("terminate called without an active exception", a
    # native thread destroyed at exit), failing a test whose work had passed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
