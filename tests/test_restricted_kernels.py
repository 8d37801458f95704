"""Committed outputs hold on any x86-64 CPU. The cells whose printed numbers come from float kernels (tagged
"numeric": 03's sampled and greedy texts, 08's quality table and its check) are run again, after their notebook's
imports and settings, with the CPU's kernels restricted one level below this machine's (AVX-512 machines run
ATen, oneDNN and MKL on AVX2, the others on their portable kernels), and nbval compares what they print with the
outputs recorded on the machine's own kernels. A number printed to a digit the kernels change fails here.

Notebook 09 is not among them: with ATEN_CPU_CAPABILITY=default, torch.compile's C++ fails to build (inductor 2.13
still emits at::vec code for a Welford reduction); its compiled tokens are checked for equality instead."""
import os
import subprocess
import sys

import nbformat
import pytest
import torch

from conftest import ROOT

NUMERIC = ["03_generation.ipynb", "08_quantization.ipynb"]


def restricted_kernels() -> dict[str, str]:
    """The environment that holds ATen, oneDNN and MKL one level below what this CPU runs."""
    if torch.backends.cpu.get_cpu_capability() == "AVX512":
        return {"ATEN_CPU_CAPABILITY": "avx2", "DNNL_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
    return {"ATEN_CPU_CAPABILITY": "default", "DNNL_MAX_CPU_ISA": "SSE41", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"}


def numeric_cells(path) -> nbformat.NotebookNode:
    """The notebook's imports and settings cells, then its cells tagged "numeric", with their recorded outputs."""
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    setup = [c for c in code if "import gptj_helpers" in c.source or c.source.startswith("# Settings")]
    tagged = [c for c in code if "numeric" in c.metadata.get("tags", [])]
    assert len(setup) == 2 and tagged, f"{path.name}: no imports, settings or numeric cells"
    nb.cells = setup + tagged
    return nb


def probe_cell(capability: str) -> nbformat.NotebookNode:
    """A cell whose recorded output says the kernel runs on the restricted kernels: nbval fails it otherwise."""
    cell = nbformat.v4.new_code_cell("import torch\nprint(torch.backends.cpu.get_cpu_capability())")
    cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=capability.upper() + "\n")]
    cell.execution_count = 1  # nbval checks only cells that were run
    return cell


@pytest.mark.timeout(600)
def test_numeric_cells_print_the_same_with_restricted_kernels(tmp_path):
    env = {**os.environ, **restricted_kernels(), "PYTEST_XDIST_WORKER_COUNT": "1"}
    env.pop("PYTEST_XDIST_WORKER", None)
    parts = [numeric_cells(ROOT / "notebooks" / name) for name in NUMERIC]
    nb = parts[0]
    nb.cells = [probe_cell(env["ATEN_CPU_CAPABILITY"])] + [c for part in parts for c in part.cells]
    nbformat.write(nb, tmp_path / "numeric.ipynb")  # one kernel for all: their cells after their own settings
    command = [sys.executable, "-m", "pytest", "--nbval", str(tmp_path / "numeric.ipynb"),
               "--nbval-sanitize-with", str(ROOT / "tests" / "sanitize.cfg"), "--nbval-cell-timeout=300",
               "-p", "no:cacheprovider", "-p", "no:xdist", "-q", "--rootdir", str(tmp_path)]
    run = subprocess.run(command, cwd=ROOT / "notebooks", env=env, capture_output=True, text=True, timeout=540)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert f"{len(nb.cells)} passed" in run.stdout
