"""Notebook 05, part 2: the rank processes this process starts (from a notebook or a shell): how they start (CPU ranks
forked from a server that imported torch once, GPU and full-size ranks spawned), each one's entry point and the
environment it takes, and a run's end: rank 0's result, or the rank that failed, died or hung, named in its caller's
words, with no process left behind.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .files import write_file
from .launch import RankPlace, notebook_places, without_launcher_variables
from .ranks import CONFIG_ERRORS, RankJob, is_neighbour_error, join_ranks, leave_process

# what every rank process imports: the fork server imports it once, before it forks any of them
RANK_IMPORTS = ["__main__", "gptj_split.preload"]


def process_context(devices: list[str], model=None):
    """How a notebook starts the rank processes of `devices`. On Linux, CPU ranks fork from a server, started at the
    first run, that imports RANK_IMPORTS once, so each starts within a fraction of a second instead of spending
    seconds of CPU importing torch and transformers again (forkserver: Python 3.14's default on Linux). GPU ranks are
    spawned: CUDA cannot start in a process forked from one that may have touched it. So are GPT-J-6B's full-size
    ranks (`model`): forked, they raised notebook 07's rehearsal peak from 14.73 to 16.87 GiB, and at that size the
    imports are a small part of the start. Elsewhere too (macOS's system libraries are not fork-safe, Windows has no
    fork). The server lives as long as this process (`adopt_environment`)."""
    from .hub import load_config
    from .models import is_gptj_6b

    if not sys.platform.startswith("linux") or any(torch.device(d).type != "cpu" for d in devices) or (
            model is not None and is_gptj_6b(load_config(str(model)))):
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(RANK_IMPORTS)  # takes effect when the server starts; a running one keeps its own
    return ctx


def adopt_environment(environ: dict[str, str] | None) -> None:
    """In a rank process: take the caller's environment as it was when the run started, as a spawned process would (a
    forked one has its fork server's, from the first run); `tempfile` then reads TMPDIR again."""
    import tempfile

    if environ is not None:
        os.environ.clear()
        os.environ.update(environ)
        tempfile.tempdir = None


def rank_main(job: RankJob, places: list[RankPlace], rank: int, init_method: str, folder: str,
              environ: dict) -> None:
    """Entry point of a rank process started by `start_ranks`, at the place decided for it there: rank 0's result,
    or any rank's error, goes to a file in `folder`, written under a temporary name and renamed when complete."""
    import pickle
    import traceback

    try:
        adopt_environment(environ)
        result = join_ranks(job, places[rank], len(places), init_method, launched_here=True)
        if rank == 0:
            write_file(Path(folder, "result.pkl"), pickle.dumps(result))
    except BaseException as err:
        try:
            pickled = pickle.dumps(err)
        except Exception:  # an exception that cannot be pickled travels as its type name and text
            pickled = None
        report = FailureReport(rank, time.time(), f"{type(err).__name__}: {err}", traceback.format_exc(),
                               is_neighbour_error(err), pickled)
        write_file(Path(folder, f"rank{rank}.pkl"), pickle.dumps(report))
        leave_process(1)  # the caller reports it, naming the rank
    leave_process()


@dataclass
class FailureReport:
    """What a failed rank leaves for its caller: when, its error's type name and text, its traceback, whether it only
    lost a neighbour, and the error itself, pickled apart so that one which cannot be rebuilt loses only itself."""

    rank: int
    time: float
    text: str
    traceback: str = ""
    neighbour: bool = False
    pickled: bytes | None = None

    @property
    def error(self) -> BaseException | None:
        """The rank's own exception, rebuilt here; None where it could not travel or cannot be rebuilt (its type
        name and text are in `text` all the same)."""
        import pickle

        try:
            return pickle.loads(self.pickled) if self.pickled is not None else None
        except Exception:
            return None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(job: RankJob, model=None):
    """Start one process per rank from this process and return rank 0's result (notebooks 05, 07). A rank that
    raises, dies or hangs ends the run: every process is stopped, and the error names the rank. Devices are checked
    here first (launch.decide_ranks, on this node's hardware, whatever launcher variables this kernel has), so a
    missing GPU is refused before any process starts. `model` picks how processes start."""
    import multiprocessing.connection
    import pickle
    import tempfile

    places = notebook_places(job)
    ctx = process_context([p.device for p in places], model)
    world, deadline = len(places), job.options.deadline
    environ = without_launcher_variables(dict(os.environ))  # the ranks are this run's, not the kernel's launcher's
    with tempfile.TemporaryDirectory(prefix="gptj-ranks-") as folder:
        init = f"tcp://127.0.0.1:{free_port()}"
        procs = [ctx.Process(target=rank_main, args=(job, places, r, init, folder, environ), daemon=True,
                             name=f"{job.error.kind.replace(' ', '-')}-{r}") for r in range(world)]
        exits: dict[int, float] = {}
        started, overdue = time.time(), []
        try:
            for p in procs:
                p.start()
            while len(exits) < world:
                multiprocessing.connection.wait([p.sentinel for p in procs if p.exitcode is None], timeout=1.0)
                for r, p in enumerate(procs):
                    if p.exitcode is not None and r not in exits:
                        exits[r] = time.time()
                if any(procs[r].exitcode != 0 for r in exits):
                    break
                if deadline is not None and time.time() - started > deadline:
                    overdue = [r for r in range(world) if r not in exits]
                    break
        finally:
            running = [r for r, p in enumerate(procs) if p.is_alive()]
            for p in procs:
                if p.is_alive():
                    p.terminate()
            for p in procs:
                p.join(5)
                if p.is_alive():
                    p.kill()
                    p.join()
        failed = {r: t for r, t in exits.items() if procs[r].exitcode != 0}
        if failed or overdue:
            raise describe_failure(job, folder, failed, running, overdue, procs)
        return pickle.loads(Path(folder, "result.pkl").read_bytes())


def describe_failure(job: RankJob, folder: str, failed: dict[int, float], running: list[int], overdue: list[int],
                     procs) -> Exception:
    """The error that ended a run: a configuration error as it was raised; else the rank to blame as the client's
    RankError, in one line, with its own exception as the cause. A rank's own error beats the transport errors the
    others then see; a rank still running when the others gave up waiting for it hung."""
    import pickle

    if overdue:
        return job.error(overdue[0], f"did not finish within the run's deadline of {job.options.deadline:g} s "
                         f"(still running: {', '.join(map(str, overdue))})")
    reports = [pickle.loads(p.read_bytes()) for p in Path(folder).glob("rank*.pkl")]
    for r, t in failed.items():
        if not any(rep.rank == r for rep in reports):  # died without a word: killed, or exited hard
            reports.append(FailureReport(r, t, f"process exited with code {procs[r].exitcode}"))
    own = [rep for rep in reports if not rep.neighbour]
    if not own and running:  # everyone who spoke lost a neighbour: the one that never answered hung
        first = min(reports, key=lambda rep: rep.time)
        error = job.error(running[0], f"hung: no answer within the {job.options.timeout:g} s timeout "
                          f"({job.error.kind} {first.rank} waited for it: {first.text})", first.time)
        error.__cause__ = first.error
        return error
    first = min(own or reports, key=lambda rep: rep.time)
    cause = first.error
    if isinstance(cause, CONFIG_ERRORS):  # a bad configuration, refused before loading
        return cause
    text = first.text.strip().splitlines()[0] if first.text.strip() else first.text
    error = job.error(first.rank, f"failed: {text}", first.time, first.traceback)
    error.__cause__ = cause
    return error
