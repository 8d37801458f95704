"""GPU check for notebooks 04, 05, 07 and 08: every case decides pass or fail from the equalities it prints.

On a CUDA machine: builds GPT-J-6B on the meta device and materialises each stage's weights (random, no
download) directly on its GPU, plans a split into 3 budget slices of 10 GiB (on one GPU, or spread over
several), generates 64 tokens greedily for a short prompt, and prints planned vs measured memory per
device (with the CUDA allocator's peak as an independent total), tokens/s and per-stage busy time.
Without CUDA the same code runs the "mini" model (8 layers x 512) on the CPU, in well under a minute.
The prompt's tokens come from the tiny default's tokenizer (built offline); with random weights the
text is meaningless, only the numbers matter.

With --full-size (one command, about 4 minutes on one 80 GB GPU; `PYTHONPATH=. python3 benchmarks/gpu_check.py
--full-size`), on CUDA only, every case: GPT-J-6B with seeded random weights in float16 as three budget slices of the
GPU, naive split and `generate`: per slice the planned bytes against the measured ones and
`torch.cuda.max_memory_allocated`, decode tokens/s against the card's measured copy bandwidth, and the host's peak RSS
(Colab has 12.7 GB); the same split with its decode step compiled over a static cache (notebook 09; CUDA graphs),
tokens/s and the fraction of the copy's read rate against eager in the same run, with the first divergence and the
largest logit difference (float16 may part ways). Budget slices of one GPU never cross a device boundary, so it
also splits the tiny model across cuda:0 and the CPU and checks greedy, sampled and beam-search output against the
unsplit model, and runs the pipeline with 2 processes on that GPU (over gloo), and tensor parallelism with 2 ranks on
that GPU (over gloo; notebook 07).
With 2 or more GPUs it also runs the pipeline and tensor parallelism over NCCL, one GPU per process. Notebook 08's
cases: GPT-J-6B with int8 and nf4 weights on the GPU (memory against the plan, peak while quantizing, decode tokens/s
against float16), and the tiny model through stock `from_pretrained(device_map=plan.device_map())` against this
project's placement. A case whose backend is missing (torchao, bitsandbytes) says so and is skipped, not passed.

With --device cpu (or cuda:N) every case runs on that device at a reduced size: the mini model where the full-size
check has GPT-J-6B, the CPU as the "other side" of the boundary (`make test` runs it). --only runs the named cases.
Every equality a case prints decides it: one False and the case fails, and the command exits 1.

usage: python benchmarks/gpu_check.py [--tokens 64] [--full-size | --device DEV] [--only CASE ...]
"""
import argparse
import time
import sys
import traceback

import torch

import gptj_helpers as gh
from gptj_split.records import compare_outputs
from gptj_split.devices import peak_rss, reset_peak_rss
from gptj_split.generate import run_generate
from gptj_split.models import mini_config
from gptj_split.plan import as_config
from gptj_split.quantize import MissingBackend, check_backend


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--full-size", action="store_true", help="every case at full size (CUDA only, about 4 minutes)")
    parser.add_argument("--device", help="every case on this device at a reduced size (cpu, cuda:0)")
    parser.add_argument("--only", nargs="+", choices=list(CASES), help="run only these cases")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    if args.full_size and not cuda:
        print("--full-size needs CUDA: this machine has none (skipped; --device cpu runs every case here)")
        return 0
    if not (args.full_size or args.device or args.only):  # notebook 04's report: the naive case alone
        return run_cases("cuda:0" if cuda else "cpu", args.tokens, cuda, ["naive"])
    return run_cases(args.device or "cuda:0", args.tokens, args.full_size, args.only or list(CASES))


GIB = 2**30
PROMPT = "Thanks very much to Paul for his awesome notebook"


class CheckFailed(AssertionError):
    """An equality or bound of the check that came out False."""


def check(label: str, ok: bool) -> None:
    """Print one equality or bound of a case, and fail the case when it is False."""
    print(f"{label}: {bool(ok)}", flush=True)
    if not ok:
        raise CheckFailed(label)


def case(title: str):
    """Run one case; a failed check or an error is printed (with its traceback) and the next case runs."""
    def wrap(fn):
        def run(*args, **kwargs):
            print(f"\n=== {title}", flush=True)
            start = time.perf_counter()
            try:
                fn(*args, **kwargs)
                print(f"--- {title}: passed in {time.perf_counter() - start:.1f} s", flush=True)
                return True
            except CheckFailed as failed:
                print(f"--- {title}: FAILED ({failed} is False) after {time.perf_counter() - start:.1f} s", flush=True)
            except Exception:
                traceback.print_exc()
                print(f"--- {title}: FAILED after {time.perf_counter() - start:.1f} s", flush=True)
            return False
        return run
    return wrap


def sized(full_size: bool, device: str):
    """The model, its tokenizer's name, dtype and slice budget of a case: GPT-J-6B at full size, else the mini model."""
    cuda = device.startswith("cuda")
    if full_size:
        return "gpt-j-6b-random", "gpt-j-6b-random", torch.float16 if cuda else torch.bfloat16, "10GiB"
    return mini_config(), "tiny", torch.float16 if cuda else torch.float32, "64MiB"


def check_params(plan, record, rel: float = 0.01) -> None:
    """Each slice's measured parameter bytes against the plan's (the first slice also holds buffers)."""
    for st, row in zip(plan.devices, record.memory):
        print(f"  slice {row.stage}: planned params {gh.format_size(st.param_bytes)} + KV "
              f"{gh.format_size(st.kv_cache_bytes)} | measured params {gh.format_size(row.param_bytes)} + KV "
              f"{gh.format_size(row.kv_cache_bytes)}")
        check(f"slice {row.stage} params within {rel:.0%} of the plan",
              abs(row.param_bytes - st.param_bytes) <= rel * st.param_bytes)


@case("naive split of GPT-J-6B (random weights, mini at reduced size) into three budget slices of one device")
def full_size_naive(tokens: int, device: str = "cuda:0", full_size: bool = True) -> None:
    model_name, tokenizer_name, dtype, budget = sized(full_size, device)
    tokenizer = gh.load_tokenizer(tokenizer_name)
    read_rate = gh.read_bandwidth(device, GIB if full_size else GIB // 8)  # half of what the copy moves
    print(f"copy bandwidth on {device} ({'1 GiB' if full_size else '128 MiB'}, read + write): "
          f"{2 * read_rate / 1e9:.0f} GB/s")
    base_rss = reset_peak_rss()
    plan = gh.plan_split(model_name, f"3x{device}={budget}", dtype=dtype,
                         prompt_tokens=len(tokenizer(PROMPT)["input_ids"]), max_new_tokens=tokens)
    print(gh.format_plan(plan))
    start = time.perf_counter()
    model = gh.place_stages(model_name, plan)
    print(f"materialised from seeds in {time.perf_counter() - start:.1f} s", flush=True)
    gh.generate_text(model, tokenizer, PROMPT, max_new_tokens=4, greedy=True)  # warm-up
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    _, record = gh.generate_text(model, tokenizer, PROMPT, max_new_tokens=tokens, greedy=True)
    print(gh.format_timing(record))
    check(f"generated {tokens} tokens", record.new_tokens == tokens)
    check_params(plan, record)
    print("estimate vs measured:\n" + gh.format_estimates(gh.compare_estimates(record, as_config(model_name))))
    planned = sum(st.param_bytes + st.kv_cache_bytes for st in plan.devices)
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated(device)
        print(f"{device} max_memory_allocated {gh.format_size(peak)} vs planned (all slices) "
              f"{gh.format_size(planned)}: ratio {peak / planned:.2f}")
    FLOAT16_TOKENS_PER_SECOND.append(record.tokens_per_second)  # the quantized cases compare with it
    weights = sum(st.param_bytes for st in plan.devices) - plan.module_bytes["embedding"]  # one row of wte is read
    seconds = 1 / record.tokens_per_second
    rate = weights / seconds
    print(f"decode {record.tokens_per_second:.1f} tokens/s = {seconds * 1000:.1f} ms/token; weights read per token "
          f"{gh.format_size(weights)} -> {rate / 1e9:.0f} GB/s = {rate / read_rate:.2f} x the copy's read rate")
    rss = peak_rss()
    if base_rss is not None and rss is not None:
        print(f"host peak RSS over this case's start: {gh.format_size(rss - base_rss)} (Colab has 12.7 GB in all)")
    del model
    gh.release_memory()


FLOAT16_TOKENS_PER_SECOND: list[float] = []  # set by the naive case, read by the quantized ones


@case("naive split in three budget slices of one device, decode compiled over a static cache, against eager (09)")
def compiled_case(tokens: int, device: str = "cuda:0", full_size: bool = True) -> None:
    model_name, tokenizer_name, dtype, budget = sized(full_size, device)
    tokenizer = gh.load_tokenizer(tokenizer_name)
    prompt_tokens = len(tokenizer(PROMPT)["input_ids"])
    read_rate = gh.read_bandwidth(device, GIB if full_size else GIB // 8)
    # the plan counts the static cache at its full length: every position of it is allocated
    plan = gh.plan_split(model_name, f"3x{device}={budget}", dtype=dtype, prompt_tokens=prompt_tokens,
                         max_new_tokens=tokens)
    model = gh.place_stages(model_name, plan)
    compiled = gh.compile_stages(model, max_cache_len=prompt_tokens + tokens)
    check("compile_stages compiled the split (one device: one region)", compiled is not None)
    greedy = gh.Sampling(greedy=True)
    gh.generate_text(model, tokenizer, PROMPT, max_new_tokens=4, greedy=True)  # warm-up
    start = time.perf_counter()
    gh.generate_compiled(compiled, tokenizer, PROMPT, max_new_tokens=tokens, greedy=True)
    print(f"first compiled run (compiling): {time.perf_counter() - start:.1f} s", flush=True)
    _, eager = run_generate(model, tokenizer, PROMPT, tokens, greedy, output_logits=True)
    _, fast = gh.generate_compiled(compiled, tokenizer, PROMPT, max_new_tokens=tokens, greedy=True, keep_logits=True)
    check(f"generated {tokens} tokens compiled", fast.new_tokens == tokens and fast.mode == "compiled")
    weights = gh.decode_limit(model, prompt_tokens + tokens // 2, read_rate)["bytes"]
    for label, record in (("eager", eager), ("compiled", fast)):
        rate = weights * record.tokens_per_second
        print(f"{label:8} decode {record.tokens_per_second:7.1f} tokens/s; {gh.format_size(weights)} read per token "
              f"-> {rate / 1e9:.0f} GB/s = {rate / read_rate:.2f} x the copy's read rate")
    print(f"compiled decode speedup: {fast.tokens_per_second / eager.tokens_per_second:.2f}x")
    diff = compare_outputs(eager.output_ids, eager.logits, fast.output_ids, fast.logits)
    print(f"first divergence: {diff['first_divergence']} (None: none in {diff['steps']} tokens); largest logit "
          f"difference before it {diff['largest_logit_difference']:.2e}")
    if not device.startswith("cuda"):  # float32 on the CPU: the same tokens; float16 on CUDA may part ways, reported
        check("compiled tokens equal eager's (float32)", diff["first_divergence"] is None)
    del model, compiled
    gh.release_memory()


def backend_missing(weights: str, backend: str | None = None, device: str = "cuda:0") -> str | None:
    """Why a quantized case cannot run here (its backend is not installed, or not for this device), else None."""
    try:
        check_backend(weights, backend, [device])
    except (MissingBackend, ValueError) as err:
        return str(err)
    return None


def quantized_full_size(tokens: int, weights: str, device: str = "cuda:0", full_size: bool = True) -> bool | None:
    """Notebook 08 at full size, or None (skipped, said why) where its backend is missing."""
    why = backend_missing(weights, device=device)
    if why:
        print(f"\n=== {weights} weights: SKIPPED, not passed ({why})")
        return None
    return quantized_case(tokens, weights, device, full_size)


@case("quantized weights on one device: memory against the plan, speed against the naive split's")
def quantized_case(tokens: int, weights: str, device: str = "cuda:0", full_size: bool = True) -> None:
    model_name, tokenizer_name, _, _ = sized(full_size, device)
    tokenizer = gh.load_tokenizer(tokenizer_name)
    plan = gh.plan_split(model_name, f"{device}={'14GiB' if full_size else '1GiB'}", dtype=torch.float16
                         if device.startswith("cuda") else torch.float32, weights=weights,
                         prompt_tokens=len(tokenizer(PROMPT)["input_ids"]), max_new_tokens=tokens)
    print(gh.format_plan(plan))
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    model = gh.place_quantized(model_name, plan)
    print(f"placed and quantized block by block in {time.perf_counter() - start:.1f} s")
    if cuda:
        loading_peak = torch.cuda.max_memory_allocated(device)
        block16 = gh.module_sizes(as_config(model_name), torch.float16)["block"]
        bound = plan.devices[0].param_bytes + 1.5 * block16
        check(f"peak while quantizing {gh.format_size(loading_peak)} within plan + 1.5 x one float16 block "
              f"{gh.format_size(bound)}", loading_peak <= bound)
    with gh.quiet_backends():
        gh.generate_text(model, tokenizer, PROMPT, max_new_tokens=4, greedy=True)  # warm-up
        _, record = gh.generate_text(model, tokenizer, PROMPT, max_new_tokens=tokens, greedy=True)
    check(f"generated {tokens} tokens", record.new_tokens == tokens)
    row, st = record.memory[0], plan.devices[0]
    ratio = row.param_bytes / st.param_bytes  # the plan may count high (safe), never low
    check(f"params: planned {gh.format_size(st.param_bytes)} | measured {gh.format_size(row.param_bytes)} (ratio "
          f"{ratio:.3f}): the plan counts at most 2% low and 10% high", 0.90 <= ratio <= 1.02)
    f16 = FLOAT16_TOKENS_PER_SECOND[-1] if FLOAT16_TOKENS_PER_SECOND else float("nan")
    print(f"decode {record.tokens_per_second:.1f} tokens/s vs the naive split's {f16:.1f} tokens/s (3 slices, same "
          f"device): ratio {record.tokens_per_second / f16:.2f}")
    del model
    gh.release_memory()


def greedy_ids(model, ids: torch.Tensor, device: str) -> torch.Tensor:
    """16 greedy tokens of stock `generate` on a model whose first stage is on `device`."""
    with torch.inference_mode(), gh.quiet_backends():
        return model.generate(ids.to(device), attention_mask=torch.ones_like(ids).to(device), do_sample=False,
                              max_new_tokens=16, pad_token_id=0).cpu()


@case("tiny: stock from_pretrained(device_map=plan.device_map()) equals place_stages / place_quantized")
def device_map_case(device: str = "cuda:0") -> None:
    tokenizer = gh.load_tokenizer("tiny")
    ids = tokenizer("The list", return_tensors="pt")["input_ids"]
    plan = gh.plan_split("tiny", f"{device}=1GiB,cpu=1GiB", dtype=torch.float32)  # accelerate attaches hooks here
    check(f"float32, {device} + cpu: device_map split == place_stages split",
          torch.equal(greedy_ids(gh.load_pretrained("tiny", plan), ids, device),
                      greedy_ids(gh.place_stages("tiny", plan), ids, device)))
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    for weights in ("int8", "nf4"):
        why = backend_missing(weights, "bitsandbytes", device)
        if why:
            print(f"{weights}: SKIPPED, not passed ({why})")
            continue
        split = gh.plan_split("tiny", f"{device}=1GiB,{device}=1GiB", dtype=dtype, weights=weights)
        whole = gh.plan_split("tiny", f"{device}=2GiB", dtype=dtype, weights=weights)
        stock = greedy_ids(gh.load_pretrained("tiny", split, backend="bitsandbytes"), ids, device)
        ours = greedy_ids(gh.place_quantized("tiny", split, backend="bitsandbytes"), ids, device)
        unsplit = greedy_ids(gh.place_quantized("tiny", whole, backend="bitsandbytes"), ids, device)
        check(f"{weights} (bitsandbytes): stock device_map == place_quantized", torch.equal(stock, ours))
        check(f"{weights} (bitsandbytes): quantized split == quantized unsplit", torch.equal(ours, unsplit))


@case("tiny split across a device and the CPU: greedy, sampled and beam search equal the unsplit model")
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
        check(f"{name:12} split == unsplit", torch.equal(*outs))


PROMPTS = ["The list", "A dictionary is", "Hello, world", "import os"]


def reference_ids(device: str, prompts: list[str]) -> torch.Tensor:
    """`generate_text`'s greedy tokens for the prompts, the unsplit tiny model on `device`."""
    model = gh.load_model("tiny", dtype=torch.float32, device=device)
    _, reference = gh.generate_text(model, gh.load_tokenizer("tiny"), prompts, max_new_tokens=12, greedy=True)
    return reference.output_ids


@case("pipeline, 2 stage processes on one device, equals generate")
def pipeline_on_one_gpu(device: str = "cuda:0") -> None:
    _, record = gh.run_pipeline("tiny", PROMPTS, f"{device}=2GiB,{device}=2GiB", micro_batches=2, max_new_tokens=12,
                                greedy=True, dtype=torch.float32)
    backend = "gloo"  # two stages on one device: NCCL refuses two ranks on one GPU
    check(f"backend {record.settings['backend']} (expected {backend}); tokens equal generate's",
          record.settings["backend"] == backend and torch.equal(record.output_ids, reference_ids(device, PROMPTS)))
    for row in record.memory:
        print(f"  stage {row.stage} on {row.device}: params {gh.format_size(row.param_bytes)}, CUDA peak "
              f"{gh.format_size(row.cuda_peak_bytes or 0)}, host peak RSS {gh.format_size(row.peak_rss_bytes or 0)}")


@case("pipeline over NCCL, one GPU per stage")
def pipeline_over_nccl() -> None:
    _, record = gh.run_pipeline("tiny", PROMPTS[:2], "cuda:0,cuda:1", max_new_tokens=12, greedy=True,
                                dtype=torch.float32)
    check(f"backend {record.settings['backend']} (expected nccl); tokens equal generate's",
          record.settings["backend"] == "nccl" and torch.equal(record.output_ids, reference_ids("cuda:0", PROMPTS[:2])))


@case("tensor parallel, 2 ranks on one device, equals generate; memory against the plan (notebook 07)")
def tensor_parallel_on_one_gpu(device: str = "cuda:0") -> None:
    reference = reference_ids(device, PROMPTS)
    for variant in ("block", "torch"):  # torch: DTensor; on a CUDA mesh over gloo, refused by name
        try:
            _, record = gh.run_tensor_parallel("tiny", PROMPTS, f"{device}=2GiB,{device}=2GiB", max_new_tokens=12,
                                               greedy=True, dtype=torch.float32, variant=variant)
        except ValueError as refusal:
            check(f"{variant}: refused by name on a shared GPU ({refusal})",
                  device.startswith("cuda") and variant == "torch")
            continue
        check(f"{variant}: backend {record.settings['backend']} (expected gloo); tokens equal generate's",
              record.settings["backend"] == "gloo" and torch.equal(record.output_ids, reference))
        for row, planned in zip(record.memory, record.plan.devices):
            print(f"  rank {row.stage} on {row.device}: params planned {gh.format_size(planned.param_bytes)} | "
                  f"measured {gh.format_size(row.param_bytes)}; planned total {gh.format_size(planned.total_bytes)} "
                  f"| CUDA peak {gh.format_size(row.cuda_peak_bytes or 0)}; host peak RSS "
                  f"{gh.format_size(row.peak_rss_bytes or 0)}")
    model = gh.load_model("tiny", dtype=torch.float32, device=device)  # seeded sampling: rank 0 draws on its device
    wanted, _ = gh.generate_text(model, gh.load_tokenizer("tiny"), PROMPTS[:1], max_new_tokens=12, seed=7)
    del model
    got, _ = gh.run_tensor_parallel("tiny", PROMPTS[:1], f"{device}=2GiB,{device}=2GiB", max_new_tokens=12, seed=7,
                                    dtype=torch.float32)
    check(f"seeded sampling equals generate_text(seed=7) on {device}", got == wanted)


@case("tensor parallel over NCCL, one GPU per rank")
def tensor_parallel_over_nccl() -> None:
    _, record = gh.run_tensor_parallel("tiny", PROMPTS[:2], "cuda:0,cuda:1", max_new_tokens=12, greedy=True,
                                       dtype=torch.float32)
    check(f"backend {record.settings['backend']} (expected nccl); tokens equal generate's",
          record.settings["backend"] == "nccl" and torch.equal(record.output_ids, reference_ids("cuda:0", PROMPTS[:2])))


CASES = {  # name -> run(device, tokens, full_size): True passed, False failed, None skipped (said why)
    "naive": lambda d, t, f: full_size_naive(t, d, f),
    "compiled": lambda d, t, f: compiled_case(t, d, f),
    "boundary": lambda d, t, f: tiny_across_a_real_boundary(d),
    "pipeline": lambda d, t, f: pipeline_on_one_gpu(d),
    "tensor-parallel": lambda d, t, f: tensor_parallel_on_one_gpu(d),
    "int8": lambda d, t, f: quantized_full_size(t, "int8", d, f),
    "nf4": lambda d, t, f: quantized_full_size(t, "nf4", d, f),
    "device-map": lambda d, t, f: device_map_case(d),
    "nccl": lambda d, t, f: all([pipeline_over_nccl(), tensor_parallel_over_nccl()])
    if torch.cuda.device_count() >= 2 else None,
}


def run_cases(device: str, tokens: int, full_size: bool, names: list[str]) -> int:
    """The prepared check: the named cases one after the other, each freeing its memory; 1 if any failed."""
    import transformers

    where = (f"{torch.cuda.device_count()} GPU(s): {torch.cuda.get_device_name(0)}" if torch.cuda.is_available()
             else "no CUDA")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {where}; cases on {device}, "
          f"{'full size' if full_size else 'reduced size (mini model)'}", flush=True)
    results = {name: CASES[name](device, tokens, full_size) for name in names}
    if results.get("nccl", False) is None:
        print("\n=== pipeline and tensor parallel over NCCL: SKIPPED, not passed (one GPU at most: NCCL refuses two "
              "ranks on one GPU)")
    ran = {name: ok for name, ok in results.items() if ok is not None}
    skipped = [name for name, ok in results.items() if ok is None]
    failed = [name for name, ok in ran.items() if not ok]
    print(f"\n{len(ran) - len(failed)} of {len(ran)} case(s) passed"
          + (f"; failed: {', '.join(failed)}" if failed else "")
          + (f"; skipped (not counted): {', '.join(skipped)}" if skipped else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
