"""The training loop every recipe runs on.

A recipe builds its components and hands them over as a `Task`; `fit` owns the rest: the step
budget (`run.steps`) and the wall-clock cap (`run.max_minutes`, counted over every resume of the
run), the LR schedule (warmup + cosine, optionally following the clock), gradient accumulation
(the DDP all-reduce on the last micro-batch only), gradient clipping, skipping non-finite steps,
atomic checkpoints with the exact data position, evaluation, pictures, wandb, the progress bar,
the metrics files and the final component folder. Rank 0 alone logs and writes; every rank runs
every collective. One process or `torchrun --nproc_per_node=N`, unchanged.

    info = setup(cfg)                                      # process group, seeds
    model = Model(cfg.model).to(info.device)
    wrapped = dist.wrap_model(model, info, "ddp")
    task = Task("name", wrapped, cfg.model, build_optimizer(model, cfg.optim), loss, batches)
    metrics = fit(cfg, task, info, resume)

In `run.out_dir`: config.yaml; ckpt/last (weights, optimizer, step, micro-batches consumed,
skipped steps, minutes spent, every rank's RNG); train_log.jsonl ("train" and "eval" rows);
metrics.json (final metrics, eval history, timing); samples/; wandb/; and NAME/, the component,
once the run has reached `run.steps` or its time cap.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from dalle_ar.checkpoint import load_train_state, rng_state, save_pretrained, set_rng_state
from dalle_ar.config import OptimConfig, RunConfig, require
from dalle_ar.runtime import CPUShare, pick_threads, seed_everything
from dalle_ar.train import dist
from dalle_ar.train.common import (
    BudgetBar,
    NonFiniteLoss,
    Run,
    checkpoint_minutes,
    last_checkpoint,
    lr_at,
    schedule_step,
    set_lr,
)

log = logging.getLogger(__name__)

Batch = dict[str, Any]


class Source(Protocol):
    """Where a recipe's batches come from (dicts of tensors and lists, one per micro-batch)."""

    def train(self, skip: int) -> Iterator[Batch]: ...  # this rank's, the first `skip` left out
    def eval(self) -> Iterable[Batch] | None: ...  # this rank's held-out batches, or None


@dataclasses.dataclass
class LoopConfig:
    """The keys `fit` reads. A recipe config inherits them (top-level keys of its YAML)."""

    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    lr_follows_time: bool = False  # with run.max_minutes: the cosine ends when time runs out
    max_bad_steps: int = 20  # non-finite steps in a row that stop the run (exit code 1)
    halt_after: int = 0  # stop (with a checkpoint) after this step; 0 = run.steps (staged runs)
    # micro-batches read ahead in a thread while the step computes (same order); 0 = inline. Off
    # by default: reading a batch takes ~3% of a shapes step and the thread cost more than it hid
    # (0.97x, docs/results.md#a-faster-cpu-recipe)
    prefetch: int = 0

    def validate(self) -> None:
        require(self.max_bad_steps >= 1, "max_bad_steps", "must be >= 1")
        require(self.prefetch >= 0, "prefetch", "must be >= 0")
        require(self.halt_after >= 0, "halt_after", "must be >= 0")


@dataclasses.dataclass
class Task:
    """What a recipe hands the loop. Its functions run on every rank unless said otherwise."""

    name: str  # the component: checkpoint tag, final folder out_dir/NAME, wandb run, bar label
    model: nn.Module  # as trained: DDP- or FSDP-wrapped (dist.wrap_model), or plain
    model_cfg: Any  # the model's config, saved beside its weights
    optimizer: torch.optim.Optimizer
    # (micro-batch, its tensors on the device; global micro-batch index) -> (scalar loss, scalar
    # tensors logged as train/NAME). Called inside DDP's no_sync where gradients wait; the loop
    # divides by optim.grad_accum and calls backward.
    loss: Callable[[Batch, int], tuple[torch.Tensor, dict[str, torch.Tensor]]]
    # skip -> this rank's micro-batches in the run's fixed order, the first `skip` left out
    batches: Callable[[int], Iterator[Batch]]
    # final -> held-out metrics, equal on every rank (reduce inside); final=True may read more
    evaluate: Callable[[bool], dict[str, float]] | None = None
    # step -> (path of a PNG it wrote, caption); rank 0 only
    pictures: Callable[[int], tuple[Path, str]] | None = None
    # (full model, folder) -> writes the component; rank 0 only. None: config.json + safetensors
    save: Callable[[nn.Module, Path], None] | None = None
    precision: str = "fp32"  # what the forward computes in ("fp32", "bf16"), for metrics.json


@dataclasses.dataclass
class Position:
    """Where a run stands; saved in every checkpoint."""

    step: int = 0  # optimizer steps taken
    micro: int = 0  # micro-batches consumed by each rank (the data position)
    skipped: int = 0  # non-finite steps skipped
    minutes: float = 0.0  # wall minutes spent by the earlier processes of this run


def setup(cfg: LoopConfig) -> dist.DistInfo:
    """Join torchrun's process group (nothing to join for one process) and seed python, numpy
    and torch with run.seed, so every rank builds the same initial weights. First, ConfigError
    when the recipe's model could not be held in this machine's memory (its config's
    `check_fits_memory`), before any work."""
    check = getattr(getattr(cfg, "model", None), "check_fits_memory", None)
    if check is not None:
        check("model.")  # named as the recipe's config key
    info = dist.init_distributed(cfg.run.device)
    seed_everything(cfg.run.seed)
    return info


def fit(cfg: LoopConfig, task: Task, info: dist.DistInfo, resume: bool = False) -> dict[str, Any]:
    """Train `task` within the budget of `cfg`; returns the final metrics (also metrics.json),
    the same on every rank.

    Raises FileNotFoundError (resume without a checkpoint), ValueError (a checkpoint of another
    shape; a resume whose run.max_minutes the run has already spent), NonFiniteLoss (see its
    docstring), RuntimeError (DDP replicas that differ at the end).
    """
    run = Run(cfg, cfg.run, rank=info.rank)
    pos = _resume(run, task, info, cfg.optim.grad_accum) if resume else Position()
    limit = cfg.run.max_minutes
    if limit > 0 and pos.minutes >= limit and pos.step < cfg.run.steps:
        raise ValueError(
            f"run.max_minutes={limit:g} is already spent by this run ({pos.minutes:.1f} minutes "
            f"over its earlier processes, step {pos.step} of {cfg.run.steps}): give a larger "
            "run.max_minutes (or 0) to continue"
        )
    run.minutes_before = pos.minutes
    run.begin()  # accepted: config.yaml is written from here on
    threads = torch.get_num_threads()  # a process-wide setting: restored below
    try:
        if info.device.type == "cpu":
            share = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # processes on this machine
            torch.set_num_threads(pick_threads(cfg.run.threads, share))
            log.info("%s: %d CPU threads", task.name, torch.get_num_threads())
        run.init_wandb(task.name)
        loop = Loop(cfg, task, info, run, pos)
        if info.device.type == "cpu" and cfg.run.threads == 0:  # 0: follow the free CPUs
            loop.cpu_share = CPUShare(torch.get_num_threads(), share=share)
        return loop.train()
    finally:
        run.finish()
        torch.set_num_threads(threads)


class Loop:
    """One run of `fit` (tools/bench_train.py drives `batches` and `step` alone)."""

    def __init__(self, cfg: LoopConfig, task: Task, info: dist.DistInfo, run: Run, pos: Position):
        self.cfg, self.task, self.info, self.run, self.pos = cfg, task, info, run, pos
        self.stop_at = min(cfg.run.steps, cfg.halt_after) if cfg.halt_after else cfg.run.steps
        self.saved_at = pos.step if pos.step else -1  # a resumed run's checkpoint is at pos.step
        self.start_step, self.t_start = pos.step, time.time()
        self.t_log, self.samples = time.time(), 0  # since the last train row
        self.last: dict[str, Any] = {}  # the last train row
        self.cpu_share: CPUShare | None = None  # set: the thread count follows the free CPUs
        self.threads_used = {torch.get_num_threads()}
        self.log_path = run.dir / "train_log.jsonl"
        self.history = _truncate_log(self.log_path, pos.step) if info.is_main else []
        module = dist.unwrap(task.model)
        saved = set(module.state_dict())
        self.buffer_names = [n for n, _ in module.named_buffers() if n in saved]

    def minutes(self) -> float:
        return dist.all_reduce_max(self.run.minutes())  # one clock for every rank

    def train(self) -> dict[str, Any]:
        cfg, pos = self.cfg, self.pos
        limit = cfg.run.max_minutes
        batches = self.batches()
        bar = BudgetBar(
            cfg.run,
            pos.step,
            self.task.name,
            disable=not self.info.is_main,
            by_time=cfg.lr_follows_time,
        )
        self.task.model.train()
        bad_in_row, out_of_time, pending = 0, False, None
        try:
            while pos.step < self.stop_at:
                minutes = self.minutes()
                if limit > 0 and minutes >= limit:
                    out_of_time = True
                    break
                lr = lr_at(schedule_step(cfg, pos.step, minutes), cfg.optim, cfg.run.steps)
                set_lr(self.task.optimizer, lr)
                sums = self.step(batches)
                if sums is None:
                    bad_in_row, pos.skipped = bad_in_row + 1, pos.skipped + 1
                    self._refuse(bad_in_row)
                    continue
                pos.step, bad_in_row = pos.step + 1, 0
                bar.update(pos.step, minutes, **self._postfix())
                pending = sums
                if pos.step % cfg.run.log_every == 0 or pos.step == self.stop_at:
                    self._log_train(*pending)
                    pending = None
                self._periodic()
                self._follow_cpus()
        finally:
            bar.close()
            batches.close()
        if pending is not None:  # stopped by the clock between two log rows
            self._log_train(*pending)
        return self._finish(out_of_time)

    def _follow_cpus(self) -> None:
        """Between two steps: take the threads the free CPUs allow now (`CPUShare`)."""
        threads = self.cpu_share.poll() if self.cpu_share is not None else None
        if threads is not None and threads != torch.get_num_threads():
            torch.set_num_threads(threads)
            self.threads_used.add(threads)
            log.info("%s: %d CPU threads from step %d (the CPUs free now)", self.task.name,
                     threads, self.pos.step)  # fmt: skip

    def batches(self) -> Prefetch:
        """The task's micro-batches from the run's data position, read `prefetch` ahead."""
        return Prefetch(self.task.batches(self.pos.micro), self.cfg.prefetch)

    def step(self, batches: Iterator[Batch]) -> tuple[torch.Tensor, ...] | None:
        """One optimizer step over optim.grad_accum micro-batches: (loss, grad norm, parts)
        averaged over ranks, or None when it was not finite (skipped, buffers restored)."""
        task, info, accum = self.task, self.info, self.cfg.optim.grad_accum
        module = dist.unwrap(task.model)
        buffers = dict(module.named_buffers())
        before = {n: buffers[n].detach().clone() for n in self.buffer_names}
        loss_sum = torch.zeros((), device=info.device)
        parts: dict[str, torch.Tensor] = {}
        for k, batch in enumerate(self._fetch(batches, accum)):
            batch = to_device(batch, info.device)
            self.samples += _batch_size(batch)
            with dist.no_sync(task.model, k < accum - 1):
                loss, terms = task.loss(batch, self.pos.micro)
                (loss / accum).backward()
            self.pos.micro += 1
            loss_sum += loss.detach().float() / accum
            for name, v in terms.items():
                parts[name] = parts.get(name, 0) + v.detach().float().to(info.device) / accum
        clip = self.cfg.optim.grad_clip or math.inf
        norm = torch.nn.utils.clip_grad_norm_(task.model.parameters(), clip)
        if hasattr(norm, "full_tensor"):  # FSDP: the norm is a DTensor over the shards
            norm = norm.full_tensor()
        stats = torch.stack([loss_sum, norm.float().to(info.device), *parts.values()])
        stats = dist.all_reduce_sum(stats) / info.world
        finite = bool(torch.isfinite(stats[:2]).all())
        if finite:
            task.optimizer.step()
        else:  # a forward may have updated buffers (an EMA codebook): undo it as well
            with torch.no_grad():
                for n, b in before.items():
                    buffers[n].copy_(b)
        task.optimizer.zero_grad(set_to_none=True)
        if not finite:
            return None
        return stats[0], stats[1], dict(zip(parts, stats[2:]))

    def _fetch(self, batches: Iterator[Batch], n: int) -> list[Batch]:
        """The step's n micro-batches. Under DDP the ranks first agree that each has them
        (`dist.raise_together`), once a step: a rank whose data ended or failed (a pass that
        yielded nothing) would otherwise raise alone while the others wait for it forever."""
        out: list[Batch] = []
        try:
            for k in range(n):
                out.append(_next(batches, self.pos.micro + k))
            error = None
        except Exception as e:
            error = e
        dist.raise_together(error)
        return out

    def _refuse(self, bad_in_row: int) -> None:
        pos = self.pos
        log.warning(
            "non-finite loss at step %d: step skipped (%d in a row, %d in all)",
            pos.step, bad_in_row, pos.skipped,
        )  # fmt: skip
        if bad_in_row >= self.cfg.max_bad_steps:
            raise NonFiniteLoss(
                f"{bad_in_row} non-finite losses in a row (max_bad_steps={self.cfg.max_bad_steps})"
                f" at step {pos.step}: stopping; {self._kept()}. Lower optim.lr or check the data."
            )

    def _kept(self) -> str:
        """What a run stopped by non-finite numbers leaves to resume from, truly."""
        if self.saved_at < 0:
            return (f"no checkpoint was written yet (the first comes at step "
                    f"{self.cfg.run.save_every}), and no component")  # fmt: skip
        found = last_checkpoint(self.run.dir) or self.run.ckpt_dir
        return f"the last good checkpoint, step {self.saved_at}, stays in {found}"

    def _postfix(self) -> dict[str, str]:
        return {"loss": f"{self.last['loss']:.4f}"} if self.last else {}

    def _log_train(self, loss: torch.Tensor, norm: torch.Tensor, parts: dict) -> None:
        pos, dt = self.pos, max(time.time() - self.t_log, 1e-9)
        row = {
            "step": pos.step,
            "loss": loss.item(),
            "lr": self.task.optimizer.param_groups[0]["lr"],
            "grad_norm": norm.item(),
            "skipped_steps": pos.skipped,
            "samples_per_s": self.samples * self.info.world / dt,
            **{f"train/{n}": v.item() for n, v in parts.items()},
        }
        self.t_log, self.samples, self.last = time.time(), 0, row
        self._write_row("train", row)

    def _periodic(self) -> None:
        step, run_cfg = self.pos.step, self.cfg.run
        if run_cfg.eval_every and step % run_cfg.eval_every == 0 and step < self.stop_at:
            metrics = self._evaluate(final=False)
            if metrics and self.info.is_main:
                self.run.write_json("metrics.json", self._summary(metrics, finished=False))
        if run_cfg.sample_every and step % run_cfg.sample_every == 0 and step < self.stop_at:
            self._pictures()
        if step % run_cfg.save_every == 0 or step == self.stop_at:
            self._save()

    def _evaluate(self, final: bool) -> dict[str, float]:
        if self.task.evaluate is None:
            return {}
        metrics = self.task.evaluate(final)
        self.task.model.train()
        if metrics:
            row = {"step": self.pos.step, "minutes": self.minutes(), **metrics}
            self.history.append(row)
            self._write_row("eval", row)
            log.info("step %d eval: %s", self.pos.step, json.dumps(metrics))
        return metrics

    def _pictures(self) -> None:
        if self.task.pictures is not None and self.info.is_main:
            path, caption = self.task.pictures(self.pos.step)
            self.run.log_image("samples", path, self.pos.step, caption=caption)
            self.task.model.train()
        dist.barrier()

    def _write_row(self, kind: str, row: dict[str, Any]) -> None:
        if not self.info.is_main:
            return
        prefix = "eval/" if kind == "eval" else ""
        self.run.log({k if "/" in k else prefix + k: v for k, v in row.items()}, row["step"])
        with open(self.log_path, "a") as f:
            f.write(json.dumps({"kind": kind, **row}) + "\n")

    def _save(self) -> None:
        """Checkpoint (every rank calls it); NonFiniteLoss instead of saving non-finite weights
        over the last good ones."""
        pos, task, module = self.pos, self.task, dist.unwrap(self.task.model)
        tensors = itertools.chain(module.parameters(), module.buffers())
        bad = sum(
            not bool(torch.isfinite(_local(t)).all()) for t in tensors if t.is_floating_point()
        )
        if dist.all_reduce_sum(torch.tensor(float(bad), device=self.info.device)).item() > 0:
            raise NonFiniteLoss(f"non-finite weights at step {pos.step}: not saved; "
                                f"{self._kept()}. Lower optim.lr.")  # fmt: skip
        model, optim = dist.full_state(task.model, task.optimizer)  # collective under FSDP
        extra = {"micro_batches": pos.micro, "skipped": pos.skipped, "minutes": self.minutes()}
        if self.info.distributed:  # each rank continues its own random streams on resume
            extra["rng_ranks"] = dist.all_gather_object(rng_state())
        self.run.save(model, task.model_cfg, task.name, pos.step, optim, extra)
        self.saved_at = pos.step
        dist.barrier()

    def _summary(self, metrics: dict[str, Any], finished: bool) -> dict[str, Any]:
        pos = self.pos
        head = {"step": pos.step, "planned_steps": self.cfg.run.steps, "finished": finished,
                "skipped_steps": pos.skipped}  # fmt: skip
        last = {k: v for k, v in self.last.items() if k != "step"}
        return {**head, "minutes": self.run.minutes(), **last, **metrics, "history": self.history}

    def _finish(self, out_of_time: bool) -> dict[str, Any]:
        pos, task, info = self.pos, self.task, self.info
        if self.saved_at != pos.step:
            self._save()  # the component below is written only from checkpointed weights
        train_s = time.time() - self.t_start
        metrics = self._evaluate(final=True)
        self._pictures()
        finished = pos.step >= self.cfg.run.steps
        component = {}  # halted runs (halt_after) write no component yet
        if finished or out_of_time:
            component = {"component": str(self._save_component())}
        if out_of_time and not finished and not self.cfg.lr_follows_time:  # else time is the plan
            component["under_trained"] = under_trained(self.cfg.run, pos.step)
        timing = {
            "steps": pos.step,
            "train_seconds_this_process": train_s,
            "train_seconds_total": 60 * pos.minutes + train_s,
            "steps_per_s": (pos.step - self.start_step) / max(train_s, 1e-9),
            "threads": torch.get_num_threads(),  # at the end; every count it ran with:
            "threads_used": sorted(self.threads_used),
            "precision": task.precision,
        }
        final = self._summary(metrics, finished) | component | {"timing": timing}
        if info.is_main:
            self.run.write_json("metrics.json", final)
            log.info("%s: %s", task.name, json.dumps({**final, "history": len(self.history)}))
            if "under_trained" in final:  # loud: the component is not what the config asked for
                log.warning("%s %s (continue it: --resume with a larger run.max_minutes, or run "
                            "the main job again)",
                            task.name, final["under_trained"])  # fmt: skip
        dist.barrier()
        return final

    def _save_component(self) -> Path:
        """out_dir/NAME from the weights just checkpointed (so checked finite)."""
        task, folder = self.task, self.run.dir / self.task.name
        if not dist.is_fsdp(task.model):
            dist.check_replicas(dist.unwrap(task.model))
        full, _ = dist.full_state(task.model, task.optimizer)  # collective under FSDP
        if self.info.is_main:
            if task.save is not None:
                task.save(full, folder)
            else:
                save_pretrained(full, task.model_cfg, folder, task.name)
        return folder


def under_trained(run: RunConfig, step: int) -> str:
    """What a run stopped by its safety cap says of itself (metrics.json "under_trained", its log,
    the main job's summary and table)."""
    return f"under-trained: stopped by max_minutes at step {step} of {run.steps}"


def _resume(run: Run, task: Task, info: dist.DistInfo, accum: int) -> Position:
    """Weights, optimizer and RNG from ckpt/last; the position to continue from."""
    if dist.is_fsdp(task.model):
        from safetensors.torch import load_file

        found = last_checkpoint(run.dir)
        if found is None:
            raise FileNotFoundError(f"--resume given but {run.ckpt_dir} holds no checkpoint")
        state = load_train_state(found)
        weights = load_file(str(found / "model.safetensors"))
        dist.load_full_state(task.model, task.optimizer, weights, state["optimizer"])
        log.info("resumed from %s at step %d", found, state["step"])
    else:
        state = run.resume(dist.unwrap(task.model), task.optimizer)
    extra, step = state["extra"], int(state["step"])
    rngs = extra.get("rng_ranks")
    set_rng_state(rngs[info.rank] if rngs and len(rngs) == info.world else state["rng"])
    # checkpoints of older versions: no data position (assume full steps)
    micro = int(extra.get("micro_batches", step * accum))
    return Position(step, micro, int(extra.get("skipped", 0)), checkpoint_minutes(extra))


def _truncate_log(path: Path, step: int) -> list[dict[str, Any]]:
    """Drop rows past `step` (they come again after a resume) and lines that are not whole JSON
    rows (an append cut short, as by a full disk), saying how many; return the evaluation rows."""
    if not path.is_file():
        return []
    rows, torn = [], []
    for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            torn.append(i)
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
        else:
            torn.append(i)
    if torn:
        log.warning("%s: dropped %d torn line(s) (line %s): not whole JSON rows", path, len(torn),
                    ", ".join(map(str, torn[:5])))  # fmt: skip
    rows = [r for r in rows if r["step"] <= step]
    tmp = path.with_suffix(path.suffix + ".tmp")  # a kill while rewriting keeps the old log
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)
    return [{k: v for k, v in r.items() if k != "kind"} for r in rows if r.get("kind") == "eval"]


class Prefetch:
    """An iterator over `batches`, read ahead by a thread: up to `depth` items wait in its queue
    and one more in its hand (depth 0: read inline, no thread). The order is the source's, and
    the loaders draw from their own seeded generators, never the global ones, so a run is the
    same with or without it. The thread's errors are raised by `next`; `close` stops the thread
    (call it last: a `next` after it may wait forever). ValueError for depth < 0."""

    _END = object()

    def __init__(self, batches: Iterator[Batch], depth: int) -> None:
        if depth < 0:
            raise ValueError(f"prefetch depth must be >= 0, got {depth}")
        self.source, self.depth = batches, depth
        if depth == 0:
            return
        self.queue: queue.Queue = queue.Queue(depth)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._fill, name="prefetch", daemon=True)
        self.thread.start()

    def _put(self, item: Any) -> bool:
        while not self.stopped.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _fill(self) -> None:
        try:
            for item in self.source:
                if not self._put(item):
                    return
            self._put(self._END)
        except BaseException as e:  # raised again in the training thread
            self._put(e)

    def __iter__(self) -> Prefetch:
        return self

    def __next__(self) -> Batch:
        if self.depth == 0:
            return next(self.source)
        item = self.queue.get()
        if item is self._END or isinstance(item, BaseException):
            self._put(item)  # the thread has stopped: every later call ends the same way
            if item is self._END:
                raise StopIteration
            raise item
        return item

    def close(self) -> None:
        if self.depth:
            self.stopped.set()
            self.thread.join(timeout=5)


def _next(batches: Iterator[Batch], micro: int) -> Batch:
    try:
        return next(batches)
    except StopIteration:
        raise RuntimeError(f"the training batches ran out after {micro} micro-batches") from None


def to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _batch_size(batch: Batch) -> int:
    return next((v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor)), 0)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t  # an FSDP shard
