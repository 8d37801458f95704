"""The full-size rehearsal (`make rehearse`): does switching each notebook's settings line to GPT-J-6B fit?

Every notebook but 01 is executed headless with only its settings cell changed: the MODEL line becomes the
rehearsal line of `gh.SETUPS` (GPT-J-6B's shapes with seeded random weights, bfloat16, two CPU budgets) and
MAX_NEW_TOKENS becomes 4. A watchdog sums the RSS of every process the notebook starts (its kernel, and the
kernel's stage processes) twice a second, and ends the notebook before the machine runs out of memory.
Notebook 01 downloads or converts 12 GB, so instead a GPT-J-6B-width checkpoint of 2 blocks (real tensor
shapes) is converted from a single pytorch_model.bin and from the JAX slim layout, each in a fresh process.

Goals: every notebook completes within 1.0 x the model's bytes + 0.6 GiB per process it runs; the conversions
stay within 3 x the largest tensor over their baseline; all of it within 40 minutes on 2 cores.

    PYTHONPATH=. .venv/bin/python benchmarks/rehearse.py            # the real thing: 20 to 40 minutes, 14 GiB
    PYTHONPATH=. .venv/bin/python benchmarks/rehearse.py --quick    # the machinery on the tiny default, a minute
"""
import argparse
import atexit
import datetime
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import gptj_helpers as gh  # noqa: E402

REHEARSAL = "CPU only, rehearsal (random weights)"
GIB = 2**30


def rehearsal_source(source: str, line: str, max_new_tokens: int) -> str:
    """A settings cell with its MODEL line replaced by `line` and MAX_NEW_TOKENS set; refuses a cell without one."""
    if not re.search(r"^MODEL = ", source, flags=re.M):
        raise ValueError(f"no MODEL line in the settings cell:\n{source}")
    source = re.sub(r"^MODEL = .*$", line, source, count=1, flags=re.M)
    return re.sub(r"^MAX_NEW_TOKENS = \d+", f"MAX_NEW_TOKENS = {max_new_tokens}", source, flags=re.M)


class Watchdog:
    """Samples the summed RSS of this process's descendants; past `limit` bytes it kills them (the notebook fails)."""

    def __init__(self, limit: int, every: float = 0.5):
        self.limit, self.every, self.peak, self.pids, self.fired = limit, every, 0, set(), False
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stop.wait(self.every):
            procs = psutil.Process().children(recursive=True)
            total = 0
            for p in procs:
                try:
                    total += p.memory_info().rss
                    self.pids.add(p.pid)
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            if total > self.limit and not self.fired:
                self.fired = True
                for p in procs:
                    try:
                        p.kill()
                    except psutil.Error:
                        pass

    def __enter__(self) -> "Watchdog":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


def run_notebook(path: Path, line: str, max_new_tokens: int, limit: int, timeout: int) -> dict:
    """Execute one notebook with its settings line switched; seconds, peak RSS of its processes, and the outcome."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    cell = next(c for c in nb.cells if c.cell_type == "code" and c.source.startswith("# Settings"))
    cell.source = rehearsal_source(cell.source, line, max_new_tokens)
    start = time.perf_counter()
    error = None
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    with Watchdog(limit) as dog:
        try:
            client.execute()
        except Exception as err:  # reported in the table: a rehearsal goes on with the next notebook
            error = "ended by the watchdog (memory)" if dog.fired else f"{type(err).__name__}: {str(err)[-300:]}"
            # a kernel killed mid-cell leaves nbclient's exit hook registered, which would fail at exit
            atexit.unregister(client._cleanup_kernel)
    return {"name": path.name, "ok": error is None, "seconds": time.perf_counter() - start, "peak": dog.peak,
            "processes": max(1, len(dog.pids)), "error": error}


def gptj_width_config(blocks: int, quick: bool):
    """GPT-J-6B's config with only `blocks` blocks (the tiny default's shape with --quick)."""
    config = gh.tiny_config() if quick else gh.gptj_6b_config()
    config.n_layer = blocks
    return config


def rehearse_conversions(quick: bool, work: Path) -> list[dict]:
    """Notebook 01 at full width: a 2-block checkpoint from one pytorch_model.bin, and from the JAX slim layout."""
    from convert_memory import largest_merged_bytes, write_random_slim

    config = gptj_width_config(2, quick)
    jcfg = {**gh.jax_config_of(config), "layers": 2}
    largest = largest_merged_bytes(jcfg)
    rows = []
    bin_dir = work / "bin"
    bin_dir.mkdir()
    config.save_pretrained(str(bin_dir))
    state = {}
    for name, shape in ((n, p.shape) for n, p in gh.meta_model(config).named_parameters()):
        state[name] = gh.seeded_tensor(name, shape, config, 0, torch.float16, torch.device("cpu"))
    torch.save(state, bin_dir / "pytorch_model.bin")
    del state
    run = gh.measure_command(["convert-bin", str(bin_dir), str(work / "from-bin"), "--no-progress"])
    rows.append({"name": "01 from pytorch_model.bin", "seconds": run["seconds"], "peak": run["peak_over_baseline"],
                 "largest": largest})
    slim = work / "slim"
    write_random_slim(slim, jcfg)
    run = gh.measure_command(["convert-jax", str(slim), str(work / "from-jax"), "--config",
                              str(slim / "jax_config.json"), "--dtype", "float16", "--no-progress"])
    rows.append({"name": "01 from the JAX slim layout", "seconds": run["seconds"],
                 "peak": run["peak_over_baseline"], "largest": largest})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the machinery on the tiny default (a test runs this)")
    parser.add_argument("--notebooks", nargs="*", help="notebook names to run (default: all but 01)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per cell")
    parser.add_argument("--skip-conversions", action="store_true")
    args = parser.parse_args()
    setup = "CPU only (tiny default)" if args.quick else REHEARSAL
    line = gh.settings_line(setup)
    model, devices, dtype = gh.SETUPS[setup]
    model_bytes = gh.module_sizes(gh.load_config(model), getattr(torch, dtype))["total"]
    limit = psutil.virtual_memory().available - GIB  # the watchdog ends a notebook before the machine swaps
    paths = sorted((ROOT / "notebooks").glob("*.ipynb"))
    paths = [p for p in paths if not p.name.startswith("01_")]
    if args.notebooks:
        paths = [p for p in paths if any(p.name.startswith(n) for n in args.notebooks)]
    memory = psutil.virtual_memory().total
    print(f"rehearsal of {len(paths)} notebook(s) with `{line}`, MAX_NEW_TOKENS = 4; "
          f"model {gh.format_size(model_bytes)}; {psutil.cpu_count()} cores, {gh.format_size(memory)} RAM; "
          f"watchdog at {gh.format_size(limit)}; {datetime.date.today()}", flush=True)
    rows, start = [], time.perf_counter()
    env_out = os.environ.pop("GPTJ_HELPERS_OUT", None)  # figures of a rehearsal are not kept
    try:
        for path in paths:
            row = run_notebook(path, line, 4, limit, args.timeout)
            row["goal"] = model_bytes + 0.6 * GIB * row["processes"]
            rows.append(row)
            print(f"{row['name']}: {'completed' if row['ok'] else 'FAILED'} in {row['seconds']:.0f} s, peak RSS "
                  f"{gh.format_size(row['peak'])} over {row['processes']} process(es)"
                  + (f" ({row['error']})" if row["error"] else ""), flush=True)
    finally:
        if env_out is not None:
            os.environ["GPTJ_HELPERS_OUT"] = env_out
    conversions = []
    if not args.skip_conversions:
        with tempfile.TemporaryDirectory(prefix="gptj-rehearse-") as tmp:
            conversions = rehearse_conversions(args.quick, Path(tmp))
            shutil.rmtree(tmp, ignore_errors=True)
    total = time.perf_counter() - start
    print("\n| notebook | completed | seconds | peak RSS (all its processes) | / model | goal: model + 0.6 GiB x "
          "processes |")
    print("|---|---|---|---|---|---|")
    met = True
    for r in rows:
        ok = r["ok"] and r["peak"] <= r["goal"]
        met &= ok
        print(f"| {r['name']} | {'yes' if r['ok'] else 'no'} | {r['seconds']:.0f} | {gh.format_size(r['peak'])} "
              f"({r['processes']} processes) | {r['peak'] / model_bytes:.2f} | {gh.format_size(r['goal'])}: "
              f"{'met' if ok else 'NOT met'} |")
    for r in conversions:  # --quick: the tiny tensors are lost in the process's own noise, so no goal
        ok = r["peak"] <= 3 * r["largest"]
        met &= ok or args.quick
        verdict = "no goal at the tiny size" if args.quick else "met" if ok else "NOT met"
        print(f"| {r['name']} | yes | {r['seconds']:.0f} | {gh.format_size(r['peak'])} over baseline | "
              f"{r['peak'] / r['largest']:.2f} x largest tensor | 3 x largest tensor: {verdict} |")
    in_time = total <= 40 * 60 or args.quick
    met &= in_time
    print(f"\nall of it: {total / 60:.1f} minutes (goal: 40, {'met' if in_time else 'NOT met'}); "
          f"{'every goal met' if met else 'a goal was NOT met'}")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
