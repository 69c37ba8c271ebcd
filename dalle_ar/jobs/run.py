"""Running the main job's plan: one stage after another in this process, or (`lanes`) side by
side, each in a process of its own; what is said of each stage on the terminal, and what a
stage that stops or fails raises."""

from __future__ import annotations

import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

from dalle_ar.checkpoint import write_json_atomic
from dalle_ar.config import ConfigError
from dalle_ar.jobs.config import STAGE_SETTINGS, MainJobConfig
from dalle_ar.jobs.plan import Plan, Stage, changed_settings, plan
from dalle_ar.train.common import NonFiniteLoss


class StageStopped(NonFiniteLoss):
    """A training stage stopped by non-finite numbers (`NonFiniteLoss`), naming the stage, what
    it kept and its config; the job's later stages did not run."""


SIDE_BY_SIDE_IDLE = 1.5  # CPUs idle as the job starts for lanes=0 to run 2 stages at once


def job_lanes(cfg: MainJobConfig) -> int:
    """How many stages run at once: `cfg.lanes`, or (0) 2 on a CPU where at least
    `SIDE_BY_SIDE_IDLE` CPUs sat idle just now (`runtime.free_cpus`), else 1 (said so). On a
    GPU, stages run one after another."""
    from dalle_ar.runtime import free_cpus

    if _on_gpu(cfg):
        return 1
    if cfg.lanes:
        return cfg.lanes
    if free_cpus() >= SIDE_BY_SIDE_IDLE:
        return 2
    say(f"stages one after another: fewer than {SIDE_BY_SIDE_IDLE} CPUs idle now (lanes=2 runs "
        "them side by side anyway)")  # fmt: skip
    return 1


def _on_gpu(cfg: MainJobConfig) -> bool:
    import torch

    return cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())


class StageFailed(RuntimeError):
    """A stage that failed in a process of its own (`lanes` > 1), naming the stage, what went
    wrong and where its output went; the stages beside it were stopped."""


def say(line: str, bar_open: bool = False) -> None:
    """One line of the job's progress on stdout. On a terminal it first clears the line a stage
    running beside it may have left a progress bar on (that bar redraws below); elsewhere (a
    log file), with `bar_open` (a stage that writes to the terminal is running), it starts a
    line of its own, so that it does not end that stage's progress-bar line."""
    lead = "\r\033[K" if sys.stdout.isatty() else ("\n" if bar_open else "")
    print(lead + line, flush=True)


def _begin(
    i: int, n: int, stage: Stage, upstream: list[str], ran_with: dict, bar_open: bool = False
) -> str | None:
    """Before a stage: None (said so) when its output is complete, it ran with the settings it
    is made from now (`ran_with`, by stage: `plan.settings_ran_with`) and nothing it needs ran in
    this job; else what to say after "running", its stale outputs removed first."""
    done = stage.done()  # may hash a CLIP's weights file (`tokens_done`): asked once
    changed = changed_settings(stage, ran_with.get(stage.name)) if done else []
    if not upstream and not changed and done:
        say(f"[{i}/{n}] {stage.name}: done already, skipped", bar_open)
        return None
    stale = [o for o in stage.outputs if o.exists()] if upstream or changed else []
    for o in stale:
        shutil.rmtree(o) if o.is_dir() else o.unlink()
    why = [f"{', '.join(upstream)} ran"] if upstream else []
    why += [f"settings changed: {'; '.join(changed)}"] if changed else []
    return f" again ({'; '.join(why)})" if stale else ""


def _record(job: Plan, name: str, ran_with: dict) -> None:
    """A stage finished: what it ran with into `ran_with` and `stage_settings.json`."""
    stage = next(s for s in job.stages if s.name == name)
    ran_with[name] = stage.made_from or {}
    write_json_atomic(job.paths.out / STAGE_SETTINGS, ran_with)


def _finished(
    i: int, n: int, name: str, t0: float, timings: dict[str, float | str], bar_open: bool = False
) -> None:
    timings[name] = round(time.perf_counter() - t0, 1)
    say(f"[{i}/{n}] {name}: finished in {timings[name]} s", bar_open)


def _stopped(job: Plan, name: str, message: str) -> StageStopped:
    config = job.yaml.get("transformer" if name == "cond_transformer" else name)
    return StageStopped(f"the {name} stage stopped ({config}): {message} A rerun of the job "
                        "resumes the stage from its last good checkpoint, or starts it over "
                        "without one.")  # fmt: skip


def one_after_another(job: Plan, timings: dict[str, float | str], ran_with: dict) -> None:
    """Each stage in turn, in this process (the plan's order has every stage after the ones it
    waits for: `plan`)."""
    ran: set[str] = set()
    n = len(job.stages)
    for i, stage in enumerate(job.stages, 1):
        again = _begin(i, n, stage, sorted(stage.needs & ran), ran_with)
        if again is None:
            timings[stage.name] = "skipped"
            continue
        say(f"[{i}/{n}] {stage.name}: running{again}")
        t0 = time.perf_counter()
        try:
            stage.run()
        except NonFiniteLoss as e:
            raise _stopped(job, stage.name, str(e)) from e
        ran.add(stage.name)
        _finished(i, n, stage.name, t0, timings)
        _record(job, stage.name, ran_with)


# What the processes of stages run side by side import once, in the server they are forked from
PRELOAD = [__name__, "dalle_ar.train.transformer", "dalle_ar.train.clip", "dalle_ar.train.vq",
           "dalle_ar.train.upsampler", "dalle_ar.pipelines"]  # fmt: skip


class Running(NamedTuple):
    number: int  # the stage's [i/n]
    name: str
    process: Any  # multiprocessing.Process
    started: float  # time.perf_counter()
    log: Path | None  # where its output goes; None: the terminal


class _Lanes:
    """The stages running side by side (`side_by_side`): their processes and result pipes."""

    def __init__(self, cfg: MainJobConfig, job: Plan) -> None:
        import multiprocessing

        methods = multiprocessing.get_all_start_methods()
        self.ctx = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
        if "forkserver" in methods:  # children forked from a server that never ran torch ops
            self.ctx.set_forkserver_preload(PRELOAD)  # (a fork after OpenMP ran can hang)
        self.cfg, self.job = cfg, job
        self.running: dict[Any, Running] = {}  # result pipe -> its stage
        self.terminal: str | None = None  # the running stage that writes to the terminal

    def start(self, i: int, stage: Stage, again: str) -> None:
        log = self.job.paths.out / "logs" / f"{stage.name}.log"
        if self.terminal is None:  # this one writes to the terminal: no log of an earlier run
            log.unlink(missing_ok=True)
            log, self.terminal = None, stage.name
        beside = [r.name for r in self.running.values()]
        where = f" beside {', '.join(beside)}" if beside else ""
        where += f", output in {log}" if log else ""
        say(f"[{i}/{len(self.job.stages)}] {stage.name}: running{again}{where}", log is not None)
        reader, writer = self.ctx.Pipe(duplex=False)
        proc = self.ctx.Process(target=_stage_process, name=f"dalle-ar {stage.name}",
                                args=(self.cfg, stage.name, writer, log))  # fmt: skip
        self.running[reader] = Running(i, stage.name, proc, time.perf_counter(), log)
        proc.start()
        writer.close()

    def finished(self) -> tuple[list[Running], Exception | None]:
        """Wait for one or more running stages to end: those that finished, and the error of
        the first that failed (StageStopped, ConfigError or StageFailed), if one did."""
        from multiprocessing.connection import wait

        done, error = [], None
        for reader in wait(list(self.running)):
            r = self.running.pop(reader)
            try:
                status, text = reader.recv()
            except EOFError:  # killed before it could say
                status, text = "error", ""
            reader.close()
            r.process.join()
            if r.name == self.terminal:
                self.terminal = None
            if status == "ok":
                done.append(r)
            elif error is None:
                error = self._error(r, status, text)
        return done, error

    def _error(self, r: Running, status: str, text: str) -> Exception:
        if status == "stopped":
            return _stopped(self.job, r.name, text)
        if status == "config":
            return ConfigError(text)
        text = text or f"its process ended with exit code {r.process.exitcode}"
        return StageFailed(f"the {r.name} stage failed: {text}"
                           + (f" (its output: {r.log})" if r.log else ""))  # fmt: skip

    def stop(self) -> None:
        """End what still runs (after a failure or an interrupt), saying which."""
        n = len(self.job.stages)
        for r in self.running.values():
            if r.process.is_alive():
                r.process.terminate()
                r.process.join(10)
                if r.process.is_alive():
                    r.process.kill()
                    r.process.join()
                say(
                    f"[{r.number}/{n}] {r.name}: stopped; a rerun of the job runs it again (a "
                    "training stage from its last checkpoint, if it wrote one)"
                )
        self.running.clear()


def side_by_side(cfg: MainJobConfig, job: Plan, lanes: int, timings: dict, ran_with: dict) -> None:
    """Up to `lanes` stages at once, each in a process of its own, a stage starting once every
    stage it waits for has finished (in the plan's order where several could). Each process
    takes the threads of the CPUs free when it starts, and a training stage follows them while
    it runs (`runtime.CPUShare`): when the stage beside it ends, it takes that core too. One
    stage at a time writes to the terminal; a stage started beside it writes to
    out_dir/logs/NAME.log. A stage that fails, an interrupt or SIGTERM stop the others (a
    training stage resumes from its last checkpoint on a rerun)."""
    import signal
    import threading

    names, n = {s.name for s in job.stages}, len(job.stages)
    waiting = list(enumerate(job.stages, 1))
    settled: set[str] = set()  # finished in this job, or skipped
    ran: set[str] = set()
    pool = _Lanes(cfg, job)

    def terminated(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    on_main = threading.current_thread() is threading.main_thread()  # signals: main thread only
    before = signal.signal(signal.SIGTERM, terminated) if on_main else None
    try:
        while waiting or pool.running:
            ready = next(((i, s) for i, s in waiting if s.waits_for() & names <= settled), None)
            if ready and len(pool.running) < lanes:
                waiting.remove(ready)
                i, stage = ready
                again = _begin(i, n, stage, sorted(stage.needs & ran), ran_with,
                               pool.terminal is not None)  # fmt: skip
                if again is None:
                    timings[stage.name] = "skipped"
                    settled.add(stage.name)
                else:
                    pool.start(i, stage, again)
                continue
            if not pool.running:  # cannot happen with the plan's order (`plan`); never spin
                raise RuntimeError(f"no stage can start: {[s.name for _, s in waiting]}")
            done, error = pool.finished()
            for r in done:
                ran.add(r.name)
                settled.add(r.name)
                _finished(r.number, n, r.name, r.started, timings, pool.terminal is not None)
                _record(job, r.name, ran_with)
            if error is not None:
                raise error
    finally:
        pool.stop()
        if on_main:
            signal.signal(signal.SIGTERM, before)


def _stage_process(cfg: MainJobConfig, name: str, conn: Any, log: Path | None) -> None:
    """One stage in a process of its own (`side_by_side`): the plan built again, the stage run
    with the threads of the CPUs free now, what came of it sent back through `conn`. It ends
    when the job's process does, however that one ends."""
    import multiprocessing
    import os
    import threading
    import traceback
    from multiprocessing.connection import wait

    from dalle_ar.cli import LOG_FORMAT
    from dalle_ar.runtime import pick_threads, set_threads

    parent = multiprocessing.parent_process()
    if parent is not None:  # the job killed (SIGKILL, out of memory): stop, do not train on
        threading.Thread(target=lambda: (wait([parent.sentinel]), os._exit(1)),
                         daemon=True).start()  # fmt: skip
    if log is not None:  # beside another stage: its progress and messages go to its log
        log.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
    logging.basicConfig(level=logging.WARNING, format=LOG_FORMAT)  # the job's own level
    set_threads(pick_threads(0))
    try:
        stage = next(s for s in plan(cfg).stages if s.name == name)
        stage.run()
        conn.send(("ok", ""))
    except NonFiniteLoss as e:
        conn.send(("stopped", str(e)))
    except ConfigError as e:
        conn.send(("config", str(e)))
    except KeyboardInterrupt:  # the terminal's Ctrl-C reached every stage: the job says it
        conn.send(("error", "interrupted"))
    except BaseException as e:
        traceback.print_exc()
        conn.send(("error", f"{type(e).__name__}: {e}"))
    finally:
        conn.close()
