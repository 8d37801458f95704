"""Notebook 05: where each rank runs, decided once. A launch is n ranks started from a notebook (one node, every rank
here) or by torchrun (its variables say this rank's place among nodes); each rank's device, backend, dtype, budget and
weight formats are a function of the device spec, the node's hardware (hardware.py) and the launch, so a test
proves them for two T4s or two nodes without having them, and the dry run prints them before anything loads.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch

from .hardware import CPU_FORMATS, Hardware, read_hardware, with_free
from .devices import Device, DeviceEntry, format_size, read_spec, resolve_entries, spec_of

if TYPE_CHECKING:  # annotations only
    from .plan import Plan

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                      "ROLE_WORLD_SIZE", "GROUP_WORLD_SIZE", "TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Launch:
    """How the ranks of one run were started: `world_size` ranks, `local_world_size` per node, and this process's
    `rank` under torchrun (None from a notebook, which starts every rank on this node) (notebook 05)."""

    world_size: int
    local_world_size: int
    rank: int | None = None

    @property
    def torchrun(self) -> bool:
        """Whether torchrun started this process as one rank."""
        return self.rank is not None


def notebook_launch(ranks: int) -> Launch:
    """A launch from a notebook or a shell: every rank on this node, whatever variables the kernel's environment
    holds (a kernel started under torchrun, accelerate or SLURM) (notebook 05)."""
    return Launch(ranks, ranks)


def torchrun_launch(environ: dict[str, str] | None = None) -> Launch:
    """This process's launch as torchrun's variables describe it (RANK, WORLD_SIZE, LOCAL_WORLD_SIZE) (notebook 05)."""
    environ = os.environ if environ is None else environ
    world = int(environ["WORLD_SIZE"])
    return Launch(world, int(environ.get("LOCAL_WORLD_SIZE", world)), int(environ["RANK"]))


@dataclass(frozen=True)
class RankPlace:
    """One rank's decided place (notebooks 05, 07): its node and local rank, device, backend, dtype, budget, the card
    there (None on the CPU) and the weight formats that card runs; `holds` is filled in from a plan."""

    rank: int
    node: int
    local_rank: int
    device: str
    backend: str
    dtype: str
    budget_bytes: int
    card: str | None  # "Tesla T4 (compute capability 7.5)"; None on the CPU
    formats: tuple[str, ...]
    holds: str = ""

    @property
    def as_device(self) -> Device:
        """The rank's device and budget, as the planner takes them."""
        return Device(self.device, self.budget_bytes)

    def line(self) -> str:
        """`rank 1: node 0, local rank 1, device cuda:1, backend nccl, dtype float16, budget 14.00 GiB, holds ...`."""
        holds = f", holds {self.holds}" if self.holds else ""
        return (f"rank {self.rank}: node {self.node}, local rank {self.local_rank}, device {self.device}, backend "
                f"{self.backend}, dtype {self.dtype}, budget {format_size(self.budget_bytes)}{holds}")

    def to_dict(self) -> dict:
        """The same as JSON-ready values (`--dry-run --json`)."""
        return {**asdict(self), "formats": list(self.formats)}


def node_entries(entries: list[DeviceEntry], launch: Launch, node: int) -> list[DeviceEntry]:
    """The entries of one node's ranks, by the spec's form: one entry (every rank takes its local GPU), one per rank on
    a node (node-local: the same list on every node), or one per rank in the world (global, in rank order)."""
    local, world = launch.local_world_size, launch.world_size
    if len(entries) == 1 and world > 1:
        return entries * local
    if len(entries) == local and (launch.torchrun or world == local):
        return entries
    if len(entries) == world:
        return entries[node * local:(node + 1) * local]
    raise ValueError(spec_length_error(len(entries), launch))


def spec_length_error(count: int, launch: Launch) -> str:
    """Why a spec of `count` entries fits no form of this launch, and the forms that would."""
    if not launch.torchrun:
        return f"{count} device(s) for {launch.world_size} rank(s): give one device per rank"
    nodes = launch.world_size // launch.local_world_size
    if nodes == 1:
        return (f"{launch.world_size} process(es) for the {count} device(s): start one process per device (torchrun "
                f"--nproc-per-node {count}, or nodes x processes = {count}), or give 1 entry ('cuda': each rank its "
                "local GPU)")
    return (f"the device spec has {count} entries, which fits no form for {launch.world_size} ranks on {nodes} "
            f"node(s) of {launch.local_world_size}: give 1 entry (every rank takes its local GPU: 'cuda' or "
            f"'cuda=14GiB'), {launch.local_world_size} (node-local: the same list on every node, entry LOCAL_RANK) "
            f"or {launch.world_size} (global, in rank order)")


def pick_backend(devices_by_node: list[list[str]]) -> str:
    """NCCL when every rank has a GPU of its own on its node, else gloo (budget slices of one GPU, the CPU) (notebooks
    05, 07)."""
    every = [d for node in devices_by_node for d in node]
    if all(d.startswith("cuda") for d in every) and all(len(set(node)) == len(node) for node in devices_by_node):
        return "nccl"
    return "gloo"


def rank_dtype(dtype: torch.dtype | str | None, devices: list[str], gptj_6b: bool, saved: str | None = None) -> str:
    """The run's compute dtype: as given, else GPT-J-6B float16 on GPUs and bfloat16 on the CPU, else the saved one,
    else float32 (the tiny default) (notebooks 05, 07)."""
    if dtype is not None:
        return str(dtype).removeprefix("torch.")
    if gptj_6b:
        return "float16" if all(d.startswith("cuda") for d in devices) else "bfloat16"
    return str(saved).removeprefix("torch.") if saved else "float32"


def decide_ranks(spec: str, hardware: Hardware, launch: Launch, dtype: str | None = None,
                 kind: str = "rank") -> list[RankPlace]:
    """Every rank's place (notebooks 05, 07): the spec's entries by node (node_entries), each node laid out as one
    process would read its spec (devices.resolve_entries; under torchrun, other nodes like this one), the backend
    over all ranks, and `dtype` checked against each card. Refuses, before any group forms, a spec that fits no
    form, a GPU the node lacks, a budget over its card, and bfloat16 on a card without it, naming the rank in
    `kind`'s words ("pipeline stage 1")."""
    entries = read_spec(spec)
    local = launch.local_world_size
    if launch.world_size % local:
        raise ValueError(f"WORLD_SIZE {launch.world_size} is not a multiple of LOCAL_WORLD_SIZE {local}: start the "
                         "same number of processes on every node")
    devices = []
    for node in range(launch.world_size // local):
        mine = node_entries(entries, launch, node)
        for local_rank, e in enumerate(mine):
            check_entry_on_node(e, hardware, launch, kind, node * local + local_rank)
        devices.append(resolve_entries(mine, hardware))
    backend = pick_backend([[d.name for d in node] for node in devices])
    places = []
    for rank in range(launch.world_size):
        node, local_rank = divmod(rank, local)
        device = devices[node][local_rank]
        card = hardware.cards[int(device.name.split(":")[1])] if device.name.startswith("cuda") else None
        place = RankPlace(rank, node, local_rank, device.name, backend, dtype or "", device.budget_bytes,
                          card and f"{card.name} (compute capability {card.capability[0]}.{card.capability[1]})",
                          card.formats() if card else CPU_FORMATS)
        if dtype is not None:
            check_place_dtype(place, dtype, kind)
        places.append(place)
    return places


def check_entry_on_node(entry: DeviceEntry, hardware: Hardware, launch: Launch, kind: str, rank: int) -> None:
    """Refuse an entry that sends `rank` to a GPU its node does not have, naming the rank and the device, with a spec
    that would work there."""
    if entry.kind != "cuda" or entry.index is None or entry.index < hardware.gpus:
        return
    have = ", ".join(f"cuda:{i}" for i in range(hardware.gpus)) or "no GPU"
    local = launch.local_world_size
    if launch.torchrun:
        works = "'cuda' (each rank its local GPU)" + (
            f" or '{','.join(f'cuda:{i}' for i in range(local))}' (node-local)" if local <= hardware.gpus else "")
    else:
        works = (f"'{','.join(f'cuda:{i % max(1, hardware.gpus)}' for i in range(launch.world_size))}'"
                 if hardware.gpus else f"'{','.join(['cpu'] * launch.world_size)}'")
    raise ValueError(f"{kind} {rank} was given cuda:{entry.index}, which its node does not have ({have}): name each "
                     f"node's own GPUs, e.g. {works}")


def rank_count(spec: str) -> int:
    """How many ranks a notebook starts for a device spec: one per entry (notebooks 05, 07)."""
    return len(read_spec(spec))


def plan_spec(devices: str | list[Device] | None, plan: Plan | None = None) -> str:
    """A run's device spec: the plan's devices and budgets where there is one, else the spec as given (notebooks 05,
    07)."""
    if plan is not None:
        return spec_of([Device(s.device, s.budget_bytes) for s in plan.devices])
    if isinstance(devices, str):
        return devices
    if not devices:
        raise ValueError("give devices, one per rank (like 'cpu,cpu'), or a plan")
    return spec_of(list(devices))


def notebook_places(job, hardware: Hardware | None = None) -> list[RankPlace]:
    """Every rank's place when this process starts them all (a ranks.RankJob's spec, dtype and error), on this node:
    its own hardware, read once, and no launcher's variables (notebooks 05, 07)."""
    entries = read_spec(job.spec)
    if hardware is None:
        hardware = read_hardware(free=any(e.kind == "cuda" and e.budget is None for e in entries))
    return decide_ranks(job.spec, hardware, notebook_launch(len(entries)), job.dtype, job.error.kind)


def torchrun_places(job, launch: Launch, hardware: Hardware | None = None) -> list[RankPlace]:
    """Every rank's place as this torchrun rank decides it on its node: devices and backend for all (other nodes
    taken to be like this one), the budget read on this rank's own card; the others' budgets come from their own
    nodes once the group forms (notebooks 05, 07)."""
    hardware = hardware or read_hardware()
    assumed = Hardware(tuple(dataclasses.replace(c, free_bytes=c.free_bytes if c.free_bytes is not None else
                                                 c.total_bytes) for c in hardware.cards), hardware.host_free_bytes)
    places = decide_ranks(job.spec, assumed, launch, job.dtype, job.error.kind)
    own = places[launch.rank]
    if own.device.startswith("cuda") and hardware.cards[int(own.device.split(":")[1])].free_bytes is None:
        index = int(own.device.split(":")[1])
        free = int(torch.cuda.mem_get_info(index)[0])  # this rank's card only: no CUDA context on the others
        places = decide_ranks(job.spec, with_free(assumed, index, free), launch, job.dtype, job.error.kind)
    return places


def launch_notes(places: list[RankPlace]) -> list[str]:
    """What a dry run says beside the ranks' lines: one rank runs nothing beside it; ranks that share a GPU talk over
    gloo through the host (notebooks 05, 07)."""
    notes = []
    if len(places) == 1:
        notes.append("one rank: everything on one device, nothing runs beside it (a pipeline of one stage, tensor "
                     "parallelism of one rank); add devices to split the work")
    if places[0].backend == "gloo" and any(p.device.startswith("cuda") for p in places):
        notes.append("ranks share a GPU (budget slices): they talk over gloo through the host, since NCCL needs a GPU "
                     "per rank")
    return notes


def check_place_dtype(place: RankPlace, dtype: str, kind: str = "rank") -> None:
    """Refuse a compute dtype this rank's card does not run (bfloat16 on a T4), naming the rank (notebooks 05, 07)."""
    if dtype not in place.formats:
        raise ValueError(f"{kind} {place.rank} is on {place.device}, a {place.card}, which does not compute {dtype}: "
                         "use dtype float16 there")


def without_launcher_variables(environ: dict[str, str]) -> dict[str, str]:
    """The caller's environment less torchrun's variables, for ranks a notebook starts: they are not its ranks."""
    return {k: v for k, v in environ.items() if k not in TORCHRUN_VARIABLES}


def with_plan(places: list[RankPlace], plan, holds: list[str], kind: str = "rank") -> list[RankPlace]:
    """The places with what each rank holds and the plan's dtype, checked against each rank's card as the real run
    checks it (the dry run, notebooks 05, 07)."""
    from dataclasses import replace

    for place in places:
        check_place_dtype(place, plan.dtype, kind)
    return [replace(p, dtype=plan.dtype, budget_bytes=st.budget_bytes, holds=h)
            for p, st, h in zip(places, plan.devices, holds)]


def stage_holds(stage) -> str:
    """What a pipeline stage holds, in words: "embedding + blocks 0-13", "blocks 14-27 + head"."""
    a, b = stage.blocks
    parts = (["embedding"] if stage.embedding else []) + ([f"blocks {a}-{b - 1}"] if b > a else [])
    return " + ".join(parts + (["head"] if stage.head else []))
