"""Is any weight format faster than bfloat16 here, and does quantizing while placing keep memory low? (notebook 08)

Three measurements, each in its own subprocess so one format's memory never counts against another's:
- speed: decode milliseconds per token at batch 1 of 4 GPT-J-width blocks (4096 wide, 16 heads; a small vocabulary,
  so the blocks dominate), for float32, bfloat16, int8 (torchao), int8 (bitsandbytes), nf4 (bitsandbytes), with
  ratios against float32 and bfloat16 measured in the same run, and each row's kernel named; `--int4` adds torchao's
  prototype int4 (a prototype API).
- peak: RSS over the process baseline while `gh.place_quantized` builds the same 4 blocks, against the planned
  quantized bytes + 1.5 x one block in the compute dtype (at most one full-precision block is ever held).
- full size (`--full-size`, about 7 GiB of RAM and several minutes: run under `flock /tmp/fullsize.lock`): GPT-J-6B
  with random weights (`gpt-j-6b-random`) in both int8s and nf4: measured bytes against the plan, and the peak.

    python benchmarks/quantization.py [--quick] [--int4] [--full-size] [--threads 2]
"""
import argparse
import gc
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import gptj_helpers as gh  # noqa: E402
from gptj_split.devices import peak_rss, reset_peak_rss
from gptj_split.place import stored_bytes
from gptj_split.quantize import check_backend
from gptj_split import quality  # noqa: E402

FORMATS = [*quality.FORMAT_ROWS]  # float32, bfloat16, int8 (torchao), int8 (bitsandbytes), nf4 (bitsandbytes)
INT4 = "int4 (torchao prototype)"
QUANTIZED = {"int8 (torchao)": ("int8", "torchao"), "int8 (bitsandbytes)": ("int8", "bitsandbytes"),
             "nf4 (bitsandbytes)": ("nf4", "bitsandbytes")}


def blocks_config(width: int, layers: int):
    """GPT-J's block shape (`width` wide, heads of 256, rotary 64) with a 1024-token vocabulary."""
    from transformers import GPTJConfig

    return GPTJConfig(vocab_size=1024, n_embd=width, n_layer=layers, n_head=max(1, width // 256),
                      rotary_dim=min(64, width // max(1, width // 256)), n_positions=2048, bos_token_id=0,
                      eos_token_id=0)


def load(config, label: str, dtype: str):
    """Seeded random weights of `config`, placed on the CPU in one format (quantized block by block)."""
    if label in ("float32", "bfloat16"):
        return gh.place_stages(config, gh.plan_split(config, "cpu", dtype=label))
    if label == INT4:  # a prototype API: bfloat16 activations, int4 weights in groups of 128
        from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig
        from torchao.quantization import quantize_

        def int4(name, block):
            with gh.quiet_backends():
                quantize_(block, PrototypeInt4WeightOnlyConfig(group_size=128, set_inductor_config=False))
            return block
        return gh.place_stages(config, gh.plan_split(config, "cpu", dtype="bfloat16"), transform=int4)
    weights, backend = QUANTIZED[label]
    return gh.place_quantized(config, gh.plan_split(config, "cpu", dtype=dtype, weights=weights), backend=backend)


def child_speed(width: int, layers: int, labels: list[str], dtype: str, threads: int, tokens: int) -> None:
    """Every format one after the other in this process, freed in between: ms per decode token, as JSON lines."""
    torch.set_num_threads(threads)
    config = blocks_config(width, layers)
    for label in labels:
        model = load(config, label, dtype)
        seconds = quality.time_decode(model, new_tokens=tokens)
        print(json.dumps({"label": label, "ms": seconds * 1000}), flush=True)
        del model
        gc.collect()


def child_peak(model: str, width: int, layers: int, label: str, dtype: str) -> None:
    """Peak RSS over this process's baseline while placing one quantized model; measured bytes against the plan."""
    config = gh.load_config(model) if model else blocks_config(width, layers)
    weights, backend = QUANTIZED[label]
    plan = gh.plan_split(config, "cpu=100GiB", dtype=dtype, weights=weights)
    check_backend(weights, backend)  # imports the backend before the baseline
    gh.meta_model(config)  # and transformers' lazy modules
    base = reset_peak_rss()
    placed = gh.place_quantized(model or config, plan, backend=backend)
    peak = peak_rss()
    measured = sum(stored_bytes(p) for p in placed.parameters())  # the plan counts parameters, not rotary tables
    print(json.dumps({"peak": peak - base if base is not None and peak is not None else None,
                      "planned": plan.devices[0].param_bytes, "measured": measured,
                      "block_dtype": gh.module_sizes(config, getattr(torch, dtype))["block"]}))


def run_child(*args: str, timeout: int = 1800) -> list[dict]:
    out = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True,
                         timeout=timeout)
    if out.returncode != 0:
        raise SystemExit(f"child {args[0]} failed:\n{out.stderr[-3000:]}")
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def report_peak(label: str, row: dict, what: str) -> bool:
    """One line: measured bytes vs plan, and the peak vs planned + 1.5 x one full-precision block."""
    goal = row["planned"] + 1.5 * row["block_dtype"]
    ok = row["peak"] is None or row["peak"] <= goal
    peak = "n/a (no /proc)" if row["peak"] is None else f"{row['peak'] / 2**30:.2f} GiB"
    print(f"{what} {label:20} measured {row['measured'] / 2**30:.3f} GiB | plan {row['planned'] / 2**30:.3f} GiB | "
          f"ratio {row['measured'] / row['planned']:.4f} || peak while quantizing {peak} | limit (plan + 1.5 x one "
          f"block) {goal / 2**30:.2f} GiB | within: {ok}")
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 small blocks, one peak: checks that it runs")
    parser.add_argument("--int4", action="store_true", help="add torchao's prototype int4 row (bfloat16 activations)")
    parser.add_argument("--full-size", action="store_true", help="also GPT-J-6B (random weights) in int8 and nf4")
    parser.add_argument("--dtype", default="bfloat16", help="compute dtype of the quantized rows (default bfloat16)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind in ("speed", "quick"):  # quick: the machinery in one process, the speed rows and then one peak
            child_speed(int(rest[0]), int(rest[1]), rest[2].split(","), rest[3], int(rest[4]), int(rest[5]))
            return None if kind == "speed" else child_peak("", int(rest[0]), int(rest[1]), "nf4 (bitsandbytes)",
                                                           rest[3])
        return child_peak(rest[0], int(rest[1]), int(rest[2]), rest[3], rest[4])
    width, layers, tokens = (512, 2, 3) if args.quick else (4096, 4, 8)
    print(f"{layers} blocks {width} wide (GPT-J's block shape), batch 1, {args.threads} threads, "
          f"quantized rows computing in {args.dtype}; {gh.backend_versions()}")
    labels = FORMATS + ([INT4] if args.int4 else [])
    rows = run_child("quick" if args.quick else "speed", str(width), str(layers), ",".join(labels), args.dtype,
                     str(args.threads), str(tokens))
    times = [quality.DecodeTime(r["label"], quality.KERNELS[r["label"]], r["ms"]) for r in rows if "label" in r]
    print(quality.format_decode(times))
    fastest = min(times, key=lambda t: t.ms_per_token)
    bf16 = next(t.ms_per_token for t in times if t.label == "bfloat16")
    faster = [t.label for t in times if t.ms_per_token < bf16 and t.label != "bfloat16"]
    print(f"faster than bfloat16 here: {', '.join(faster) if faster else 'none'} (fastest: {fastest.label})")
    ok = True
    if args.quick:  # the peak after the speed rows, in their process: a check of the machinery
        report_peak("nf4 (bitsandbytes)", next(r for r in rows if "peak" in r), f"{layers} blocks:")
        return print("--quick: 2 small blocks, whose weights the process baseline swamps: no peak goal")
    for label in QUANTIZED:
        ok &= report_peak(label, run_child("peak", "", str(width), str(layers), label, args.dtype)[0],
                          f"{layers} blocks:")
    if args.full_size:
        for label in QUANTIZED:
            ok &= report_peak(label, run_child("peak", gh.GPTJ_6B_RANDOM, "0", "0", label, args.dtype)[0],
                              "GPT-J-6B (random):")
    print(f"every peak within plan + 1.5 x one block: {ok}")


if __name__ == "__main__":
    main()
