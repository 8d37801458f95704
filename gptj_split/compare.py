"""Notebook 05, part 3: the speedup measured live. A random GPT-J big enough for compute to dominate is timed as the
naive split on one thread, the same on two threads (the machine's own limit), and as a pipeline of one-thread
stage processes pinned to their own cores; benchmarks/pipeline_speedup.py runs the same with more rounds.
"""

from __future__ import annotations

import contextlib
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .place import place_stages
from .plan import Plan, plan_split
from .records import EventClock, RunRecord
from .generate import StageRecorder
from .jobs import make_job
from .ranks import LaunchOptions
from .pipeline import run_pipeline


@contextlib.contextmanager
def pinned(cores: list[int], threads: int):
    """Run the block on these cores with this many torch threads, then give the caller's settings back."""
    before_cores, before_threads = os.sched_getaffinity(0), torch.get_num_threads()
    os.sched_setaffinity(0, set(cores))
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before_threads)
        os.sched_setaffinity(0, before_cores)


def time_generate(model, ids: torch.Tensor, new_tokens: int, mask: torch.Tensor | None = None) -> dict:
    """Greedy `generate` of exactly `new_tokens` on a placed model, timed on the one clock (EventClock: host seconds,
    CUDA events on a GPU): its output (`sequences`, `cache`), the prefill's seconds (to the first logits), the
    decode's (from there to the end: new_tokens - 1 steps), the mean seconds per decode step, and the whole call's
    (notebooks 05, 07, 08)."""
    from transformers import LogitsProcessor, LogitsProcessorList

    clock, marks = EventClock(), []

    class Mark(LogitsProcessor):  # called once per step, right after that step's logits
        def __call__(self, input_ids, scores):
            marks.append((clock.stamp(scores.device), scores.device))
            return scores

    first = ids.device
    start = clock.stamp(first)
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids) if mask is None else mask, do_sample=False,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             pad_token_id=model.config.eos_token_id, return_dict_in_generate=True,
                             logits_processor=LogitsProcessorList([Mark()]))
    last = marks[-1][1]
    end = clock.stamp(last)
    clock.sync()
    begun, logits_at, ended = clock.seconds(start, first), clock.seconds(*marks[0]), clock.seconds(end, last)
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)  # older transformers
    return {"sequences": out.sequences, "cache": cache, "prefill": logits_at - begun, "decode": ended - logits_at,
            "decode_step": (ended - logits_at) / max(1, new_tokens - 1), "total": ended - begun}


def measure_module_seconds(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                           max_new_tokens: int = 4, repeats: int = 1) -> dict[str, list[float]]:
    """Seconds of each module (embedding, every block, head) for one prefill and one decode step, timed inside
    `generate` with hooks (the fastest of `repeats`): the `cost` to balance a pipeline's stages by (notebook 05)."""

    if repeats > 1:
        runs = [measure_module_seconds(model, input_ids, attention_mask, max_new_tokens) for _ in range(repeats)]
        return {phase: [min(r[phase][i] for r in runs) for i in range(len(runs[0][phase]))] for phase in runs[0]}
    n = model.config.n_layer
    device = {name: next(m.parameters()).device for name, m in model.named_modules() if list(m.parameters())}
    parts = [["transformer.wte"], *([f"transformer.h.{b}"] for b in range(n)), ["transformer.ln_f", "lm_head"]]
    stages = [(names, device[names[-1]]) for names in parts]  # each part a "stage": the one clock, the one hook style
    with StageRecorder(model, stages=stages, sizes=False) as recorder, torch.inference_mode():
        model.generate(input_ids, attention_mask=attention_mask, do_sample=False, max_new_tokens=max_new_tokens,
                       min_new_tokens=max_new_tokens, pad_token_id=model.config.eos_token_id)
    seconds = {"prefill": [0.0] * len(parts), "decode": [0.0] * len(parts)}
    for event in recorder.events():
        seconds[event.phase][event.stage] += event.end - event.start
    seconds["decode"] = [s / max(1, max_new_tokens - 1) for s in seconds["decode"]]
    return seconds


def balanced_plans(model, prefill_ids: torch.Tensor, decode_ids: torch.Tensor, prefill_mb: int, decode_mb: int,
                   cores: list[int], n: int = 2) -> dict[str, Plan]:
    """One plan per phase with equal measured seconds per stage (one thread), not equal bytes: the head over
    GPT-J's vocabulary costs as much as several blocks (notebook 05)."""
    plans = {}
    with pinned(cores[:1], 1):
        for phase, ids, mb, steps in (("prefill", prefill_ids, prefill_mb, 2), ("decode", decode_ids, decode_mb, 6)):
            rows = ids[: len(ids) // mb]
            cost = measure_module_seconds(model, rows, torch.ones_like(rows), max_new_tokens=steps, repeats=2)[phase]
            plans[phase] = plan_split(model.config, ",".join(["cpu"] * n), dtype=torch.float32, cost=cost)
    return plans


@dataclass
class SpeedupRun:
    """Seconds per phase for the naive split on 1 and 2 threads and the pipeline, medians of interleaved rounds,
    with the pipeline's last records (notebook 05)."""

    seconds: dict[str, list[float]] = field(default_factory=dict)  # "naive1 prefill", "pipeline decode", ...
    records: dict[str, RunRecord] = field(default_factory=dict)
    micro_batches: dict[str, int] = field(default_factory=dict)
    same_tokens: bool = False

    def median(self, key: str) -> float:
        return statistics.median(self.seconds[key])

    def ratios(self, phase: str) -> dict[str, float]:
        """The two-core scaling (naive, 1 vs 2 threads) and the pipeline's speedup over the naive split."""
        naive1 = self.median(f"naive1 {phase}")
        return {"scaling": naive1 / self.median(f"naive2 {phase}"),
                "speedup": naive1 / self.median(f"pipeline {phase}")}


def measure_pipeline_speedup(model_path: str | Path, prefill_ids: torch.Tensor, decode_ids: torch.Tensor,
                             prefill_mb: int = 8, decode_mb: int = 2, new_tokens: int = 16, rounds: int = 1,
                             plans: dict[str, Plan] | None = None) -> SpeedupRun:
    """The naive split on 1 and 2 threads, then a 2-stage pipeline (one thread and one core per stage), round after
    round; the pipeline runs each job twice and keeps the second, so start-up is not counted (notebook 05)."""
    cores = sorted(os.sched_getaffinity(0))[:2]
    if len(cores) < 2:
        raise RuntimeError("the speedup needs two CPU cores; this process may use only one")
    naive = place_stages(model_path, plan_split(model_path, "cpu,cpu", dtype=torch.float32), dtype=torch.float32)
    plans = plans or balanced_plans(naive, prefill_ids, decode_ids, prefill_mb, decode_mb, cores)
    jobs = {"prefill": make_job(prefill_ids, torch.ones_like(prefill_ids), prefill_mb, max_new_tokens=1, greedy=True),
            "decode": make_job(decode_ids, torch.ones_like(decode_ids), decode_mb, max_new_tokens=new_tokens,
                               greedy=True)}
    run = SpeedupRun(micro_batches={"prefill": prefill_mb, "decode": decode_mb})
    for threads in (2, 1):  # warm-up, also of the thread pools
        with pinned(cores[:threads], threads):
            time_generate(naive, prefill_ids[:2], 2)
    for _ in range(rounds):
        for threads in (1, 2):
            with pinned(cores[:threads], threads):
                prefill = time_generate(naive, prefill_ids, 1)["prefill"]
                timing = time_generate(naive, decode_ids, new_tokens)
                decode, naive_out = timing["decode"], timing["sequences"]
            run.seconds.setdefault(f"naive{threads} prefill", []).append(prefill)
            run.seconds.setdefault(f"naive{threads} decode", []).append(decode)
        for phase in ("prefill", "decode"):
            record = run_pipeline(model_path, [jobs[phase], jobs[phase]], plan=plans[phase],
                                  options=LaunchOptions(threads=1, affinity=[[c] for c in cores]))[1]
            run.records[phase] = record
            run.seconds.setdefault(f"pipeline {phase}", []).append(
                record.time_to_first_token if phase == "prefill" else record.total_seconds - record.time_to_first_token)
    run.same_tokens = torch.equal(run.records["decode"].output_ids, naive_out)
    return run


def prefill_bubble(record: RunRecord) -> dict[str, float]:
    """The prefill's measured bubble beside GPipe's (p-1)/(m+p-1), with p and m read from the run; the time per slot
    that is not a stage's mean compute ("the rest": sends, receives, Python, and waiting for a slower stage), and
    each stage's own compute per slot, whose spread is that waiting (notebook 05)."""
    p, m = len(record.memory), int(record.settings.get("micro_batches", 1))
    wall = record.time_to_first_token
    events = [e for e in record.events if e.step == 0 and e.kind == "compute"]
    compute = [e.end - e.start for e in events]
    busy = sum(compute)
    per_slot = statistics.mean(compute)
    slot = wall / (m + p - 1)  # the formula's time slot, as measured
    stages = [statistics.mean([e.end - e.start for e in events if e.stage == s] or [0.0]) * 1e3 for s in range(p)]
    return {"p": p, "m": m, "measured": 1 - busy / (p * wall), "formula": (p - 1) / (m + p - 1),
            "compute_ms": per_slot * 1e3, "overhead_ms": (slot - per_slot) * 1e3, "stage_compute_ms": stages}
