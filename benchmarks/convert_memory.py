"""Benchmark for notebook 01: does converting the JAX slim checkpoint stay within a few merged tensors of memory?

Builds random slim checkpoints shaped like GPT-J (vocabulary about 12.5 x d_model), converts each in a fresh
process (`python -m gptj_helpers convert-jax`), and prints its peak RSS above the process's baseline beside the
largest merged tensor and the checkpoint's size. Goal: peak <= 3 x largest tensor, flat when the layers double.

    python benchmarks/convert_memory.py                 # 20 and 40 layers of width 1024: 0.55 and 1.06 GB
    python benchmarks/convert_memory.py --layers 4 --d-model 256   # a quick smoke run
"""
import argparse
import json
import math
import shutil
import tempfile
from pathlib import Path

import numpy as np

import gptj_helpers as gh


def write_random_slim(out: Path, cfg: dict, seed: int = 0) -> int:
    """Random bf16 leaves in the slim layout, written piece by piece (never the whole model in memory); returns
    bytes."""
    rng = np.random.default_rng(seed)
    pieces = gh.split_pieces(gh.jax_leaves(cfg))
    for s in range(cfg["cores_per_replica"]):
        (out / f"shard_{s}").mkdir(parents=True)
        for p, piece in enumerate(pieces):
            arrays = []
            for leaf in piece:
                if leaf.merge == "skip":
                    arrays.append(np.array(0, np.int32))
                    continue
                x = rng.standard_normal(leaf.shard_shape, dtype=np.float32) * 0.02
                arrays.append((x.view(np.uint32) >> 16).astype(np.uint16).view("V2"))  # bf16 bits, truncated
            np.savez(out / f"shard_{s}" / f"{p}.npz", *arrays)
    (out / "jax_config.json").write_text(json.dumps(cfg))
    return sum(f.stat().st_size for f in out.rglob("*.npz"))


def largest_merged_bytes(cfg: dict, itemsize: int = 2) -> int:
    """Bytes of the biggest tensor after merging the shards (the embedding or the head for GPT-J's shape)."""
    shards = cfg["cores_per_replica"]
    return max(math.prod(leaf.shard_shape) * (1 if leaf.merge in ("sum", "first") else shards) * itemsize
               for leaf in gh.jax_leaves(cfg) if leaf.merge != "skip")


def measure(layers: int, args, work: Path) -> dict:
    cfg = {"layers": layers, "d_model": args.d_model, "n_heads": 16, "n_vocab": args.vocab,
           "pe_rotary_dims": args.d_model // 64, "seq": 2048, "cores_per_replica": 8}
    slim, out = work / f"slim-{layers}", work / f"hf-{layers}"
    try:
        size = write_random_slim(slim, cfg)
        run = gh.measure_command(["convert-jax", str(slim), str(out), "--config", str(slim / "jax_config.json"),
                                  "--dtype", "float16", "--no-progress"])
        out_bytes = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    finally:
        shutil.rmtree(slim, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
    return {"layers": layers, "slim": size, "converted": out_bytes, "largest": largest_merged_bytes(cfg), **run}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=20, help="the first run's layers; the second has twice as many")
    parser.add_argument("--d-model", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=12800)
    parser.add_argument("--workdir", help="where the checkpoints go (deleted afterwards); default: a temp folder")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="convert_memory.", dir=args.workdir))
    try:
        runs = [measure(n, args, work) for n in (args.layers, 2 * args.layers)]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    mib = 2**20
    print(f"d_model {args.d_model}, vocabulary {args.vocab}, converting bf16 -> float16, one process per run")
    print(f"{'layers':>6} | {'slim size':>10} | {'largest tensor':>14} | {'peak over base':>14} | "
          f"{'peak/largest':>12} | {'peak/model':>10} | {'s per GB':>8}")
    for r in runs:
        print(f"{r['layers']:>6} | {r['slim'] / mib:>6.0f} MiB | {r['largest'] / mib:>10.1f} MiB | "
              f"{r['peak_over_baseline'] / mib:>10.1f} MiB | {r['peak_over_baseline'] / r['largest']:>12.2f} | "
              f"{r['peak_over_baseline'] / r['converted']:>10.3f} | {r['seconds'] / (r['slim'] / 1e9):>8.1f}")
    small, big = runs
    growth = big["peak_over_baseline"] / small["peak_over_baseline"]
    worst = max(r["peak_over_baseline"] / r["largest"] for r in runs)
    print(f"model size x{big['slim'] / small['slim']:.2f} -> peak x{growth:.2f}  "
          f"(goal: flat) | worst peak/largest {worst:.2f} (goal <= 3): "
          f"{'met' if worst <= 3 and growth < 1.25 else 'NOT met'}")


if __name__ == "__main__":
    main()
