"""The series as a whole: README, notebook structure, Binder environment, CI wiring."""
import ast
import json
import re
import sys

import pytest
import yaml

import gptj_helpers as gh
from gptj_split.setups import settings_comment
from conftest import ROOT

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
SLUG = re.search(r"^REPO_SLUG := (\S+)", (ROOT / "Makefile").read_text(), flags=re.M).group(1)


def cells(path):
    return json.loads(path.read_text())["cells"]


def source(cell):
    return "".join(cell["source"])


def test_readme_has_the_two_commands_and_ci_calls_one():
    readme = (ROOT / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
    assert re.search(r"^make test\b", (ROOT / ".ci" / "run").read_text(), flags=re.M)


def test_readme_setup_table_is_the_planners():
    readme = (ROOT / "README.md").read_text()
    table = readme.split("<!-- setups:start -->\n", 1)[1].split("\n<!-- setups:end -->", 1)[0]
    assert table == gh.setups_markdown(), "README is stale: paste `python -m gptj_helpers setups` between the markers"


def test_readme_lists_every_notebook():
    readme = (ROOT / "README.md").read_text()
    for nb in NOTEBOOKS:
        assert f"(notebooks/{nb.name})" in readme


def test_readme_picture_is_the_notebooks_figure_and_make_notebooks_redraws_it():
    readme = (ROOT / "README.md").read_text()
    assert "![" in readme and "(assets/readme_timeline.png)" in readme
    picture = ROOT / "assets" / "readme_timeline.png"
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "notebook-figure notebooks/05_pipeline_parallelism.ipynb 05_timelines assets/readme_timeline.png" in (
        ROOT / "Makefile").read_text()
    # the committed picture is the one the committed notebook shows
    import gptj_split.plots

    shown = ROOT / "build" / "test-readme-picture.png"
    shown.parent.mkdir(exist_ok=True)
    gptj_split.plots.save_notebook_figure(ROOT / "notebooks" / "05_pipeline_parallelism.ipynb", "05_timelines", shown)
    assert shown.read_bytes() == picture.read_bytes(), "run make notebooks: it redraws the README's picture"
    shown.unlink()


def test_repository_address_is_one_placeholder():
    for path in [ROOT / "README.md", *NOTEBOOKS]:
        for slug in re.findall(r"github(?:\.com)?/([\w.-]+/[\w.-]+?)/(?:blob|actions|main)", path.read_text()):
            assert slug == SLUG, f"{path.name} uses {slug}, the Makefile says {SLUG}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_opens_and_ends_the_same_way(path):
    c = cells(path)
    head = source(c[0])
    assert c[0]["cell_type"] == "markdown" and head.startswith("# ") and "**Needs:**" in head
    assert f"colab.research.google.com/github/{SLUG}/blob/main/notebooks/{path.name}" in head
    assert f"mybinder.org/v2/gh/{SLUG}/" in head
    install = source(c[1])
    assert "google.colab" in install and "KAGGLE_KERNEL_RUN_TYPE" in install and "pip install" in install
    assert "import gptj_helpers as gh" in source(c[2])
    assert source(c[3]).startswith("# NBVAL_IGNORE_OUTPUT") and "describe_environment" in source(c[3])
    assert source(c[4]).startswith("# Settings") and re.search(r"^MODEL = ", source(c[4]), flags=re.M)
    settings_cells = [x for x in c if x["cell_type"] == "code" and source(x).startswith("# Settings")]
    assert len(settings_cells) == 1
    assert "solutions" in c[-1]["metadata"].get("tags", []), "the last cell holds the exercises' solutions"
    tail = source(c[-2])
    assert "## Summary" in tail and "## Exercises" in tail
    if path != NOTEBOOKS[-1]:
        assert re.search(r"\*\*Next:\*\* \[[\w]+\]\([\w]+\.ipynb\)", tail)
        target = re.search(r"\(([\w]+\.ipynb)\)", tail.split("**Next:**")[1]).group(1)
        assert (path.parent / target).exists()


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_executed_and_clean(path):
    nb = json.loads(path.read_text())
    text = path.read_text()
    for noise in ("outputId", "base_uri", "colab", "application/vnd.jupyter.widget-state+json"):
        assert noise not in json.dumps(nb["metadata"]) and f'"{noise}"' not in text
    assert "widgets" not in nb["metadata"]
    for c in nb["cells"]:
        if c["cell_type"] == "code" and source(c).strip():
            assert c["execution_count"] is not None, f"unexecuted cell in {path.name}: {source(c)[:60]}"
            for out in c.get("outputs", []):
                assert "<Figure size" not in json.dumps(out.get("data", {}).get("text/plain", "")), path.name


def test_binder_environment():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    deps = env["dependencies"]
    assert any(str(d).startswith("python") for d in deps) and "pip" in deps
    assert not (ROOT / "binder").exists() and not (ROOT / ".binder").exists()
    post = ROOT / "postBuild"
    assert post.stat().st_mode & 0o111 and "pip install" in post.read_text() and "-e ." in post.read_text()


def test_binder_torch_is_conda_forge_cpu_build():
    """Binder's torch is conda-forge's CPU build: pip's Linux torch pulls gigabytes of CUDA libraries (nvidia-*)."""
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert env["channels"] == ["conda-forge"]
    conda = [d for d in env["dependencies"] if isinstance(d, str)]
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    names = [re.split(r"[<>=!~ ]", d, maxsplit=1)[0] for d in conda]
    # `pytorch-cpu` is conda-forge's metapackage pinning `pytorch` to a cpu_* build; `pytorch=*=cpu*` would do too
    assert "pytorch-cpu" in names or any(re.fullmatch(r"pytorch[ =][^=]*=cpu\S*", d) for d in conda), conda
    assert not [n for n in names if n in {"pytorch-gpu", "cudatoolkit"} or n.startswith(("cuda", "nvidia"))]
    assert not [p for p in pip if re.match(r"(torch|pytorch|nvidia)\b", p, flags=re.I)], pip


def notebook_imports(path):
    names = set()
    for c in cells(path):
        if c["cell_type"] != "code":
            continue
        code = "\n".join(line[:len(line) - len(line.lstrip())] + "pass" if line.lstrip().startswith(("%", "!"))
                         else line for line in source(c).splitlines())
        for node in ast.walk(ast.parse(code)):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module.split(".")[0])
    return names


def test_binder_provides_every_notebook_import():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    provided = {re.split(r"[<>=!~ ]", p, maxsplit=1)[0].lower().replace("-", "_") for p in pip}
    provided |= {"gptj_helpers"}  # postBuild installs it
    if any(str(d).startswith("pytorch") for d in env["dependencies"]):  # conda-forge's pytorch(-cpu) is torch
        provided |= {"torch"}
    imports = set().union(*(notebook_imports(p) for p in NOTEBOOKS))
    missing = {m for m in imports if m not in sys.stdlib_module_names and m.lower() not in provided}
    assert not missing, f"notebooks import {missing}, which environment.yml does not provide"


@pytest.mark.parametrize("path", [p for p in NOTEBOOKS if not p.name.startswith("01_")], ids=lambda p: p.name)
def test_settings_cell_is_one_line_to_switch_with_the_setups_table(path):
    """Every settings cell carries the same suggested lines, from gh.SETUPS, and one MODEL line to replace."""
    cell = next(source(c) for c in cells(path) if c["cell_type"] == "code" and source(c).startswith("# Settings"))
    assert settings_comment() in cell
    model_lines = [line for line in cell.splitlines() if line.startswith("MODEL = ")]
    assert len(model_lines) == 1 and "; DEVICES = " in model_lines[0] and "; DTYPE = torch." in model_lines[0]
    suggested = [line.split(": ", 1)[1].strip() for line in cell.splitlines() if line.startswith("#   ")]
    assert suggested == [gh.settings_line(name) for name in gh.SETUPS if gh.SETUPS[name][0] != "tiny"]


def test_readme_suggests_only_lines_of_the_setups_table():
    lines = set(re.findall(r'`(MODEL = "gpt-j-6b[^`]*)`', (ROOT / "README.md").read_text()))
    assert lines and lines <= {gh.settings_line(name) for name in gh.SETUPS}


def test_readme_names_every_file_of_the_package():
    readme = (ROOT / "README.md").read_text()
    files = sorted(p.name for p in (ROOT / "gptj_split").glob("*.py") if p.name != "__init__.py")
    assert [f for f in files if f"`{f}`" not in readme] == [], "add the file to README's table of chapters"
