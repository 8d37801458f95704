"""Benchmark for notebook 03: what does splitting a model over 4 virtual CPU devices cost in tokens/s?

Greedy generation of 64 new tokens from one prompt, the unsplit model and the same weights split into 4
stages, in interleaved repetitions (A B, B A, A B, ...) so drifts in machine load hit both alike.
Two measurements per variant: plain `model.generate` timed by the wall clock (the split's own cost: its
boundary hooks), and `gh.generate_text` (the same plus this series' timing hooks; its tokens/s after the
first token). For the tiny default and a "mini" model (8 layers x 512 wide) it prints medians
and two ratios split / unsplit: the median of the per-repetition ratios and best run over best run
(both hold up better than a ratio of means on a machine shared with other work). Goal: ratio >= 0.95.

usage: python benchmarks/split_overhead.py [--reps 9] [--threads 1] [--tokens 64]
"""
import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import gptj_helpers as gh
from gptj_split.models import mini_config
from common import save_random_model


def raw_rate(model, ids, tokens: int) -> float:
    """Tokens per second of plain greedy `generate`, wall clock, whole call."""
    start = time.perf_counter()
    out = model.generate(**ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0)
    seconds = time.perf_counter() - start
    assert out.shape[1] - ids["input_ids"].shape[1] == tokens
    return tokens / seconds


def bench(name: str, path: Path, reps: int, tokens: int, prompt: str) -> None:
    tokenizer = gh.load_tokenizer(str(path))
    variants = {"unsplit": gh.load_model(str(path)),
                "4 stages": gh.place_stages(path, gh.plan_split(str(path), "4xcpu", dtype=torch.float32))}
    ids = tokenizer(prompt, return_tensors="pt")
    raw = {k: [] for k in variants}
    run = {k: [] for k in variants}
    texts = {}
    for model in variants.values():  # warm-up
        raw_rate(model, ids, 8)
    for rep in range(reps):
        order = list(variants) if rep % 2 == 0 else list(reversed(variants))
        for key in order:
            raw[key].append(raw_rate(variants[key], ids, tokens))
            texts[key], record = gh.generate_text(variants[key], tokenizer, prompt, max_new_tokens=tokens, greedy=True)
            run[key].append(record.tokens_per_second)
    assert texts["unsplit"] == texts["4 stages"], "split and unsplit disagree"
    config = variants["unsplit"].config
    print(f"\n{name}: {config.n_layer} layers x {config.n_embd} wide, float32, greedy, {tokens} new tokens, "
          f"{reps} interleaved reps, {torch.get_num_threads()} thread(s)")
    for label, data in (("model.generate (wall clock)", raw), ("gh.generate_text (after 1st token)", run)):
        a, b = statistics.median(data["unsplit"]), statistics.median(data["4 stages"])
        paired = statistics.median(y / x for x, y in zip(data["unsplit"], data["4 stages"]))
        best = max(data["4 stages"]) / max(data["unsplit"])
        print(f"  {label:36} median unsplit {a:7.1f} tok/s | 4 stages {b:7.1f} tok/s || "
              f"ratio: median of paired reps {paired:.3f}, best of each {best:.3f}")

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    parser.add_argument("--prompt", default="The list")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bench("tiny", gh.resolve_model("tiny"), args.reps, args.tokens, args.prompt)
    with tempfile.TemporaryDirectory() as tmp:
        bench("mini", save_random_model(mini_config(), Path(tmp)), args.reps, args.tokens, args.prompt)
    print("\ngoal: ratio >= 0.95 (the split costs at most 5% of tokens/s)")


if __name__ == "__main__":
    main()
