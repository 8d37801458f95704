"""Every exercise that is a change of settings or arguments can be done as written: the change, kept as metadata on
the notebook's Exercises cell, is applied and the notebook runs from the top to the cell the exercise names."""
import json

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import ROOT

NOTEBOOKS = sorted((ROOT / "notebooks").glob("0*.ipynb"))


def exercises():
    """(notebook, exercise number, change) for every exercise that carries one."""
    found = []
    for path in NOTEBOOKS:
        for cell in json.loads(path.read_text())["cells"]:
            for number, change in cell.get("metadata", {}).get("exercises", {}).items():
                found.append(pytest.param(path, number, change, id=f"{path.stem[:2]}-exercise{number}"))
    return found


def apply_change(nb, change: dict) -> list:
    """The notebook's code cells up to the one named by `run_to`, with the exercise's change made."""
    cells = []
    for old, new in change.get("change", []):
        hits = [c for c in nb.cells if c.cell_type == "code" and old in c.source]
        assert len(hits) == 1, f"the exercise's change {old!r} matches {len(hits)} code cells"
        hits[0].source = hits[0].source.replace(old, new)
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        cells.append(cell)
        if change["run_to"] in cell.source:
            if change.get("append"):
                cell.source += "\n" + change["append"]
            return cells
    raise AssertionError(f"no code cell contains {change['run_to']!r}")


def test_the_exercises_that_change_settings_carry_their_change():
    numbers = {(p.values[0].stem[:2], p.values[1]) for p in exercises()}
    assert {("00", "1"), ("02", "1"), ("04", "1"), ("04", "2"), ("05", "1")} <= numbers


@pytest.fixture(scope="module")
def kernel():
    """One kernel for every exercise: each runs its notebook from the top (installs, imports, settings), so what an
    earlier exercise left behind is set again, and torch is imported once instead of once per exercise."""
    from jupyter_client.manager import KernelManager

    km = KernelManager(kernel_name="python3")
    km.start_kernel(cwd=str(ROOT / "notebooks"))
    yield km
    km.shutdown_kernel(now=True)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("path, number, change", exercises())
def test_exercise_runs_as_written(path, number, change, kernel):
    nb = nbformat.read(path, as_version=4)
    nb.cells = apply_change(nb, change)
    for cell in nb.cells:
        cell.outputs = []
    if not kernel.is_alive():  # an exercise that killed the kernel does not fail the next ones
        kernel.restart_kernel(now=True)
    client = NotebookClient(nb, km=kernel, timeout=150, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    try:
        client.execute()
    finally:
        if client.kc is not None:
            client.kc.stop_channels()
    printed = "".join(o.get("text", "") for c in nb.cells for o in c.outputs if o.get("output_type") == "stream")
    assert change.get("expect", "") in printed
