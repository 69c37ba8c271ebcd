"""The floor every layer stands on: device, precision, threads and seeds.

Nothing here knows about models, data or training; data, models, sampling and training all import
from it (the import-linter contracts in tests/test_layers.py keep it that way).

Per-sample random streams: sample b of a generation draws from its own generator, seeded with its
own seed, so a sample depends only on its seed, never on the batch it was drawn in
(`dalle_ar.sampling`).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from dalle_ar.config import TOO_MANY

SEED_SPACE = 2**63 - 1  # per-sample seeds drawn from a generator lie in [0, SEED_SPACE)


# ----------------------------------------------------------------------------------------------
# Device, threads, precision.


def pick_device(name: str | torch.device) -> torch.device:
    """ "auto" -> cuda when available, else cpu; a device torch names ("cpu", "cuda", "cuda:1").
    ValueError for a name that is no device, and for a CUDA device this machine lacks (no CUDA,
    or fewer GPUs than the index)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name} was asked for, but no CUDA device is available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {name} was asked for, but this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s)")  # fmt: skip
    return dev


def describe_machine() -> dict[str, object]:
    """What a measured figure was measured on: the CPU's model name, its logical CPUs, whether it
    has bf16 instructions, the GPU if any, torch's version."""
    name = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": name, "cpus": os.cpu_count(), "cpu_bf16": cpu_has_bf16(), "gpu": gpu,
            "torch": torch.__version__}  # fmt: skip


def set_threads(n: int) -> None:
    """torch's CPU threads for this process; n <= 0 keeps torch's default."""
    if n > 0:
        torch.set_num_threads(n)


def free_cpus(interval: float = 0.2) -> float:
    """CPUs of this process's affinity set that sat idle over the next `interval` seconds, read
    from /proc/stat (Linux); elsewhere every CPU of the set counts as free."""
    cpus = _affinity()
    if not cpus:
        return float(os.cpu_count() or 1)
    try:
        before = Path("/proc/stat").read_text()
        time.sleep(interval)
        return idle_between(before, Path("/proc/stat").read_text(), cpus)
    except (OSError, ValueError, IndexError):
        return float(len(cpus))


def idle_between(before: str, after: str, cpus: set[int]) -> float:
    """CPUs idle between two readings of /proc/stat (its text), summed over `cpus`: each CPU
    adds the fraction of its ticks that were idle or iowait, 1.0 where no tick passed."""

    def ticks(stat: str) -> dict[int, tuple[int, int]]:
        out = {}
        for line in stat.splitlines():
            name, *t = line.split()
            if name.startswith("cpu") and name != "cpu" and int(name[3:]) in cpus:
                out[int(name[3:])] = (int(t[3]) + int(t[4]), sum(int(x) for x in t[:8]))
        return out

    old, free = ticks(before), 0.0
    for c, (idle, total) in ticks(after).items():
        idle0, total0 = old.get(c, (idle, total))
        free += (idle - idle0) / (total - total0) if total > total0 else 1.0
    return free


def pick_threads(n: int, share: int = 1) -> int:
    """Threads for a CPU run: n > 0 as given; n = 0 the CPUs measured free just now
    (`free_cpus`), split among `share` processes of one job, rounded, at least 1. On a 2-core
    machine where another job holds one core, a 2-thread step ran many times slower than a
    1-thread one: each op waits for its descheduled thread (docs/results.md#a-faster-cpu-recipe)."""
    if n > 0:
        return n
    usable = len(_affinity()) or os.cpu_count() or 1
    return max(1, min(usable, round(free_cpus() / max(1, share))))


class CPUShare:
    """The threads a CPU run should have now, followed while it runs (`run.threads=0`): every
    `every` seconds, the CPUs other processes left it over the last window (`cpus_left`: the
    idle CPUs of its affinity set, split among the `share` processes of its job, plus the ones
    it kept busy itself). When a job's other stage running beside this one ends, the count
    rises to take its core; when another process starts, it falls at the next window.

    Falling takes effect at once, to the CPUs left (rounded up from 0.75), when fewer than the
    threads less a quarter are left (two threads on one free core wait on each other at every
    parallel region); rising only to whole CPUs left (again from 0.75) and after two windows in
    a row agree, so that a half-free core or a short pause of the other process does not flip
    the count back and forth. Where /proc/stat is not readable (not Linux), `poll` always
    returns None.
    """

    def __init__(self, threads: int, every: float = 10.0, share: int = 1) -> None:
        self.threads, self.every, self.share = threads, every, share
        self.cpus = _affinity()
        self._rise = 0  # windows in a row that asked for more
        self._mark = self._read()

    def _read(self) -> tuple[float, float, str] | None:
        if not self.cpus:
            return None
        try:
            stat = Path("/proc/stat").read_text()
        except OSError:
            return None
        t = os.times()
        return time.monotonic(), t.user + t.system, stat

    def poll(self) -> int | None:
        """The new thread count when it should change now, else None (cheap between windows)."""
        if self._mark is None or time.monotonic() - self._mark[0] < self.every:
            return None
        now = self._read()
        if now is None:
            return None
        (t0, own0, stat0), (t1, own1, stat1) = self._mark, now
        self._mark = now
        own = (own1 - own0) / max(t1 - t0, 1e-9)
        free = cpus_left(stat0, stat1, self.cpus, own, self.share)
        if free is None:
            return None
        want = max(1, min(len(self.cpus), math.floor(free + 0.25)))
        self._rise = self._rise + 1 if free >= self.threads + 0.75 else 0
        if free < self.threads - 0.25 or self._rise >= 2:
            self._rise = 0
            if want != self.threads:
                self.threads = want
                return want
        return None


def cpus_left(before: str, after: str, cpus: set[int], own: float, share: int = 1) -> float | None:
    """CPUs a process may run on between two readings of /proc/stat: the CPUs of `cpus` that sat
    idle (`idle_between`), split among the `share` processes of its job, plus `own`, the CPUs it
    kept busy itself over the same window (CPU seconds per second). None for unreadable text."""
    try:
        return own + idle_between(before, after, cpus) / max(1, share)
    except (ValueError, IndexError):
        return None


def _affinity() -> set[int]:
    """The CPUs this process may run on; empty where the OS does not say (not Linux)."""
    return set(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else set()


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX flags in /proc/cpuinfo);
    elsewhere bf16 is emulated and slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def uses_bf16(device: torch.device, precision: str, cpu_auto: bool = False) -> bool:
    """precision=bf16; or auto on a GPU with bf16, and (cpu_auto) on a CPU with bf16 instructions.
    A recipe sets cpu_auto where bf16 measured faster on such a CPU: the transformer trained
    1.75x faster, while the VQ-VAE's small convolutions ran 1.6x slower (docs/results.md)."""
    if precision != "auto":
        return precision == "bf16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return cpu_auto and device.type == "cpu" and cpu_has_bf16()


def precision_name(device: torch.device, precision: str, cpu_auto: bool = False) -> str:
    """What a forward under `autocast_context` computes in: "bf16" or "fp32" (metrics.json)."""
    return "bf16" if uses_bf16(device, precision, cpu_auto) else "fp32"


def autocast_context(
    device: torch.device, precision: str, cpu_auto: bool = False
) -> contextlib.AbstractContextManager:
    """bf16 autocast where `uses_bf16`; fp32 elsewhere."""
    if uses_bf16(device, precision, cpu_auto):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------
# Seeds.


def seed_everything(seed: int) -> None:
    """Seed python's, numpy's and torch's global generators (training runs)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def sample_seeds(
    n: int, seeds: int | Sequence[int] | None = None, generator: torch.Generator | None = None
) -> list[int]:
    """One seed per sample: an int s gives s, s+1, ..., s+n-1; a sequence is taken as is (n of
    them); otherwise seeds are drawn from `generator` (or torch's global generator).
    ValueError for a wrong count, a bool, or both seeds and generator."""
    if seeds is not None and generator is not None:
        raise ValueError("give seeds or generator, not both")
    if isinstance(seeds, bool):
        raise ValueError(f"seeds must be an int or a sequence of ints, got {seeds!r}")
    if isinstance(seeds, int):
        return [seeds + i for i in range(n)]
    if seeds is not None:
        out = [int(s) for s in seeds]
        if len(out) != n:
            raise ValueError(f"expected one seed per sample ({n}), got {len(out)} seeds")
        return out
    return torch.randint(0, SEED_SPACE, (n,), generator=generator).tolist()


def sample_generator(seed: int) -> torch.Generator:
    """A CPU generator for one sample's stream; seeds lie in [0, 2**64) (ValueError)."""
    if not 0 <= seed < 2**64:
        raise ValueError(f"seeds must be in [0, 2**64), got {seed}")
    return torch.Generator().manual_seed(seed)


def uniforms(seeds: Sequence[int], n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(len(seeds), n) fp64 uniforms in [0, 1); row b comes from a generator seeded with seeds[b]
    on the CPU, so it is the same on every device and in every batch."""
    rows = [torch.rand(n, generator=sample_generator(s), dtype=torch.float64) for s in seeds]
    return torch.stack(rows).to(device) if rows else torch.zeros(0, n, dtype=torch.float64)


def values_by_depth(build: Callable[..., torch.nn.Module], **depths: int) -> int:
    """The numbers (parameters and buffers) of the model `build(**depths)` would hold, counted on
    torch's meta device (nothing allocated) from models of depth 1 and 2: a model's size is
    linear in each of its depths (`depths`: keyword -> layers, e.g. layers=4), and building an
    absurd depth, even on the meta device, would itself take minutes. A tensor too large for
    torch to describe at all (an absurd width) counts as TOO_MANY numbers."""

    def count(**at: int) -> int:
        try:
            with torch.device("meta"):
                model = build(**{k: 1 for k in depths} | at)
        except RuntimeError as e:  # "Storage size calculation overflowed"
            if "overflow" not in str(e):
                raise
            return TOO_MANY
        return sum(t.numel() for t in itertools.chain(model.parameters(), model.buffers()))

    base = count()
    total = base + sum((d - 1) * (count(**{k: 2}) - base) for k, d in depths.items() if d > 1)
    return min(total, TOO_MANY)
