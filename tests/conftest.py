"""Shared fixtures: an isolated model cache and the tiny default, built once per test session."""
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")  # tests draw figures without a display
# Under pytest-xdist each worker, and every process it starts (kernels, stages, ranks), gets its share of the cores:
# two workers of two threads each on two cores spend their time waiting on each other's threads (a teacher-forced
# pass on the tiny model took 2.4x longer beside a 2-thread load, 1.0x on one thread). Tests and cells that
# measure threads set their own.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // WORKERS)))

ROOT = Path(__file__).resolve().parents[1]
FAULTS = ROOT / "tests" / "faults"  # the test-only route for faults into rank processes (its sitecustomize.py)
# first on the path of every process the tests start, before any rank runs (so the ranks' fork server has it too)
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(FAULTS), os.environ.get("PYTHONPATH", "")) if p)
FAULT_VARIABLE = "GPTJ_TEST_FAULT"  # "RANK:STEP:raise|exit|hang", read by tests/faults/sitecustomize.py


def install_faults_here() -> None:
    """The same route in this process (commands called in process, as rank 0 of a torchrun launch), before any test
    imports the package."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gptj_test_faults", FAULTS / "sitecustomize.py")
    spec.loader.exec_module(importlib.util.module_from_spec(spec))


install_faults_here()
VERSIONS_SHOWN = ("torch", "transformers", "huggingface_hub", "ipywidgets")


def imported_version(name: str) -> str:
    """The version of the module Python imports under this name (PYTHONPATH first), "missing" without one."""
    import importlib

    try:
        return importlib.import_module(name).__version__
    except ImportError:  # e.g. no ipywidgets on a GPU image
        return "missing"


def pytest_report_header(config):
    return "versions: " + ", ".join(f"{name} {imported_version(name)}" for name in VERSIONS_SHOWN)


def pytest_configure(config):
    """GPTJ_EXPECT_VERSIONS="transformers==5.17 huggingface_hub==1.5" (set by `make test` for its runs on other
    versions): stop unless those are the versions imported, so a run meant for them never tests the pinned ones."""
    from packaging.requirements import Requirement

    for spec in os.environ.get("GPTJ_EXPECT_VERSIONS", "").split():
        req = Requirement(spec)
        found = imported_version(req.name)
        if found == "missing" or found not in req.specifier:
            raise pytest.UsageError(f"GPTJ_EXPECT_VERSIONS wants {spec} but {req.name} {found} is imported "
                                    f"(is its folder first on PYTHONPATH?)")


@pytest.fixture(scope="session", autouse=True)
def isolated_tmp(tmp_path_factory):
    """Processes the tests start (torchrun's torchelastic_* logs, stage processes, notebook kernels) leave their
    temporary files in this session's folder, which pytest removes with its old sessions, not in /tmp."""
    old = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(tmp_path_factory.mktemp("tmp"))
    yield
    if old is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = old


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """Every test session builds its models in its own cache folder (worker processes inherit it)."""
    old = os.environ.get("GPTJ_HELPERS_CACHE")
    os.environ["GPTJ_HELPERS_CACHE"] = str(tmp_path_factory.mktemp("gptj_cache"))
    yield Path(os.environ["GPTJ_HELPERS_CACHE"])
    if old is None:
        os.environ.pop("GPTJ_HELPERS_CACHE", None)
    else:
        os.environ["GPTJ_HELPERS_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_path(isolated_cache):
    import gptj_helpers as gh

    return gh.resolve_model("tiny")


@pytest.fixture(scope="session")
def tiny(tiny_path):
    """(model, tokenizer) of the tiny default, float32 on the CPU."""
    import gptj_helpers as gh

    return gh.load_model(str(tiny_path)), gh.load_tokenizer(str(tiny_path))


def run_cli(*args, timeout=120, env=None, **kw):
    """Run `python -m gptj_helpers ARGS` with a timeout; returns the CompletedProcess."""
    import subprocess

    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "gptj_helpers", *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=ROOT, **kw)


def call_cli(*args):
    """`python -m gptj_helpers ARGS` as `gh.main` in this process, with what it prints captured: the same parser and
    commands as run_cli without a new process's seconds of imports (run_cli keeps the entry point itself tested).
    Returns a CompletedProcess."""
    import contextlib
    import io
    import subprocess

    import gptj_helpers as gh

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = gh.main([str(a) for a in args])
        except SystemExit as exit:  # argparse's usage errors (2); a message exits with 1, as Python does
            code = exit.code if isinstance(exit.code, int) else 1
            if isinstance(exit.code, str):
                print(exit.code, file=sys.stderr)
    return subprocess.CompletedProcess(["gptj_helpers", *args], code, out.getvalue(), err.getvalue())


LONGEST_FIRST = [  # files whose tests take longest, as measured by --durations=0; the others follow in their order
    "notebooks/05_pipeline_parallelism.ipynb", "tests/test_restricted_kernels.py",
    "notebooks/07_tensor_parallelism.ipynb", "tests/test_widget.py", "tests/test_benchmarks.py",
    "tests/test_measure_and_plot.py",
    "notebooks/08_quantization.ipynb", "notebooks/09_one_prompt_speed.ipynb", "tests/test_pipeline.py",
    "tests/test_tensor_parallel.py",
]


def pytest_collection_modifyitems(session, config, items):
    """Longest files first, each file's items in their own order: with `--dist loadfile --no-loadscope-reorder` no
    long file starts after the other worker has run out of work."""
    def rank(item) -> int:
        path = item.nodeid.split("::")[0]
        return LONGEST_FIRST.index(path) if path in LONGEST_FIRST else len(LONGEST_FIRST)

    items[:] = sorted(items, key=rank)  # stable: a file's items keep their order
