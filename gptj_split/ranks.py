"""Notebook 05, part 2: one runtime for n ranks, under the pipeline (05) and tensor parallelism (07): what every rank
does, however it was started (by processes.py from a notebook, or by torchrun). It puts the rank where launch.py
decided (one decision, from the spec, the node's hardware and the launch); lets each node find the model itself
before any group forms; sets the CUDA device before any process group exists; gives the load a time limit that
follows its bytes; runs the jobs on each rank's clock; and names a failed rank in its caller's words.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .hardware import Hardware
from .launch import RankPlace, torchrun_launch, torchrun_places

DEFAULT_TIMEOUT = 60.0  # seconds a rank waits for another in a collective (once the weights are loaded)
DEFAULT_DEADLINE = 3600.0  # seconds a run of prompts started from a notebook may take in all, loading included
LOAD_RATE_FLOOR = 20e6  # bytes/s: the slowest disk a load may read from before its ranks give up on each other
CONFIG_ERRORS = (ValueError, MemoryError, FileNotFoundError)  # refused before loading: passed on as they are


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


