"""Notebook 10: several people at once. The KV cache of slots, the scheduler's steps (decode every running sequence,
then prefill chunks within a token budget), each request getting what it would get alone, the slot plan against the
budgets, and refusals with their numbers."""
import pytest
import torch

import gptj_helpers as gh
from gptj_split.scheduler import QueueFull, Request, Scheduler, certain_text, run_requests
from gptj_split.slots import SlotCache, forward_slots, plan_slots

PROMPTS = ["The list", "A dictionary is a mapping of keys to values, and", "import os", "Hello, world",
           "The function returns the", "Each module has its own private symbol table, which"]
NEW = 10


def alone(model, tokenizer, prompt: str, new: int, **sampling) -> list[int]:
    """generate_text's new tokens for one prompt alone, up to its end-of-text token as generate_text counts them."""
    _, record = gh.generate_text(model, tokenizer, prompt, new, **sampling)
    ids = record.output_ids[0, len(tokenizer(prompt)["input_ids"]):].tolist()
    eos = tokenizer.eos_token_id
    return ids[:ids.index(eos) + 1] if eos in ids else ids


def request(tokenizer, prompt: str, new: int = NEW, **knobs) -> Request:
    """A scheduler request for a prompt."""
    stop = knobs.pop("stop", ())
    sampling = gh.Sampling(**knobs) if knobs else gh.Sampling(greedy=True)
    return Request(tokenizer(prompt)["input_ids"], new, sampling, tuple(stop))


@pytest.mark.parametrize("slots, budget", [(6, 256), (2, 4)], ids=["all at once", "queued, chunked prefill"])
def test_each_greedy_request_gets_what_it_would_alone(tiny, slots, budget):
    """Prompts of different lengths share each step's forward (and with 2 slots wait for one, their prompts prefilled
    in chunks of at most a few tokens beside the others' decode): token for token what generate_text gives alone."""
    model, tokenizer = tiny
    scheduler = Scheduler(model, tokenizer, slots=slots, max_len=64, budget=budget)
    done = run_requests(scheduler, [request(tokenizer, p) for p in PROMPTS])
    for prompt, completion in zip(PROMPTS, done):
        assert completion.tokens == alone(model, tokenizer, prompt, NEW, greedy=True), prompt
        assert completion.text == tokenizer.decode(completion.tokens, skip_special_tokens=True)
        assert completion.reason in ("stop", "length")
        assert completion.prompt_tokens == len(tokenizer(prompt)["input_ids"])
    assert not scheduler.running and sorted(scheduler.free) == list(range(slots))


def test_seeded_sampling_equals_generate_text_alone_whatever_else_runs(tiny):
    model, tokenizer = tiny
    knobs = [dict(temperature=0.9, top_p=0.8, seed=3), dict(temperature=1.2, top_k=20, seed=5), dict(greedy=True)]
    scheduler = Scheduler(model, tokenizer, slots=3, max_len=64)
    done = run_requests(scheduler, [request(tokenizer, p, **k) for p, k in zip(PROMPTS, knobs)])
    for prompt, k, completion in zip(PROMPTS, knobs, done):
        assert completion.tokens == alone(model, tokenizer, prompt, NEW, **k), (prompt, k)


def test_the_slot_cache_keeps_each_rows_keys_in_its_own_slot(tiny):
    """Two rows of different lengths in one forward: each row's logits equal that sequence run alone, and the
    positions past a row's end are never read (filled with garbage, the logits do not move)."""
    model, tokenizer = tiny
    a, b = (tokenizer(p)["input_ids"] for p in PROMPTS[:2])
    cache = SlotCache(slots=3, max_len=32)
    forward_slots(model, cache, torch.tensor([2]), torch.tensor([0]), torch.tensor([a]))
    forward_slots(model, cache, torch.tensor([0]), torch.tensor([0]), torch.tensor([b]))
    with torch.inference_mode():  # the cache's tensors are inference tensors
        for store in (*cache.keys.values(), *cache.values.values()):
            store[2, :, len(a):] = 1e4  # beyond row a's end: must stay unseen
    both = forward_slots(model, cache, torch.tensor([2, 0]), torch.tensor([len(a), len(b)]), torch.tensor([[7], [9]]))
    with torch.inference_mode():
        want_a = model(input_ids=torch.tensor([a + [7]])).logits[0, -1]
        want_b = model(input_ids=torch.tensor([b + [9]])).logits[0, -1]
    assert torch.allclose(both[0], want_a, atol=1e-4) and torch.allclose(both[1], want_b, atol=1e-4)


def test_stop_strings_end_a_request_and_the_streamed_pieces_join_to_the_text(tiny):
    model, tokenizer = tiny
    whole = tokenizer.decode(alone(model, tokenizer, PROMPTS[1], 24, greedy=True), skip_special_tokens=True)
    stop = whole[5:8]
    pieces = []
    r = request(tokenizer, PROMPTS[1], 24, stop=[stop])
    r.on_text = pieces.append
    done = run_requests(Scheduler(model, tokenizer, slots=2, max_len=64), [r])[0]
    assert done.reason == "stop" and done.text == whole[:whole.index(stop)] and "".join(pieces) == done.text


def test_certain_text_holds_back_what_a_later_token_can_change():
    assert certain_text("abc\ufffd", ()) == "abc"  # half a character
    assert certain_text("the end is ne", ("near",)) == "the end is "  # could grow into the stop string
    assert certain_text("the end", ("xyz",)) == "the end"


def test_a_request_that_can_never_fit_is_refused_with_the_numbers_and_a_full_queue_at_once(tiny):
    model, tokenizer = tiny
    scheduler = Scheduler(model, tokenizer, slots=1, max_len=16, queue_limit=2)
    with pytest.raises(ValueError, match=r"the prompt has 2 tokens and max_tokens is 20: 22 in all, more than a "
                       r"slot's 16; ask for at most 14 tokens"):
        scheduler.submit(request(tokenizer, "The list", 20))
    scheduler.submit(request(tokenizer, "The list", 4))
    scheduler.submit(request(tokenizer, "The list", 4))
    with pytest.raises(QueueFull, match="2 requests are already waiting"):
        scheduler.submit(request(tokenizer, "The list", 4))


def test_a_cancelled_request_frees_its_slot_at_the_next_step_and_the_others_are_unchanged(tiny):
    model, tokenizer = tiny
    scheduler = Scheduler(model, tokenizer, slots=2, max_len=64)
    ended = []
    leaving, staying = request(tokenizer, PROMPTS[0], 40), request(tokenizer, PROMPTS[1])
    leaving.on_end = ended.append
    scheduler.submit(leaving)
    scheduler.step()
    scheduler.step()
    scheduler.cancel(leaving)
    done = run_requests(scheduler, [staying])[0]
    assert ended[0].reason == "cancelled" and len(ended[0].tokens) == 2
    assert done.tokens == alone(model, tokenizer, PROMPTS[1], NEW, greedy=True)
    assert sorted(scheduler.free) == [0, 1]


def test_the_slot_plan_counts_sequences_against_every_budget():
    """GPT-J-6B on Kaggle's two T4s: how many sequences of 512 tokens fit beside the weights, and one more does not."""
    config = gh.gptj_6b_config()
    two_t4s = gh.parse_devices("cuda:0=14GiB,cuda:1=14GiB", gh.describe_hardware("2 x T4"))
    most = plan_slots(config, two_t4s, 512, torch.float16, reserve="1GiB")
    assert most.slots > 1
    with pytest.raises(MemoryError):
        plan_slots(config, two_t4s, 512, torch.float16, slots=most.slots + 1, reserve="1GiB")
    kv = sum(s.kv_cache_bytes for s in most.plan.devices)
    assert kv == most.slots * 2 * config.n_embd * 2 * 512 * config.n_layer  # keys and values, float16
    assert str(most).startswith(f"{most.slots} sequences of 512 tokens")


def test_the_slot_table_prints_each_readme_setups_count():
    from gptj_split.slots import slot_table

    table = slot_table(512)
    for setup in gh.SETUPS:
        assert f"| {setup} | " in table
    kaggle = next(line for line in table.splitlines() if line.startswith("| Kaggle"))
    colab = next(line for line in table.splitlines() if line.startswith("| Colab"))
    assert int(kaggle.split("|")[2].split()[0]) > int(colab.split("|")[2].split()[0]) >= 1  # two T4s hold more
