"""GPU check for notebook 04: GPT-J-6B in float16, random weights, split into budget slices, 64 tokens.

On a CUDA machine: builds GPT-J-6B on the meta device and materialises each stage's weights (random, no
download) directly on its GPU, plans a split into 3 budget slices of 10 GiB (on one GPU, or spread over
several), generates 64 tokens greedily for a short prompt, and prints planned vs measured memory per
device (with the CUDA allocator's peak as an independent total), tokens/s and per-stage busy time.
Without CUDA the same code runs the "mini" model (8 layers x 512) on the CPU, in well under a minute.
The prompt's tokens come from the tiny default's tokenizer (built offline); with random weights the
text is meaningless, only the numbers matter.

With --full-size (one command, about 4 minutes on one 80 GB GPU; `PYTHONPATH=. python3 benchmarks/gpu_check.py
--full-size`), on CUDA only: GPT-J-6B with seeded random weights in float16 as three budget slices of the GPU,
naive split and `generate`: per slice the planned bytes against `torch.cuda.max_memory_allocated`, decode tokens/s
against the card's measured copy bandwidth, and the host's peak RSS (Colab has 12.7 GB). Budget slices of one GPU
never cross a device boundary, so it also splits the tiny model across cuda:0 and the CPU and checks greedy,
sampled and beam-search output against the unsplit model, and runs the pipeline with 2 processes on that GPU (over
gloo), and tensor parallelism with 2 ranks on that GPU (over gloo; notebook 07). With 2 or more GPUs it also runs the
pipeline and tensor parallelism over NCCL, one GPU per process (written, labelled untested until it has run on such a
machine). Notebook 08's cases: GPT-J-6B with int8 and nf4 weights on the GPU (memory against the plan, peak while
quantizing, decode tokens/s against float16), and the tiny model through stock
`from_pretrained(device_map=plan.device_map())` against this project's placement. A case whose backend is missing
(torchao, bitsandbytes) says so and is skipped.

usage: python benchmarks/gpu_check.py [--devices 3x10GiB] [--tokens 64] [--mini] [--full-size]
"""
import argparse
import time
import sys
import traceback

import torch

import gptj_helpers as gh


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", help="device spec; default 3x10GiB on CUDA, 3x64MiB on the CPU")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--mini", action="store_true", help="the mini model even where CUDA is present")
    parser.add_argument("--full-size", action="store_true", help="the full-size check (CUDA only, about 4 minutes)")
    args = parser.parse_args()
    if args.full_size:
        return full_size_check(args.tokens)
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
    return 0


GIB = 2**30


def synchronize(device: str) -> None:
    """Wait for a CUDA device's queued work (nothing to wait for on the CPU)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def copy_bandwidth(device: str, nbytes: int = GIB, reps: int = 5) -> float:
    """Bytes moved per second (read + written) copying one large tensor on `device`; the best of `reps`."""
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(reps + 1):  # the first copy warms up
        synchronize(device)
        start = time.perf_counter()
        dst.copy_(src)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    del src, dst
    return 2 * nbytes / best


def case(title: str):
    """Run one case of the full-size check; a failure is printed with its traceback and the next case runs."""
    def wrap(fn):
        def run(*args, **kwargs):
            print(f"\n=== {title}", flush=True)
            start = time.perf_counter()
            try:
                fn(*args, **kwargs)
                print(f"--- {title}: done in {time.perf_counter() - start:.1f} s", flush=True)
                return True
            except Exception:
                traceback.print_exc()
                print(f"--- {title}: FAILED after {time.perf_counter() - start:.1f} s", flush=True)
                return False
        return run
    return wrap


@case("GPT-J-6B (random weights), three 10 GiB budget slices of one device, naive split")
def full_size_naive(tokens: int, device: str = "cuda:0", dtype: torch.dtype = torch.float16) -> None:
    tokenizer = gh.load_tokenizer("gpt-j-6b-random")
    prompt = "Thanks very much to Paul for his awesome notebook"
    bandwidth = copy_bandwidth(device)
    print(f"copy bandwidth on {device} (1 GiB, read + write): {bandwidth / 1e9:.0f} GB/s")
    base_rss = gh.reset_peak_rss()
    plan = gh.plan_split("gpt-j-6b-random", f"3x{device}=10GiB", dtype=dtype,
                         prompt_tokens=len(tokenizer(prompt)["input_ids"]), max_new_tokens=tokens)
    print(gh.format_plan(plan))
    start = time.perf_counter()
    model = gh.place_stages("gpt-j-6b-random", plan)
    print(f"materialised from seeds in {time.perf_counter() - start:.1f} s", flush=True)
    gh.generate_text(model, tokenizer, prompt, max_new_tokens=4, greedy=True)  # warm-up
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    _, record = gh.generate_text(model, tokenizer, prompt, max_new_tokens=tokens, greedy=True)
    print(gh.format_timing(record))
    planned = sum(st.param_bytes + st.kv_cache_bytes for st in plan.devices)
    for st, row in zip(plan.devices, record.memory):
        print(f"  slice {row.stage}: planned params {gh.format_size(st.param_bytes)} + KV "
              f"{gh.format_size(st.kv_cache_bytes)} | measured params {gh.format_size(row.param_bytes)} + KV "
              f"{gh.format_size(row.kv_cache_bytes)}")
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated(device)
        print(f"{device} max_memory_allocated {gh.format_size(peak)} vs planned (all slices) "
              f"{gh.format_size(planned)}: ratio {peak / planned:.2f}")
    FLOAT16_TOKENS_PER_SECOND.append(record.tokens_per_second)  # the quantized cases compare with it
    weights = sum(st.param_bytes for st in plan.devices) - plan.module_bytes["embedding"]  # one row of wte is read
    seconds = 1 / record.tokens_per_second
    rate = weights / seconds
    print(f"decode {record.tokens_per_second:.1f} tokens/s = {seconds * 1000:.1f} ms/token; weights read per token "
          f"{gh.format_size(weights)} -> {rate / 1e9:.0f} GB/s = {rate / (bandwidth / 2):.2f} x the copy's read rate")
    rss = gh.peak_rss()
    if base_rss is not None and rss is not None:
        print(f"host peak RSS over this case's start: {gh.format_size(rss - base_rss)} (Colab has 12.7 GB in all)")
    del model
    gh.release_memory()


FLOAT16_TOKENS_PER_SECOND: list[float] = []  # set by the float16 case, read by the quantized ones


def backend_missing(weights: str, backend: str | None = None) -> str | None:
    """Why a quantized case cannot run here (its backend is not installed, or not for this device), else None."""
    try:
        gh.check_backend(weights, backend, ["cuda:0"])
    except (gh.MissingBackend, ValueError) as err:
        return str(err)
    return None


def quantized_full_size(tokens: int, weights: str) -> bool | None:
    """Notebook 08 at full size, or None (skipped, said why) where its backend is missing."""
    why = backend_missing(weights)
    if why:
        print(f"\n=== GPT-J-6B (random weights) with {weights} weights: skipped ({why})")
        return None
    return quantized_case(tokens, weights)


@case("GPT-J-6B (random weights), quantized weights on one GPU: memory against the plan, speed against float16")
def quantized_case(tokens: int, weights: str, device: str = "cuda:0") -> None:
    tokenizer = gh.load_tokenizer("gpt-j-6b-random")
    prompt = "Thanks very much to Paul for his awesome notebook"
    plan = gh.plan_split("gpt-j-6b-random", f"{device}=14GiB", dtype=torch.float16, weights=weights,
                         prompt_tokens=len(tokenizer(prompt)["input_ids"]), max_new_tokens=tokens)
    print(gh.format_plan(plan))
    torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    model = gh.place_quantized("gpt-j-6b-random", plan)
    loading_peak = torch.cuda.max_memory_allocated(device)
    block16 = gh.module_sizes(gh.load_config("gpt-j-6b-random"), torch.float16)["block"]
    print(f"placed and quantized block by block in {time.perf_counter() - start:.1f} s; peak while quantizing "
          f"{gh.format_size(loading_peak)} vs plan + 1.5 x one float16 block "
          f"{gh.format_size(plan.devices[0].param_bytes + 1.5 * block16)}: "
          f"within {loading_peak <= plan.devices[0].param_bytes + 1.5 * block16}")
    with gh.quiet_backends():
        gh.generate_text(model, tokenizer, prompt, max_new_tokens=4, greedy=True)  # warm-up
        _, record = gh.generate_text(model, tokenizer, prompt, max_new_tokens=tokens, greedy=True)
    row, st = record.memory[0], plan.devices[0]
    print(f"params: planned {gh.format_size(st.param_bytes)} | measured {gh.format_size(row.param_bytes)} | ratio "
          f"{row.param_bytes / st.param_bytes:.4f}")
    f16 = FLOAT16_TOKENS_PER_SECOND[-1] if FLOAT16_TOKENS_PER_SECOND else float("nan")
    print(f"decode {record.tokens_per_second:.1f} tokens/s vs float16 {f16:.1f} tokens/s (3 slices, same GPU): "
          f"ratio {record.tokens_per_second / f16:.2f}")
    del model
    gh.release_memory()


def device_map_equality() -> bool:
    """Stock `from_pretrained(device_map=plan.device_map())` against this project's placement, on the tiny model."""
    return device_map_case()


@case("tiny: stock from_pretrained(device_map=plan.device_map()) equals place_stages / place_quantized")
def device_map_case(device: str = "cuda:0") -> None:
    tokenizer = gh.load_tokenizer("tiny")
    ids = tokenizer("The list", return_tensors="pt")["input_ids"]

    def greedy(model):
        with torch.inference_mode(), gh.quiet_backends():
            return model.generate(ids.to(device), attention_mask=torch.ones_like(ids).to(device), do_sample=False,
                                  max_new_tokens=16, pad_token_id=0).cpu()

    plan = gh.plan_split("tiny", f"{device}=1GiB,cpu=1GiB", dtype=torch.float32)  # accelerate attaches hooks here
    print(f"float32, {device} + cpu: device_map split == place_stages split: "
          f"{torch.equal(greedy(gh.load_pretrained('tiny', plan)), greedy(gh.place_stages('tiny', plan)))}")
    for weights in ("int8", "nf4"):
        why = backend_missing(weights, "bitsandbytes")
        if why:
            print(f"{weights}: skipped ({why})")
            continue
        split = gh.plan_split("tiny", f"{device}=1GiB,{device}=1GiB", dtype=torch.float16, weights=weights)
        whole = gh.plan_split("tiny", f"{device}=2GiB", dtype=torch.float16, weights=weights)
        stock = greedy(gh.load_pretrained("tiny", split, backend="bitsandbytes"))
        ours = greedy(gh.place_quantized("tiny", split, backend="bitsandbytes"))
        unsplit = greedy(gh.place_quantized("tiny", whole, backend="bitsandbytes"))
        print(f"{weights} (bitsandbytes): stock device_map == place_quantized: {torch.equal(stock, ours)}; "
              f"quantized split == quantized unsplit: {torch.equal(ours, unsplit)}")


@case("tiny split across cuda:0 and the CPU: greedy, sampled and beam search equal the unsplit model")
def tiny_across_a_real_boundary(device: str = "cuda:0") -> None:
    tokenizer = gh.load_tokenizer("tiny")
    whole = gh.load_model("tiny", dtype=torch.float32, device=device)
    split = gh.place_stages("tiny", gh.plan_split("tiny", f"{device}=1GiB,cpu=1GiB", dtype=torch.float32))
    ids = tokenizer("The list", return_tensors="pt")["input_ids"]
    for name, options in [("greedy", {"do_sample": False}), ("sampled", {"do_sample": True, "top_p": 0.7}),
                          ("beam search", {"do_sample": False, "num_beams": 3})]:
        outs = []
        for model in (whole, split):
            torch.manual_seed(0)
            outs.append(model.generate(ids.to(model.device), attention_mask=torch.ones_like(ids).to(model.device),
                                       max_new_tokens=16, pad_token_id=tokenizer.eos_token_id, **options).cpu())
        print(f"{name:12} split == unsplit: {torch.equal(*outs)}")


@case("pipeline, 2 stage processes on cuda:0 over gloo, equals generate")
def pipeline_on_one_gpu(device: str = "cuda:0") -> None:
    tokenizer = gh.load_tokenizer("tiny")
    prompts = ["The list", "A dictionary is", "Hello, world", "import os"]
    _, record = gh.run_pipeline("tiny", prompts, f"{device}=2GiB,{device}=2GiB", micro_batches=2, max_new_tokens=12,
                                greedy=True, dtype=torch.float32)
    model = gh.load_model("tiny", dtype=torch.float32, device=device)
    _, reference = gh.generate_text(model, tokenizer, prompts, max_new_tokens=12, greedy=True)
    print(f"backend {gh.pick_backend([s.device for s in record.plan.devices])}; tokens equal generate's: "
          f"{torch.equal(record.output_ids, reference.output_ids)}")
    for row in record.memory:
        print(f"  stage {row.stage} on {row.device}: params {gh.format_size(row.param_bytes)}, CUDA peak "
              f"{gh.format_size(row.cuda_peak_bytes or 0)}, host peak RSS {gh.format_size(row.peak_rss_bytes or 0)}")


@case("pipeline over NCCL, one GPU per stage (UNTESTED until it has run on a machine with several GPUs)")
def pipeline_over_nccl() -> None:
    tokenizer = gh.load_tokenizer("tiny")
    prompts = ["The list", "A dictionary is"]
    _, record = gh.run_pipeline("tiny", prompts, "cuda:0,cuda:1", max_new_tokens=12, greedy=True,
                                dtype=torch.float32)
    model = gh.load_model("tiny", dtype=torch.float32, device="cuda:0")
    _, reference = gh.generate_text(model, tokenizer, prompts, max_new_tokens=12, greedy=True)
    print(f"backend {gh.pick_backend(['cuda:0', 'cuda:1'])}; tokens equal generate's: "
          f"{torch.equal(record.output_ids, reference.output_ids)}")


@case("tensor parallel, 2 ranks on cuda:0 over gloo, equals generate; memory against the plan (notebook 07)")
def tensor_parallel_on_one_gpu(device: str = "cuda:0") -> None:
    tokenizer = gh.load_tokenizer("tiny")
    prompts = ["The list", "A dictionary is", "Hello, world", "import os"]
    model = gh.load_model("tiny", dtype=torch.float32, device=device)
    _, reference = gh.generate_text(model, tokenizer, prompts, max_new_tokens=12, greedy=True)
    del model
    for variant in ("block", "torch"):  # torch: DTensor on a CUDA mesh over gloo, refused by name
        try:
            _, record = gh.run_tensor_parallel("tiny", prompts, f"{device}=2GiB,{device}=2GiB", max_new_tokens=12,
                                               greedy=True, dtype=torch.float32, variant=variant)
        except ValueError as refusal:
            print(f"{variant}: refused: {refusal}")
            continue
        print(f"{variant}: backend {gh.pick_backend([s.device for s in record.plan.devices])}; tokens equal "
              f"generate's: {torch.equal(record.output_ids, reference.output_ids)}")
        for row, planned in zip(record.memory, record.plan.devices):
            print(f"  rank {row.stage} on {row.device}: params planned {gh.format_size(planned.param_bytes)} | "
                  f"measured {gh.format_size(row.param_bytes)}; planned total {gh.format_size(planned.total_bytes)} "
                  f"| CUDA peak {gh.format_size(row.cuda_peak_bytes or 0)}; host peak RSS "
                  f"{gh.format_size(row.peak_rss_bytes or 0)}")
    model = gh.load_model("tiny", dtype=torch.float32, device=device)  # seeded sampling: rank 0 draws on its device
    wanted, _ = gh.generate_text(model, tokenizer, prompts[:1], max_new_tokens=12, seed=7)
    del model
    got, _ = gh.run_tensor_parallel("tiny", prompts[:1], f"{device}=2GiB,{device}=2GiB", max_new_tokens=12, seed=7,
                                    dtype=torch.float32)
    print(f"seeded sampling equals generate_text(seed=7) on {device}: {got == wanted}")


@case("tensor parallel over NCCL, one GPU per rank (UNTESTED until it has run on a machine with several GPUs)")
def tensor_parallel_over_nccl() -> None:
    tokenizer = gh.load_tokenizer("tiny")
    prompts = ["The list", "A dictionary is"]
    _, record = gh.run_tensor_parallel("tiny", prompts, "cuda:0,cuda:1", max_new_tokens=12, greedy=True,
                                       dtype=torch.float32)
    model = gh.load_model("tiny", dtype=torch.float32, device="cuda:0")
    _, reference = gh.generate_text(model, tokenizer, prompts, max_new_tokens=12, greedy=True)
    print(f"backend {gh.pick_backend(['cuda:0', 'cuda:1'])}; tokens equal generate's: "
          f"{torch.equal(record.output_ids, reference.output_ids)}")


def full_size_check(tokens: int) -> int:
    """The prepared GPU check: every case, one after the other, each freeing its memory; 1 if any failed."""
    import transformers

    if not torch.cuda.is_available():
        print("--full-size needs CUDA: this machine has none (skipped)")
        return 0
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.cuda.device_count()} GPU(s): "
          f"{torch.cuda.get_device_name(0)}", flush=True)
    results = [full_size_naive(tokens), tiny_across_a_real_boundary(), pipeline_on_one_gpu(),
               tensor_parallel_on_one_gpu()]
    results += [r for r in (quantized_full_size(tokens, "int8"), quantized_full_size(tokens, "nf4"),
                            device_map_equality()) if r is not None]
    if torch.cuda.device_count() >= 2:
        results += [pipeline_over_nccl(), tensor_parallel_over_nccl()]
    else:
        print("\n=== pipeline and tensor parallel over NCCL: skipped, one GPU only (NCCL refuses two ranks on one GPU)")
    print(f"\n{sum(results)} of {len(results)} case(s) passed")
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
