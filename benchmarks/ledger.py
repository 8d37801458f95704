"""What the rehearsal (`benchmarks/rehearse.py`) counts while a notebook runs: each device's memory apart from the
host's.

On the CPU every "device" is host memory, so one RSS figure cannot say whether a GPU of the plan or the host would
run out. Two records tell them apart:

- a ledger inside the kernel (`LEDGER_CELL`, run first): after every cell it writes the bytes of each model the
  kernel holds, by the device of the plan it was placed for (a model loaded outside a plan counts as the host's);
- a watchdog outside (`Watchdog`): twice a second, the RSS of the kernel and of each process the kernel started
  (pipeline stages, tensor-parallel ranks), the peak of each cell on its own, and a kill past the machine's limit.

The host's share of a cell is then the kernel's peak during it less the bytes placed on the plan's devices, before
or after it (the larger); a stage or rank process holds one device's share.
"""
from __future__ import annotations

import json
import threading
from pathlib import Path

import psutil

LEDGER_VARIABLE = "GPTJ_REHEARSAL_LEDGER"  # the file the kernel's ledger appends to, one JSON line per cell

LEDGER_CELL = '''\
# The rehearsal's ledger (benchmarks/ledger.py), not part of the notebook: after each cell, the bytes of every model
# this kernel holds, by the device of its plan.
def _rehearsal_ledger(result=None):
    import gc, json, os
    import psutil, torch
    from gptj_split.place import plan_of, tensor_bytes, tensor_stage

    def key(t):
        try:
            return t.untyped_storage().data_ptr()
        except Exception:  # a tensor subclass without one storage (a quantized weight)
            return id(t)

    seen, devices, unplaced = set(), {}, 0
    modules = [m for m in gc.get_objects() if isinstance(m, torch.nn.Module) and type(m).__name__ != "OptimizedModule"]
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
            row = devices.setdefault(str(s), {"device": plan.devices[s].device, "bytes": 0,
                                              "budget": plan.devices[s].budget_bytes})
            row["bytes"] += tensor_bytes(t)
    with open(os.environ["GPTJ_REHEARSAL_LEDGER"], "a") as f:
        f.write(json.dumps({"devices": devices, "unplaced": unplaced,
                            "rss": psutil.Process().memory_info().rss}) + "\\n")


get_ipython().events.register("post_run_cell", _rehearsal_ledger)
'''


def read_ledger(path: Path) -> list[dict]:
    """The ledger's lines so far."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def placed_bytes(entry: dict | None) -> int:
    """Bytes a ledger line counts on the plan's devices."""
    return sum(row["bytes"] for row in entry["devices"].values()) if entry else 0


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
