"""Pipeline speedup, the headline figure of notebook 05: two stage processes on two CPU cores vs the naive split.

Each stage process runs one thread pinned to its own core (`os.sched_setaffinity`), emulating two devices of
equal speed; the naive split runs in this process with one thread. The cores of one machine share caches and
memory bandwidth, so the machine's own limit is measured in the same run: the naive split with two intra-op
threads on both cores vs one thread. Repetitions are interleaved (naive 1 thread, naive 2 threads, pipeline)
and the median of each is reported.

    PYTHONPATH=. .venv/bin/python benchmarks/pipeline_speedup.py            # about 3 to 5 minutes on 2 cores
    PYTHONPATH=. .venv/bin/python benchmarks/pipeline_speedup.py --quick    # a smaller check that it runs
"""
import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

import gptj_helpers as gh
from gptj_split.compare import balanced_plans


def breakdown(record, start: float, end: float) -> list[dict]:
    """Per stage, within [start, end]: compute, send, recv (waiting for a neighbour) and the rest (Python, idle)."""
    n = len(record.memory)
    rows = [{"compute": 0.0, "send": 0.0, "recv": 0.0} for _ in range(n)]
    for e in record.events:
        overlap = min(e.end, end) - max(e.start, start)
        if overlap > 0:
            rows[e.stage][e.kind] += overlap
    for row in rows:
        row["other"] = (end - start) - row["compute"] - row["send"] - row["recv"]
    return rows


def print_breakdown(title: str, rows: list[dict], wall: float) -> None:
    print(f"{title} per stage, of {wall:.3f} s wall:")
    for s, row in enumerate(rows):
        print(f"  stage {s}: compute {row['compute']:.3f} s ({row['compute'] / wall:.0%}) | "
              f"send {row['send']:.3f} s ({row['send'] / wall:.0%}) | "
              f"recv wait {row['recv']:.3f} s ({row['recv'] / wall:.0%}) | "
              f"other/idle {row['other']:.3f} s ({row['other'] / wall:.0%})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=50400)
    parser.add_argument("--prefill-prompts", type=int, default=16)
    parser.add_argument("--prefill-tokens", type=int, default=64)
    parser.add_argument("--prefill-micro-batches", type=int, default=8)
    parser.add_argument("--decode-prompts", type=int, default=64)  # decode needs a big batch to be compute-bound
    parser.add_argument("--decode-prompt-tokens", type=int, default=16)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--decode-micro-batches", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3, help="interleaved rounds; medians are reported")
    parser.add_argument("--quick", action="store_true", help="small sizes, one round: checks that it runs")
    args = parser.parse_args()
    if args.quick:
        args.layers, args.width, args.vocab, args.reps = 4, 256, 8192, 1
        args.prefill_prompts, args.prefill_tokens, args.decode_prompts, args.decode_tokens = 8, 32, 8, 8
    cores = sorted(os.sched_getaffinity(0))[:2]
    if len(cores) < 2:
        print("this benchmark needs two CPU cores")
        return 1
    p = 2  # stages
    gen = torch.Generator().manual_seed(0)
    prefill_ids = torch.randint(1, 1000, (args.prefill_prompts, args.prefill_tokens), generator=gen)
    decode_ids = torch.randint(1, 1000, (args.decode_prompts, args.decode_prompt_tokens), generator=gen)
    with tempfile.TemporaryDirectory(prefix="pipeline-bench-") as tmp:
        path = gh.mini_gptj_folder(Path(tmp) / "mini", args.layers, args.width, args.vocab)
        config = gh.load_config(str(path))
        print(f"model: {args.layers} blocks x {args.width} wide, vocabulary {args.vocab}, float32, "
              f"{gh.module_sizes(config, torch.float32)['params']:,} parameters; cores {cores}; "
              f"torch {torch.__version__}")
        # measured seconds per module, one thread, for one micro-batch of each phase: the planner balances these
        model = gh.load_model(str(path))
        plans = balanced_plans(model, prefill_ids, decode_ids, args.prefill_micro_batches,
                                  args.decode_micro_batches, cores)
        del model
        for phase, plan in plans.items():
            parts = [f"stage {s}: " + (f"blocks {st.blocks[0]}-{st.blocks[1] - 1}" if st.blocks[1] > st.blocks[0]
                                       else "no blocks") + (" + head" if st.head else "")
                     + f" ({st.cost * 1e3:.1f} ms)" for s, st in enumerate(plan.devices)]
            print(f"balanced plan for {phase}: " + ", ".join(parts))
        # rounds interleave naive 1 thread, naive 2 threads and the pipeline (each job run twice, the second kept)
        run = gh.measure_pipeline_speedup(path, prefill_ids, decode_ids, args.prefill_micro_batches,
                                          args.decode_micro_batches, args.decode_tokens, args.reps, plans=plans)
        for r in range(args.reps):
            print(f"round {r + 1}/{args.reps}: " + ", ".join(f"{k} {v[r]:.3f} s" for k, v in run.seconds.items()))
        print(f"pipeline tokens equal the naive split's: {run.same_tokens}")
        med = {k.replace("pipeline", "pipe"): run.median(k) for k in run.seconds}
        records = run.records

    print()
    for phase in ("prefill", "decode"):
        print(f"{phase}: naive 1 thread {med[f'naive1 {phase}']:.3f} s | naive 2 threads {med[f'naive2 {phase}']:.3f}"
              f" s | pipeline 2 stages x 1 thread {med[f'pipe {phase}']:.3f} s (medians of {args.reps})")
    scaling = {ph: med[f"naive1 {ph}"] / med[f"naive2 {ph}"] for ph in ("prefill", "decode")}
    speedup = {ph: med[f"naive1 {ph}"] / med[f"pipe {ph}"] for ph in ("prefill", "decode")}
    print(f"two-core scaling (prefill): {scaling['prefill']:.2f}x")
    print(f"two-core scaling (decode): {scaling['decode']:.2f}x")
    print(f"prefill speedup: {speedup['prefill']:.2f}x  ({args.prefill_prompts} prompts x {args.prefill_tokens} "
          f"tokens in {args.prefill_micro_batches} micro-batches; {speedup['prefill'] / scaling['prefill']:.2f} of "
          f"the two-core scaling, goal >= 0.80)")
    print(f"decode speedup: {speedup['decode']:.2f}x  ({args.decode_prompts} prompts x {args.decode_tokens} new "
          f"tokens in {args.decode_micro_batches} micro-batches; {speedup['decode'] / scaling['decode']:.2f} of the "
          f"two-core scaling, goal >= 0.90 and >= 1.0x)")

    m = args.prefill_micro_batches
    rec = records["prefill"]
    wall = rec.time_to_first_token
    rows = breakdown(rec, 0.0, wall)
    busy = [row["compute"] for row in rows]
    bubble = gh.prefill_bubble(rec)
    print(f"prefill bubble: measured {bubble['measured']:.3f} | GPipe formula (p-1)/(m+p-1) = {bubble['formula']:.3f} "
          f"(p={p}, m={m}) | ratio {bubble['measured'] / bubble['formula']:.2f} | per slot: compute "
          f"{bubble['compute_ms']:.1f} ms, the rest {bubble['overhead_ms']:.1f} ms")
    print(f"prefill stage imbalance (slowest / mean compute): {max(busy) / statistics.mean(busy):.2f}")
    expected = [st.cost * m for st in plans["prefill"].devices]
    print("prefill compute vs the same modules alone on one core: "
          + ", ".join(f"stage {s} x{b / e:.2f}" for s, (b, e) in enumerate(zip(busy, expected))))
    print_breakdown("prefill", rows, wall)
    rec = records["decode"]
    start, end = rec.time_to_first_token, rec.total_seconds
    rows = breakdown(rec, start, end)
    busy = [row["compute"] for row in rows]
    md = args.decode_micro_batches
    print(f"decode bubble: measured {1 - sum(busy) / (p * (end - start)):.3f} | with {md} micro-batches in "
          f"{p} stages each token's round trip waits on both stages: the ideal overlap needs m >= p")
    expected = [st.cost * md * (args.decode_tokens - 1) for st in plans["decode"].devices]
    print("decode compute vs the same modules alone on one core: "
          + ", ".join(f"stage {s} x{b / e:.2f}" for s, (b, e) in enumerate(zip(busy, expected))))
    print_breakdown("decode", rows, end - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
