"""Notebook 04, part 1: measurements. Scaling over device counts and prompt lengths, and every estimate beside
what was measured (memory per stage, time per decode step), so a learner sees where the model's numbers hold.
"""

from __future__ import annotations

import json
import os
import sys

import torch

from .models import REPO_DIR, module_sizes
from .hub import load_tokenizer, resolve_model
from .plan import kv_cache_bytes_per_layer, plan_split
from .records import RunRecord
from .place import place_stages
from .generate import generate_text


def utilisation(record: RunRecord) -> list[float]:
    """Each stage's busy time over the run's wall time (notebook 04)."""
    return [b / record.total_seconds for b in record.busy_seconds()]


def prompt_of_length(tokenizer, tokens: int, words: str = "The list of numbers is sorted. ") -> str:
    """The shortest prefix of repeated `words` that is `tokens` tokens long (or just over), for scaling runs
    (notebook 04)."""
    text = words
    while len(tokenizer(text)["input_ids"]) < tokens:
        text += words
    low, high = 1, len(text)
    while low < high:  # bisect the character length
        mid = (low + high) // 2
        low, high = (mid + 1, high) if len(tokenizer(text[:mid])["input_ids"]) < tokens else (low, mid)
    return text[:low]


def measure_scaling(model_name: str = "tiny", n_devices=(1, 2, 4, 8), prompt_lengths=(8, 64, 256),
                    fixed_devices: int = 4, max_new_tokens: int = 16, device: str = "cpu",
                    dtype: torch.dtype = torch.float32, reps: int = 3, threads: int | None = 1) -> list[dict]:
    """Greedy runs over 1 to 8 virtual devices and over prompt lengths, interleaved, best of `reps` each (notebook
    04)."""
    tokenizer = load_tokenizer(model_name)
    path = resolve_model(model_name)
    cases = [(n, prompt_lengths[0]) for n in n_devices] + [(fixed_devices, p) for p in prompt_lengths[1:]]
    models = {n: place_stages(path, plan_split(str(path), f"{n}x{device}", dtype=dtype, model_name=model_name))
              for n in dict.fromkeys(n for n, _ in cases)}
    prompts = {p: prompt_of_length(tokenizer, p) for _, p in cases}
    old_threads = torch.get_num_threads()
    if threads and device == "cpu":
        torch.set_num_threads(threads)
    try:
        runs: dict = {case: [] for case in cases}
        for _ in range(reps):
            for n, length in cases:
                runs[(n, length)].append(generate_text(models[n], tokenizer, prompts[length],
                                                       max_new_tokens=max_new_tokens, greedy=True)[1])
    finally:
        torch.set_num_threads(old_threads)
    rows = []
    for case in cases:
        best = max(runs[case], key=lambda r: r.tokens_per_second)
        rows.append({"n_devices": case[0], "prompt_tokens": best.settings["prompt_tokens"][0],
                     "tokens_per_second": best.tokens_per_second, "ms_per_token": 1000 / best.tokens_per_second,
                     "time_to_first_token_ms": min(r.time_to_first_token for r in runs[case]) * 1000,
                     "utilisation": utilisation(best)})
    return rows


def copy_seconds(src: str, dst: str, nbytes: int, reps: int = 5) -> float:
    """Fastest of `reps` copies of `nbytes` from one device to another, timed by `torch.utils.benchmark` (which
    synchronizes CUDA); 0 when both are the same device: placement copies nothing (notebook 04)."""
    from torch.utils import benchmark

    if torch.device(src) == torch.device(dst) or nbytes == 0:
        return 0.0
    x = torch.empty(nbytes, dtype=torch.uint8, device=src)
    timer = benchmark.Timer(stmt="x.to(dst)", globals={"x": x, "dst": dst}, num_threads=torch.get_num_threads())
    return min(timer.timeit(1).times[0] for _ in range(reps))


def compare_estimates(record: RunRecord, config) -> list[dict]:
    """Estimates beside measurements for one run: memory per device (the planner's formulas for the run's
    tokens) and the mean time per decode step (sum of the stages' mean times plus boundary copies, against
    the mean time between consecutive steps' starts on stage 0) (notebook 04)."""
    import statistics

    plan = record.plan
    dtype = getattr(torch, plan.dtype) if plan else torch.float32
    steps = max(e.step for e in record.events) + 1
    batch = record.settings.get("batch_size", 1)
    tokens = max(record.settings.get("prompt_tokens", [0])) + steps - 1
    rows = []
    for s, row in enumerate(record.memory):
        st = plan.devices[s] if plan else None
        n_blocks = (st.blocks[1] - st.blocks[0]) if st else config.n_layer
        planned_params = st.param_bytes if st else module_sizes(config, dtype)["total"]
        rows.append({"what": f"stage {s} parameters", "unit": "MiB", "estimate": planned_params / 2**20,
                     "measured": row.param_bytes / 2**20})
        rows.append({"what": f"stage {s} KV cache", "unit": "MiB",
                     "estimate": n_blocks * kv_cache_bytes_per_layer(config, dtype, tokens, batch) / 2**20,
                     "measured": row.kv_cache_bytes / 2**20})
        if row.cuda_peak_bytes is not None:
            rows.append({"what": f"stage {s} params+KV+activations vs CUDA peak ({row.device})", "unit": "MiB",
                         "estimate": sum(r.total_bytes for r in record.memory if r.device == row.device) / 2**20,
                         "measured": row.cuda_peak_bytes / 2**20})
    decode = [e for e in record.events if e.phase == "decode" and e.kind == "compute"]
    n = len(record.memory)
    per_stage = [statistics.mean([e.end - e.start for e in decode if e.stage == s] or [0.0]) for s in range(n)]
    devices = [r.device for r in record.memory]
    hidden = batch * config.n_embd * dtype.itemsize  # one token's hidden states per sequence cross each boundary
    transfer = sum(copy_seconds(devices[s], devices[s + 1], hidden) for s in range(n - 1))
    starts = sorted(e.start for e in decode if e.stage == 0)
    step_wall = statistics.mean(b - a for a, b in zip(starts, starts[1:])) if len(starts) > 1 else float("nan")
    rows.append({"what": "time per decode step (stages + copies)", "unit": "ms",
                 "estimate": (sum(per_stage) + transfer) * 1000, "measured": step_wall * 1000})
    for row in rows:
        row["ratio"] = row["measured"] / row["estimate"] if row["estimate"] else float("nan")
    return rows


def format_estimates(rows: list[dict]) -> str:
    """Estimate | measured | ratio, one line each (notebook 04)."""
    return "\n".join(f"{r['what']:44} estimate {r['estimate']:9.3f} {r['unit']:3} | measured {r['measured']:9.3f} "
                     f"{r['unit']:3} | ratio {r['ratio']:.2f}" for r in rows)


def decode_read_bytes(config, dtype: torch.dtype) -> int:
    """Bytes of weights one decode step reads: every block and the head; the embedding is a lookup of one row per
    token, so it is left out (notebooks 03, 04)."""
    from .models import module_sizes

    sizes = module_sizes(config, dtype)
    return sizes["total"] - sizes["embedding"]


def measure_weight_bandwidth(rows: int = 16384, cols: int = 4096, dtypes=(torch.float32, torch.bfloat16),
                             threads=(1, 2)) -> list[dict]:
    """Decode's core at batch 1, one linear layer of GPT-J's MLP (`fc_in`, 16384 x 4096) times one vector, per
    dtype and thread count: weight bytes read per second and multiply-adds per second, beside the bandwidth of a
    plain copy of the same bytes on one thread (notebook 04)."""
    from torch.utils import benchmark

    results = []
    for dtype in dtypes:
        weight = torch.randn(rows, cols).to(dtype)
        x = torch.randn(1, cols).to(dtype)
        nbytes = weight.numel() * weight.element_size()
        copy = torch.empty_like(weight)
        copy_s = benchmark.Timer("copy.copy_(weight)", globals={"copy": copy, "weight": weight},
                                 num_threads=1).blocked_autorange(min_run_time=0.3).median
        for n in threads:
            seconds = benchmark.Timer("torch.nn.functional.linear(x, weight)", globals={"x": x, "weight": weight},
                                      num_threads=n).blocked_autorange(min_run_time=0.3).median
            results.append({"dtype": str(dtype).removeprefix("torch."), "threads": n, "ms": seconds * 1e3,
                            "weights_gb_s": nbytes / seconds / 1e9, "gmacs": rows * cols / seconds / 1e9,
                            "copy_gb_s": 2 * nbytes / copy_s / 1e9})  # a copy reads and writes every byte
        del weight, copy
    return results


def format_bandwidth(rows: list[dict]) -> str:
    """The bandwidth table with a verdict per row, argued from its own numbers (notebook 04). The ceiling is the
    fastest this machine was seen to move memory (a copy, or any row's reading): a row near it waits on memory;
    a row well below it waits on arithmetic, and then a second thread helps."""
    ceiling = max([rows[0]["copy_gb_s"]] + [r["weights_gb_s"] for r in rows])
    one = {r["dtype"]: r for r in rows if r["threads"] == 1}
    lines = ["dtype     threads   ms/call   weights read   multiply-adds   of the ceiling   bound by"]
    for r in rows:
        share = r["weights_gb_s"] / ceiling
        if share >= 0.7:
            verdict = "memory bandwidth"
        elif r["threads"] == 1 or r["ms"] < 0.8 * one[r["dtype"]]["ms"]:
            verdict = "arithmetic" + (" (a second thread helps)" if r["threads"] > 1 else "")
        else:
            verdict = "neither alone: the threads get in each other's way"
        lines.append(f"{r['dtype']:9} {r['threads']:7} {r['ms']:9.2f} {r['weights_gb_s']:9.1f} GB/s "
                     f"{r['gmacs']:9.2f} G/s {share:12.0%}      {verdict}")
    lines.append(f"ceiling {ceiling:.1f} GB/s; a plain copy on one thread moved {rows[0]['copy_gb_s']:.1f} GB/s "
                 "(read + write)")
    return "\n".join(lines)


def measure_command(argv: list[str], timeout: float = 3600) -> dict:
    """Run `python -m gptj_helpers ARGV` in a fresh process: seconds, and peak RSS above its baseline after imports
    (notebook 01)."""
    import subprocess

    # the peak-RSS window opens after the imports (devices.reset_peak_rss and peak_rss)
    code = ("import json, resource, sys, time, numpy, psutil, safetensors.torch, tqdm.auto\n"
            "from gptj_split.cli import main\n"
            "from gptj_split.devices import peak_rss, reset_peak_rss\n"
            "from transformers import GPTJConfig\n"
            "base = reset_peak_rss() or psutil.Process().memory_info().rss\n"
            "start = time.perf_counter(); rc = main(sys.argv[1:]); seconds = time.perf_counter() - start\n"
            "peak = peak_rss() or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "print(json.dumps(dict(rc=rc, seconds=seconds, baseline=base, peak=peak)))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_DIR), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=timeout, env=env)
    result = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else {"rc": proc.returncode}
    if result["rc"] != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {proc.stderr.strip()[-2000:]}")
    return {**result, "peak_over_baseline": result["peak"] - result["baseline"]}


QUIET_SHARE = 0.10  # of the machine's cores: more CPU than this used by other processes is a busy machine


class LoadWatch:
    """Other processes' CPU use while the block runs (`make notebooks`): every process of the machine is sampled every
    `every` seconds; this process's descendants are ours, and stay ours once seen (a stage process whose parent has
    ended is orphaned, not someone else's). A process born and ended between two samples goes unseen."""

    def __init__(self, every: float = 0.5):
        import threading

        self.every, self.ours, self.first, self.last = every, set(), {}, {}
        self.started, self.wall = False, 0.0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def sample(self) -> None:
        """One look at every process: mark ours, note each one's CPU seconds so far."""
        import psutil

        procs = {}
        for proc in psutil.process_iter(["pid", "ppid", "cpu_times", "create_time"]):
            if proc.info["cpu_times"] is not None:
                procs[proc.info["pid"]] = proc.info
        me = os.getpid()
        for pid, info in procs.items():
            key, walk, hops = (pid, info["create_time"]), pid, 0
            while key not in self.ours and walk in procs and hops < 64:
                if walk == me or (walk, procs[walk]["create_time"]) in self.ours:
                    self.ours.add(key)
                walk, hops = procs[walk]["ppid"], hops + 1
            cpu = info["cpu_times"].user + info["cpu_times"].system
            self.first.setdefault(key, cpu if not self.started else 0.0)  # born during the watch: all of it counts
            self.last[key] = cpu
        self.started = True

    def run(self) -> None:
        while not self.stop.wait(self.every):
            self.sample()

    def __enter__(self) -> LoadWatch:
        import time

        self.start = time.monotonic()
        self.sample()
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        import time

        self.stop.set()
        self.thread.join()
        self.sample()
        self.wall = time.monotonic() - self.start

    def share(self) -> float:
        """Other processes' CPU seconds over the watch, as a share of all the machine's cores (0.25: a quarter)."""
        import psutil

        others = sum(self.last[k] - self.first[k] for k in self.last if k not in self.ours)
        return max(0.0, others) / max(self.wall, 1e-9) / (psutil.cpu_count() or 1)
