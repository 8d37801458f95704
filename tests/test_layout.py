"""The helper module's shape: a table of contents over one file per chapter, imports that run one way, no patches on
re-exports, the trained tiny model inside the package, and the typed objects every path shares."""
import ast
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest
import torch

import gptj_helpers as gh
from gptj_split.devices import parse_size
from gptj_split.hub import transport_errors
from gptj_split.launch import Launch, decide_ranks, notebook_launch, notebook_places, torchrun_places
from gptj_split.measure import LoadWatch, QUIET_SHARE
from gptj_split.models import default_dtype
from gptj_split.tiny import random_tiny_model
from gptj_split.quiet import quiet_progress
from gptj_split.files import build_atomically
from gptj_split.pipeline import pipeline_job, pipeline_settings, prepare_pipeline
from gptj_split.ranks import RankJob, is_neighbour_error
from gptj_split.runner import run_notebooks
from gptj_split.tensor_parallel import prepare_tensor_parallel, tensor_parallel_settings
import gptj_split.models
import gptj_split.tiny
import gptj_split.pipeline
import gptj_split.processes
import gptj_split.ranks
from conftest import ROOT

PACKAGE = ROOT / "gptj_split"
# chapter of each file: a file may import files of its own or an earlier chapter only
CHAPTERS = {"quiet": 0, "models": 0, "files": 0, "tiny": 0, "hardware": 0, "devices": 0, "hub": 1, "convert": 1,
            "convert_bin": 1, "random_models": 1,
            "plan": 2, "records": 2, "hooks": 2, "place": 2, "setups": 2,
            "sampling": 3, "generate": 3, "measure": 4, "plots": 4, "launch": 5, "ranks": 5, "processes": 5,
            "jobs": 5, "stage": 5,
            "pipeline": 5, "relay": 5, "compare": 5, "widget": 6, "shards": 7, "tensor_parallel": 7, "tp_compare": 7,
            "preload": 7,
            "quantize": 8, "quality": 8, "compiled": 9, "roofline": 9, "runner": 10, "cli_ranks": 10, "slots": 10,
            "scheduler": 10, "server": 10, "cli": 10}


def package_imports(path):
    """The package files one file imports (relative imports anywhere in it, outside `if TYPE_CHECKING:`)."""
    tree = ast.parse(path.read_text())
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for n in ast.walk(node)}
    return {node.module.split(".")[0] for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module and id(node) not in skip}


def test_every_file_has_a_chapter_and_says_what_it_is_for():
    """About 400 lines is a guide for a file read in one sitting, not a rule: past it, a warning (split by meaning,
    never by moving code into an unrelated file)."""
    import warnings

    files = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    assert files == set(CHAPTERS)
    for name in files:
        lines = (PACKAGE / f"{name}.py").read_text().splitlines()
        if len(lines) > 400:
            warnings.warn(f"{name}.py has {len(lines)} lines: does it still hold one job?", stacklevel=1)
        assert lines[0].startswith('"""') and len(lines[0]) > 20, f"{name}.py opens without saying what it is for"


def test_imports_run_from_later_chapters_to_earlier_ones_without_circles():
    graph = {name: package_imports(PACKAGE / f"{name}.py") for name in CHAPTERS}
    for name, deps in graph.items():
        for dep in deps:
            assert CHAPTERS[dep] <= CHAPTERS[name], f"{name}.py (chapter {CHAPTERS[name]}) imports {dep}.py"
    done, visiting = set(), []

    def visit(name):
        assert name not in visiting, f"import circle: {' -> '.join([*visiting, name])}"
        if name not in done:
            visiting.append(name)
            for dep in graph[name]:
                visit(dep)
            visiting.pop()
            done.add(name)

    for name in graph:
        visit(name)


def test_the_import_check_can_fail(tmp_path):
    bad = tmp_path / "models.py"
    bad.write_text("from .launch import run_pipeline\nif TYPE_CHECKING:\n    from .plan import Plan\n")
    assert package_imports(bad) == {"launch"}


TYPES_SHOWN = {  # the types the series' tools take and return, re-exported beside them though no cell spells gh.NAME
    "Device", "Hardware", "Card", "GPTJ_6B_RANDOM", "read_hardware", "Plan", "StagePlan", "SETUPS", "settings_line",
    "setups_markdown", "Sampling", "RunRecord", "MemoryRow", "TimingEvent", "EventClock", "compare_outputs",
    "RankError", "PipelineError", "RankPlace", "GenerationJob", "TensorParallelError", "TensorParallelJob"}


def facade_names() -> set[str]:
    """The names gptj_helpers re-exports."""
    return {n for n in vars(gh) if not n.startswith("_") and n not in ("annotations", "sys")}


def test_the_table_of_contents_holds_what_the_notebooks_use_and_no_plumbing():
    """gh.NAME is the series' tools: every name a notebook, the README or an exercise uses, the types they meet, and
    nothing else (benchmarks and tests import the rest from gptj_split.<file>); about 150 names at most."""
    import json
    import re

    used = set(re.findall(r"\bgh\.([A-Za-z_]\w*)", (ROOT / "README.md").read_text()))
    for notebook in (ROOT / "notebooks").glob("*.ipynb"):
        for cell in json.loads(notebook.read_text())["cells"]:
            used |= set(re.findall(r"\bgh\.([A-Za-z_]\w*)", "".join(cell["source"])))
    assert used <= facade_names(), f"used but not re-exported: {sorted(used - facade_names())}"
    assert facade_names() <= used | TYPES_SHOWN, f"plumbing in the table of contents: {sorted(facade_names() - used)}"
    assert len(facade_names()) <= 150


def test_gptj_helpers_is_only_a_table_of_contents():
    text = (ROOT / "gptj_helpers.py").read_text()
    assert len(text.splitlines()) <= 150
    tree = ast.parse(text)
    doc = ast.get_docstring(tree)
    for name in CHAPTERS:
        assert f"{name}.py" in doc, f"the table of contents does not name {name}.py"
    for node in tree.body[1:]:
        assert isinstance(node, (ast.Import, ast.ImportFrom)) or (
            isinstance(node, ast.If) and ast.unparse(node.test) == "__name__ == '__main__'"), ast.unparse(node)[:80]


def test_no_test_patches_a_re_export():
    """A patch on gh.NAME changes nothing the package calls: patch the defining module instead."""
    for path in (ROOT / "tests").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func).endswith(("setattr", "patch.object")):
                target = ast.unparse(node.args[0]) if node.args else ""
                assert target not in ("gh", "gptj_helpers"), f"{path.name}:{node.lineno} patches {target}"


def test_patching_the_defining_module_reaches_the_package(tiny_path, monkeypatch):
    monkeypatch.setattr(gptj_split.pipeline, "start_ranks", lambda *a, **k: pytest.fail("stage processes started"))
    with pytest.raises(BaseException, match="stage processes started"):
        gh.run_pipeline(str(tiny_path), ["The list"], "cpu,cpu", max_new_tokens=2)


def test_sampling_is_checked_once_and_converted_both_ways():
    s = gh.Sampling(temperature=0.8, top_p=0.9, top_k=5, seed=3)
    assert s.generate_kwargs() == {"do_sample": True, "temperature": 0.8, "top_p": 0.9, "top_k": 5}
    assert [type(w).__name__ for w in s.warpers()] == ["TemperatureLogitsWarper", "TopKLogitsWarper",
                                                       "TopPLogitsWarper"]
    assert gh.Sampling(greedy=True).generate_kwargs() == {"do_sample": False}
    assert len(gh.Sampling(greedy=True, temperature=0).warpers()) == 0
    for bad, match in [(dict(temperature=0), "temperature=0"), (dict(top_p=0), "top_p=0"), (dict(top_k=-1), "top_k"),
                       (dict(seed=1.5), "seed")]:
        with pytest.raises(ValueError, match=match):
            gh.Sampling(**bad)


def test_sampling_object_and_keywords_give_the_same_text(tiny):
    model, tokenizer = tiny
    by_keywords, _ = gh.generate_text(model, tokenizer, "The list", 12, temperature=0.9, top_k=20, seed=4)
    by_object, record = gh.generate_text(model, tokenizer, "The list", 12,
                                         sampling=gh.Sampling(temperature=0.9, top_k=20, seed=4))
    assert by_object == by_keywords and record.settings["top_k"] == 20 and record.settings["seed"] == 4
    with pytest.raises(ValueError, match="not both"):
        gh.generate_text(model, tokenizer, "The list", 2, greedy=True, sampling=gh.Sampling(seed=1))


def test_seeded_generation_leaves_the_callers_random_state(tiny):
    model, tokenizer = tiny
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    gh.generate_text(model, tokenizer, "The list", 4, seed=9)
    assert torch.equal(torch.rand(3), expected)


def test_building_the_tiny_model_leaves_the_callers_random_state():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    random_tiny_model(seed=0)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("settings_of, prepare", [(pipeline_settings, prepare_pipeline),
                                                   (tensor_parallel_settings, prepare_tensor_parallel)])
def test_run_settings_are_one_checked_object_and_rank_0_plans_over_every_ranks_place(tiny_path, settings_of, prepare):
    """Both clients' settings carry the spec as given (the runtime reads it where the ranks start); rank 0 plans over
    the places the ranks report, not over a spec of its own."""
    settings = settings_of(tiny_path, "cpu,cpu", prompts=["a"], max_new_tokens=3,
                           sampling=gh.Sampling(greedy=True), dtype=torch.float32)
    assert settings.spec == "cpu,cpu" and settings.dtype == "float32" and settings.sampling.greedy
    places = decide_ranks("cpu=5MiB,cpu=6MiB", gh.describe_hardware("cpu"), notebook_launch(2))
    plan, jobs = prepare(settings, places, tiny_path)
    assert [s.budget_bytes for s in plan.devices] == [5 * 2**20, 6 * 2**20] and len(jobs) == 1
    with pytest.raises(ValueError, match="give devices"):
        settings_of(tiny_path)


SPEC_PATHS = {  # every path that takes devices, each called with the spec "cpu=40MiB,cpu=40MiB"
    "parse_devices": lambda spec, tiny_path: gh.parse_devices(spec),
    "plan_split": lambda spec, tiny_path: gh.plan_split("tiny", spec),
    "plan_tensor_parallel": lambda spec, tiny_path: gh.plan_tensor_parallel("tiny", spec),
    "place_stages": lambda spec, tiny_path: gh.place_stages(tiny_path, gh.plan_split(tiny_path, spec)),
    "check_split": lambda spec, tiny_path: gh.check_split(tiny_path, spec, None, torch.ones(1, 2, dtype=torch.long), 1),
    "pipeline_dry_run": lambda spec, tiny_path: gh.pipeline_dry_run(tiny_path, spec),
    "tensor_parallel_dry_run": lambda spec, tiny_path: gh.tensor_parallel_dry_run(tiny_path, spec),
    "notebook_places": lambda spec, tiny_path: notebook_places(pipeline_job(pipeline_settings("tiny", spec))),
    "torchrun_places": lambda spec, tiny_path: torchrun_places(
        pipeline_job(pipeline_settings("tiny", spec)), Launch(2, 2, 1), gh.describe_hardware("cpu")),
    "setups_markdown": lambda spec, tiny_path: gh.setups_markdown(),
    "cli devices": lambda spec, tiny_path: gh.main(["devices", spec]),
    "cli plan": lambda spec, tiny_path: gh.main(["plan", "--devices", spec]),
    "cli pipeline --dry-run": lambda spec, tiny_path: gh.main(["pipeline", "--devices", spec, "--dry-run"]),
    "cli tensor-parallel --dry-run": lambda spec, tiny_path: gh.main(["tensor-parallel", "--devices", spec,
                                                                       "--dry-run"]),
}


@pytest.mark.parametrize("path", list(SPEC_PATHS))
def test_every_path_that_takes_devices_reads_the_spec_through_the_one_reader(tiny_path, monkeypatch, capsys, path):
    """devices.read_spec is the only reader of spec text: each path reads it there (counted), and no other module
    splits a spec itself (the static half: no `.split(",")` outside devices.py)."""
    import gptj_split.devices

    calls = []
    real = gptj_split.devices.read_spec
    monkeypatch.setattr(gptj_split.devices, "read_spec", lambda spec: calls.append(spec) or real(spec))
    for module in (gptj_split.ranks, __import__("gptj_split.launch", fromlist=["x"])):
        if hasattr(module, "read_spec"):
            monkeypatch.setattr(module, "read_spec", gptj_split.devices.read_spec)
    SPEC_PATHS[path]("cpu=40MiB,cpu=40MiB", tiny_path)
    assert calls, f"{path} read its spec without devices.read_spec"
    for file in PACKAGE.glob("*.py"):
        if file.stem != "devices":
            assert 'split(",")' not in file.read_text(), f"{file.name} splits a spec by itself"


def test_public_functions_take_about_ten_parameters_at_most_besides_sampling():
    import inspect

    sampling = {"greedy", "temperature", "top_p", "top_k", "seed", "sampling", "knobs", "kwargs"}
    for name in dir(gh):
        obj = getattr(gh, name)
        if inspect.isfunction(obj) and obj.__module__.startswith("gptj_split"):
            params = set(inspect.signature(obj).parameters) - sampling
            assert len(params) <= 10, f"{name} takes {len(params)} parameters: {sorted(params)}"


def test_one_memory_row_type_on_every_path(tiny, tiny_path):
    model, tokenizer = tiny
    _, naive = gh.generate_text(model, tokenizer, "The list", 3, greedy=True)
    _, piped = gh.run_pipeline(str(tiny_path), ["The list"], "cpu,cpu", max_new_tokens=3, greedy=True)
    assert {type(r) for r in naive.memory + piped.memory} == {gh.MemoryRow}
    assert all(r.budget_bytes for r in piped.memory) and all(r.peak_rss_bytes for r in piped.memory)


@pytest.mark.parametrize("error, words", [(gh.PipelineError, "pipeline stage 1"),
                                          (gh.TensorParallelError, "tensor-parallel rank 1")])
def test_a_rank_error_keeps_its_type_and_cause_in_its_callers_words(tmp_path, error, words):
    import pickle

    class Proc:
        exitcode = 1

    def report(err, neighbour=False, rank=1, at=1.0):
        return gptj_split.processes.FailureReport(rank, at, f"{type(err).__name__}: {err}", "", neighbour,
                                              pickle.dumps(err))

    job = RankJob(error, None, None, "cpu,cpu", None, gh.LaunchOptions(timeout=7, deadline=30))
    describe = gptj_split.processes.describe_failure
    (tmp_path / "rank1.pkl").write_bytes(pickle.dumps(report(FileNotFoundError("no weights here"))))
    got = describe(job, str(tmp_path), {1: 1.0}, [], [], [Proc(), Proc()])
    assert type(got) is FileNotFoundError and str(got) == "no weights here"  # a bad configuration, as raised
    (tmp_path / "rank1.pkl").write_bytes(pickle.dumps(report(KeyError("lost"))))
    (tmp_path / "rank0.pkl").write_bytes(pickle.dumps(report(ConnectionResetError("gone"), True, 0, 0.5)))
    got = describe(job, str(tmp_path), {0: 0.5, 1: 1.0}, [], [], [Proc(), Proc()])  # own error beats the transport's
    assert type(got) is error and got.rank == 1 and str(got) == f"{words} failed: KeyError: 'lost'"
    assert type(got.__cause__) is KeyError and got.__cause__.args == ("lost",) and got.kind == words[:-2]
    (tmp_path / "rank1.pkl").unlink()  # rank 1 never answered: still running when rank 0 gave up waiting
    got = describe(job, str(tmp_path), {0: 0.5}, [1], [], [Proc(), Proc()])
    assert str(got).startswith(f"{words} hung: no answer within the 7 s timeout") and got.rank == 1
    got = describe(job, str(tmp_path), {}, [0, 1], [0, 1], [Proc(), Proc()])
    assert str(got).startswith(f"{words[:-2]} 0 did not finish within the run's deadline of 30 s")
    # an exception that pickles but cannot be rebuilt (its __init__ wants two arguments) still reaches the caller by
    # its type name and text
    (tmp_path / "rank1.pkl").write_bytes(pickle.dumps(report(Unrebuildable("half", "the story"))))
    got = describe(job, str(tmp_path), {1: 1.0}, [], [], [Proc(), Proc()])
    assert str(got) == f"{words} failed: Unrebuildable: half and the story" and got.__cause__ is None


class Unrebuildable(Exception):
    """An exception pickle can write but not read back (its args are not its __init__'s)."""

    def __init__(self, first, second):
        super().__init__(f"{first} and {second}")


def test_neighbour_errors_are_recognised_by_class():
    import torch.distributed as dist

    assert is_neighbour_error(dist.DistNetworkError("peer went away"))
    assert is_neighbour_error(ConnectionResetError())
    assert not is_neighbour_error(RuntimeError("connection to gloo timed out"))  # words alone are not a class
    # but gloo raises a vanished peer as a RuntimeError from its transport (seen when a rank exits mid all-reduce)
    assert is_neighbour_error(RuntimeError("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] "
                                              "Read error [127.0.0.1]:3488: Connection reset by peer."))


def test_dropped_downloads_are_caught_for_both_http_clients():
    names = {f"{c.__module__.split('.')[0]}.{c.__name__}" for c in transport_errors()}
    assert "httpx.TransportError" in names
    pytest.importorskip("httpx2")
    assert "httpx2.TransportError" in names


def test_quiet_progress_restores_what_it_found():
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        with quiet_progress():
            pass
        assert not hf_logging.is_progress_bar_enabled()
    finally:
        hf_logging.enable_progress_bar()
    with quiet_progress():
        assert not hf_logging.is_progress_bar_enabled()
    assert hf_logging.is_progress_bar_enabled()


def test_run_notebooks_restores_the_environment(tmp_path, monkeypatch):
    import nbformat

    monkeypatch.setenv("GPTJ_HELPERS_OUT", "before")
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("import os; print(os.environ['GPTJ_HELPERS_OUT'])")])
    path = tmp_path / "n.ipynb"
    nbformat.write(nb, path)
    run_notebooks([path], out_dir=tmp_path / "out")
    assert os.environ["GPTJ_HELPERS_OUT"] == "before"
    ran = nbformat.read(tmp_path / "out" / "n.ipynb", as_version=4)
    assert ran.cells[0].outputs[0]["text"].strip() == str((tmp_path / "out" / "figures").resolve())


def test_pad_left_equals_the_tokenizers_own_left_padding(tiny):
    _, tokenizer = tiny
    prompts = ["The list", "A dictionary is a mapping of", "x"]
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    ours = gh.pad_left(ids, tokenizer.eos_token_id, "cpu")
    theirs = tokenizer.pad({"input_ids": ids}, padding=True, padding_side="left", return_tensors="pt") \
        if tokenizer.pad_token_id == tokenizer.eos_token_id else None
    if theirs is None:  # the tiny tokenizer has no pad token: lend it eos for this comparison only
        tokenizer = type(tokenizer).from_pretrained(tokenizer.name_or_path, pad_token=tokenizer.eos_token)
        theirs = tokenizer.pad({"input_ids": ids}, padding=True, padding_side="left", return_tensors="pt")
    assert torch.equal(ours[0], theirs["input_ids"]) and torch.equal(ours[1], theirs["attention_mask"])


def test_parse_size_agrees_with_accelerate_where_both_read_a_size():
    from accelerate.utils import convert_file_size_to_int

    for text in ("10GiB", "512MiB", "5GB", "300MB", "2KiB"):
        assert parse_size(text) == convert_file_size_to_int(text), text
    assert parse_size("1.5gb") == 1_500_000_000  # accelerate reads lowercase "gb" as gigabits
    assert parse_size("1024") == 1024  # accelerate refuses a bare number


def test_build_happens_once_under_concurrency(tmp_path):
    calls, results = [], []

    def build(tmp):
        calls.append(tmp)
        (tmp / "config.json").write_text("{}")

    threads = [threading.Thread(target=lambda: results.append(build_atomically(tmp_path / "m", build)))
               for _ in range(4)]
    [t.start() for t in threads]
    [t.join(10) for t in threads]
    assert len(calls) == 1 and len(results) == 4 and set(results) == {tmp_path / "m"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary folder or lock left behind


@pytest.mark.timeout(240)
def test_installed_wheel_ships_the_trained_tiny_model(tiny, tmp_path):
    """pip install on Colab gets the same trained tiny model as the repository, from inside the package."""
    wheels, target, source = tmp_path / "wheels", tmp_path / "site", tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE", "gptj_helpers.py", "gptj_split"):  # built outside the
        if (ROOT / name).is_dir():  # repository, so that no build/ folder is left there
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / name, source / name)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(wheels), str(source)], capture_output=True, text=True, timeout=180)
    assert build.returncode == 0, build.stderr[-2000:]
    wheel = next(wheels.glob("gptj_helpers-*.whl"))
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                              str(wheel)], capture_output=True, text=True, timeout=120)
    assert install.returncode == 0, install.stderr[-2000:]
    code = ("import gptj_helpers as gh\n"
            "path = gh.resolve_model('tiny')\n"
            "m, t = gh.load_model('tiny'), gh.load_tokenizer('tiny')\n"
            "print(path)\n"
            "print(repr(gh.generate_text(m, t, 'The list', 16, greedy=True)[0][0]))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=tmp_path, env={**env, "PYTHONPATH": str(target)})
    assert run.returncode == 0, run.stderr[-2000:]
    path, text = run.stdout.strip().splitlines()[-2:]
    assert path == str(target / "gptj_split" / "tiny-gptj")
    model, tokenizer = tiny
    assert text == repr(gh.generate_text(model, tokenizer, "The list", 16, greedy=True)[0][0])


def test_default_dtype_is_one_rule():
    tiny = gh.load_config("tiny")
    assert default_dtype(tiny) == torch.float32
    six = gh.gptj_6b_config()
    assert default_dtype(six, ["cuda:0", "cuda:1"]) == torch.float16
    assert default_dtype(six, ["cpu"]) == default_dtype(six) == torch.bfloat16
    half = gh.tiny_config()
    half.dtype = "float16"
    assert default_dtype(half) == torch.float16
    assert gh.plan_split(tiny, "2x4MiB").dtype == "float32"
    assert gh.plan_split(six, "2x14GiB").dtype == "bfloat16"


def test_models_module_stays_importable_first():
    """models.py (chapter 00) imports nothing from the package but quiet.py, which imports nothing."""
    assert package_imports(PACKAGE / "models.py") == {"quiet"} and package_imports(PACKAGE / "quiet.py") == set()
    assert gptj_split.tiny.TINY_TRAINED.parent == PACKAGE


@pytest.mark.timeout(60)
def test_load_watch_tells_our_processes_from_others():
    """A process we started is ours; one whose shell ended before the watch began is someone else's, and its CPU is
    the others' share."""
    import signal
    import subprocess

    theirs = subprocess.run(["sh", "-c", f"'{sys.executable}' -c 'while True: pass' >/dev/null 2>&1 & echo $!"],
                            capture_output=True, text=True, timeout=10)
    other = int(theirs.stdout)  # orphaned at once: not a descendant of this process
    ours = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        with LoadWatch(every=0.2) as watch:
            time.sleep(1.5)
    finally:
        ours.kill()
        ours.wait(10)
        os.kill(other, signal.SIGKILL)
    pids = {pid for pid, _ in watch.ours}
    assert ours.pid in pids and os.getpid() in pids and other not in pids
    assert watch.share() > QUIET_SHARE  # the other spinner alone is a core's worth


@pytest.mark.timeout(60)
def test_in_place_runs_refuse_a_busy_machine_unless_forced(tmp_path):
    """`make notebooks` on a machine where another process spins: refused before any notebook runs, and forced, the
    notebook records the load it saw."""
    import signal
    import subprocess

    import nbformat

    path = tmp_path / "n.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("print(1)")]), path)
    before = path.read_text()
    spin = subprocess.run(["sh", "-c", f"'{sys.executable}' -c 'while True: pass' >/dev/null 2>&1 & echo $!"],
                          capture_output=True, text=True, timeout=10)
    pid = int(spin.stdout)  # its shell has exited: not a process of ours, so it counts as another's
    try:
        with pytest.raises(RuntimeError, match=r"the machine is busy: other processes used \d+% of its cores"):
            run_notebooks([path], inplace=True, watch=1.5)
        assert path.read_text() == before
        run_notebooks([path], inplace=True, watch=1.5, force=True)
    finally:
        os.kill(pid, signal.SIGKILL)
    recorded = nbformat.read(path, as_version=4).metadata["recorded"]
    assert recorded["forced"] and recorded["others_cpu_share_before"] > QUIET_SHARE


def test_no_test_hooks_in_the_product():
    """Faults reach rank processes only through tests/faults/sitecustomize.py: no product module reads a fault
    variable or calls a fault point."""
    import re

    for file in PACKAGE.glob("*.py"):
        text = file.read_text()
        assert not re.search(r"\bfault|GPTJ_TEST", text, flags=re.I), f"{file.name} holds a test hook"
