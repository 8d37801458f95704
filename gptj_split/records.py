"""Shared records: what one generation measured, and the one clock that times it. Every way of generating (the naive
split of notebook 03, the pipeline of notebook 05, tensor parallelism of notebook 07) returns `(texts, RunRecord)`,
with memory as `MemoryRow`s and times from an `EventClock`, so the plots of notebook 04 draw any of them.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # annotations only: records stay importable before the planner
    from .plan import Plan


@dataclass
class TimingEvent:
    """One busy interval of one stage: seconds since the run started (notebooks 03 to 05)."""

    stage: int
    phase: str  # "prefill" or "decode"
    step: int  # 0 for the prefill, then one per generated token
    start: float
    end: float
    kind: str = "compute"  # the pipeline also records "send" and "recv"
    micro_batch: int = 0


@dataclass
class MemoryRow:
    """Bytes one stage holds, the same fields on every path; None where a path cannot measure it (notebooks 02 to
    05)."""

    stage: int
    device: str
    param_bytes: int = 0  # parameters and buffers placed on this stage
    kv_cache_bytes: int = 0
    activation_bytes: int = 0  # an estimate from tensor sizes during the prefill (naive split only)
    budget_bytes: int | None = None
    cuda_peak_bytes: int | None = None  # torch.cuda.max_memory_allocated of the device during the run
    cuda_allocated_bytes: int | None = None  # torch.cuda.memory_allocated of the device at the end
    peak_rss_bytes: int | None = None  # a stage process's peak RSS over its baseline after imports (pipeline)
    load_seconds: float | None = None  # time to load this stage's weights (pipeline)

    @property
    def total_bytes(self) -> int:
        """Parameters + KV cache + activations."""
        return self.param_bytes + self.kv_cache_bytes + self.activation_bytes


@dataclass
class RunRecord:
    """What one generation measured; the naive split and the pipeline both return one (notebooks 03 to 05)."""

    texts: list[str]
    prompts: list[str]
    mode: str  # "single", "naive" or "pipeline"
    new_tokens: int  # tokens generated, summed over the batch
    time_to_first_token: float
    tokens_per_second: float  # after the first token, summed over the batch
    total_seconds: float
    events: list[TimingEvent] = dataclasses.field(default_factory=list)
    memory: list[MemoryRow] = dataclasses.field(default_factory=list)  # one row per stage
    plan: Plan | None = None
    output_ids: torch.Tensor | None = None  # prompt + new token ids, left-padded, like generate's output
    settings: dict = dataclasses.field(default_factory=dict)  # what was asked: max_new_tokens, sampling, batch

    def busy_seconds(self) -> list[float]:
        """Compute time of each stage."""
        n = max((e.stage for e in self.events), default=-1) + 1
        busy = [0.0] * n
        for e in self.events:
            if e.kind == "compute":
                busy[e.stage] += e.end - e.start
        return busy


class EventClock:
    """The one timing recorder of every way of generating (notebooks 03 to 07). A stamp is host seconds since `t0`
    (time.time(), so the processes of one run share the axis) on the CPU, and a recorded CUDA event on a GPU, read
    after one synchronize at the end: times are the device's own (a collective's real time, not its launch), and
    stamping never stalls the device. `step` is the generation step that `note` files an interval under."""

    def __init__(self, t0: float | None = None):
        self.t0 = time.time() if t0 is None else t0
        self.step = 0
        self.origins: dict[torch.device, tuple[object, float]] = {}  # CUDA device -> (event, host seconds at it)
        self.marks: list[tuple] = []  # (stage, phase, step, start, end, kind, micro_batch, device)

    def restart(self, t0: float) -> None:
        """Start again from `t0`, with nothing noted (a rank's next job)."""
        self.t0, self.step, self.marks = t0, 0, []
        self.origins.clear()

    def now(self) -> float:
        """Host seconds since t0."""
        return time.time() - self.t0

    def stamp(self, device: torch.device | None = None):
        """A point in time on `device`: host seconds, or a CUDA event recorded on the device's current stream."""
        if device is None or device.type != "cuda":
            return self.now()
        if device not in self.origins:  # the device's zero: an event recorded when it is idle, at a known host time
            torch.cuda.synchronize(device)
            origin = torch.cuda.Event(enable_timing=True)
            origin.record(torch.cuda.current_stream(device))
            self.origins[device] = (origin, self.now())
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(device))
        return event

    def seconds(self, stamp, device: torch.device | None = None) -> float:
        """A stamp as seconds since t0 (call after `sync`)."""
        if isinstance(stamp, float):
            return stamp
        origin, at = self.origins[device]
        return at + origin.elapsed_time(stamp) / 1000

    def note(self, stage: int, start, device: torch.device | None = None, kind: str = "compute",
             micro_batch: int = 0, step: int | None = None) -> None:
        """File the interval from `start` (a stamp) to now as a TimingEvent of `stage`."""
        step = self.step if step is None else step
        self.marks.append((stage, "prefill" if step == 0 else "decode", step, start, self.stamp(device), kind,
                           micro_batch, device))

    def sync(self) -> None:
        """Wait for every device stamped on, so its events can be read."""
        for device in self.origins:
            torch.cuda.synchronize(device)

    def events(self) -> list[TimingEvent]:
        """Every interval noted, in seconds since t0, in the order they were noted."""
        self.sync()
        return [TimingEvent(stage, phase, step, self.seconds(a, d), self.seconds(b, d), kind, mb)
                for stage, phase, step, a, b, kind, mb, d in self.marks]


def timed(fn, device: torch.device | str | None = None):
    """`fn()`'s result and its seconds on the one clock (EventClock): host seconds on the CPU; on a GPU, CUDA events
    recorded on `device` around it, read after one synchronize, so work still queued there is counted (notebooks 04
    to 09)."""
    device = torch.device(device) if device is not None else None
    clock = EventClock()
    start = clock.stamp(device)
    result = fn()
    end = clock.stamp(device)
    clock.sync()
    return result, clock.seconds(end, device) - clock.seconds(start, device)


def compare_outputs(ids: torch.Tensor, logits: torch.Tensor | None, other_ids: torch.Tensor,
                    other_logits: torch.Tensor | None, dtype: torch.dtype | None = None) -> dict:
    """The one comparison of two greedy runs of one model (notebooks 07, 08, 09). `ids`: prompt + new tokens (or new
    tokens alone where `logits` is None), batch first; `logits`: one per new token. Returns the first new token where
    they part (`first_divergence`, None: equal throughout), how many new tokens they share before it
    (`same_tokens`), and the largest logit difference over the steps up to it, where both had seen the same tokens;
    with `dtype`, that difference against 10 roundings of the largest logit in it (`tolerance`, `agree`): within
    it, parting is a near tie that another order of partial sums flips, while a wrong computation moves logits by
    about the largest."""
    start = ids.shape[1] - logits.shape[1] if logits is not None else 0
    a, b = ids[:, start:], other_ids[:, start:]
    steps = min(a.shape[1], b.shape[1])
    differ = (a[:, :steps] != b[:, :steps]).any(dim=0).nonzero()
    first = int(differ[0, 0]) if len(differ) else None
    out = {"first_divergence": first, "same_tokens": steps if first is None else first, "steps": steps}
    if logits is None or other_logits is None:
        return out
    upto = steps if first is None else first + 1  # the step that picked differently still saw the same tokens
    out["largest_logit_difference"] = (logits[:, :upto].float() - other_logits[:, :upto].float()).abs().max().item()
    if dtype is not None:
        out["tolerance"] = 10 * torch.finfo(dtype).eps * logits.float().abs().max().item()
        out["agree"] = out["largest_logit_difference"] <= out["tolerance"]
    return out
