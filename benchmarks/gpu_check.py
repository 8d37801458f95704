"""GPU check for notebook 04: GPT-J-6B in float16, random weights, split into budget slices, 64 tokens.

On a CUDA machine: builds GPT-J-6B on the meta device and materialises each stage's weights (random, no
download) directly on its GPU, plans a split into 3 budget slices of 10 GiB (on one GPU, or spread over
several), generates 64 tokens greedily for a short prompt, and prints planned vs measured memory per
device (with the CUDA allocator's peak as an independent total), tokens/s and per-stage busy time.
Without CUDA the same code runs the "mini" model (8 layers x 512) on the CPU, in well under a minute.
The prompt's tokens come from the tiny default's tokenizer (built offline); with random weights the
text is meaningless, only the numbers matter.

usage: python benchmarks/gpu_check.py [--devices 3x10GiB] [--tokens 64] [--mini]
"""
import argparse
import time

import torch

import gptj_helpers as gh


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", help="device spec; default 3x10GiB on CUDA, 3x64MiB on the CPU")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--mini", action="store_true", help="the mini model even where CUDA is present")
    args = parser.parse_args()
    cuda = torch.cuda.is_available() and not args.mini
    config = gh.gptj_6b_config() if cuda else gh.mini_config()
    dtype = torch.float16 if cuda else torch.float32
    spec = args.devices or ("3x10GiB" if cuda else "3x64MiB")
    name = "GPT-J-6B (random weights)" if cuda else "mini (8 layers x 512, random weights)"
    print(f"{name} in {str(dtype).replace('torch.', '')} on {spec}; torch {torch.__version__}, "
          f"{torch.cuda.get_device_name(0) if cuda else 'no CUDA: CPU mode'}", flush=True)

    tokenizer = gh.load_tokenizer("tiny")
    prompt = "Thanks very much to Paul for his awesome notebook"
    prompt_tokens = len(tokenizer(prompt)["input_ids"])
    plan = gh.plan_split(config, spec, dtype=dtype, prompt_tokens=prompt_tokens, max_new_tokens=args.tokens,
                         model_name=name)
    print(gh.format_plan(plan), flush=True)
    start = time.perf_counter()
    model = gh.place_stages(config, plan, dtype)
    print(f"materialised the stages in {time.perf_counter() - start:.1f} s", flush=True)
    gh.generate_text(model, tokenizer, prompt, max_new_tokens=4, greedy=True)  # warm-up (CUDA kernels, caches)
    texts, record = gh.generate_text(model, tokenizer, prompt, max_new_tokens=args.tokens, greedy=True)

    print(f"\ngenerated {record.new_tokens} tokens")
    print(gh.format_timing(record))
    print("\nmemory per stage (measured):")
    for row in record.memory:
        peak = (f", CUDA peak on {row.device} {gh.format_size(row.cuda_peak_bytes)}"
                if row.cuda_peak_bytes is not None else "")
        print(f"  stage {row.stage} {row.device:7} params {gh.format_size(row.param_bytes):>11} "
              f"KV {gh.format_size(row.kv_cache_bytes):>10} activations (estimate) "
              f"{gh.format_size(row.activation_bytes):>10} of budget {gh.format_size(row.budget_bytes)}{peak}")
    print("\nestimate vs measured:")
    print(gh.format_estimates(gh.compare_estimates(record, config)))


if __name__ == "__main__":
    main()
