"""Notebook 00: devices and memory budgets. A device is a torch device plus a budget, so "3x5GiB" can be three
slices of one GPU or of the CPU; also this process's own host memory (RSS), which later chapters measure.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .hardware import Hardware, read_hardware

UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """Parse "10GiB", "512 MB", "1.5gb" or a plain byte count into bytes (notebook 00)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in UNITS:
        raise ValueError(f"cannot read the size {text!r}: write a number and a unit, like 10GiB, 5GB or 512MiB")
    return int(float(match.group(1)) * UNITS[match.group(2).lower()])


def format_size(nbytes: float) -> str:
    """Bytes as a short human string in binary units (notebook 00)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(nbytes) < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.2f} {unit}"
        nbytes /= 1024
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class Device:
    """A place for a stage: a torch device name plus a memory budget in bytes. Several may share one device."""

    name: str
    budget_bytes: int

    @property
    def torch(self) -> torch.device:
        """The torch.device this budget lives on."""
        return torch.device(self.name)

    def __str__(self) -> str:
        return f"{self.name}={format_size(self.budget_bytes).replace(' ', '')}"


def available_memory(name: str) -> int:
    """Free memory of a device right now: host RAM for the CPU, free GPU memory for CUDA (notebook 00)."""
    if name.startswith("cuda"):
        free, _total = torch.cuda.mem_get_info(torch.device(name))
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)


def list_devices() -> list[Device]:
    """What this machine offers: each CUDA GPU with its free memory, else the CPU (notebook 00)."""
    hardware = read_hardware(free=True)
    if hardware.gpus:
        return [Device(f"cuda:{i}", card.free_bytes) for i, card in enumerate(hardware.cards)]
    return [Device("cpu", hardware.host_free_bytes)]


GPU_RESERVE = 2**30  # kept free on a GPU whose budget the spec leaves out: the CUDA context and activations
SPEC_FORMS = "cpu, cuda, cuda:N, each with an optional =SIZE, or a bare SIZE; N x ENTRY repeats one"


@dataclass(frozen=True)
class DeviceEntry:
    """One entry of a device spec as written, before any hardware is read (notebook 00): `kind` is "cpu", "cuda" (with
    an `index`, or None: the node's next GPU) or "size" (a bare budget: the node's GPUs in order, else the CPU)."""

    part: str  # the text it came from, named in errors
    kind: str
    index: int | None = None
    budget: int | None = None


def read_spec(spec: str) -> list[DeviceEntry]:
    """The entries of a device spec ("3x5GiB", "cuda:0=10GiB,cuda:1=10GiB", "cpu,cpu", "2xcuda"), one per device,
    read without looking at any hardware (notebook 00)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError("empty device spec: try 'cpu,cpu' or '2x5GiB' or 'cuda:0=10GiB,cuda:1=10GiB'")
    entries: list[DeviceEntry] = []
    for part in spec.split(","):
        part = part.strip()
        count_match = re.fullmatch(r"(\d+)\s*[x×]\s*(.+)", part)
        count, body = (int(count_match.group(1)), count_match.group(2)) if count_match else (1, part)
        if count < 1:
            raise ValueError(f"device spec part {part!r}: the count must be at least 1")
        name, _, size = body.partition("=")
        name = name.strip()
        if re.match(r"^\d", name):  # a bare size
            if size:
                raise ValueError(f"device spec part {part!r}: write either NxSIZE or DEVICE=SIZE")
            entries += [DeviceEntry(part, "size", None, parse_size(name))] * count
            continue
        kind, index = read_device_name(name, part)
        entries += [DeviceEntry(part, kind, index, parse_size(size) if size else None)] * count
    return entries


def read_device_name(name: str, part: str) -> tuple[str, int | None]:
    """"cpu", "cuda" or "cuda:N" as (kind, index), refusing anything else by the spec part to blame."""
    try:
        dev = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"device spec part {part!r}: {name!r} is not a device name ({SPEC_FORMS})") from err
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device spec part {part!r}: only cpu and cuda devices are supported, not {dev.type}")
    return dev.type, dev.index if dev.type == "cuda" else None


def resolve_entries(entries: list[DeviceEntry], hardware: Hardware) -> list[Device]:
    """The devices of one node's entries: a plain `cuda` at position p is cuda:p, bare sizes take the node's GPUs in
    order (several on one GPU where there are more sizes than GPUs), else the CPU; a missing budget is what the
    card has free less GPU_RESERVE (the host's free memory for the CPU); every GPU is checked against the node
    (notebook 00)."""
    sizes = [i for i, e in enumerate(entries) if e.kind == "size"]
    devices = []
    for position, e in enumerate(entries):
        if e.kind == "cpu" or (e.kind == "size" and not hardware.gpus):
            devices.append(Device("cpu", e.budget if e.budget is not None else hardware.host_free_bytes))
            continue
        if e.kind == "size":
            index = sizes.index(position) * hardware.gpus // len(sizes)
        else:
            index = position if e.index is None else e.index
        card = node_card(hardware, index, e.part)
        if e.budget is None and card.free_bytes is None:
            raise ValueError(f"device spec part {e.part!r}: no budget given and cuda:{index}'s free memory was not "
                             "read: read the hardware with free=True, or give a budget like cuda:0=10GiB")
        budget = e.budget if e.budget is not None else max(0, card.free_bytes - GPU_RESERVE)
        devices.append(Device(f"cuda:{index}", budget))
    check_cards(devices, entries, hardware)
    return devices


def node_card(hardware: Hardware, index: int, part: str):
    """The node's GPU `index`, or a refusal naming the spec part and what the node has."""
    if not hardware.gpus:
        raise ValueError(f"device spec part {part!r}: this node has no CUDA GPU; use cpu or a size like 3x5GiB")
    if index >= hardware.gpus:
        have = ", ".join(f"cuda:{i}" for i in range(hardware.gpus))
        raise ValueError(f"device spec part {part!r}: cuda:{index} does not exist, this node has {hardware.gpus} "
                         f"GPU(s) ({have}: {hardware})")
    return hardware.cards[index]


def check_cards(devices: list[Device], entries: list[DeviceEntry], hardware: Hardware) -> None:
    """Refuse a budget, or budgets that share a GPU, larger than that GPU as torch reports it (a T4 shows 14.75 GiB)
    (notebook 00)."""
    for device, entry in zip(devices, entries):
        if device.name.startswith("cuda"):
            card = hardware.cards[int(device.name.split(":")[1])]
            if device.budget_bytes > card.total_bytes:
                raise ValueError(f"device spec part {entry.part!r}: {device.name} is a {card.name} with "
                                 f"{format_size(card.total_bytes)} in all, less than the budget of "
                                 f"{format_size(device.budget_bytes)}: give at most "
                                 f"{card.total_bytes // 2**30}GiB, and keep room for the CUDA context")
    for name in {d.name for d in devices if d.name.startswith("cuda")}:
        card, shared = hardware.cards[int(name.split(":")[1])], [d.budget_bytes for d in devices if d.name == name]
        if len(shared) > 1 and sum(shared) > card.total_bytes:
            raise ValueError(f"device spec: {len(shared)} budgets on {name} add up to {format_size(sum(shared))}, "
                             f"more than the {card.name}'s {format_size(card.total_bytes)}: give smaller slices")


def parse_devices(spec: str, hardware: Hardware | None = None) -> list[Device]:
    """The one reader of device specs: "3x5GiB", "cuda:0=10GiB,cuda:1=10GiB", "cuda:0,cuda:1", "2xcuda", "cpu,cpu",
    read against `hardware` (default: this node, read now; a described one plans for a machine that is not here:
    `parse_devices("2x14GiB", describe_hardware("2 x T4"))`) (notebook 00)."""
    entries = read_spec(spec)
    if hardware is None:
        hardware = read_hardware(free=any(e.budget is None and e.kind == "cuda" for e in entries))
    return resolve_entries(entries, hardware)


def spec_of(devices: list[Device]) -> str:
    """Devices written back as a spec that reads to exactly them (budgets in bytes) (notebooks 05, 07)."""
    return ",".join(f"{d.name}={d.budget_bytes}" for d in devices)


def check_dtype_on_devices(dtype: torch.dtype, names, hardware: Hardware | None = None) -> None:
    """Refuse bfloat16 on a GPU that does not compute it (compute capability below 8.0, like a T4 or a P100), even
    though `torch.cuda.is_bf16_supported()` says True there: it counts emulation (notebooks 00, 02)."""
    if dtype != torch.bfloat16:
        return
    names = [str(getattr(n, "name", n)) for n in names]
    if not any(n.startswith("cuda") for n in names):
        return
    hardware = hardware or read_hardware()
    for name in names:
        dev = torch.device(name)
        if dev.type != "cuda" or (dev.index or 0) >= hardware.gpus:
            continue
        card = hardware.cards[dev.index or 0]
        if not card.computes_bfloat16:
            raise ValueError(f"{name} is a {card.name} (compute capability {card.capability[0]}."
                             f"{card.capability[1]}), which does not compute bfloat16 (it needs 8.0 or more): use "
                             "dtype float16 there")


def card_capability(name: str) -> tuple[str, tuple[int, int]] | None:
    """A CUDA device's card name and compute capability; None for the CPU or where this torch has no CUDA."""
    if not name.startswith("cuda") or not torch.cuda.is_available():
        return None
    dev = torch.device(name)
    card = read_hardware().cards[dev.index if dev.index is not None else torch.cuda.current_device()]
    return card.name, tuple(card.capability)


def release_memory() -> None:
    """Hand memory back after `del model`: collect the garbage, trim the host heap, and empty CUDA's cache (notebooks
    04, 05)."""
    import gc

    gc.collect()
    trim_host_heap()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def trim_host_heap() -> None:
    """Give back to the system the freed host memory that glibc's allocator keeps in holes of its heap (malloc_trim;
    nothing elsewhere): many freed temporaries between long-lived tensors otherwise stay in RSS (notebook 08)."""
    import ctypes
    import ctypes.util
    import sys

    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # musl and other C libraries have no malloc_trim
            pass


def describe_environment() -> str:
    """Library versions and this machine's devices, for the top of every notebook (notebook 00)."""
    import platform

    import transformers

    lines = [f"python {platform.python_version()} | torch {torch.__version__} | "
             f"transformers {transformers.__version__}"]
    lines += [f"device {d.name}: {format_size(d.budget_bytes)} free" for d in list_devices()]
    return "\n".join(lines)


def reset_peak_rss() -> int | None:
    """Start a new peak-RSS window for this process; its RSS now, the baseline (Linux only, else None) (notebook 05)."""
    import psutil

    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        return None
    return psutil.Process().memory_info().rss


def peak_rss() -> int | None:
    """This process's peak RSS since `reset_peak_rss` (VmHWM: its own; ru_maxrss would include its parent's)."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    return int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) * 1024
