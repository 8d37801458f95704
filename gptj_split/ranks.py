"""Notebook 05, part 2: one runtime for n ranks, under the pipeline (05) and tensor parallelism (07). It starts one
process per device from a notebook, or joins the group that torchrun started; puts each rank where launch.py decided
(one decision, from the spec, the node's hardware and the launch); lets each node find the model itself before any
group forms; sets the CUDA device before any process group exists; gives the load a time limit that follows its
bytes; carries rank 0's result and the original errors back, naming a failed rank in its caller's words; and ends
every run within one deadline.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .hardware import Hardware
from .files import write_file
from .launch import RankPlace, notebook_places, torchrun_launch, torchrun_places, without_launcher_variables

DEFAULT_TIMEOUT = 60.0  # seconds a rank waits for another in a collective (once the weights are loaded)
DEFAULT_DEADLINE = 3600.0  # seconds a run of prompts started from a notebook may take in all, loading included
LOAD_RATE_FLOOR = 20e6  # bytes/s: the slowest disk a load may read from before its ranks give up on each other
CONFIG_ERRORS = (ValueError, MemoryError, FileNotFoundError)  # refused before loading: passed on as they are
# what every rank process imports: the fork server imports it once, before it forks any of them
RANK_IMPORTS = ["__main__", "gptj_split.preload"]


@dataclass(frozen=True)
class LaunchOptions:
    """How the ranks of one run start and wait, the same for the pipeline and tensor parallelism (notebooks 05, 07).

    `timeout`: seconds a rank waits for another in a collective once the weights are loaded (while they load, the
    limit follows the bytes: `load_timeout`); `deadline`: seconds the whole run may take when started from a notebook,
    an hour by default (None: as long as the ranks keep answering, for a long-lived service); `threads` per rank
    (default: the node's cores shared among its ranks); `affinity`: the cores of each rank; `transform`: called on
    each block module as a stage loads it (notebook 08 quantizes there); `cap_memory`: cap each GPU rank's
    allocator at its budget (`torch.cuda.set_per_process_memory_fraction`), so slices of one GPU stay in their
    slices and a card larger than the one rehearsed runs out of memory where that one would (`make gpu-check`)."""

    timeout: float = DEFAULT_TIMEOUT
    deadline: float | None = DEFAULT_DEADLINE
    threads: int | None = None
    affinity: list[list[int]] | None = None
    transform: Callable | None = None
    cap_memory: bool = False

    def __post_init__(self):
        if self.timeout <= 0 or (self.deadline is not None and self.deadline <= 0):
            raise ValueError(f"timeout={self.timeout}, deadline={self.deadline}: give positive seconds")


class RankError(RuntimeError):
    """A rank failed. `kind` ("pipeline stage", "tensor-parallel rank") and `rank` name it, `failed_at` is when
    (time.time()), `remote_traceback` is its own traceback; its exception, where it could travel, is the `__cause__`
    (notebooks 05, 07). Each client subclasses it with its own `kind`."""

    kind = "rank"

    def __init__(self, rank: int, detail: str, failed_at: float | None = None, remote_traceback: str = ""):
        super().__init__(f"{self.kind} {rank} {detail}")
        self.rank, self.detail, self.remote_traceback = rank, detail, remote_traceback
        self.failed_at = time.time() if failed_at is None else failed_at

    @property
    def stage(self) -> int:
        """The rank's number, by the pipeline's name for it."""
        return self.rank


@dataclass
class RankJob:
    """What the runtime runs on every rank: `locate(payload)` on every rank before any group forms (this node's own
    copy of the model, downloaded there if need be), `prepare(payload, places, located)` once on rank 0 with every
    rank's place and budget (plan, tokenize; its configuration error reaches every rank), then `serve(context,
    payload, prepared)` on all; rank 0's return value is the run's result. All are module-level functions, so they
    reach processes that were spawned (notebooks 05, 07)."""

    error: type[RankError]
    prepare: Callable
    serve: Callable
    spec: str  # the device spec, one entry per rank (or per node's rank, or one for all: launch.node_entries)
    payload: object
    options: LaunchOptions = dataclasses.field(default_factory=LaunchOptions)
    locate: Callable | None = None
    dtype: str | None = None  # the compute dtype, checked against each rank's card; None: decided by `prepare`


@dataclass
class RankContext:
    """One rank's place in the run, handed to `serve` (notebooks 05, 07): `place` as launch.py decided it, every
    rank's `places` (budgets as each node read them), and what `locate` found on this node."""

    place: RankPlace
    places: list[RankPlace]
    error: type[RankError]
    options: LaunchOptions
    located: object = None

    @property
    def rank(self) -> int:
        """This rank's number."""
        return self.place.rank

    @property
    def world_size(self) -> int:
        """How many ranks the run has."""
        return len(self.places)

    @property
    def device(self) -> torch.device:
        """This rank's own device, on its own node: where every client loads."""
        return torch.device(self.place.device)

    @property
    def backend(self) -> str:
        """"nccl" or "gloo"."""
        return self.place.backend

    @property
    def comm_device(self) -> torch.device:
        """Where tensors cross between ranks: the GPU for NCCL, the CPU for gloo."""
        return self.device if self.backend == "nccl" else torch.device("cpu")


def configure_worker(threads: int | None, cpus: list[int] | None) -> None:
    """Limit this process's threads and pin it to some cores (the benchmark emulates one device per core)."""
    if cpus:
        os.sched_setaffinity(0, set(cpus))
    if threads:
        torch.set_num_threads(threads)
        with contextlib.suppress(RuntimeError):  # only settable before the first parallel work
            torch.set_num_interop_threads(threads)


def join_ranks(job: RankJob, place: RankPlace, world_size: int, init_method: str = "env://",
               launched_here: bool = False):
    """Every rank's start, from a notebook or under torchrun, in this order: threads and cores; `locate` on this node
    (a download happens here, before any group forms, never while other ranks wait); this rank's device, set before
    any process group; the group; every rank's place gathered (each budget as its own node read it); rank 0's
    `prepare`, broadcast; then `serve`. Returns rank 0's result (None elsewhere) (notebooks 05, 07)."""
    import datetime

    import torch.distributed as dist

    options, rank = job.options, place.rank
    configure_worker(options.threads or (max(1, (os.cpu_count() or 1) // world_size) if launched_here else None),
                     options.affinity[rank] if options.affinity else None)
    located = job.locate(job.payload) if job.locate is not None else None
    if place.device.startswith("cuda"):  # before the group and any DeviceMesh: NCCL and DTensor use the current device
        torch.cuda.set_device(torch.device(place.device))
        if options.cap_memory:
            cap_memory(place.device, place.budget_bytes)
    dist.init_process_group(place.backend, init_method=init_method, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=options.timeout))
    try:
        places: list = [None] * world_size
        dist.all_gather_object(places, place)
        setup: list = [None]
        if rank == 0:
            try:
                setup[0] = job.prepare(job.payload, places, located)
            except CONFIG_ERRORS as err:
                setup[0] = err
        dist.broadcast_object_list(setup, src=0)
        if isinstance(setup[0], Exception):
            raise setup[0]
        context = RankContext(place, places, job.error, options, located)
        result = job.serve(context, job.payload, setup[0])
        dist.barrier()  # nobody leaves while another rank still talks to it
        return result
    finally:
        dist.destroy_process_group()


def cap_memory(device: str, budget_bytes: int) -> float:
    """Cap this process's CUDA allocator on `device` at `budget_bytes`; the fraction of the card it is (make
    gpu-check)."""
    fraction = min(1.0, budget_bytes / torch.cuda.get_device_properties(torch.device(device)).total_memory)
    torch.cuda.set_per_process_memory_fraction(fraction, torch.device(device))
    return fraction


def load_timeout(nbytes: int, timeout: float = DEFAULT_TIMEOUT) -> float:
    """Seconds ranks wait for each other while they load `nbytes` (the largest rank's weights): the step timeout plus
    the bytes read at LOAD_RATE_FLOOR, so a full-size load needs no hand-raised timeout (notebooks 05, 07)."""
    return timeout + nbytes / LOAD_RATE_FLOOR


def set_group_timeout(seconds: float) -> None:
    """The timeout of the run's process group from now on (torch's `_set_pg_timeout`, as torchtitan sets a long one
    for its first step and a short one after)."""
    import datetime

    from torch.distributed import distributed_c10d

    distributed_c10d._set_pg_timeout(datetime.timedelta(seconds=seconds))


@contextlib.contextmanager
def loading(context: RankContext, nbytes: int):
    """The load phase of a rank: while it loads, the ranks wait for each other up to `load_timeout(nbytes)`; after,
    they meet (every rank loaded) and wait only the step timeout (notebooks 05, 07)."""
    import torch.distributed as dist

    set_group_timeout(load_timeout(nbytes, context.options.timeout))
    yield
    dist.barrier()
    set_group_timeout(context.options.timeout)


def clock_start(node: int, rank0_start: float, now: float) -> float:
    """Where a rank's times start: rank 0's start on rank 0's node (one machine, one clock: one time axis for the
    timelines), this rank's own `now` on any other node (durations on its own clock, never another machine's)."""
    return rank0_start if node == 0 else now


def run_jobs(context: RankContext, jobs: list, run: Callable, merge: Callable) -> list | None:
    """Every job in turn on every rank: the ranks meet, then each times the job from `clock_start` (`run(job, t0)`
    returns this rank's report, its events on an EventClock from t0); rank 0 merges the gathered reports with
    `merge(reports, job)`. Rank 0 returns the merged results, the others None (notebooks 05, 07)."""
    import torch.distributed as dist

    merged = []
    for job in jobs:
        dist.barrier()
        start = [time.time()]
        dist.broadcast_object_list(start, src=0)
        report = run(job, clock_start(context.place.node, start[0], time.time()))
        gathered = [None] * context.world_size if context.rank == 0 else None
        dist.gather_object(report, gathered, dst=0)
        if context.rank == 0:
            merged.append(merge(gathered, job))
    return merged if context.rank == 0 else None


def serve_torchrun(job: RankJob, hardware: Hardware | None = None):
    """This process as one rank of a torchrun launch (RANK, WORLD_SIZE, LOCAL_WORLD_SIZE set): its place decided on
    its node, refused before any group forms; rank 0 returns the result; any other rank leaves; a failure ends the
    process naming the rank in one line (the command line)."""
    launch = torchrun_launch()
    place = torchrun_places(job, launch, hardware)[launch.rank]
    try:
        result = join_ranks(job, place, launch.world_size)
    except CONFIG_ERRORS:
        raise
    except Exception as err:
        how = "lost another rank (see its error)" if is_neighbour_error(err) else "failed"
        raise SystemExit(f"error: {job.error.kind} {launch.rank} {how}: {type(err).__name__}: {err}") from err
    if launch.rank != 0:
        leave_process()
    return result


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


def leave_process(code: int = 0) -> None:
    """Exit a rank process at once: gloo's threads can abort an orderly interpreter shutdown (SIGABRT)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def is_neighbour_error(err: BaseException) -> bool:
    """Did this error come from the transport (another rank vanished or timed out), not from this rank itself? gloo
    reports a vanished peer as a plain RuntimeError from its transport."""
    import torch.distributed as dist

    return isinstance(err, (dist.DistError, ConnectionError, TimeoutError)) or (
        isinstance(err, RuntimeError) and any(m in str(err) for m in ("gloo/transport", "by peer")))


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
