"""Shared records: what one generation measured. Every way of generating (the naive split of notebook 03, the
pipeline of notebook 05) returns `(texts, RunRecord)`, with memory as `MemoryRow`s, so the plots of notebook 04
draw any of them.
"""

from __future__ import annotations

import dataclasses
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
