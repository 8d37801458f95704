"""What the rehearsal (`benchmarks/rehearse.py`) counts while a notebook runs: each device's memory apart from the
host's.

On the CPU every "device" is host memory, so one RSS figure cannot say whether a GPU of the plan or the host would
run out. Two records tell them apart:

- a ledger inside the kernel (`LEDGER_CELL`, run first): once a second while a cell runs (the models the notebook's
  names reach) and at its end (every module alive), it counts the bytes of the models the kernel holds by the
  device of the plan they were placed for, beside the kernel's RSS; each cell's line holds the largest of each (a
  model loaded outside a plan counts as the host's);
- a watchdog outside (`Watchdog`): twice a second, the RSS of the kernel and of each process the kernel started
  (pipeline stages, tensor-parallel ranks), the peak of each cell on its own, and a kill past the machine's limit.

The host's share is the kernel's resident anonymous memory less the placed tensors held there, at the same look:
tensors read in place from a safetensors file are the file's pages, which the system can drop (on a GPU they would
be copied to the device); a stage or rank process holds one device's share.
"""
from __future__ import annotations

import json
import threading
from pathlib import Path

import psutil

LEDGER_VARIABLE = "GPTJ_REHEARSAL_LEDGER"  # the file the kernel's ledger appends to, one JSON line per cell

LEDGER_CELL = '''\
# The rehearsal's ledger (benchmarks/ledger.py), not part of the notebook: while each cell runs, once a second and
# at its end, the bytes of every model this kernel holds by the device of its plan, and the process's RSS beside them.
import threading as _threading


def _rehearsal_modules(everything):
    """Every module alive (gc, from the main thread only: another thread's look can catch a tuple being built, and
    CPython then fails), or those the notebook's names reach, one attribute or item deep (safe from any thread)."""
    import gc
    import torch

    def is_module(m):
        return issubclass(type(m), torch.nn.Module) and type(m).__name__ != "OptimizedModule"

    if everything:
        return [m for m in gc.get_objects() if is_module(m)]
    found = []
    for value in list(get_ipython().user_ns.values()):
        inner = list(value.values()) if isinstance(value, dict) else list(value) if isinstance(value, (list, tuple)) \
            else list(getattr(value, "__dict__", {}).values())
        found += [v for v in [value, *inner] if is_module(v)]
    return found


def _rehearsal_memory():
    """The process's resident anonymous and shared memory (what must stay in RAM), and the address ranges mapped
    from files: tensors there are a file's pages (safetensors read in place), which the system can drop and read
    again, as a GPU's copy would leave the host free."""
    import os
    status = open(f"/proc/{os.getpid()}/status").read().split("\\n")
    kib = {line.split(":")[0]: int(line.split()[1]) for line in status if line.startswith(("RssAnon", "RssShmem"))}
    ranges = []
    for line in open(f"/proc/{os.getpid()}/maps"):
        parts = line.split()
        if len(parts) >= 6 and parts[4] != "0" and not parts[5].startswith("["):
            start, end = (int(x, 16) for x in parts[0].split("-"))
            ranges.append((start, end))
    return 1024 * (kib.get("RssAnon", 0) + kib.get("RssShmem", 0)), sorted(ranges)


def _rehearsal_sample(everything=False):
    """(bytes per stage of the plan with device and budget, bytes of models outside a plan, RSS, the host's bytes
    outside the plan's devices), looked at once."""
    import bisect
    import psutil
    from gptj_split.place import plan_of, tensor_bytes, tensor_stage

    def key(t):
        try:
            return t.untyped_storage().data_ptr()
        except Exception:  # a tensor subclass without one storage (a quantized weight)
            return id(t)

    resident, ranges = _rehearsal_memory()
    starts = [start for start, _ in ranges]

    def in_file(t):
        ptr = key(t)
        i = bisect.bisect_right(starts, ptr) - 1
        return i >= 0 and ranges[i][0] <= ptr < ranges[i][1]

    seen, devices, unplaced, placed_resident = set(), {}, 0, 0
    modules = list({id(m): m for m in _rehearsal_modules(everything)}.values())
    for m in [m for m in modules if plan_of(m) is not None] + [m for m in modules if plan_of(m) is None]:
        plan = plan_of(m)
        for name, t in list(m.named_parameters()) + list(m.named_buffers()):
            if key(t) in seen:
                continue
            seen.add(key(t))
            if plan is None:
                unplaced += tensor_bytes(t)
                continue
            s = tensor_stage(plan, name)
            device, budget = plan.devices[s].device, plan.devices[s].budget_bytes  # two plans alike add up
            row = devices.setdefault(f"{s}|{device}|{budget}", {"device": device, "bytes": 0, "budget": budget})
            row["bytes"] += tensor_bytes(t)
            placed_resident += 0 if in_file(t) else tensor_bytes(t)
    return devices, unplaced, psutil.Process().memory_info().rss, resident - placed_resident


_rehearsal_cell = {}
_rehearsal_lock = _threading.Lock()  # a look folds into the cell it began in, never into the next one


def _rehearsal_note(everything=False):
    """Fold one sample into the running cell's maxima."""
    with _rehearsal_lock:
        _rehearsal_fold(*_rehearsal_sample(everything))


def _rehearsal_fold(devices, unplaced, rss, host):
    cell = _rehearsal_cell
    for s, row in devices.items():
        held = cell.setdefault("devices", {}).setdefault(s, dict(row))
        held["bytes"] = max(held["bytes"], row["bytes"])
    placed = sum(row["bytes"] for row in devices.values())
    cell["host"] = max(cell.get("host", 0), host)
    cell["placed"] = max(cell.get("placed", 0), placed)
    cell["unplaced"] = max(cell.get("unplaced", 0), unplaced)
    cell["rss"] = max(cell.get("rss", 0), rss)


def _rehearsal_loop():
    import time
    while True:
        time.sleep(1.0)
        try:
            _rehearsal_note()
        except Exception:  # a model changing under the look (loading): the next look counts it
            pass


def _rehearsal_start(info=None):
    with _rehearsal_lock:
        _rehearsal_cell.clear()


def _rehearsal_end(result=None):
    import json, os
    with _rehearsal_lock:
        _rehearsal_fold(*_rehearsal_sample(everything=True))
        with open(os.environ["GPTJ_REHEARSAL_LEDGER"], "a") as f:
            f.write(json.dumps({"devices": {}, **_rehearsal_cell}) + "\\n")
        _rehearsal_cell.clear()


get_ipython().events.register("pre_run_cell", _rehearsal_start)
get_ipython().events.register("post_run_cell", _rehearsal_end)
_threading.Thread(target=_rehearsal_loop, daemon=True).start()
'''


def read_ledger(path: Path) -> list[dict]:
    """The ledger's lines so far."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class Watchdog:
    """Samples the RSS of this process's descendants: the kernel's peak per cell, each other process's peak, and
    their sum; past `limit` bytes summed it kills them all (the notebook fails)."""

    def __init__(self, limit: int, every: float = 0.5):
        self.limit, self.every, self.peak, self.fired = limit, every, 0, False
        self.cell = -1  # the index of the cell running now, set by the client's hook
        self.kernel_peaks: dict[int, int] = {}  # cell index -> the kernel's peak RSS during it
        self.total_peaks: dict[int, int] = {}  # cell index -> the peak of every process together during it
        self.process_peaks: dict[int, int] = {}  # pid of a process the kernel started -> its peak RSS
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def start_cell(self, cell=None, cell_index: int = -1, **_) -> None:
        """nbclient's on_cell_start hook."""
        self.cell = cell_index

    def sample(self) -> None:
        """One look at every process: record the peaks; past the limit, kill."""
        kernels = psutil.Process().children(recursive=False)
        total, kernel_rss = 0, 0
        for kernel in kernels:
            try:
                kernel_rss += kernel.memory_info().rss
                procs = kernel.children(recursive=True)
            except psutil.Error:
                continue
            for p in procs:
                try:
                    rss = p.memory_info().rss
                except psutil.Error:
                    continue
                self.process_peaks[p.pid] = max(self.process_peaks.get(p.pid, 0), rss)
                total += rss
        total += kernel_rss
        self.peak = max(self.peak, total)
        self.kernel_peaks[self.cell] = max(self.kernel_peaks.get(self.cell, 0), kernel_rss)
        self.total_peaks[self.cell] = max(self.total_peaks.get(self.cell, 0), total)
        if total > self.limit and not self.fired:
            self.fired = True
            for p in psutil.Process().children(recursive=True):
                try:
                    p.kill()
                except psutil.Error:
                    pass

    def run(self) -> None:
        while not self.stop.wait(self.every):
            self.sample()

    def __enter__(self) -> Watchdog:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
