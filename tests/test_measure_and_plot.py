"""Notebook 04: the recorded timeline and memory of a run, the plots drawn from them, estimates, gpu_check's CPU
mode."""
from pathlib import Path

import matplotlib
import pytest
import torch

import gptj_helpers as gh
from gptj_split.plots import shared_span_ms

matplotlib.use("Agg")
ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["The list", "A function is called when the"]


@pytest.fixture(scope="module")
def run(tiny, tiny_path):
    """A greedy run of the tiny default over 4 virtual devices with small budgets, and its model."""
    _, tokenizer = tiny
    plan = gh.plan_split(tiny_path, "4x3MiB", dtype=torch.float32, prompt_tokens=16, max_new_tokens=12, batch_size=2)
    model = gh.place_stages(tiny_path, plan)
    _, record = gh.generate_text(model, tokenizer, PROMPTS, max_new_tokens=12, greedy=True)
    return model, record


def test_every_stage_once_per_forward_and_no_overlap(run):
    model, record = run
    n = len(model.plan.devices)
    steps = sorted({e.step for e in record.events})
    assert steps == list(range(len(steps))) and len(steps) > 2
    assert [e.phase for e in record.events].count("prefill") == n
    for step in steps:
        assert sorted(e.stage for e in record.events if e.step == step) == list(range(n))
    ordered = sorted(record.events, key=lambda e: e.start)
    assert all(a.end <= b.start for a, b in zip(ordered, ordered[1:]))  # naive split: one stage at a time
    assert [(e.step, e.stage) for e in ordered] == sorted((e.step, e.stage) for e in ordered)
    assert all(0 <= e.start < e.end <= record.total_seconds for e in record.events)
    used = gh.utilisation(record)
    assert len(used) == n and all(u > 0 for u in used) and sum(used) <= 1


def test_memory_parts_sum_to_the_total(run):
    model, record = run
    placed = [0] * len(model.plan.devices)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        placed[0 if name.startswith("transformer.rotary") else model.plan.stage_of_module(name)] += \
            t.numel() * t.element_size()
    for row, stage, params in zip(record.memory, model.plan.devices, placed):
        assert row.param_bytes == params
        assert row.total_bytes == row.param_bytes + row.kv_cache_bytes + row.activation_bytes
        assert row.budget_bytes == stage.budget_bytes == 3 * 2**20
        assert row.kv_cache_bytes > 0 and row.activation_bytes > 0


def test_activation_estimate_grows_with_the_prompt(tiny, run):
    model, record = run
    _, tokenizer = tiny
    long_prompt = gh.prompt_of_length(tokenizer, 64)
    _, longer = gh.generate_text(model, tokenizer, [long_prompt] * 2, max_new_tokens=2, greedy=True)
    for short_row, long_row in zip(record.memory, longer.memory):
        assert long_row.activation_bytes > 4 * short_row.activation_bytes
    # for a block stage: the hidden states entering (b*t*d) plus the MLP's widest step (4*b*t*d in and out)
    width = max(longer.settings["prompt_tokens"])
    hidden = 2 * width * model.config.n_embd * 4
    assert longer.memory[1].activation_bytes == 9 * hidden


def test_measure_memory_without_activations_is_unchanged(run):
    model, _ = run
    rows = gh.measure_memory(model)
    assert all(r.activation_bytes == 0 and r.total_bytes == r.param_bytes for r in rows)


def test_estimates_beside_measurements(run):
    model, record = run
    rows = gh.compare_estimates(record, model.config)
    kv = [r for r in rows if "KV cache" in r["what"]]
    assert len(kv) == 4 and all(r["ratio"] == 1.0 for r in kv)
    params = [r for r in rows if "parameters" in r["what"]]
    assert all(r["ratio"] == pytest.approx(1.0, abs=0.02) for r in params)
    step = rows[-1]
    assert step["unit"] == "ms" and step["estimate"] > 0 and step["measured"] > 0  # no speed asserted: timings vary
    assert "estimate" in gh.format_estimates(rows) and "ratio" in gh.format_estimates(rows)


def labels_of(fig):
    ax = fig.axes[0]
    return ax.get_title(), ax.get_xlabel(), ax.get_ylabel(), ax.get_legend()


def test_plots_are_figures_with_titles_units_and_legends(run):
    _, record = run
    for fig in (gh.plot_memory(record), gh.plot_timeline(record), gh.plot_utilisation(record)):
        title, xlabel, ylabel, legend = labels_of(fig)
        assert title and legend is not None and (xlabel or ylabel)
        assert "(" in xlabel + ylabel  # a unit
    assert len(gh.plot_timeline(record, max_step=2).axes[0].collections) == 2 * 4  # decode steps 1, 2; 4 stages
    assert len(gh.plot_timeline(record, max_step=2, first_step=0).axes[0].collections) == 3 * 4  # and the prefill


def test_timeline_draws_a_pipeline_record():
    events = []
    for mb in range(2):
        for stage in range(2):
            t = mb * 0.01 + stage * 0.01
            events.append(gh.TimingEvent(stage, "prefill", 0, t, t + 0.008, micro_batch=mb))
            if stage == 0:
                events.append(gh.TimingEvent(0, "prefill", 0, t + 0.008, t + 0.009, kind="send", micro_batch=mb))
            else:
                events.append(gh.TimingEvent(1, "prefill", 0, t - 0.001, t, kind="recv", micro_batch=mb))
    record = gh.RunRecord(texts=["a"], prompts=["p"], mode="pipeline", new_tokens=1, time_to_first_token=0.03,
                          tokens_per_second=0.0, total_seconds=0.04, events=events)
    fig = gh.plot_timeline(record)
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend == ["prefill", "send", "recv"]
    assert "micro-batches" in fig.axes[0].get_title()
    with pytest.raises(ValueError, match="no timing events"):
        gh.plot_timeline(gh.RunRecord([], [], "naive", 0, 0.0, 0.0, 0.0))


def test_timelines_of_two_runs_share_one_time_axis():
    """The slower run sets the axis: the faster one's bars end about halfway along it."""
    def run_of(seconds, mode):
        events = [gh.TimingEvent(s, "prefill", 0, s * seconds / 2, (s + 1) * seconds / 2) for s in range(2)]
        return gh.RunRecord(texts=["a"], prompts=["p"], mode=mode, new_tokens=1, time_to_first_token=seconds,
                            tokens_per_second=0.0, total_seconds=seconds, events=events)

    slow, fast = run_of(0.2, "naive"), run_of(0.1, "pipeline")
    assert shared_span_ms([slow, fast], max_step=0, first_step=0) == pytest.approx(200)
    fig = gh.plot_timelines([slow, fast], max_step=0, first_step=0)
    assert len(fig.axes) == 2 and fig.axes[0].get_xlim() == fig.axes[1].get_xlim()
    assert fig.axes[1].get_xlim()[1] == pytest.approx(204)
    assert "naive" in fig.axes[0].get_title() and "pipeline" in fig.axes[1].get_title()


def test_figures_are_saved_only_with_an_output_folder(run, tmp_path, monkeypatch):
    _, record = run
    monkeypatch.delenv("GPTJ_HELPERS_OUT", raising=False)
    assert gh.show_figure(gh.plot_utilisation(record), "utilisation") is None
    monkeypatch.setenv("GPTJ_HELPERS_OUT", str(tmp_path / "figures"))
    path = gh.show_figure(gh.plot_timeline(record), "timeline")
    assert path == tmp_path / "figures" / "timeline.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in path.parent.iterdir()] == ["timeline.png"]


def test_scaling_measurements_and_plot(tiny_path):
    rows = gh.measure_scaling(str(tiny_path), n_devices=(1, 2), prompt_lengths=(4, 16), fixed_devices=2,
                              max_new_tokens=3, reps=1)
    assert [(r["n_devices"], r["prompt_tokens"]) for r in rows] == [(1, 4), (2, 4), (2, 16)]
    assert all(r["tokens_per_second"] > 0 and len(r["utilisation"]) == r["n_devices"] for r in rows)
    fig = gh.plot_scaling(rows, fixed_devices=2)
    assert len(fig.axes) == 4 and all(ax.get_ylabel() for ax in fig.axes)


def test_random_stages_have_the_planned_placement_and_dtype(tiny):
    _, tokenizer = tiny
    config = gh.tiny_config()
    plan = gh.plan_split(config, "3xcpu", dtype=torch.bfloat16)
    model = gh.place_stages(config, plan)
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in model.parameters())
    assert not any(p.is_meta for p in model.parameters())
    assert [r.param_bytes for r in gh.measure_memory(model)][1:] == [s.param_bytes for s in plan.devices][1:]
    weights = model.transformer.h[0].attn.q_proj.weight.float()
    assert 0.015 < weights.std() < 0.025  # initialised, not left empty
    assert torch.equal(model.transformer.h[0].ln_1.weight, torch.ones_like(model.transformer.h[0].ln_1.weight))
    texts, record = gh.generate_text(model, tokenizer, "x", max_new_tokens=3, greedy=True)
    assert record.mode == "naive" and len(record.busy_seconds()) == 3


def gpu_check_module(monkeypatch):
    """benchmarks/gpu_check.py, imported into this process (its child processes stay processes)."""
    import importlib

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    return importlib.import_module("gpu_check")


def test_gpu_check_runs_every_case_on_the_cpu(monkeypatch, capsys):
    """`gpu_check.py --device cpu`: every case of the GPU check, at reduced size, each equality deciding it."""
    assert gpu_check_module(monkeypatch).main(["--device", "cpu", "--tokens", "8"]) == 0
    text = capsys.readouterr().out
    assert "FAILED" not in text and ": False" not in text
    assert text.count(": passed in ") == 8, text  # naive, compiled, boundary, pipeline, tensor parallel, int8, nf4,
    assert "8 of 8 case(s) passed; skipped (not counted): nccl" in text  # device map
    assert "compiled tokens equal eager's (float32): True" in text
    assert all(f"slice {s} params within 1% of the plan: True" in text for s in range(3))
    assert "estimate vs measured" in text and "busy ms" in text and "tokens/s after it" in text
    assert "torch: backend gloo (expected gloo); tokens equal generate's: True" in text


def test_gpu_check_fails_when_a_split_is_perturbed(monkeypatch, capsys):
    """One weight of the split changed: the boundary case prints False, fails, and the command exits 1."""
    import gptj_split.place

    gpu_check = gpu_check_module(monkeypatch)
    hook = gptj_split.place.hook_stages  # every split passes here once its weights are in place

    def perturbed(model, *args, **kwargs):
        with torch.no_grad():
            model.transformer.h[-1].mlp.fc_out.weight[0] += 1.0
        return hook(model, *args, **kwargs)

    monkeypatch.setattr(gptj_split.place, "hook_stages", perturbed)
    assert gpu_check.main(["--device", "cpu", "--only", "boundary"]) == 1
    text = capsys.readouterr().out
    assert "greedy       split == unsplit: False" in text
    assert "FAILED (greedy       split == unsplit is False)" in text
    assert "0 of 1 case(s) passed; failed: boundary" in text


def test_bandwidth_verdicts_follow_the_numbers_of_the_run():
    """A row near the fastest memory rate waits on memory; one well below it waits on arithmetic."""
    rows = [dict(dtype="float32", threads=1, ms=12.5, weights_gb_s=21.5, gmacs=5.4, copy_gb_s=22.3),
            dict(dtype="bfloat16", threads=1, ms=13.7, weights_gb_s=9.8, gmacs=4.9, copy_gb_s=22.3),
            dict(dtype="bfloat16", threads=2, ms=12.9, weights_gb_s=10.4, gmacs=5.2, copy_gb_s=22.3)]
    lines = gh.format_bandwidth(rows).splitlines()
    assert lines[1].endswith("memory bandwidth") and lines[2].endswith("arithmetic")
    assert "get in each other's way" in lines[3]  # two threads, no faster, still far below the ceiling
    measured = gh.measure_weight_bandwidth(rows=256, cols=128, dtypes=(torch.float32,), threads=(1,))
    assert len(measured) == 1 and measured[0]["weights_gb_s"] > 0 and measured[0]["copy_gb_s"] > 0


def test_decode_reads_every_weight_but_the_embedding():
    sizes = gh.module_sizes(gh.gptj_6b_config(), torch.float16)
    read = gh.decode_read_bytes(gh.gptj_6b_config(), torch.float16)
    assert read == sizes["total"] - sizes["embedding"] and round(read / 1e9, 1) == 11.7


def test_prefill_bubble_reads_stages_and_micro_batches_from_the_run():
    """3 stages, 2 micro-batches, 10 ms of compute in 12 ms slots: GPipe's formula and the rest per slot."""
    events = [gh.TimingEvent(s, "prefill", 0, (s + m) * 0.012, (s + m) * 0.012 + 0.010, micro_batch=m)
              for s in range(3) for m in range(2)]
    record = gh.RunRecord(texts=[], prompts=[], mode="pipeline", new_tokens=0, time_to_first_token=4 * 0.012,
                          tokens_per_second=0.0, total_seconds=0.05, events=events, settings={"micro_batches": 2},
                          memory=[gh.MemoryRow(s, "cpu", 0, 0) for s in range(3)])
    b = gh.prefill_bubble(record)
    assert (b["p"], b["m"]) == (3, 2) and b["formula"] == pytest.approx(2 / 4)
    assert b["measured"] == pytest.approx(1 - 6 * 0.010 / (3 * 0.048))
    assert b["compute_ms"] == pytest.approx(10) and b["overhead_ms"] == pytest.approx(2)
