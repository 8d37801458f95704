"""How much of one prompt's decode time does a compiled step over a static KV cache remove? (notebook 09)

On the CPU, one batch-1 prompt, greedy, side by side in one run:
- the tiny default split over 3 budget slices of the CPU, and the same model unsplit;
- 4 GPT-J-width blocks (4096 wide, 16 heads, a 1024-token vocabulary so the blocks dominate) in bfloat16.
Each model decodes eagerly (`generate_text`: transformers' dynamic cache) and compiled (`compile_stages` +
`generate_compiled`: a static cache, inductor), in interleaved rounds (eager then compiled, then the other way
round); the medians of seconds per token are compared. Beside each: the bandwidth limit (bytes read per token
over this machine's measured read rate) and the fraction of it reached, the compile time (the first compiled
step), with the inductor cache said cold or warm, and whether the compiled tokens equal eager's.

    PYTHONPATH=. python benchmarks/compiled_decode.py [--rounds 5] [--tokens 48] [--threads 1] [--quick]

Goals on the 2-core development machine: the tiny split at least 1.5x faster compiled than eager and at least 0.9
of the unsplit model's compiled speedup in the same run; the 4 GPT-J-width blocks at least 0.95x.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import gptj_helpers as gh  # noqa: E402
from gptj_split import roofline  # noqa: E402

PROMPT = "The list of"


def blocks_model(layers: int = 4, width: int = 4096):
    """`layers` GPT-J blocks (heads of 256, rotary 64) with a 1024-token vocabulary, bfloat16, seeded weights."""
    config = gh.bench_config(layers, width, vocab=1024)
    return gh.place_stages(config, gh.plan_split(config, "cpu", dtype=torch.bfloat16))


def inductor_hits() -> int:
    """How many compiled graphs inductor has loaded from its on-disk cache so far (a warm cache loads them)."""
    from torch._dynamo.utils import counters

    return counters["inductor"]["fxgraph_cache_hit"]


def measure(name: str, model, tokenizer, rounds: int, tokens: int, bandwidth: float) -> dict:
    """Eager against compiled for one model, interleaved; their medians, the limit and the compile time."""
    hits = inductor_hits()
    compiled = gh.compile_stages(model, max_cache_len=64 + tokens)
    if compiled is None:
        return {"name": name, "skipped": True}
    start = time.perf_counter()
    first, _ = gh.generate_compiled(compiled, tokenizer, PROMPT, max_new_tokens=tokens, greedy=True)
    compile_seconds = time.perf_counter() - start
    cache = "warm" if inductor_hits() > hits else "cold"
    eager_texts, _ = gh.generate_text(model, tokenizer, PROMPT, max_new_tokens=tokens, greedy=True)
    times = {"eager": [], "compiled": []}
    runs = {"eager": lambda: gh.generate_text(model, tokenizer, PROMPT, max_new_tokens=tokens, greedy=True),
            "compiled": lambda: gh.generate_compiled(compiled, tokenizer, PROMPT, max_new_tokens=tokens, greedy=True)}
    for r in range(rounds):
        for kind in (("eager", "compiled") if r % 2 == 0 else ("compiled", "eager")):
            _, record = runs[kind]()
            times[kind].append(1 / record.tokens_per_second)
    eager, fast = statistics.median(times["eager"]), statistics.median(times["compiled"])
    limit = roofline.decode_limit(model, len(tokenizer(PROMPT)["input_ids"]) + tokens // 2, bandwidth)
    return {"name": name, "skipped": False, "eager": eager, "compiled": fast, "speedup": eager / fast,
            "limit": limit["seconds"], "compile_seconds": compile_seconds, "cache": cache,
            "equal": first == eager_texts, "bytes": limit["bytes"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="the tiny models only, 2 rounds (a smoke run)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    tokenizer = gh.load_tokenizer("tiny")
    bandwidth = roofline.read_bandwidth("cpu")
    print(f"CPU, {args.threads} thread(s), torch {torch.__version__}; read bandwidth {bandwidth / 1e9:.1f} GB/s; "
          f"batch 1, greedy, {args.tokens} tokens, medians of {args.rounds} interleaved rounds", flush=True)
    rows = [measure("tiny split 3x4MiB", gh.place_stages("tiny", gh.plan_split("tiny", "3x4MiB")), tokenizer,
                    args.rounds if not args.quick else 2, args.tokens, bandwidth),
            measure("tiny unsplit", gh.load_model("tiny"), tokenizer, args.rounds if not args.quick else 2,
                    args.tokens, bandwidth)]
    if not args.quick:
        rows.append(measure("4 GPT-J-width blocks bf16", blocks_model(), tokenizer, args.rounds, args.tokens,
                            bandwidth))
    print(f"\n{'model':26} {'eager ms/tok':>12} {'compiled':>9} {'limit':>7} {'eager/limit':>11} "
          f"{'compiled/limit':>14} {'compile s':>9}  inductor cache")
    for r in rows:
        if r["skipped"]:
            print(f"{r['name']:26} skipped (see the line above)")
            continue
        print(f"{r['name']:26} {r['eager'] * 1000:12.2f} {r['compiled'] * 1000:9.2f} {r['limit'] * 1000:7.2f} "
              f"{r['limit'] / r['eager']:11.2f} {r['limit'] / r['compiled']:14.2f} {r['compile_seconds']:9.1f}  "
              f"{r['cache']}")
    print()
    measured = [r for r in rows if not r["skipped"]]
    for r in measured:
        print(f"compiled decode speedup ({r['name']}): {r['speedup']:.2f}x")
    print(f"tokens equal (compiled vs eager): {all(r['equal'] for r in measured)}")
    by = {r["name"]: r for r in measured}
    goals = []
    if "tiny split 3x4MiB" in by and "tiny unsplit" in by:
        split, whole = by["tiny split 3x4MiB"]["speedup"], by["tiny unsplit"]["speedup"]
        goals.append(("tiny split at least 1.5x", split >= 1.5))
        goals.append((f"tiny split at least 0.9 of the unsplit speedup ({split / whole:.2f})", split >= 0.9 * whole))
    if "4 GPT-J-width blocks bf16" in by:
        goals.append(("4 GPT-J-width blocks at least 0.95x", by["4 GPT-J-width blocks bf16"]["speedup"] >= 0.95))
    for label, met in goals:
        print(f"goal: {label}: {'met' if met else 'NOT met'}")
    return 0 if all(r["equal"] for r in measured) else 1


if __name__ == "__main__":
    sys.exit(main())
