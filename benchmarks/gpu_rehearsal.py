"""GPU rehearsal of README's Colab and Kaggle lines (`make gpu-check`): do they fit, on a GPU, at GPT-J-6B's size?

GPT-J-6B's shapes with seeded random weights (`gpt-j-6b-random`, made on the GPU, nothing downloaded), float16:
- Colab, `cuda:0=14GiB`: the naive split in this process, its allocator capped at 14 GiB of the card
  (`torch.cuda.set_per_process_memory_fraction`, as on a T4's 14.75 GiB), generating through it;
- Kaggle, `cuda:0=14GiB,cuda:1=14GiB`: the pipeline, one process per stage, each capped at its budget
  (`LaunchOptions(cap_memory=True)`); on a machine with one GPU, the two budgets as two slices of it (`cuda:0=14GiB,
  cuda:0=14GiB`, over gloo, said so).
Each line's dry run first (where each rank would go), then per device the CUDA allocator's peak
(`torch.cuda.max_memory_allocated`) against its budget, and the host's peak RSS against the platform's RAM (Colab's
12.7 GB; Kaggle's about 31 GB for every process together). Every bound it prints decides it: one False and the
command exits 1.

With --device cpu (`make test` runs it) the same harness runs the tiny model on the CPU with budgets of a few MiB:
no cap (CUDA only, said so), and the host's RSS against the same limits.

usage: python benchmarks/gpu_rehearsal.py [--device cpu] [--tokens 16] [--only colab|kaggle]
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import gptj_helpers as gh  # noqa: E402
from gptj_split.devices import peak_rss, reset_peak_rss  # noqa: E402
from gptj_split.ranks import cap_memory  # noqa: E402

PROMPT = "Thanks very much to Paul for his awesome notebook"
HOST_RAM = {"colab": 12.7e9, "kaggle": 31e9}  # what each platform's host has in all
TORCH_PROCESS = 0.6 * 2**30  # what a stage process holds before its share: torch and transformers imported
SPECS = {"colab": ["cuda:0=14GiB"], "kaggle": ["cuda:0=14GiB", "cuda:1=14GiB"]}


class CheckFailed(AssertionError):
    """A bound of the rehearsal that came out False."""


def check(label: str, ok: bool) -> None:
    """Print one bound, and fail the line when it is False."""
    print(f"{label}: {bool(ok)}", flush=True)
    if not ok:
        raise CheckFailed(label)


def line_spec(line: str, device: str) -> str:
    """README's line as it runs here: its GPUs where this machine has them, else budget slices of one GPU; on the CPU,
    slices of a few MiB for the tiny model."""
    entries = SPECS[line]
    if device == "cpu":  # the tiny model's 7 MiB in float32, in as many budgets
        return ",".join([f"cpu={16 // len(entries)}MiB"] * len(entries))
    if torch.cuda.device_count() >= len(entries):
        return ",".join(entries)
    return ",".join(e.replace(e.split("=")[0], device) for e in entries)


def sized(device: str) -> tuple[str, torch.dtype]:
    """GPT-J-6B's shapes in float16 on a GPU; the tiny default in float32 on the CPU."""
    return ("gpt-j-6b-random", torch.float16) if device.startswith("cuda") else ("tiny", torch.float32)


def rehearse_colab(device: str, tokens: int) -> None:
    """Colab's line: the whole model on one budget, in this process, capped there."""
    model, dtype = sized(device)
    spec = line_spec("colab", device)
    print("\n".join(p.line() for p in gh.pipeline_dry_run(model, spec, max_new_tokens=tokens, dtype=dtype)))
    base_rss = reset_peak_rss()
    plan = gh.plan_split(model, spec, dtype=dtype, prompt_tokens=16, max_new_tokens=tokens)
    budget = plan.devices[0].budget_bytes
    if device.startswith("cuda"):
        fraction = cap_memory(plan.devices[0].device, budget)
        print(f"{plan.devices[0].device} capped at {gh.format_size(budget)} ({fraction:.3f} of the card)")
        torch.cuda.reset_peak_memory_stats(plan.devices[0].device)
    else:
        print("no cap on the CPU (set_per_process_memory_fraction is CUDA's)")
    start = time.perf_counter()
    split = gh.place_stages(model, plan)
    print(f"placed in {time.perf_counter() - start:.1f} s")
    _, record = gh.generate_text(split, gh.load_tokenizer(model), PROMPT, max_new_tokens=tokens, greedy=True)
    print(gh.format_timing(record))
    check(f"generated {tokens} tokens", record.new_tokens == tokens)
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated(plan.devices[0].device)
        check(f"{plan.devices[0].device} peak {gh.format_size(peak)} within its budget {gh.format_size(budget)}",
              peak <= budget)
    rss = peak_rss()
    if base_rss is not None and rss is not None:
        check(f"host peak RSS {rss / 1e9:.2f} GB within Colab's {HOST_RAM['colab'] / 1e9} GB", rss <= HOST_RAM["colab"])
    del split
    gh.release_memory()


def rehearse_kaggle(device: str, tokens: int) -> None:
    """Kaggle's line: one stage process per budget, each capped at it."""
    model, dtype = sized(device)
    spec = line_spec("kaggle", device)
    places = gh.pipeline_dry_run(model, spec, max_new_tokens=tokens, dtype=dtype)
    print("\n".join(p.line() for p in places))
    if places[0].backend == "gloo" and device.startswith("cuda"):
        print("one GPU here: Kaggle's two T4s rehearsed as two budget slices of it, over gloo (NCCL needs a GPU each)")
    options = gh.LaunchOptions(cap_memory=device.startswith("cuda"))
    rss = peak_rss()
    _, record = gh.run_pipeline(model, [PROMPT], spec, max_new_tokens=tokens, greedy=True, dtype=dtype,
                                options=options)
    print(gh.format_timing(record))
    check(f"generated {tokens} tokens", record.new_tokens == tokens)
    host = (rss or 0) + len(record.memory) * TORCH_PROCESS
    for row in record.memory:
        peak = row.cuda_peak_bytes
        if peak is not None:
            check(f"stage {row.stage} on {row.device}: peak {gh.format_size(peak)} within its budget "
                  f"{gh.format_size(row.budget_bytes)}", peak <= row.budget_bytes)
        host += (row.peak_rss_bytes or 0)
        print(f"  stage {row.stage}: params {gh.format_size(row.param_bytes)}, host peak RSS over its imports "
              f"{gh.format_size(row.peak_rss_bytes or 0)} (+ about {gh.format_size(TORCH_PROCESS)} of imports)")
    check(f"host RSS, this process's peak and each stage's with its imports, {host / 1e9:.2f} GB within Kaggle's "
          f"{HOST_RAM['kaggle'] / 1e9:.0f} GB", host <= HOST_RAM["kaggle"])


LINES = {"colab": rehearse_colab, "kaggle": rehearse_kaggle}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else None,
                        help="cuda:0 (default where there is CUDA), or cpu: the harness on the tiny model")
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--only", nargs="+", choices=list(LINES))
    args = parser.parse_args(argv)
    if args.device is None:
        print("no CUDA here: the GPU rehearsal needs a GPU (--device cpu runs its harness on the tiny model)")
        return 0
    failed = []
    for name in args.only or list(LINES):
        print(f"\n=== {name}'s line on {args.device}", flush=True)
        try:
            LINES[name](args.device, args.tokens)
        except CheckFailed as err:
            print(f"--- {name}: FAILED ({err})")
            failed.append(name)
    print(f"\n{len(LINES if not args.only else args.only) - len(failed)} line(s) fit"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
