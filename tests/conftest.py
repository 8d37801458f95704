"""Shared fixtures: an isolated model cache and the tiny default, built once per test session."""
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")  # tests draw figures without a display

ROOT = Path(__file__).resolve().parents[1]


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
