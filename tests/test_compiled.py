"""Notebook 09: the decode step compiled over a static KV cache. These tests trace with dynamo's "eager" backend
(graphs and recompiles are dynamo's, whatever the backend); notebook 09 and benchmarks/compiled_decode.py compile
with inductor and check its tokens."""
import pytest
import torch

import gptj_helpers as gh
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
