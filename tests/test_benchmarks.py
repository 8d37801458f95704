"""The benchmarks that no other test runs stay alive: their quick modes run and check their own results."""
import sys

import pytest

from conftest import ROOT


@pytest.mark.parametrize("script", sorted(p.stem for p in (ROOT / "benchmarks").glob("*.py")))
def test_every_benchmark_imports_and_reads_its_quick_flag(script, monkeypatch, capsys):
    """Each script imports against today's helpers, and those with a --quick mode list it. The quick modes of
    pipeline_speedup.py and tensor_parallel.py are not run here: their work is notebook 05's
    `measure_pipeline_speedup` and notebook 07's `compare_splits`, which nbval runs; quantization.py's and
    rehearse.py's are run below."""
    import importlib

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    module = importlib.import_module(script)
    if hasattr(module, "main") and "--quick" in (ROOT / "benchmarks" / f"{script}.py").read_text():
        monkeypatch.setattr(sys, "argv", [script, "--help"])
        with pytest.raises(SystemExit) as exit:
            module.main()
        assert exit.value.code == 0 and "--quick" in capsys.readouterr().out


def run_main(script: str, *args: str, monkeypatch, capsys):
    """A benchmark's main() with these arguments, in this process (no second import of torch and transformers):
    its return value and what it printed."""
    import importlib

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    monkeypatch.setattr(sys, "argv", [f"benchmarks/{script}.py", *args])
    code = importlib.import_module(script).main()
    return code, capsys.readouterr().out


@pytest.mark.timeout(200)
def test_rehearsal_quick_mode_runs_a_setup_of_the_readme_on_as_many_cpu_devices(monkeypatch, capsys):
    code, out = run_main("rehearse", "--quick", "--setup", "Kaggle, 2 x T4 16 GB", "--notebooks", "00",
                         "--skip-conversions", monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0, out[-2000:]
    assert 'with `MODEL = "tiny"; DEVICES = "cpu=12MiB,cpu=12MiB"; DTYPE = torch.float32`' in out
    assert "| 00_start_here.ipynb | yes |" in out and "(cell " in out  # the host's peak names its cell


def test_rehearsal_converts_notebook_01s_two_checkpoints(monkeypatch, tmp_path):
    """The conversions, each run by the command line in this process instead of a fresh one (whose peak
    measure_command's own tests check): both convert, and their rows carry the largest tensor to judge by."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import rehearse

    import gptj_helpers as gh

    def in_process(argv: list[str]) -> dict:
        assert gh.main(argv) == 0
        return {"seconds": 0.0, "peak_over_baseline": 1}

    monkeypatch.setattr(rehearse, "measure_command", in_process)
    rows = rehearse.rehearse_conversions(True, tmp_path)
    assert [r["name"] for r in rows] == ["01 from pytorch_model.bin", "01 from the JAX slim layout"]
    for folder in ("from-bin", "from-jax"):
        assert list((tmp_path / folder).glob("*.safetensors")), folder
    assert all(r["largest"] > 0 for r in rows)


def test_rehearsal_fails_a_notebook_over_a_device_budget_or_over_the_host_and_names_the_cell():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from rehearse import HOST_LIMIT, format_cells, judge

    def row(device_bytes: int, kernel_peak: int) -> dict:
        placed = device_bytes + 2**30
        entry = {"devices": {"0": {"device": "cpu", "bytes": device_bytes, "budget": 7 * 2**30},
                             "1": {"device": "cpu", "bytes": 2**30, "budget": 7 * 2**30}},
                 "host": kernel_peak - placed, "placed": placed, "unplaced": 0, "rss": kernel_peak}
        return {"ok": True, "ledger": {0: {"devices": {}, "host": 2**29}, 1: entry}, "kernel_peaks": {0: 2**30,
                1: kernel_peak}, "total_peaks": {0: 2**30, 1: kernel_peak}, "process_peaks": {}, "peak": kernel_peak,
                "sources": {0: "x = 1", 1: "model = load()"}}

    assert judge(row(6 * 2**30, 9 * 2**30))["ok"]
    over_device = judge(row(8 * 2**30, 10 * 2**30))
    assert not over_device["ok"] and not over_device["devices_ok"] and over_device["host_ok"]
    over_host = row(6 * 2**30, int(HOST_LIMIT) + 8 * 2**30)  # 7 GiB placed: the rest is the host's
    verdict = judge(over_host)
    assert not verdict["ok"] and not verdict["host_ok"] and verdict["host_cell"] == 1
    assert "cell 1:" in format_cells(over_host)[0] and "model = load()" in format_cells(over_host)[0]


def test_rehearsal_switches_only_the_model_line_and_refuses_a_cell_without_one():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from rehearse import rehearsal_source

    cell = ('# Settings\n# MODEL = "x" in a comment stays\nMODEL = "tiny"; DEVICES = "cpu"\n'
            "MAX_NEW_TOKENS = 24\nSEED = 0")
    switched = rehearsal_source(cell, 'MODEL = "gpt-j-6b-random"; DEVICES = "2x7GiB"', 4)
    assert switched.splitlines() == ["# Settings", '# MODEL = "x" in a comment stays',
                                     'MODEL = "gpt-j-6b-random"; DEVICES = "2x7GiB"', "MAX_NEW_TOKENS = 4", "SEED = 0"]
    with pytest.raises(ValueError, match="no MODEL line"):
        rehearsal_source("# Settings\nDEVICES = 'cpu'", "MODEL = 'x'", 4)


@pytest.mark.timeout(120)
def test_rehearsal_watchdog_ends_a_notebook_past_its_memory_limit():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from rehearse import run_notebook

    row = run_notebook(ROOT / "notebooks" / "00_start_here.ipynb", 'MODEL = "tiny"; DEVICES = "cpu"; '
                       "DTYPE = torch.float32", 4, limit=1, timeout=60)
    assert not row["ok"] and row["error"] == "ended by the watchdog (memory)"


@pytest.mark.timeout(300)
def test_quantization_quick_mode_times_every_format_and_measures_bytes_against_the_plan(monkeypatch, capsys):
    _, out = run_main("quantization", "--quick", monkeypatch=monkeypatch, capsys=capsys)
    rows = {line.split("  ")[0]: line for line in out.splitlines()}
    for label in ("float32", "bfloat16", "int8 (torchao)", "int8 (bitsandbytes)", "nf4 (bitsandbytes)"):
        assert "matmul" in rows[label]  # each row times its format and names its kernel
    assert "faster than bfloat16 here:" in out
    peak = next(line for line in out.splitlines() if line.startswith("2 blocks: nf4 (bitsandbytes)"))
    assert float(peak.split("ratio ")[1].split()[0]) == pytest.approx(1.0, abs=0.01)  # measured bytes = the plan
