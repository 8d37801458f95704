"""Tensor parallelism for one prompt, the headline figure of notebook 07: 2 ranks (one core, one thread each) vs the
naive split on one thread and on two threads (the machine's own two-core limit), and the pipeline beside them.

By default the model is 4 GPT-J-width blocks (4096 wide, 16 heads of 256, rotary 64) with GPT-J's vocabulary and
head, in bfloat16, random weights: compute dominates a token as it does at full size. Rounds are interleaved
(naive 1 thread, naive 2 threads, pipeline, tensor parallel) and medians are reported.

    PYTHONPATH=. .venv/bin/python benchmarks/tensor_parallel.py             # about 5 to 8 minutes on 2 cores
    PYTHONPATH=. .venv/bin/python benchmarks/tensor_parallel.py --small     # also the 8 x 512 model (latency-bound)
    PYTHONPATH=. flock /tmp/fullsize.lock .venv/bin/python benchmarks/tensor_parallel.py --full-size  # GPT-J-6B
    PYTHONPATH=. .venv/bin/python benchmarks/tensor_parallel.py --quick     # a small check that it runs
"""
import argparse
import gc
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

import gptj_helpers as gh
from gptj_split.devices import peak_rss, reset_peak_rss
from gptj_split.random_models import bench_config, write_bench_model
from gptj_split.tp_compare import comm_per_token, compare_splits, decode_seconds, decode_seconds_of, pinned

KEYS = ("naive1", "naive2", "pipeline", "tp-block", "tp-torch")


def measure(path: Path, label: str, args, cores: list[int], goal: bool) -> None:
    """Interleaved rounds on one model, then the medians, the ratios and (with `goal`) the verdict."""
    config = gh.load_config(str(path))
    print(f"model: {label}: {config.n_layer} blocks x {config.n_embd} wide, {config.n_head} heads, vocabulary "
          f"{config.vocab_size}, bfloat16, {gh.module_sizes(config, torch.bfloat16)['params']:,} parameters; "
          f"one prompt of {args.prompt_tokens} tokens, {args.tokens} new; cores {cores}; torch {torch.__version__}",
          flush=True)
    times = {k: [] for k in KEYS}
    comm = {v: [] for v in ("block", "torch")}
    equal = True
    for r in range(args.reps):
        result = compare_splits(path, "cpu,cpu", new_tokens=args.tokens, prompt_tokens=args.prompt_tokens,
                                cores=cores, variants=("block", "torch"))
        for k in KEYS:
            times[k].append(result[k]["decode"])
        for v in comm:
            comm[v].append(result[f"tp-{v}"]["comm"].get("all-reduce", (0, 0.0)))
        equal &= all(torch.equal(result["naive1"]["tokens"], result[k]["tokens"]) for k in KEYS[2:])
        print(f"round {r + 1}/{args.reps}: " + ", ".join(f"{k} {times[k][-1]:.3f} s/token" for k in KEYS), flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"tokens equal (naive split, pipeline, tensor parallel block and torch): {equal}")
    print("one-prompt decode, s/token: " + " | ".join(f"{k} {med[k]:.3f}" for k in KEYS)
          + f" (medians of {args.reps})")
    scaling = med["naive1"] / med["naive2"]
    speedup = med["naive1"] / med["tp-block"]
    print(f"two-core scaling (one-prompt decode): {scaling:.2f}x")
    verdict = ""
    if goal:
        met = speedup >= 0.85 * scaling and speedup >= 1.2
        verdict = f"; goal >= 0.85 of the scaling and >= 1.20x: {'met' if met else 'NOT met'}"
    print(f"one-prompt decode speedup: {speedup:.2f}x  (tensor parallel, one all-reduce per block; "
          f"{speedup / scaling:.2f} of the two-core scaling{verdict})")
    print(f"one-prompt decode speedup, torch's parallelize_module: {med['naive1'] / med['tp-torch']:.2f}x")
    for v in ("block", "torch"):
        count = statistics.median(c for c, _ in comm[v])
        seconds = statistics.median(s for _, s in comm[v])
        print(f"all-reduce per token ({v}): {count:.0f} x {seconds / max(count, 1) * 1e3:.2f} ms = "
              f"{seconds * 1e3:.1f} ms, {seconds / med[f'tp-{v}']:.0%} of a token")
    print(flush=True)


def full_size(args, cores: list[int]) -> None:
    """GPT-J-6B (random weights, bfloat16) on 2 devices, one way after another, each freeing its memory first."""
    path = gh.resolve_model("gpt-j-6b-random")
    config = gh.load_config(str(path))
    ids = torch.randint(1, 1000, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
    plan = gh.plan_split(config, "cpu,cpu", dtype=torch.bfloat16, prompt_tokens=args.prompt_tokens,
                         max_new_tokens=args.tokens)
    print(f"model: GPT-J-6B, random weights, bfloat16, 2 devices; one prompt of {args.prompt_tokens} tokens, "
          f"{args.tokens} new", flush=True)
    baseline = reset_peak_rss()
    naive = gh.place_stages(path, plan, dtype=torch.bfloat16)
    rows = {}
    for threads in (1, 2):
        with pinned(cores[:threads], threads):
            seconds, out = decode_seconds(naive, ids, args.tokens)
        rows[f"naive split, {threads} thread(s)"] = (seconds, [peak_rss() - baseline])
    del naive
    gc.collect()
    job = gh.make_job(ids, torch.ones_like(ids), 1, args.tokens, greedy=True)
    one_core = gh.LaunchOptions(threads=1, affinity=[[c] for c in cores])
    pipe = gh.run_pipeline(path, [job], plan=plan, dtype=torch.bfloat16, options=one_core)[0]
    rows["pipeline, 2 stages"] = (decode_seconds_of(pipe), [m.peak_rss_bytes for m in pipe.memory])
    tp = gh.run_tensor_parallel(path, [gh.variant_job(job)], "cpu,cpu", dtype=torch.bfloat16,
                                     options=one_core)[0]
    rows["tensor parallel, 2 ranks"] = (decode_seconds_of(tp), [m.peak_rss_bytes for m in tp.memory])
    print(f"tokens equal (naive, pipeline, tensor parallel): "
          f"{torch.equal(out, pipe.output_ids) and torch.equal(out, tp.output_ids)}")
    for name, (seconds, rss) in rows.items():
        print(f"full size, {name}: {seconds:.2f} s/token | peak RSS over baseline "
              + " / ".join(gh.format_size(b) for b in rss))
    reduce = comm_per_token(tp).get("all-reduce", (0, 0.0))
    print(f"full size, all-reduce per token: {reduce[0]:.0f} x = {reduce[1] * 1e3:.1f} ms")
    plan_tp = tp.plan.devices[0]
    print(f"full size, tensor-parallel plan per rank: {gh.format_size(plan_tp.total_bytes)} "
          f"(weights {gh.format_size(plan_tp.param_bytes)} with the whole embedding)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3, help="interleaved rounds; medians are reported")
    parser.add_argument("--tokens", type=int, default=8, help="new tokens per run")
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--small", action="store_true", help="also the 8 x 512 model (no goal: latency-bound)")
    parser.add_argument("--full-size", action="store_true",
                        help="GPT-J-6B, random weights: the three one after another, about 13 GiB of RAM at most")
    parser.add_argument("--quick", action="store_true", help="a 2 x 512 model, one round: checks that it runs")
    args = parser.parse_args()
    cores = sorted(os.sched_getaffinity(0))[:2]
    if len(cores) < 2:
        print("this benchmark needs two CPU cores")
        return 1
    if args.full_size:
        full_size(args, cores)
        return 0
    models = [("quick", bench_config(2, 512, 8192))] if args.quick else [("default", bench_config(4, 4096, 50400))]
    if args.small:
        models.append(("small", bench_config(8, 512, 50400)))
    if args.quick:
        args.reps, args.tokens = 1, 4
    with tempfile.TemporaryDirectory(prefix="tp-bench-") as tmp:
        for label, config in models:
            path = write_bench_model(Path(tmp) / label, config)
            measure(path, label, args, cores, goal=label == "default")
    return 0


if __name__ == "__main__":
    sys.exit(main())
