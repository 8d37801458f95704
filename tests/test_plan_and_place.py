"""Notebook 02: the planner (optimal, budgets, costs, errors) and placement across virtual devices."""
import itertools
from pathlib import Path
import json
import random

import pytest
import torch

import gptj_helpers as gh
from gptj_split.plan import kv_cache_bytes_per_layer
from gptj_split.random_models import write_random_model
from conftest import call_cli

GB = 10**9


def tiny_config(n_layer):
    config = gh.tiny_config()
    config.n_layer = n_layer
    return config


def brute_force(config, devices, dtype, tokens, cost):
    """Every contiguous split, scored like the planner: the smallest worst fill, or worst cost within budgets."""
    sizes = gh.module_sizes(config, dtype)
    kv = kv_cache_bytes_per_layer(config, dtype, tokens)
    n, L = len(devices), config.n_layer
    best = None
    for cuts in itertools.combinations_with_replacement(range(L + 1), n - 1):
        bounds = list(zip((0,) + cuts, cuts + (L,)))
        fills, costs = [], []
        for s, (a, b) in enumerate(bounds):
            load = (b - a) * (sizes["block"] + kv) + (s == 0) * sizes["embedding"] + (s == n - 1) * sizes["head"]
            fills.append(load / devices[s].budget_bytes)
            if cost:
                costs.append(sum(cost[1 + a:1 + b]) + (s == 0) * cost[0] + (s == n - 1) * cost[-1])
        if cost and max(fills) > 1:
            continue
        value = max(costs) if cost else max(fills)
        best = value if best is None else min(best, value)
    return best


@pytest.mark.parametrize("trial", range(12))
def test_planner_is_optimal_against_brute_force(trial):
    rng = random.Random(trial)
    config = tiny_config(rng.randint(1, 9))
    n = rng.randint(1, 4)
    block = gh.module_sizes(config, torch.float32)["block"]
    devices = [gh.Device("cpu", int(block * rng.uniform(2, 8))) for _ in range(n)]
    tokens = rng.choice([0, 64, 512])
    cost = [rng.uniform(0.1, 5) for _ in range(config.n_layer + 2)] if trial % 2 else None
    best = brute_force(config, devices, torch.float32, tokens, cost)
    if best is None or (cost is None and best > 1):
        with pytest.raises(MemoryError):
            gh.plan_split(config, devices, dtype=torch.float32, max_new_tokens=tokens, cost=cost)
        return
    plan = gh.plan_split(config, devices, dtype=torch.float32, max_new_tokens=tokens, cost=cost)
    got = max(s.cost for s in plan.devices) if cost else max(s.fill for s in plan.devices)
    assert got == pytest.approx(best)
    assert all(s.fill <= 1 for s in plan.devices)
    assert [s.blocks[0] for s in plan.devices[1:]] == [s.blocks[1] for s in plan.devices[:-1]]
    assert plan.devices[0].blocks[0] == 0 and plan.devices[-1].blocks[1] == config.n_layer
    assert plan.devices[0].embedding and plan.devices[-1].head


# largest device load in GB: this planner, accelerate's device_map="auto", accelerate's greedy max_memory fill
GPTJ_CASES = {"2x15GiB": (6.05, 6.05, 12.10), "3x5GiB": (4.04, 4.43, 5.24),
              "4x4GiB": (3.22, 3.22, 4.03), "8x2GiB": (1.61, 2.01, 2.01)}


@pytest.mark.parametrize("spec", GPTJ_CASES)
def test_gptj_6b_plans_beat_or_match_accelerate(spec):
    config = gh.gptj_6b_config()
    devices = gh.parse_devices(spec)
    plan = gh.plan_split(config, devices, dtype=torch.float16)
    ours = max(s.total_bytes for s in plan.devices)
    auto = gh.accelerate_plan(config, devices, torch.float16, balanced=True)
    greedy = gh.accelerate_plan(config, devices, torch.float16, balanced=False)
    assert sum(auto) == sum(greedy) == sum(s.param_bytes for s in plan.devices) == 12_101_765_568
    assert (round(ours / GB, 2), round(max(auto) / GB, 2), round(max(greedy) / GB, 2)) == GPTJ_CASES[spec]
    assert ours <= max(auto) and ours <= max(greedy)
    if spec == "8x2GiB":
        assert 0 in auto and min(s.total_bytes for s in plan.devices) > 0  # accelerate leaves a GPU empty


def test_unequal_budgets_and_kv_cache():
    config = gh.gptj_6b_config()
    two_cards = gh.parse_devices("cuda:0=6GiB,cuda:1=10GiB", gh.describe_hardware("2 x T4"))
    plan = gh.plan_split(config, two_cards, prompt_tokens=1024, max_new_tokens=1024)
    small, big = plan.devices
    assert small.blocks[1] - small.blocks[0] < big.blocks[1] - big.blocks[0]
    assert small.fill <= 1 and big.fill <= 1 and abs(small.fill - big.fill) < 0.1
    per_layer = 2 * 4096 * 2 * 2048
    assert small.kv_cache_bytes == (small.blocks[1] - small.blocks[0]) * per_layer
    assert sum(s.kv_cache_bytes for s in plan.devices) == 28 * per_layer  # 0.875 GiB for a full context


def test_infeasible_plan_says_what_to_do():
    with pytest.raises(MemoryError) as err:
        gh.plan_split(gh.gptj_6b_config(), "2x5GiB", dtype=torch.float32)
    text = str(err.value)
    assert "needs 22.54 GiB" in text and "give 10.00 GiB" in text and "add" in text and "float16" not in text
    with pytest.raises(MemoryError, match="use dtype=float16"):
        gh.plan_split(gh.gptj_6b_config(), "2x7GiB", dtype=torch.float32)
    with pytest.raises(MemoryError, match="shorter context"):
        gh.plan_split(gh.gptj_6b_config(), "2x6GiB", prompt_tokens=2048, max_new_tokens=2048, batch_size=8)


def test_plan_json_round_trip_and_cli(tiny_path):
    two_cards = gh.parse_devices("cuda:0=6GiB,cuda:1=10GiB", gh.describe_hardware("2 x T4"))
    plan = gh.plan_split("gpt-j-6b", two_cards, model_name="gpt-j-6b")
    assert gh.Plan.from_json(plan.to_json()) == plan
    out = call_cli("plan", "--model", "gpt-j-6b", "--devices", "cuda:0=6GiB,cuda:1=10GiB", "--hardware", "2 x T4",
                   "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data == json.loads(plan.to_json())
    assert set(data["devices"][0]) >= {"device", "embedding", "blocks", "head", "param_bytes", "kv_cache_bytes",
                                       "reserve_bytes", "total_bytes", "budget_bytes"}
    bad = call_cli("plan", "--model", "gpt-j-6b", "--devices", "2x5GiB")
    assert bad.returncode == 2 and "does not fit" in bad.stderr


def greedy(model, tokenizer, texts=("The list", "A function is"), n=16):
    tokenizer.padding_side = "left"
    tokenizer.pad_token = tokenizer.eos_token
    batch = tokenizer(list(texts), return_tensors="pt", padding=True)
    return model.generate(**batch, max_new_tokens=n, do_sample=False, pad_token_id=tokenizer.eos_token_id)


@pytest.mark.floor
@pytest.mark.parametrize("spec", ["cpu,cpu", "cpu,cpu,cpu", "4xcpu", "cpu=3MB,cpu=20MB"])
def test_split_equals_unsplit(tiny, tiny_path, spec):
    model, tokenizer = tiny
    plan = gh.plan_split(tiny_path, spec, dtype=torch.float32)
    split = gh.place_stages(tiny_path, plan)
    assert torch.equal(greedy(split, tokenizer), greedy(model, tokenizer))
    if spec.startswith("cpu=3MB"):  # unequal budgets give unequal stages
        sizes = [st.blocks[1] - st.blocks[0] for st in plan.devices]
        assert sizes[0] < sizes[1]


@pytest.mark.floor
def test_every_block_receives_inputs_on_its_stage(tiny_path, tiny):
    _, tokenizer = tiny
    plan = gh.plan_split(tiny_path, "3xcpu", dtype=torch.float32)
    dtypes = [torch.float32, torch.float64, torch.float32]
    split = gh.place_stages(tiny_path, plan, dtype=dtypes)
    seen = []

    def check(stage_dtype):
        def hook(module, args, kwargs):
            floats = [t for t in list(args) + list(kwargs.values()) + list(kwargs.get("position_embeddings") or ())
                      if isinstance(t, torch.Tensor) and t.is_floating_point()]
            seen.append(all(t.dtype == stage_dtype for t in floats))
        return hook

    for s, st in enumerate(plan.devices):
        for b in range(*st.blocks):
            split.transformer.h[b].register_forward_pre_hook(check(dtypes[s]), with_kwargs=True)
    greedy(split, tokenizer, n=3)
    assert seen and all(seen)


def test_a_missing_boundary_hook_fails(tiny, tiny_path):
    model, tokenizer = tiny
    plan = gh.plan_split(tiny_path, "3xcpu", dtype=torch.float32)
    split = gh.place_stages(tiny_path, plan, dtype=[torch.float32, torch.float64, torch.float32])
    assert torch.equal(greedy(split, tokenizer), greedy(model, tokenizer))  # float64 in the middle changes nothing
    split.hooks[f"transformer.h.{plan.devices[1].blocks[0]}"].remove()
    with pytest.raises(RuntimeError, match="dtype"):
        greedy(split, tokenizer, n=2)


@pytest.mark.floor
def test_measure_memory_matches_plan(tiny_path, tiny):
    model, tokenizer = tiny
    plan = gh.plan_split(tiny_path, "cpu,cpu,cpu", dtype=torch.float32)
    split = gh.place_stages(tiny_path, plan)
    rows = gh.measure_memory(split)
    # rotary sin/cos: one table on the first stage (transformers 5.24) or one in each block's attention (5.17)
    buffers = [0] * len(plan.devices)
    for name, b in split.named_buffers():
        buffers[plan.stage_of_module(name) if name.startswith("transformer.h.") else 0] += b.numel() * b.element_size()
    assert buffers[0] > 0
    assert [r.param_bytes for r in rows] == [s.param_bytes + b for s, b in zip(plan.devices, buffers)]
    assert sum(r.param_bytes for r in rows) == sum(
        t.numel() * t.element_size() for t in list(split.parameters()) + list(split.buffers()))


def test_place_refuses_a_plan_for_another_model(tiny_path):
    plan = gh.plan_split(tiny_config(6), "2xcpu", dtype=torch.float32)
    with pytest.raises(ValueError, match="covers 6 blocks"):
        gh.place_stages(tiny_path, plan)


def test_infeasible_when_one_block_exceeds_every_device():
    with pytest.raises(MemoryError, match="one block alone needs"):
        gh.plan_split(gh.tiny_config(), "2x1MiB", dtype=torch.float32, max_new_tokens=60, batch_size=5)


def test_random_weights_are_the_same_in_any_process(tmp_path):
    import subprocess
    import sys

    config = gh.tiny_config()
    folder = write_random_model(config, tmp_path / "random", seed=3)
    plan = gh.plan_split(config, "2xcpu", dtype=torch.float32)
    whole = gh.place_stages(config, plan, seed=3)
    only_last = gh.place_stages(folder, plan, stages=[1])  # another stage set, rebuilt from the folder
    name = f"transformer.h.{plan.devices[1].blocks[0]}.mlp.fc_in.weight"
    assert torch.equal(whole.get_parameter(name), only_last.get_parameter(name))
    assert only_last.transformer.wte.weight.is_meta
    code = (f"import gptj_helpers as gh, torch; m = gh.place_stages({str(folder)!r}, gh.Plan.from_json(open("
            f"{str(tmp_path / 'plan.json')!r}).read())); print(float(m.get_parameter({name!r}).double().sum()))")
    (tmp_path / "plan.json").write_text(plan.to_json())
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])
    assert float(out.stdout) == float(whole.get_parameter(name).double().sum()), out.stderr
    other = gh.place_stages(config, plan, seed=4)
    assert not torch.equal(other.get_parameter(name), whole.get_parameter(name))
