"""Full-size check on the CPU: GPT-J-6B's real architecture in bfloat16, split over two processes, measured.

Everything else in this project runs on a tiny stand-in; this script shows that splitting, memory accounting and
the pipeline hold at the real size (random weights: the real ones cannot be downloaded everywhere, and the
numbers do not depend on the values). Each stage process materialises only its own stage's weights, tensor by
tensor from per-tensor seeds (`gh.place_stages` on a folder written by `write_random_model`: a config and a
seed, no weights on disk), so any process rebuilds any module identically.

1. measures this machine's copy bandwidth (one core, then all), the physical limit of decoding;
2. runs the 2-stage pipeline, one process per core, for a short prompt and 8 new tokens, greedy;
3. after those processes have exited, builds the naive split over 2 virtual devices in this process (the only
   time the whole model is in one process) from the same seeds, generates the same tokens, and checks they are
   identical to the pipeline's;
4. prints per stage: planned bytes, measured parameter bytes, KV-cache bytes, peak RSS over the process's
   baseline and the ratio peak / planned (goal <= 1.1); the time to build, time per token (prefill, decode) and
   the bandwidth achieved per token (bytes of weights read / time per token) beside the copy bandwidth.

It checks first that the memory it needs is free (about 14 GiB at full size) and refuses otherwise.

    PYTHONPATH=. .venv/bin/python benchmarks/full_size_cpu.py                        # GPT-J-6B: ~14 GiB, minutes
    PYTHONPATH=. .venv/bin/python benchmarks/full_size_cpu.py --layers 4             # full width, 4 blocks: ~3 GiB
    PYTHONPATH=. .venv/bin/python benchmarks/full_size_cpu.py --layers 2 --width 512 # reduced: seconds (the test)
"""
import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import gptj_helpers as gh  # noqa: E402
from gptj_split.devices import peak_rss, reset_peak_rss  # noqa: E402
from gptj_split.generate import StageRecorder  # noqa: E402
from gptj_split.random_models import write_random_model  # noqa: E402
from common import copy_tiny_tokenizer  # noqa: E402
from gptj_split.compare import time_generate as one_clock_generate  # noqa: E402

# GPT-2 / GPT-J token ids of "The quick brown fox jumps over the lazy dog." (no GPT-J tokenizer offline)
PROMPT_IDS = [464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13]
INTERPRETER_BYTES = 512 * 2**20  # torch + transformers in one process: this one and each stage process
GOAL = 1.1  # peak RSS over baseline / planned bytes
GB = 1e9


def cpu_name() -> str:
    """The processor's model name (Linux), else what the platform module says."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        return next(line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def build_config(layers: int | None, width: int | None):
    """GPT-J-6B's config, optionally with fewer blocks or a narrower width (heads of 256, as GPT-J's)."""
    config = gh.gptj_6b_config()
    if layers is not None:
        config.n_layer = layers
    if width is not None:
        if width % 256:
            raise SystemExit(f"--width {width}: use a multiple of 256 (GPT-J's heads are 256 wide)")
        config.n_embd, config.n_head = width, width // 256
    if config.n_layer < 2:
        raise SystemExit(f"--layers {config.n_layer}: two stages need at least 2 blocks")
    return config


def needed_bytes(plan: gh.Plan, processes: int) -> int:
    """Free memory to ask for: the goal's 1.1 x planned bytes, plus the interpreters (torch, transformers)."""
    return int(GOAL * sum(s.param_bytes + s.kv_cache_bytes for s in plan.devices)) + processes * INTERPRETER_BYTES


def check_free_memory(need: int, what: str) -> None:
    """Refuse to start when less than `need` bytes are free: never push the machine into swap or the OOM killer."""
    free = psutil.virtual_memory().available
    if free < need:
        raise SystemExit(f"refusing to start {what}: it needs about {gh.format_size(need)} of free memory and only "
                         f"{gh.format_size(free)} is available now. Close other programs (or wait for them), or run "
                         f"a reduced model: --layers 4 (full width, about 3 GiB) or --layers 2 --width 512.")


def copy_bandwidth(nbytes: int, threads: int, reps: int = 5) -> float:
    """Bytes moved per second (read + written, STREAM's "copy" convention) copying one large tensor; the best of
    `reps`."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        src = torch.ones(nbytes, dtype=torch.uint8)
        dst = torch.empty_like(src)
        dst.copy_(src)  # touch every page once before timing
        best = float("inf")
        for _ in range(reps):
            start = time.perf_counter()
            dst.copy_(src)
            best = min(best, time.perf_counter() - start)
        return 2 * nbytes / best
    finally:
        torch.set_num_threads(old)


def weights_read_per_token(plan: gh.Plan, config, stage: int) -> int:
    """Bytes of weights a decode step reads on a stage: all of them, except the embedding, of which one row."""
    st = plan.devices[stage]
    if not st.embedding:
        return st.param_bytes
    row = plan.module_bytes["embedding"] // config.vocab_size
    return st.param_bytes - plan.module_bytes["embedding"] + row


def stage_seconds(events: list[gh.TimingEvent], n_stages: int) -> list[dict]:
    """Per stage: compute seconds of the prefill and the mean compute seconds of one decode step."""
    rows = []
    for s in range(n_stages):
        compute = [e for e in events if e.stage == s and e.kind == "compute"]
        prefill = sum(e.end - e.start for e in compute if e.step == 0)
        decode = [e.end - e.start for e in compute if e.step > 0]
        rows.append({"prefill": prefill, "decode": statistics.mean(decode) if decode else float("nan")})
    return rows


def time_generate(model, ids: torch.Tensor, new_tokens: int, threads: int) -> dict:
    """Greedy generate with `threads` intra-op threads after a 2-token warm-up: tokens, cache, prefill seconds, mean
    seconds per decode step (gptj_split.compare.time_generate, the one clock), and each stage's compute seconds."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        one_clock_generate(model, ids, 2)  # warm-up
        with StageRecorder(model) as recorder:
            timing = one_clock_generate(model, ids, new_tokens)
    finally:
        torch.set_num_threads(old)
    run = {"sequences": timing["sequences"], "cache": timing["cache"], "prefill": timing["prefill"],
           "decode": timing["decode_step"], "seconds": timing["total"]}
    return {**run, "stages": stage_seconds(recorder.events(), len(model.plan.devices))}


def run_naive(config, plan: gh.Plan, ids: torch.Tensor, new_tokens: int, seed: int, threads: list[int]) -> dict:
    """Build the naive split in this process from the seeds; generate with each thread count; peak RSS over it all."""
    baseline = reset_peak_rss()
    start = time.perf_counter()
    model = gh.place_stages(config, plan, torch.bfloat16, seed=seed)
    build = time.perf_counter() - start
    runs = {t: time_generate(model, ids, new_tokens, t) for t in threads}
    peak = peak_rss()
    memory = gh.measure_memory(model, runs[threads[-1]]["cache"])
    for run in runs.values():
        del run["cache"]
    del model
    return {"build": build, "runs": runs, "memory": memory, "peak": None if baseline is None else peak - baseline}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, help="blocks (default: GPT-J-6B's 28)")
    parser.add_argument("--width", type=int, help="hidden size, a multiple of 256 (default: GPT-J-6B's 4096)")
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds a stage waits for its neighbour")
    args = parser.parse_args()
    config = build_config(args.layers, args.width)
    full = args.layers is None and args.width is None
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        print("this benchmark needs two CPU cores (one per stage process)")
        return 1
    dtype = torch.bfloat16
    ids = torch.tensor([PROMPT_IDS])
    name = "GPT-J-6B" if full else f"GPT-J-6B reduced to {config.n_layer} blocks x {config.n_embd} wide"
    try:
        plan = gh.plan_split(config, "cpu,cpu", dtype=dtype, prompt_tokens=ids.shape[1],
                             max_new_tokens=args.new_tokens, model_name=f"{name} (random weights)")
    except MemoryError as err:
        raise SystemExit(f"refusing to start: {err}") from None
    need = needed_bytes(plan, processes=3)
    print(f"{name}, random weights, bfloat16; {cpu_name()}, {len(cores)} cores, "
          f"{gh.format_size(psutil.virtual_memory().total)} RAM; torch {torch.__version__}; {datetime.date.today()}")
    print(gh.format_plan(plan))
    print(f"free memory: {gh.format_size(psutil.virtual_memory().available)}, needs about {gh.format_size(need)}",
          flush=True)
    check_free_memory(need, "the pipeline")

    # 1. the machine's limit: a large copy, on one core (what one stage process has) and on all
    copy_bytes = min(2**30, max(256 * 2**20, max(s.param_bytes for s in plan.devices) // 4))
    bandwidth = {t: copy_bandwidth(copy_bytes, t) for t in sorted({1, len(cores)})}
    print(f"copy bandwidth ({gh.format_size(copy_bytes)} tensor, read + write): "
          + ", ".join(f"{t} thread(s) {b / GB:.1f} GB/s" for t, b in bandwidth.items()), flush=True)

    # 2. the pipeline: one process per stage, one thread each, pinned to its own core
    with tempfile.TemporaryDirectory(prefix="gptj-full-size-") as tmp:
        folder = write_random_model(config, Path(tmp) / "model", seed=args.seed)
        copy_tiny_tokenizer(folder)
        mask = torch.ones_like(ids)
        jobs = [gh.make_job(ids, mask, 1, max_new_tokens=2, greedy=True, seed=0),  # warm-up
                gh.make_job(ids, mask, 1, max_new_tokens=args.new_tokens, greedy=True, seed=0)]
        start = time.perf_counter()
        options = gh.LaunchOptions(timeout=args.timeout, threads=1, affinity=[[cores[0]], [cores[1]]])
        record = gh.run_pipeline(str(folder), jobs, plan=plan, dtype=dtype, options=options)[-1]
        pipeline_wall = time.perf_counter() - start
    print(f"pipeline: 2 stage processes done in {pipeline_wall:.1f} s (start, build, warm-up, run, exit)", flush=True)

    # 3. the naive split, in this process, once the stage processes are gone
    need_naive = needed_bytes(plan, processes=0)
    check_free_memory(need_naive, "the naive split")
    threads = sorted({1, len(cores)})
    naive = run_naive(config, plan, ids, args.new_tokens, args.seed, threads)
    new_ids = record.output_ids[0, ids.shape[1]:].tolist()
    print(f"naive split: built in {naive['build']:.1f} s in this process")
    print(f"new token ids, pipeline:{'':12} {new_ids}")
    same = True
    for t, run in naive["runs"].items():
        same = same and torch.equal(record.output_ids, run["sequences"])
        print(f"new token ids, naive on {t} thread(s): {run['sequences'][0, ids.shape[1]:].tolist()}")
    print(f"tokens identical: {same}")

    # 4. the table
    pipe_stages = stage_seconds(record.events, len(plan.devices))
    read = [weights_read_per_token(plan, config, s) for s in range(len(plan.devices))]
    print("\nmemory per stage (pipeline: each stage process's own peak RSS over its baseline after imports):")
    print("stage  blocks  planned params   measured params  planned KV  measured KV  planned total  "
          "peak RSS over base  peak / planned")
    ratios = []
    for s, (st, row) in enumerate(zip(plan.devices, record.memory)):
        planned = st.param_bytes + st.kv_cache_bytes
        peak = row.peak_rss_bytes
        ratios.append(peak / planned if peak is not None else float("nan"))
        print(f"{s:5}  {st.blocks[0]:2}-{st.blocks[1] - 1:<3} {gh.format_size(st.param_bytes):>14}  "
              f"{gh.format_size(row.param_bytes):>16}  {gh.format_size(st.kv_cache_bytes):>10}  "
              f"{gh.format_size(row.kv_cache_bytes):>11}  {gh.format_size(planned):>13}  "
              f"{gh.format_size(peak) if peak is not None else 'n/a':>18}  {ratios[-1]:14.2f}")
    planned_all = sum(s.param_bytes + s.kv_cache_bytes for s in plan.devices)
    naive_params = sum(r.param_bytes for r in naive["memory"])
    naive_kv = sum(r.kv_cache_bytes for r in naive["memory"])
    naive_ratio = naive["peak"] / planned_all if naive["peak"] is not None else float("nan")
    print(f"naive  (one process, both stages): measured params {gh.format_size(naive_params)}, "
          f"KV {gh.format_size(naive_kv)}, planned total {gh.format_size(planned_all)}, peak RSS over base "
          f"{gh.format_size(naive['peak']) if naive['peak'] is not None else 'n/a'}, peak / planned {naive_ratio:.2f}")
    worst = max([*ratios, naive_ratio])
    print(f"worst peak / planned: {worst:.2f} (goal <= {GOAL}): {'met' if worst <= GOAL else 'NOT met'}")

    print("\ntime (one run after a 2-token warm-up; timings on a shared machine are noisy):")
    loads = [row.load_seconds for row in record.memory]
    print(f"build: pipeline stages {' / '.join(f'{x:.1f}' for x in loads)} s (in parallel, one core each); "
          f"naive {naive['build']:.1f} s")
    pipe_decode = 1 / record.tokens_per_second
    print(f"pipeline: prefill (time to first token) {record.time_to_first_token:.2f} s, "
          f"decode {pipe_decode:.3f} s/token")
    for t, run in naive["runs"].items():
        print(f"naive on {t} thread(s): prefill {run['prefill']:.2f} s, decode {run['decode']:.3f} s/token")
    print("bandwidth achieved in decode (weights read per token / time per token) beside the copy bandwidth:")
    for s, row in enumerate(pipe_stages):
        achieved = read[s] / row["decode"]
        print(f"  pipeline stage {s} ({gh.format_size(read[s])} read, {row['decode']:.3f} s compute, 1 core): "
              f"{achieved / GB:.1f} GB/s = {achieved / bandwidth[1]:.2f} x copy on 1 core "
              f"({bandwidth[1] / GB:.1f} GB/s)")
    total_read = sum(read)
    rows = [("pipeline, whole token", pipe_decode, 1)]
    rows += [(f"naive on {t} thread(s)", run["decode"], t) for t, run in naive["runs"].items()]
    for label, seconds, t in rows:
        achieved = total_read / seconds
        print(f"  {label} ({gh.format_size(total_read)} read, {seconds:.3f} s): {achieved / GB:.1f} GB/s "
              f"= {achieved / bandwidth[t]:.2f} x copy on {t} core(s) ({bandwidth[t] / GB:.1f} GB/s)")

    if full or os.environ.get("FULL_SIZE_SUMMARY"):
        blocks = " / ".join(str(s.blocks[1] - s.blocks[0]) for s in plan.devices)
        peaks = [row.peak_rss_bytes or 0 for row in record.memory]
        fullest = max(range(len(peaks)), key=lambda s: peaks[s])
        when = datetime.date.today().isoformat()
        print("\n--- summary to paste (README 'Which setup do I have?' and notebook 04) ---")
        print(f"| CPU only, full size (measured: random weights, bfloat16, 2 cores, "
              f"{gh.format_size(psutil.virtual_memory().total)} RAM) | "
              f"`MODEL = \"gpt-j-6b\"; DEVICES = \"cpu,cpu\"; DTYPE = torch.bfloat16` | {blocks} | "
              f"peak RSS {gh.format_size(peaks[fullest])} per stage process, {ratios[fullest]:.2f} x planned |")
        print(f"Measured on {when} with `PYTHONPATH=. .venv/bin/python benchmarks/full_size_cpu.py` "
              f"({cpu_name()}, {len(cores)} cores, "
              f"{gh.format_size(psutil.virtual_memory().total)} RAM; GPT-J-6B's architecture with random weights, "
              f"bfloat16, 2-stage pipeline, one process per core): peak RSS / planned "
              f"{' / '.join(f'{r:.2f}' for r in ratios)} per stage (naive split in one process {naive_ratio:.2f}); "
              f"build {max(loads):.0f} s; prefill of {ids.shape[1]} tokens {record.time_to_first_token:.1f} s; "
              f"decode {pipe_decode:.2f} s/token pipelined ({total_read / pipe_decode / GB:.1f} GB/s of weights "
              f"read; copy bandwidth {bandwidth[1] / GB:.1f} GB/s on 1 core); naive split in one process "
              + ", ".join(f"{run['decode']:.2f} s/token on {t} thread(s) ({total_read / run['decode'] / GB:.1f} GB/s; "
                          f"copy {bandwidth[t] / GB:.1f} GB/s)" for t, run in naive["runs"].items())
              + f"; {len(new_ids)} greedy tokens identical: {same}.")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
