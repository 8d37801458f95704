"""Notebook 09: the decode step compiled over a static KV cache. These tests trace with dynamo's "eager" backend
(graphs and recompiles are dynamo's, whatever the backend); notebook 09 and benchmarks/compiled_decode.py compile
with inductor and check its tokens."""
import pytest
import torch

import gptj_helpers as gh
from gptj_split.generate import run_generate
from gptj_split.models import REPO_DIR
import gptj_split.compiled
from gptj_split.compiled import MAX_GRAPHS


@pytest.fixture(scope="module")
def compiled_split():
    """The tiny model in three budget slices of the CPU, its decode step compiled once for this file."""
    model = gh.place_stages("tiny", gh.plan_split("tiny", "3x4MiB", dtype=torch.float32))
    return model, gh.compile_stages(model, max_cache_len=96, backend="eager")


@pytest.mark.floor  # the cache keyword and StaticCache differ between transformers 5.15 and 5.2x
def test_compiled_decode_equals_eager_and_never_recompiles_for_a_new_prompt(tiny, compiled_split):
    model, compiled = compiled_split
    tokenizer = tiny[1]
    for kwargs in (dict(greedy=True), dict(seed=3, top_p=0.9), dict(seed=5, temperature=0.8, top_k=20)):
        eager, _ = gh.generate_text(model, tokenizer, "The list", max_new_tokens=12, **kwargs)
        got, record = gh.generate_compiled(compiled, tokenizer, "The list", max_new_tokens=12, **kwargs)
        assert got == eager and record.mode == "compiled", kwargs
    assert list(compiled.compile_seconds) == [1]  # one graph: batch 1
    with torch.compiler.set_stance("fail_on_recompile"):  # other prompt lengths and settings: the same graph
        for prompt in ("A dictionary is", "Hello, world and more words than before"):
            got, _ = gh.generate_compiled(compiled, tokenizer, prompt, max_new_tokens=20, greedy=True)
            assert got == gh.generate_text(model, tokenizer, prompt, max_new_tokens=20, greedy=True)[0]
        with pytest.raises(RuntimeError, match="[Rr]ecompil"):  # a new batch size is a new graph: the stance sees it
            gh.generate_compiled(compiled, tokenizer, ["The list", "A dictionary is"], max_new_tokens=4, greedy=True)
    got, _ = gh.generate_compiled(compiled, tokenizer, ["The list", "A dictionary is"], max_new_tokens=8, greedy=True)
    assert got == gh.generate_text(model, tokenizer, ["The list", "A dictionary is"], max_new_tokens=8, greedy=True)[0]
    assert sorted(compiled.compile_seconds) == [1, 2]


def test_a_prompt_past_the_static_cache_is_refused_with_the_numbers(tiny, compiled_split):
    _, compiled = compiled_split
    prompt = "word " * 90
    n = len(tiny[1](prompt)["input_ids"])
    with pytest.raises(ValueError, match=rf"a prompt of {n} tokens plus max_new_tokens=20 needs {n + 20} positions; "
                                         rf"the static cache holds 96: ask for at most {96 - n} new tokens"):
        gh.generate_compiled(compiled, tiny[1], prompt, max_new_tokens=20)


def test_graphs_are_bounded_by_batch_size(compiled_split):
    _, compiled = compiled_split
    sizes = [b for b in range(1, 20) if b not in compiled.caches][:MAX_GRAPHS - len(compiled.caches)]
    for b in sizes:
        compiled.cache_for(b)
    with pytest.raises(ValueError, match=f"a batch of 19 would compile a {MAX_GRAPHS + 1}th"):
        compiled.cache_for(19)
    for b in sizes:
        del compiled.caches[b]


def test_what_cannot_compile_falls_back_with_one_line(tiny, monkeypatch, capsys):
    model = tiny[0]
    monkeypatch.setattr(gptj_split.compiled, "stage_modules",
                        lambda m: [([], torch.device("cuda:0")), ([], torch.device("cuda:1"))])
    assert gh.compile_stages(model) is None
    assert capsys.readouterr().out == (
        "compiled decode: not available (the stages span 2 devices (cuda:0, cuda:1): one compiled region (and one "
        "CUDA graph) holds one device's work, and regions per device are not built here); generating eagerly\n")
    monkeypatch.setattr(gptj_split.compiled, "stage_modules", lambda m: [([], torch.device("cpu"))])
    monkeypatch.setattr(gptj_split.compiled.shutil, "which", lambda name: None)
    assert gh.compile_stages(model) is None
    assert "needs a C++ compiler (g++ or clang++)" in capsys.readouterr().out


def test_the_one_comparison_names_the_first_divergence(tiny, compiled_split):
    model, compiled = compiled_split
    _, eager = run_generate(model, tiny[1], "The list", 10, gh.Sampling(greedy=True), output_logits=True)
    _, fast = gh.generate_compiled(compiled, tiny[1], "The list", 10, greedy=True, keep_logits=True)
    same = gh.compare_outputs(eager.output_ids, eager.logits, fast.output_ids, fast.logits)
    assert same["first_divergence"] is None and same["steps"] == 10 and same["largest_logit_difference"] < 1e-4
    fast.output_ids[0, -4] += 1  # the 7th new token picked differently
    parted = gh.compare_outputs(eager.output_ids, eager.logits, fast.output_ids, fast.logits)
    assert parted["first_divergence"] == 6 and parted["same_tokens"] == 6
    tokens_only = gh.compare_outputs(eager.output_ids[:, -10:], None, fast.output_ids[:, -10:], None)  # notebook 08's
    assert tokens_only == {"first_divergence": 6, "same_tokens": 6, "steps": 10}


def test_the_limit_counts_every_weight_read_once_and_the_cache(tiny):
    model = tiny[0]
    limit = gh.decode_limit(model, 100, bandwidth=1e9)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    wte = model.transformer.wte.weight
    assert limit["weights"] == params - wte.numel() * 4 + wte.shape[1] * 4  # one row of the embedding
    assert limit["kv_cache"] == 2 * 8 * 128 * 4 * 100  # keys and values, 8 blocks, width 128, float32, 100 positions
    assert limit["tokens_per_second"] == pytest.approx(1e9 / (limit["weights"] + limit["kv_cache"]))


def test_profile_decode_splits_a_step_and_prints_nothing(tiny, capfd):
    model, tokenizer = tiny
    where = gh.profile_decode(lambda n: gh.generate_text(model, tokenizer, "The list", max_new_tokens=n, greedy=True),
                              steps=8)  # enough steps that a busy moment in one run cannot outweigh them
    assert where["where"] == "CPU" and where["ops"] > 100 and where["kernel_ms"] > 0 and where["wall_ms"] > 0
    assert where["rest_ms"] == pytest.approx(max(0.0, where["wall_ms"] - where["kernel_ms"]))
    out, err = capfd.readouterr()
    assert "profiler_start" not in out + err  # the profiler's native lines stay out of a notebook


def test_the_compiled_decode_benchmark_parses_its_arguments(monkeypatch, capsys):
    import importlib
    import sys

    monkeypatch.syspath_prepend(str(REPO_DIR / "benchmarks"))
    module = importlib.import_module("compiled_decode")
    with pytest.raises(SystemExit) as done:
        module.main(["--help"])
    assert done.value.code == 0 and "--rounds" in capsys.readouterr().out and "compiled_decode" in sys.modules
