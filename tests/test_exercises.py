"""Every exercise has a solution with a check that can fail: the notebook's last cell, collapsed, holds one block
per exercise (`# N.`), each with an assert on what it computed. nbval runs those cells with the notebooks; here
their shape is checked, and a check is shown to fail when the answer it tests is wrong."""
import json
import re

import pytest

from conftest import ROOT

NOTEBOOKS = sorted((ROOT / "notebooks").glob("0*.ipynb"))
TITLE = "# @title Solutions: open after trying the exercises (each check fails if its answer is wrong)"


def text(cell: dict) -> str:
    return "".join(cell["source"])


def exercise_numbers(markdown: str) -> list[str]:
    """The numbers of the list under '## Exercises'."""
    section = markdown.split("## Exercises", 1)[1].split("**Next:**")[0].split("This is the last notebook")[0]
    return re.findall(r"^(\d+)\. ", section, flags=re.M)


def solution_blocks(source: str) -> dict[str, str]:
    """The solutions cell cut at its `# N.` comments: number -> that exercise's code."""
    parts = re.split(r"^(?=# \d+\. )", source, flags=re.M)[1:]
    return {re.match(r"# (\d+)\. ", part).group(1): part for part in parts}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem[:2])
def test_every_exercise_has_a_collapsed_solution_with_a_check(path):
    cells = json.loads(path.read_text())["cells"]
    solutions, exercises = cells[-1], cells[-2]
    assert solutions["cell_type"] == "code" and text(solutions).startswith(TITLE)
    assert solutions["metadata"]["jupyter"] == {"outputs_hidden": True, "source_hidden": True}
    assert solutions["metadata"]["cellView"] == "form"  # Colab shows a form cell's title, its code collapsed
    numbers = exercise_numbers(text(exercises))
    blocks = solution_blocks(text(solutions))
    assert numbers and list(blocks) == numbers, f"{path.name}: exercises {numbers}, solutions {list(blocks)}"
    for number, code in blocks.items():
        assert re.search(r"^\s*assert ", code, flags=re.M), f"{path.name} exercise {number} has no check"
        assert re.search(rf'print\(f?"{number}\. ', code), f"{path.name} exercise {number} prints no answer"
    code = "\n".join(line.split("#")[0] for line in text(solutions).splitlines())  # comments may name them
    assert "benchmarks/" not in code, "a solution must run where benchmarks/ is not (Colab)"


def test_exercises_that_need_benchmarks_say_how_to_get_them():
    for path in NOTEBOOKS:
        exercises = text(json.loads(path.read_text())["cells"][-2]).split("## Exercises", 1)[1]
        for item in re.split(r"^\d+\. ", exercises, flags=re.M)[1:]:
            if "benchmarks/" in item:
                assert "git clone" in item, f"{path.name}: {item[:80]}"


def test_a_check_fails_when_its_answer_is_wrong():
    """Notebook 00's second solution, run with a block size one byte off its hand count, fails its assert."""
    import torch
    import gptj_helpers as gh

    cells = json.loads((ROOT / "notebooks" / "00_start_here.ipynb").read_text())["cells"]
    code = solution_blocks(text(cells[-1]))["2"]
    config = gh.gptj_6b_config()
    d, ff = config.n_embd, 4 * config.n_embd
    block = 4 * d * d + (d * ff + ff) + (ff * d + d) + 2 * d  # the estimate cell's hand count
    exec(code, {"gh": gh, "torch": torch, "config": config, "block": block})  # the answer as written passes
    with pytest.raises(AssertionError):
        exec(code, {"gh": gh, "torch": torch, "config": config, "block": block + 1})
