"""Notebook 09, part 1: the limit one prompt's decode cannot beat. At batch 1 a decode step reads every weight once
(and the KV cache so far), so no step is faster than those bytes over the device's memory bandwidth; a step's time
splits into what its kernels took and the rest (Python, launching kernels one by one, allocating).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time

import torch

from .devices import format_size
from .place import stored_bytes


def read_bandwidth(device: str = "cpu", nbytes: int = 2**28, reps: int = 5) -> float:
    """Bytes per second this device reads while copying one large tensor (half of what the copy moves: it reads and
    writes each byte once), the best of `reps` after a warm-up, on torch's current threads (notebook 09)."""
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(reps + 1):
        if src.is_cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        dst.copy_(src)
        if src.is_cuda:
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return nbytes / best


def bytes_per_token(model, context_tokens: int) -> dict[str, int]:
    """What one batch-1 decode step reads: every parameter but the embedding table (it reads one row of it; buffers
    like the rotary table, one row each, are left out), and the KV cache of `context_tokens` positions in the
    model's dtype (notebook 09)."""
    params = sum(stored_bytes(p) for p in model.parameters())  # a quantized weight counts its packed bytes
    wte = model.transformer.wte.weight
    embedding = wte.numel() * wte.element_size()
    config = model.config
    kv = 2 * config.n_layer * config.n_embd * wte.element_size() * context_tokens
    return {"weights": params - embedding + wte.shape[1] * wte.element_size(), "kv_cache": kv}


def decode_limit(model, context_tokens: int, bandwidth: float) -> dict:
    """The fastest a batch-1 decode step can be here: bytes per token over the read bandwidth (notebook 09)."""
    parts = bytes_per_token(model, context_tokens)
    total = sum(parts.values())
    return {**parts, "bytes": total, "bandwidth": bandwidth, "seconds": total / bandwidth,
            "tokens_per_second": bandwidth / total}


def format_roofline(limit: dict, measured_tokens_per_second: float, label: str = "eager") -> str:
    """The limit beside a measured decode, and what fraction of it the measurement reached (notebook 09)."""
    fraction = measured_tokens_per_second / limit["tokens_per_second"]
    return (f"bytes read per token: weights {format_size(limit['weights'])} + KV cache "
            f"{format_size(limit['kv_cache'])} = {format_size(limit['bytes'])}\n"
            f"read bandwidth measured here: {limit['bandwidth'] / 1e9:.1f} GB/s\n"
            f"limit: {limit['tokens_per_second']:.1f} tokens/s ({limit['seconds'] * 1000:.2f} ms per token)\n"
            f"{label} decode measured: {measured_tokens_per_second:.1f} tokens/s "
            f"({1000 / measured_tokens_per_second:.2f} ms per token) = {fraction:.2f} of the limit")


@contextlib.contextmanager
def quiet_native_stderr():
    """The profiler's C++ side writes timestamped start and stop lines straight to file descriptor 2 (a notebook
    shows them); inside the block that descriptor goes to /dev/null, Python's own errors still raise."""
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def profile_run(run) -> tuple[float, float, int, str]:
    """Wall seconds of `run()` under torch.profiler, the seconds inside its operators (the self time of every aten op:
    CPU time on the CPU, CUDA time on a GPU) and how many operators ran."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    with quiet_native_stderr(), profile(activities=[ProfilerActivity.CPU]
                                        + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        start = time.perf_counter()
        run()
        wall = time.perf_counter() - start
    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    kernel_us = sum((e.self_device_time_total if cuda else e.self_cpu_time_total) for e in events)
    return wall, kernel_us / 1e6, sum(e.count for e in events), "CUDA" if cuda else "CPU"


def profile_decode(generate, steps: int) -> dict:
    """Where a decode step's time goes: `generate(n)` decodes n tokens after its prompt; run for 1 and 1 + steps
    tokens, the difference is `steps` decode steps alone: per step the wall time (best of 3, without the profiler,
    which slows every operator), the time inside operators and their number (profiled); the rest is Python,
    launching and allocating (notebook 09)."""
    def seconds(n: int) -> float:
        start = time.perf_counter()
        generate(n)
        return time.perf_counter() - start

    generate(1 + steps)  # warm-up
    wall = (min(seconds(1 + steps) for _ in range(3)) - min(seconds(1) for _ in range(3))) / steps  # unprofiled
    _, kernel1, ops1, where = profile_run(lambda: generate(1))
    _, kernel, ops, _ = profile_run(lambda: generate(1 + steps))
    kernel = (kernel - kernel1) / steps
    return {"wall_ms": 1000 * wall, "kernel_ms": 1000 * kernel, "rest_ms": 1000 * max(0.0, wall - kernel),
            "ops": (ops - ops1) / steps, "where": where}
