"""The full-size rehearsal (`make rehearse`): does switching each notebook's settings line to GPT-J-6B fit, on
the setups of README's table?

Each setup's line is mapped onto the CPU with the same number of devices and the same budgets (Colab's
`cuda:0=14GiB` becomes `cpu=14GiB`), with GPT-J-6B's shapes and seeded random weights, written once as safetensors
under the cache folder (`gh.random_gptj_files`), so stock `from_pretrained` reads them as it reads the real ones.
Every notebook but 01 runs in Colab's shape; 02 to 07 also in Kaggle's (two devices) and in 4 x 8 GB's.
Each runs headless with only its settings cell changed (that line, and MAX_NEW_TOKENS = 4), with the ledger of
`benchmarks/ledger.py`: per device of the plan, the bytes the kernel's placed models hold against its budget; the
host's bytes outside them against Colab's 12.7 GB; each stage or rank process against its device's budget. A
notebook fails if it exceeds any of them. Notebook 01 downloads or converts 12 GB, so instead a GPT-J-6B-width
checkpoint of 2 blocks is converted from a single pytorch_model.bin and from the JAX slim layout.

Goals: every notebook within its devices' budgets and the host's 12.7 GB; the conversions within 3 x the largest
tensor over their baseline; all setups within 90 minutes on 2 cores.

    PYTHONPATH=. .venv/bin/python benchmarks/rehearse.py                      # every setup: about an hour, 16 GiB
    PYTHONPATH=. .venv/bin/python benchmarks/rehearse.py --setup Kaggle       # one setup on its own
    PYTHONPATH=. .venv/bin/python benchmarks/rehearse.py --quick              # the machinery on the tiny default
"""
import argparse
import atexit
import datetime
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import gptj_helpers as gh  # noqa: E402
from gptj_split.convert import jax_config_of  # noqa: E402
from gptj_split.models import seeded_tensor  # noqa: E402
from gptj_split.setups import setup_hardware  # noqa: E402
from ledger import LEDGER_CELL, LEDGER_VARIABLE, Watchdog, read_ledger  # noqa: E402
from gptj_split.measure import measure_command  # noqa: E402

GIB = 2**30
HOST_LIMIT = 12.7e9  # Colab's RAM on the free tier: the smallest host of README's setups
TORCH_PROCESS = 0.6 * GIB  # what a stage or rank process holds beside its share: torch itself
SECOND_SETUPS = ("02", "03", "04", "05", "06", "07")
REHEARSED = {  # README's setup -> the notebooks rehearsed in its shape (None: all but 01)
    "Colab, 1 x T4 16 GB": None,
    "Kaggle, 2 x T4 16 GB": SECOND_SETUPS,
    "4 x 8 GB": SECOND_SETUPS,
}


def rehearsal_source(source: str, line: str, max_new_tokens: int) -> str:
    """A settings cell with its MODEL line replaced by `line` and MAX_NEW_TOKENS set; refuses a cell without one."""
    if not re.search(r"^MODEL = ", source, flags=re.M):
        raise ValueError(f"no MODEL line in the settings cell:\n{source}")
    source = re.sub(r"^MODEL = .*$", line, source, count=1, flags=re.M)
    return re.sub(r"^MAX_NEW_TOKENS = \d+", f"MAX_NEW_TOKENS = {max_new_tokens}", source, flags=re.M)


def cpu_devices(setup: str, quick: bool) -> str:
    """A README line's devices on the CPU: as many, with the same budgets (with --quick, budgets the tiny model
    fills as GPT-J-6B fills the real ones)."""
    spec = gh.SETUPS[setup][1]
    budgets = [d.budget_bytes for d in gh.parse_devices(spec, setup_hardware(setup))]
    if quick:
        return ",".join(f"cpu={max(4, 24 // len(budgets))}MiB" for _ in budgets)
    return ",".join(f"cpu={b / GIB:g}GiB" for b in budgets)


def setup_line(setup: str, quick: bool) -> str:
    """The settings line a setup is rehearsed with."""
    model = "tiny" if quick else str(gh.random_gptj_files())
    dtype = "float32" if quick else "bfloat16"
    return f'MODEL = "{model}"; DEVICES = "{cpu_devices(setup, quick)}"; DTYPE = torch.{dtype}'


def run_notebook(path: Path, line: str, max_new_tokens: int, limit: int, timeout: int) -> dict:
    """Execute one notebook with its settings line switched and the ledger first: seconds, the watchdog's peaks, the
    ledger's line after each cell, and the outcome."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    cell = next(c for c in nb.cells if c.cell_type == "code" and c.source.startswith("# Settings"))
    cell.source = rehearsal_source(cell.source, line, max_new_tokens)
    nb.cells.insert(0, nbformat.v4.new_code_cell(LEDGER_CELL))
    ledger = Path(tempfile.mkstemp(prefix="gptj-ledger-", suffix=".jsonl")[1])
    by_cell: dict[int, dict] = {}

    def complete(cell=None, cell_index: int = -1, **_) -> None:
        lines = read_ledger(ledger)
        if len(lines) > len(by_cell):
            by_cell[cell_index - 1] = lines[-1]  # the notebook's own cell numbers: the ledger's cell is -1

    start, error = time.perf_counter(), None
    os.environ[LEDGER_VARIABLE] = str(ledger)  # the kernel inherits it
    try:
        with Watchdog(limit) as dog:
            client = NotebookClient(nb, timeout=timeout, kernel_name="python3", on_cell_start=dog.start_cell,
                                    on_cell_complete=complete, extra_arguments=["--IPKernelApp.log_level=ERROR"],
                                    resources={"metadata": {"path": str(path.parent)}})
            try:
                client.execute()
            except Exception as err:  # reported in the table: a rehearsal goes on with the next notebook
                error = "ended by the watchdog (memory)" if dog.fired else f"{type(err).__name__}: {str(err)[-300:]}"
                # a kernel killed mid-cell leaves nbclient's exit hook registered, which would fail at exit
                atexit.unregister(client._cleanup_kernel)
    finally:
        os.environ.pop(LEDGER_VARIABLE, None)
        ledger.unlink(missing_ok=True)
    sources = {i - 1: c.source for i, c in enumerate(nb.cells)}
    return {"name": path.name, "ok": error is None, "seconds": time.perf_counter() - start, "peak": dog.peak,
            "kernel_peaks": {i - 1: v for i, v in dog.kernel_peaks.items()},
            "total_peaks": {i - 1: v for i, v in dog.total_peaks.items()},
            "process_peaks": dog.process_peaks, "ledger": by_cell, "sources": sources, "error": error}


def judge(row: dict, check_processes: bool = True) -> dict:
    """Each device's peak against its budget, the host's peak outside the devices against Colab's 12.7 GB, and each
    stage or rank process against the largest budget (plus torch's own share). Without `check_processes` (the tiny
    rehearsal, whose budgets of a few MiB no process fits) the processes are reported only."""
    devices: dict[str, dict] = {}
    for entry in row["ledger"].values():
        for s, d in entry["devices"].items():
            held = devices.setdefault(s, {"device": d["device"], "budget": d["budget"], "peak": 0})
            held["peak"] = max(held["peak"], d["bytes"])
    host = {cell: entry.get("host", 0) for cell, entry in row["ledger"].items()}
    largest_budget = max((d["budget"] for d in devices.values()), default=0)
    process_peak = max(row["process_peaks"].values(), default=0)
    verdict = {
        "devices": devices,
        "devices_ok": all(d["peak"] <= d["budget"] for d in devices.values()),
        "host": max(host.values(), default=0),
        "host_cell": max(host, key=host.get, default=None),
        "processes": len(row["process_peaks"]),
        "process_peak": process_peak,
        "processes_ok": (not check_processes or not row["process_peaks"]
                         or process_peak <= largest_budget + TORCH_PROCESS),
    }
    verdict["host_ok"] = verdict["host"] <= HOST_LIMIT
    verdict["ok"] = row["ok"] and verdict["devices_ok"] and verdict["host_ok"] and verdict["processes_ok"]
    return verdict


def format_cells(row: dict, count: int = 5) -> list[str]:
    """The cells with the highest peak of every process together, with their first line."""
    worst = sorted(row["total_peaks"].items(), key=lambda kv: -kv[1])[:count]
    return [f"    cell {cell}: {gh.format_size(peak)} in all, the kernel {gh.format_size(row['kernel_peaks'][cell])}: "
            f"{row['sources'].get(cell, '').splitlines()[0][:70] if row['sources'].get(cell) else ''}"
            for cell, peak in worst if cell >= 0]


def format_row(row: dict, verdict: dict) -> str:
    """One notebook's line of a setup's table."""
    devices = " / ".join(f"{gh.format_size(d['peak'])} of {gh.format_size(d['budget'])}"
                         for _, d in sorted(verdict["devices"].items(), key=lambda kv: (-kv[1]["budget"], kv[0])))
    devices = devices or "no placed model"
    processes = (f"{verdict['processes']}, largest {gh.format_size(verdict['process_peak'])}"
                 if verdict["processes"] else "none")
    return (f"| {row['name']} | {'yes' if row['ok'] else 'no'} | {row['seconds']:.0f} | {devices} | "
            f"{gh.format_size(verdict['host'])} (cell {verdict['host_cell']}) | {processes} | "
            f"{gh.format_size(row['peak'])} | {'met' if verdict['ok'] else 'NOT met'} |")


def gptj_width_config(blocks: int, quick: bool):
    """GPT-J-6B's config with only `blocks` blocks (the tiny default's shape with --quick)."""
    config = gh.tiny_config() if quick else gh.gptj_6b_config()
    config.n_layer = blocks
    return config


def rehearse_conversions(quick: bool, work: Path) -> list[dict]:
    """Notebook 01 at full width: a 2-block checkpoint from one pytorch_model.bin, and from the JAX slim layout."""
    from convert_memory import largest_merged_bytes, write_random_slim

    config = gptj_width_config(2, quick)
    jcfg = {**jax_config_of(config), "layers": 2}
    largest = largest_merged_bytes(jcfg)
    rows = []
    bin_dir = work / "bin"
    bin_dir.mkdir()
    config.save_pretrained(str(bin_dir))
    state = {}
    for name, shape in ((n, p.shape) for n, p in gh.meta_model(config).named_parameters()):
        state[name] = seeded_tensor(name, shape, config, 0, torch.float16, torch.device("cpu"))
    torch.save(state, bin_dir / "pytorch_model.bin")
    del state
    run = measure_command(["convert-bin", str(bin_dir), str(work / "from-bin"), "--no-progress"])
    rows.append({"name": "01 from pytorch_model.bin", "seconds": run["seconds"], "peak": run["peak_over_baseline"],
                 "largest": largest})
    slim = work / "slim"
    write_random_slim(slim, jcfg)
    run = measure_command(["convert-jax", str(slim), str(work / "from-jax"), "--config",
                              str(slim / "jax_config.json"), "--dtype", "float16", "--no-progress"])
    rows.append({"name": "01 from the JAX slim layout", "seconds": run["seconds"],
                 "peak": run["peak_over_baseline"], "largest": largest})
    return rows


def rehearse_setup(setup: str, args, limit: int) -> bool:
    """Every notebook of one setup, one after the other; prints its table and returns whether every goal was met."""
    line = setup_line(setup, args.quick)
    wanted = args.notebooks or REHEARSED[setup] or ()
    paths = [p for p in sorted((ROOT / "notebooks").glob("*.ipynb")) if not p.name.startswith("01_")]
    if wanted:
        paths = [p for p in paths if any(p.name.startswith(n) for n in wanted)]
    print(f"\n## {setup}: {len(paths)} notebook(s) with `{line}`, MAX_NEW_TOKENS = 4", flush=True)
    rows = []
    for path in paths:
        row = run_notebook(path, line, 4, limit, args.timeout)
        verdict = judge(row, check_processes=not args.quick)
        rows.append((row, verdict))
        print(f"{row['name']}: {'completed' if row['ok'] else 'FAILED'} in {row['seconds']:.0f} s"
              + (f" ({row['error']})" if row["error"] else ""), flush=True)
    print("\n| notebook | completed | seconds | each device: peak held of its budget | host outside the devices "
          f"(goal {HOST_LIMIT / 1e9:.1f} GB) | stage or rank processes | all processes | goals |")
    print("|---|---|---|---|---|---|---|---|")
    for row, verdict in rows:
        print(format_row(row, verdict))
    for row, verdict in rows:
        if not verdict["ok"]:
            print(f"{row['name']}, the cells with the highest peaks:", *format_cells(row), sep="\n")
    return all(verdict["ok"] for _, verdict in rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the machinery on the tiny default (a test runs this)")
    parser.add_argument("--setup", action="append", choices=list(REHEARSED), metavar="SETUP",
                        help=f"a setup of README's table (default: all of {', '.join(REHEARSED)}); repeatable")
    parser.add_argument("--notebooks", nargs="*", help="notebook names to run (default: the setup's)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per cell")
    parser.add_argument("--skip-conversions", action="store_true")
    args = parser.parse_args()
    setups = args.setup or list(REHEARSED)
    limit = psutil.virtual_memory().available - GIB  # the watchdog ends a notebook before the machine swaps
    model = "tiny" if args.quick else gh.GPTJ_6B_RANDOM
    model_bytes = gh.module_sizes(gh.load_config(model), torch.float32 if args.quick else torch.bfloat16)["total"]
    print(f"rehearsal of {', '.join(setups)}; model {gh.format_size(model_bytes)}; {psutil.cpu_count()} cores, "
          f"{gh.format_size(psutil.virtual_memory().total)} RAM; watchdog at {gh.format_size(limit)}; "
          f"{datetime.date.today()}", flush=True)
    start = time.perf_counter()
    if not args.quick:
        print(f"weights on disk: {gh.random_gptj_files()} (written once)", flush=True)
    met = True
    env_out = os.environ.pop("GPTJ_HELPERS_OUT", None)  # figures of a rehearsal are not kept
    try:
        for setup in setups:
            met &= rehearse_setup(setup, args, limit)
    finally:
        if env_out is not None:
            os.environ["GPTJ_HELPERS_OUT"] = env_out
    conversions = []
    if not args.skip_conversions:
        with tempfile.TemporaryDirectory(prefix="gptj-rehearse-") as tmp:
            conversions = rehearse_conversions(args.quick, Path(tmp))
            shutil.rmtree(tmp, ignore_errors=True)
    if conversions:
        print("\n| notebook 01 | completed | seconds | peak RSS over its baseline | / largest tensor | goal |")
        print("|---|---|---|---|---|---|")
    for r in conversions:  # --quick: the tiny tensors are lost in the process's own noise, so no goal
        ok = r["peak"] <= 3 * r["largest"]
        met &= ok or args.quick
        verdict = "no goal at the tiny size" if args.quick else "met" if ok else "NOT met"
        print(f"| {r['name']} | yes | {r['seconds']:.0f} | {gh.format_size(r['peak'])} | "
              f"{r['peak'] / r['largest']:.2f} | 3 x largest tensor: {verdict} |")
    total = time.perf_counter() - start
    in_time = total <= 90 * 60 or args.quick
    met &= in_time
    print(f"\nall of it: {total / 60:.1f} minutes (goal: 90, {'met' if in_time else 'NOT met'}); "
          f"{'every goal met' if met else 'a goal was NOT met'}")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
