"""The full-size CPU benchmark (notebook 04's measured reference), kept alive in a reduced mode.

The full run (GPT-J-6B, about 14 GiB) is not part of `make test`; here the same code path runs GPT-J-6B's
architecture shrunk to 2 blocks x 512 wide: 2 stage processes, then the naive split, in well under a minute.
"""
import importlib.util
import re
import sys

import pytest
import torch

import gptj_helpers as gh
from gptj_split.devices import parse_size
from conftest import ROOT

SCRIPT = ROOT / "benchmarks" / "full_size_cpu.py"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("full_size_cpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(240)
def test_reduced_run_pipeline_equals_naive_and_reports_memory(monkeypatch, capsys):
    """The benchmark's main() in this process (its stages are processes of their own, as in a real run)."""
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--layers", "2", "--width", "512", "--new-tokens", "4"])
    code = load_benchmark().main()
    text = capsys.readouterr().out
    assert code == 0, text[-3000:]
    assert "tokens identical: True" in text
    ids = re.findall(r"new token ids, (?:pipeline|naive on \d thread\(s\)): +\[([\d, ]+)\]", text)
    assert len(ids) >= 2 and len(set(ids)) == 1 and len(ids[0].split(",")) == 4
    rows = re.findall(r"^ +(\d) +\d+-\d+ +(.+?B) +(.+?B) +(.+?B) +(.+?B) +(.+?B) +(.+?B) +([\d.]+)$", text, re.M)
    assert [r[0] for r in rows] == ["0", "1"], text
    for _, planned, measured, planned_kv, measured_kv, _total, peak, ratio in rows:
        assert planned == measured  # placement made exactly the planned parameters
        assert parse_size(measured_kv) <= parse_size(planned_kv)  # the last token is never fed back
        assert parse_size(peak) >= parse_size(measured)  # a stage process's peak holds at least its weights
        assert float(ratio) >= 0.95
    assert "worst peak / planned" in text and "GB/s" in text
    assert "summary to paste" not in text  # only the full-size run prints the README block


def test_free_memory_requirement_scales_and_refuses():
    bench = load_benchmark()
    full = gh.plan_split(bench.build_config(None, None), "2x100GiB", dtype=torch.bfloat16, prompt_tokens=10,
                         max_new_tokens=8)
    reduced = gh.plan_split(bench.build_config(2, 512), "2x100GiB", dtype=torch.bfloat16, prompt_tokens=10,
                            max_new_tokens=8)
    assert 13 * 2**30 < bench.needed_bytes(full, processes=3) < 15 * 2**30  # the "about 14 GiB"
    assert bench.needed_bytes(reduced, processes=3) < 2 * 2**30
    with pytest.raises(SystemExit, match=r"refusing to start the pipeline: it needs about .* --layers"):
        bench.check_free_memory(2**50, "the pipeline")
    bench.check_free_memory(1, "the pipeline")  # enough: no error
    with pytest.raises(SystemExit, match="multiple of 256"):
        bench.build_config(2, 500)
