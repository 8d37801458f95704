"""Notebook 07, part 3: the three ways side by side. One model with GPT-J's width, measured in one run as the naive
split (one process, the devices in turn), the pipeline (notebook 05) and tensor parallelism: memory per device,
one-prompt latency, many-prompt throughput and communication per token. The benchmark prints the same figures.
"""

from __future__ import annotations

import os

import torch

from .devices import format_size, parse_devices
from .hub import load_config
from .plan import plan_split
from .records import compare_outputs
from .place import measure_memory, place_stages
from .jobs import make_job
from .ranks import LaunchOptions
from .pipeline import run_pipeline
from .compare import pinned, time_generate
from .tensor_parallel import TP_VARIANT, run_tensor_parallel, variant_job

COMM_KINDS = ("all-reduce", "all-gather", "broadcast", "send")


def decode_seconds(model, ids: torch.Tensor, new_tokens: int) -> tuple[float, torch.Tensor]:
    """Greedy `generate` on a placed model: mean seconds per token after the first, and the output (notebook 07)."""
    timing = time_generate(model, ids, new_tokens)
    return timing["decode_step"], timing["sequences"]


def decode_seconds_of(record) -> float:
    """Mean seconds per token after the first, from a pipeline or tensor-parallel record (notebook 07)."""
    steps = max(e.step for e in record.events)
    return (record.total_seconds - record.time_to_first_token) / max(1, steps)


def comm_per_token(record, rank: int = 0) -> dict[str, tuple[float, float]]:
    """Per decode token on one rank: (count, seconds) of each kind of communication event (notebook 07)."""
    steps = max(e.step for e in record.events)
    out = {}
    for kind in COMM_KINDS:
        events = [e for e in record.events if e.kind == kind and e.stage == rank and e.step >= 1]
        if events:
            out[kind] = (len(events) / max(1, steps), sum(e.end - e.start for e in events) / max(1, steps))
    return out


def compare_splits(path, devices: str = "cpu,cpu", new_tokens: int = 8, batch: int = 4, prompt_tokens: int = 16,
                   cores: list[int] | None = None, variants: tuple[str, ...] = (TP_VARIANT,)) -> dict:
    """Measure the naive split (1 and 2 threads), the pipeline and tensor parallelism on one model in one run: one
    prompt's decode seconds per token, a batch's tokens per second, memory per device and communication (notebook
    07). Each process runs one thread, pinned to its own core when `cores` names them."""
    config = load_config(str(path))
    parsed = parse_devices(devices)
    n = len(parsed)
    gen = torch.Generator().manual_seed(0)
    one = torch.randint(1, min(config.vocab_size - 1, 1000), (1, prompt_tokens), generator=gen)
    many = torch.randint(1, min(config.vocab_size - 1, 1000), (batch, prompt_tokens), generator=gen)
    affinity = [[c] for c in cores] if cores else None
    plan = plan_split(config, parsed, dtype=torch.bfloat16, prompt_tokens=prompt_tokens, max_new_tokens=new_tokens,
                      batch_size=batch)
    naive = place_stages(path, plan, dtype=torch.bfloat16)
    result = {"naive": {"memory": [r.param_bytes for r in measure_memory(naive)]}}
    for threads in (1, 2):
        with pinned(cores[:threads] if cores else sorted(os.sched_getaffinity(0)), threads):
            decode_seconds(naive, one, 2)  # warm-up
            result[f"naive{threads}"] = dict(zip(("decode", "tokens"), decode_seconds(naive, one, new_tokens)))
    with pinned(cores[:1] if cores else sorted(os.sched_getaffinity(0)), 1):
        result["naive"]["throughput"] = batch * new_tokens / time_generate(naive, many, new_tokens)["total"]
    with torch.inference_mode():  # the naive split's logits for its own new tokens, read once, teacher-forced
        tokens = result["naive1"]["tokens"]
        result["naive1"]["logits"] = naive(input_ids=tokens).logits[0, one.shape[1] - 1:-1].float().cpu()
    del naive
    jobs = [make_job(one, torch.ones_like(one), 1, 2, greedy=True), make_job(one, torch.ones_like(one), 1, new_tokens,
                                                                              greedy=True),
            make_job(many, torch.ones_like(many), min(n, batch), new_tokens, greedy=True)]
    one_core = LaunchOptions(threads=1, affinity=affinity)
    pipe = run_pipeline(path, jobs, plan=plan, dtype=torch.bfloat16, options=one_core)
    result["pipeline"] = {"decode": decode_seconds_of(pipe[1]), "record": pipe[1], "tokens": pipe[1].output_ids,
                          "throughput": batch * new_tokens / pipe[2].total_seconds,
                          "memory": [r.param_bytes + r.kv_cache_bytes for r in pipe[2].memory]}
    tp_jobs = [variant_job(make_job(job.input_ids, job.attention_mask, 1, job.max_new_tokens, greedy=True), v,
                           keep_logits=job is jobs[1]) for v in variants for job in jobs]
    records = run_tensor_parallel(path, tp_jobs, devices, dtype=torch.bfloat16, options=one_core)
    for i, variant in enumerate(variants):
        _, rec, rec_many = records[3 * i:3 * i + 3]
        result[f"tp-{variant}"] = {"decode": decode_seconds_of(rec), "record": rec, "tokens": rec.output_ids,
                                   "throughput": batch * new_tokens / rec_many.total_seconds,
                                   "memory": [r.param_bytes + r.kv_cache_bytes for r in rec_many.memory],
                                   "peak_rss": [r.peak_rss_bytes for r in rec.memory], "comm": comm_per_token(rec),
                                   "agreement": compare_outputs(result["naive1"]["tokens"],
                                                                result["naive1"]["logits"][None], rec.output_ids,
                                                                rec.logits[:1], torch.bfloat16)}
    return result


def format_comparison(result: dict, batch: int = 4) -> str:
    """The side-by-side table of `compare_splits` (notebook 07)."""
    lines = [f"{'':22} {'memory/device':>14} {'one prompt':>12} {f'{batch} prompts':>12}  communication per token",
             f"{'':22} {'(largest)':>14} {'s/token':>12} {'tokens/s':>12}"]
    naive = result["naive"]
    lines.append(f"{'naive split, 1 thread':22} {format_size(max(naive['memory'])):>14} "
                 f"{result['naive1']['decode']:12.3f} {naive['throughput']:12.1f}  one hidden state copied in-process")
    pipe = result["pipeline"]
    sends = comm_per_token(pipe["record"], 0).get("send", (0, 0))
    lines.append(f"{'pipeline':22} {format_size(max(pipe['memory'])):>14} {pipe['decode']:12.3f} "
                 f"{pipe['throughput']:12.1f}  {sends[0]:.0f} send(s) from stage 0, {sends[1] * 1e3:.1f} ms")
    for key in [k for k in result if k.startswith("tp-")]:
        tp = result[key]
        comm = ", ".join(f"{c:.0f} {kind} {s * 1e3:.1f} ms" for kind, (c, s) in tp["comm"].items())
        lines.append(f"{'tensor parallel (' + key[3:] + ')':22} {format_size(max(tp['memory'])):>14} "
                     f"{tp['decode']:12.3f} {tp['throughput']:12.1f}  {comm}")
    return "\n".join(lines)
