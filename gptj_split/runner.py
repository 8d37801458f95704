"""The notebook runner behind `make demo` and `make notebooks`: notebooks executed headless, in order, their copies
written elsewhere or back in place; outputs that will be committed are recorded on a quiet machine only.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from .measure import QUIET_SHARE, LoadWatch


def run_notebooks(paths: list[str | Path], out_dir: str | Path | None = None, inplace: bool = False,
                  timeout: int = 900, force: bool = False, watch: float = 60.0) -> list[tuple[Path, float]]:
    """Execute notebooks in order, headless; write copies to `out_dir`, or back in place, cleaned; the environment
    variable that points the kernels at `out_dir` is restored afterwards. In place (committed outputs), the machine
    must be quiet: other processes' CPU is measured for `watch` seconds before and during each notebook, and past
    QUIET_SHARE of the cores the run stops (unless `force`); what was seen goes into each notebook's metadata."""
    if inplace:
        load = check_quiet(watch, force)
    old = os.environ.get("GPTJ_HELPERS_OUT")
    if out_dir is not None:
        out_dir = Path(out_dir).resolve()
        (out_dir / "figures").mkdir(parents=True, exist_ok=True)
        os.environ["GPTJ_HELPERS_OUT"] = str(out_dir / "figures")  # the kernels inherit it: figures land there
    try:
        return [run_notebook(path, out_dir, inplace, timeout, {"before": load, "force": force} if inplace else None)
                for path in map(Path, sorted(paths))]
    finally:
        if old is None:
            os.environ.pop("GPTJ_HELPERS_OUT", None)
        else:
            os.environ["GPTJ_HELPERS_OUT"] = old


def check_quiet(seconds: float, force: bool = False) -> float:
    """Other processes' share of the cores over the next `seconds`; a busy machine stops the run unless `force`."""
    with LoadWatch() as watch:
        time.sleep(seconds)
    load = watch.share()
    print(f"other processes used {load:.0%} of the cores in the last {seconds:.0f} s", flush=True)
    if load > QUIET_SHARE and not force:
        raise RuntimeError(f"the machine is busy: other processes used {load:.0%} of its cores (more than "
                           f"{QUIET_SHARE:.0%}); committed outputs are recorded on a quiet machine. Stop them, or "
                           "force it (make notebooks FORCE=1, --force) and the notebooks record the load they saw")
    return load


def run_notebook(path: Path, out_dir: Path | None, inplace: bool, timeout: int,
                 quiet: dict | None = None) -> tuple[Path, float]:
    """Execute one notebook headless in its folder; write it to `out_dir` or back in place, without widget state;
    `quiet`: the load seen before the run, checked again during it and recorded in the notebook's metadata."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    with LoadWatch() as watch:
        NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=False,
                       extra_arguments=["--IPKernelApp.log_level=ERROR"],  # not its TCP notice, once per notebook
                       resources={"metadata": {"path": str(path.parent.resolve())}}).execute()
    seconds = time.perf_counter() - start
    nb.metadata.pop("widgets", None)  # widget state blobs are noise in a committed notebook
    if quiet is not None:
        during = watch.share()
        if during > QUIET_SHARE and not quiet["force"]:
            raise RuntimeError(f"{path.name}: other processes used {during:.0%} of the cores while it ran (more than "
                               f"{QUIET_SHARE:.0%}); its outputs were not written. Run again on a quiet machine, or "
                               "force it (make notebooks FORCE=1)")
        nb.metadata["recorded"] = {"others_cpu_share_before": round(quiet["before"], 3),
                                   "others_cpu_share_during": round(during, 3), "forced": quiet["force"]}
    target = path if inplace else (out_dir / path.name if out_dir else None)
    if target is not None:
        tmp = target.with_suffix(".tmp")
        nbformat.write(nb, tmp)
        os.replace(tmp, target)
    print(f"{path.name}: {seconds:.1f} s", flush=True)
    return path, seconds
