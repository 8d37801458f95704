"""Notebook 03: generation through the split model: equality with the unsplit model, sampling, batching,
streaming, validation, timing, and the `generate` command."""
import pytest
import torch

import gptj_helpers as gh
from conftest import call_cli

PROMPTS = ["The list", "A function is called when the", "x"]  # three different lengths: left padding matters


@pytest.fixture(scope="module")
def split_models(tiny_path):
    """The tiny default placed over 1 to 4 virtual CPU devices."""
    return {n: gh.place_stages(tiny_path, gh.plan_split(tiny_path, f"{n}xcpu", dtype=torch.float32))
            for n in (1, 2, 3, 4)}


def tokens_of(tokenizer, texts):
    return [tokenizer(t)["input_ids"] for t in texts]


@pytest.mark.floor
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_split_greedy_equals_unsplit(tiny, split_models, n):
    model, tokenizer = tiny
    split = split_models[n]
    assert len(split.plan.devices) == n
    for prompts in (PROMPTS[:1], PROMPTS):
        want, _ = gh.generate_text(model, tokenizer, prompts, max_new_tokens=12, greedy=True)
        got, record = gh.generate_text(split, tokenizer, prompts, max_new_tokens=12, greedy=True)
        assert got == want
        assert record.mode == ("naive" if n > 1 else "single") and record.texts is got
    # and generate_text is HF generate: the same tokens as calling it by hand on the unsplit model
    ids = tokenizer(PROMPTS[0], return_tensors="pt")
    by_hand = model.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert tokens_of(tokenizer, got[:1])[0] == tokens_of(tokenizer, [tokenizer.decode(
        by_hand[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)])[0]


def test_batched_equals_alone(tiny, split_models):
    _, tokenizer = tiny
    split = split_models[3]
    batched, _ = gh.generate_text(split, tokenizer, PROMPTS, max_new_tokens=12, greedy=True)
    alone = [gh.generate_text(split, tokenizer, p, max_new_tokens=12, greedy=True)[0][0] for p in PROMPTS]
    assert batched == alone
    assert len(set(batched)) == len(PROMPTS)  # the prompts really give different texts


@pytest.mark.floor
def test_seeded_sampling_is_reproducible_split_or_not(tiny, split_models):
    model, tokenizer = tiny
    kw = dict(max_new_tokens=16, seed=7)
    whole, _ = gh.generate_text(model, tokenizer, PROMPTS, **kw)
    assert gh.generate_text(split_models[4], tokenizer, PROMPTS, **kw)[0] == whole
    assert gh.generate_text(split_models[2], tokenizer, PROMPTS, **kw)[0] == whole
    assert gh.generate_text(model, tokenizer, PROMPTS, max_new_tokens=16, seed=8)[0] != whole  # the seed matters
    greedy, _ = gh.generate_text(model, tokenizer, PROMPTS, max_new_tokens=16, greedy=True)
    assert greedy != whole  # and sampling is not greedy


def test_sampling_follows_the_seed_recipe(tiny):
    """seed + generate_text == torch.manual_seed + HF generate with the seed post's settings."""
    model, tokenizer = tiny
    texts, record = gh.generate_text(model, tokenizer, PROMPTS[0], max_new_tokens=16, seed=3)
    ids = tokenizer(PROMPTS[0], return_tensors="pt")
    torch.manual_seed(3)
    out = model.generate(**ids, do_sample=True, max_new_tokens=16, top_p=0.7, top_k=0, temperature=1.0,
                         pad_token_id=tokenizer.eos_token_id)
    assert texts[0] == tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert record.settings["top_p"] == 0.7 and record.settings["top_k"] == 0 and not record.settings["greedy"]
    # knobs change the text
    hot, _ = gh.generate_text(model, tokenizer, PROMPTS[0], max_new_tokens=16, seed=3, top_k=1)
    assert hot != texts and hot == gh.generate_text(model, tokenizer, PROMPTS[0], max_new_tokens=16, greedy=True)[0]


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=0.0), "temperature"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=510), "context of 512"),
    (dict(prompts=[]), "no prompts"),
    (dict(prompts=["fine", ""]), "prompt 1"),
    (dict(prompts=["a", "b"], stream=True), "one prompt at a time"),
])
def test_bad_settings_fail_before_any_work(tiny, kwargs, message):
    model, tokenizer = tiny
    calls = []
    handle = model.register_forward_pre_hook(lambda *a: calls.append(1))
    kw = dict(prompts=PROMPTS, max_new_tokens=4) | kwargs
    try:
        with pytest.raises(ValueError, match=message):
            gh.generate_text(model, tokenizer, kw.pop("prompts"), **kw)
    finally:
        handle.remove()
    assert calls == []


def test_greedy_ignores_temperature(tiny):
    model, tokenizer = tiny
    cold, _ = gh.generate_text(model, tokenizer, "The list", max_new_tokens=12, greedy=True, temperature=0)
    hot, _ = gh.generate_text(model, tokenizer, "The list", max_new_tokens=12, greedy=True, temperature=1.7, top_k=3)
    assert cold == hot
    sampled, _ = gh.generate_text(model, tokenizer, "The list", max_new_tokens=12, temperature=1.7, seed=0)
    assert sampled != cold  # the comparison can fail: sampling at that temperature leaves the greedy path


@pytest.mark.floor
def test_streaming_gives_the_same_text(tiny, split_models, capsys):
    from transformers import TextIteratorStreamer

    _, tokenizer = tiny
    split = split_models[2]
    plain, _ = gh.generate_text(split, tokenizer, PROMPTS[1], max_new_tokens=20, seed=5)
    capsys.readouterr()
    streamed, _ = gh.generate_text(split, tokenizer, PROMPTS[1], max_new_tokens=20, seed=5, stream=True)
    assert streamed == plain
    assert capsys.readouterr().out == PROMPTS[1] + plain[0] + "\n"
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    gh.generate_text(split, tokenizer, PROMPTS[1], max_new_tokens=20, seed=5, stream=streamer)
    pieces = list(streamer)  # generate ran in this thread; the queue holds every piece
    assert len(pieces) > 1 and "".join(pieces) == plain[0]


@pytest.mark.floor
def test_timing_record(tiny, split_models):
    _, tokenizer = tiny
    split = split_models[4]
    texts, record = gh.generate_text(split, tokenizer, PROMPTS, max_new_tokens=10, greedy=True)
    steps = sorted({e.step for e in record.events})
    assert steps == list(range(len(steps))) and 1 < len(steps) <= 10
    for step in steps:  # every stage once per forward, in order, one after the other
        events = [e for e in record.events if e.step == step]
        assert [e.stage for e in events] == [0, 1, 2, 3]
        assert all(e.phase == ("prefill" if step == 0 else "decode") for e in events)
        assert all(a.end <= b.start for a, b in zip(events, events[1:]))
        assert all(e.start < e.end for e in events)
    assert 0 < record.time_to_first_token < record.total_seconds
    assert record.tokens_per_second > 0
    busy = record.busy_seconds()
    assert len(busy) == 4 and 0 < sum(busy) <= record.total_seconds
    # the KV cache at the end: every layer holds keys and values for the padded prompt plus each fed-back token
    width = max(len(x) for x in tokens_of(tokenizer, PROMPTS))
    config = split.config
    per_layer = 2 * len(PROMPTS) * config.n_embd * 4 * (width + len(steps) - 1)
    for stage, row in zip(split.plan.devices, record.memory):
        assert row.kv_cache_bytes == (stage.blocks[1] - stage.blocks[0]) * per_layer
    assert record.new_tokens <= 3 * 10 and record.settings["batch_size"] == 3
    assert "time to first token" in gh.format_timing(record)


def test_cli_generate(tiny, tiny_path):
    _, tokenizer = tiny
    model = gh.load_model(str(tiny_path))
    want, _ = gh.generate_text(model, tokenizer, PROMPTS[:2], max_new_tokens=8, greedy=True)
    out = call_cli("generate", "--model", str(tiny_path), "--devices", "3xcpu", "--prompt", PROMPTS[0],
                  "--prompt", PROMPTS[1], "--greedy", "--max-new-tokens", "8")
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"{PROMPTS[0]}{want[0]}\n\n{PROMPTS[1]}{want[1]}\n"
    assert "tokens/s" in out.stderr and "time to first token" in out.stderr
    sampled, _ = gh.generate_text(model, tokenizer, PROMPTS[0], max_new_tokens=8, seed=11)
    out = call_cli("generate", "--model", str(tiny_path), "--devices", "2xcpu", "--prompt", PROMPTS[0],
                  "--seed", "11", "--max-new-tokens", "8", "--stream")
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"{PROMPTS[0]}{sampled[0]}\n"
    bad = call_cli("generate", "--model", str(tiny_path), "--devices", "2xcpu", "--prompt", "x", "--top-k", "-2")
    assert bad.returncode == 2 and "top_k=-2" in bad.stderr and bad.stdout == ""


@pytest.mark.floor
def test_record_keeps_the_token_ids_like_the_pipeline(tiny):
    model, tokenizer = tiny
    texts, record = gh.generate_text(model, tokenizer, PROMPTS[:2], max_new_tokens=6, greedy=True)
    ids = gh.check_generation(model.config, tokenizer, PROMPTS[:2], 6)
    input_ids, mask = gh.pad_left(ids, tokenizer.eos_token_id, "cpu")
    expected = model.generate(input_ids, attention_mask=mask, do_sample=False, max_new_tokens=6,
                              pad_token_id=tokenizer.eos_token_id)
    assert torch.equal(record.output_ids, expected)
