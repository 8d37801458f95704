"""Notebook 00: devices and memory budgets. A device is a torch device plus a budget, so "3x5GiB" can be three
slices of one GPU or of the CPU; also this process's own host memory (RSS), which later chapters measure.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

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
    if torch.cuda.is_available():
        names = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    else:
        names = ["cpu"]
    return [Device(n, available_memory(n)) for n in names]


def check_device_name(name: str, part: str, check: bool = True) -> str:
    """Validate a device name like "cpu", "cuda:1" or "cuda" (the current GPU: under the rank runtime, the rank's own)
    (against this machine's GPUs when `check`)."""
    try:
        dev = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"device spec part {part!r}: {name!r} is not a device name (use cpu, cuda or cuda:N)") from err
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device spec part {part!r}: only cpu and cuda devices are supported, not {dev.type}")
    if dev.type == "cpu":
        return "cpu"
    index, count = dev.index or 0, torch.cuda.device_count()
    if check and count == 0:
        raise ValueError(f"device spec part {part!r}: this machine has no CUDA GPU; use cpu or a size like 3x5GiB")
    if check and index >= count:
        raise ValueError(f"device spec part {part!r}: cuda:{index} does not exist, this machine has {count} GPU(s)")
    return f"cuda:{index}" if dev.index is not None else "cuda"  # "cuda": the current GPU, a rank's own (LOCAL_RANK)


def parse_devices(spec: str, check: bool = True) -> list[Device]:
    """Parse "3x5GiB", "cuda:0=10GiB,cuda:1=10GiB", "cpu,cpu", "2xcpu=4GiB"; check=False: CUDA need not exist
    (notebook 00)."""
    if not spec or not spec.strip():
        raise ValueError("empty device spec: try 'cpu,cpu' or '2x5GiB' or 'cuda:0=10GiB,cuda:1=10GiB'")
    devices: list[Device] = []
    for part in spec.split(","):
        part = part.strip()
        count_match = re.fullmatch(r"(\d+)\s*[x×]\s*(.+)", part)
        count, body = (int(count_match.group(1)), count_match.group(2)) if count_match else (1, part)
        if count < 1:
            raise ValueError(f"device spec part {part!r}: the count must be at least 1")
        name, _, size = body.partition("=")
        name = name.strip()
        if re.match(r"^\d", name):  # a bare size: lay the slices on the GPUs in order, else on the CPU
            if size:
                raise ValueError(f"device spec part {part!r}: write either NxSIZE or DEVICE=SIZE")
            budget = parse_size(name)
            gpus = torch.cuda.device_count()
            names = [f"cuda:{i * gpus // count}" if gpus else "cpu" for i in range(count)]
            devices += [Device(n, budget) for n in names]
            continue
        name = check_device_name(name, part, check)
        if not size and not check and name.startswith("cuda"):
            raise ValueError(f"device spec part {part!r}: give a budget, like {name}=10GiB")
        budget = parse_size(size) if size else available_memory(name)
        if check:
            check_card(name, budget, part)
        devices += [Device(name, budget) for _ in range(count)]
    return devices


def check_card(name: str, budget: int, part: str) -> None:
    """Refuse a budget larger than the GPU it names, as torch reports it (a T4 shows 14.7 GiB) (notebook 00)."""
    if not name.startswith("cuda"):
        return
    props = torch.cuda.get_device_properties(torch.device(name))
    if budget > props.total_memory:
        raise ValueError(f"device spec part {part!r}: {name} is a {props.name} with {format_size(props.total_memory)} "
                         f"in all, less than the budget of {format_size(budget)}: give at most "
                         f"{props.total_memory // 2**30}GiB, and keep room for the CUDA context")


BFLOAT16_CAPABILITY = (8, 0)  # Ampere: the first cards that compute bfloat16 (a T4, 7.5, only emulates it)


def card_capability(name: str) -> tuple[str, tuple[int, int]] | None:
    """A CUDA device's card name and compute capability; None for the CPU or where this torch has no CUDA."""
    if not name.startswith("cuda") or not torch.cuda.is_available():
        return None
    dev = torch.device(name)
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_name(index), tuple(torch.cuda.get_device_capability(index))


def check_dtype_on_devices(dtype: torch.dtype, names) -> None:
    """Refuse bfloat16 on a GPU that does not compute it (compute capability below 8.0, like a T4 or a P100), even
    though `torch.cuda.is_bf16_supported()` says True there: it counts emulation (notebooks 00, 02)."""
    if dtype != torch.bfloat16:
        return
    for name in [str(getattr(n, "name", n)) for n in names]:
        card = card_capability(name)
        if card and card[1] < BFLOAT16_CAPABILITY:
            raise ValueError(f"{name} is a {card[0]} (compute capability {card[1][0]}.{card[1][1]}), which does not "
                             f"compute bfloat16 (it needs 8.0 or more): use dtype float16 there")


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
