"""Notebook 07: tensor-parallel generation equals generate (greedy tokens, logits, seeded sampling) with both variants;
memory against the plan; refusals before any process starts; the CLI under both launchers; a rank that dies.

Starting ranks costs seconds (each imports torch), so one module-scoped launch runs several jobs and the tests
share it.
"""
import os
import subprocess
import sys
import time

import psutil
import pytest
import torch

import gptj_helpers as gh
from gptj_split.plan import kv_cache_bytes_per_layer
from gptj_split.random_models import save_tokenizer, write_random_model
from gptj_split.shards import check_head_split
import gptj_split.ranks
import gptj_split.tensor_parallel
from conftest import FAULT_VARIABLE, ROOT, call_cli

PROMPTS = ["The list", "A dictionary is a mapping of", "Hello"]
NEW = 8
SAMPLING = dict(temperature=0.9, top_p=0.7, top_k=0, seed=7)


@pytest.fixture(scope="module")
def batch(tiny):
    model, tokenizer = tiny
    ids = gh.check_generation(model.config, tokenizer, PROMPTS, NEW)
    return gh.pad_left(ids, tokenizer.eos_token_id, "cpu")


def greedy_reference(model, ids, mask):
    """Plain greedy generate on the unsplit model: tokens and each step's raw logits."""
    out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=NEW, return_dict_in_generate=True,
                         output_logits=True, pad_token_id=model.config.eos_token_id)
    return out.sequences, torch.stack(out.logits, dim=1)


@pytest.fixture(scope="module")
def runs(tiny_path, batch):
    """One start of 2 ranks on the tiny model: greedy (logits kept) with each variant, then seeded sampling (rank 0
    samples the same way whichever variant made the logits)."""
    ids, mask = batch
    jobs = [gh.variant_job(gh.make_job(ids, mask, max_new_tokens=NEW, greedy=True), v, True)
            for v in ("torch", "block")]
    jobs.append(gh.variant_job(gh.make_job(ids, mask, max_new_tokens=NEW, **SAMPLING), "block"))
    return gh.run_tensor_parallel(str(tiny_path), jobs, "cpu,cpu", options=gh.LaunchOptions(timeout=30))


@pytest.mark.floor  # transformers 5.17 reshapes heads with the module's own count, 5.24 with -1
@pytest.mark.timeout(300)
def test_greedy_tokens_and_logits_equal_unsplit(runs, tiny, batch):
    model, tokenizer = tiny
    ids, mask = batch
    expected, logits = greedy_reference(model, ids, mask)
    for record in runs[:2]:
        assert torch.equal(record.output_ids, expected), record.settings["variant"]
        steps = record.logits.shape[1]
        assert steps == logits.shape[1]
        assert torch.allclose(record.logits, logits, rtol=0, atol=1e-5), record.settings["variant"]
        assert record.texts == gh.generate_text(model, tokenizer, PROMPTS, NEW, greedy=True)[0]
    assert not torch.equal(runs[0].logits, runs[1].logits)  # the partial sums are added in another order


@pytest.mark.timeout(300)
def test_the_one_comparison_tells_a_near_tie_from_a_wrong_split(runs, tiny, batch):
    """07's check on its bfloat16 measurement: the ranks' logits within 10 roundings of the naive split's agree, even
    where a near tie flips a token; logits off by a wrong split do not."""
    model, _ = tiny
    record = runs[1]  # the hand-written variant, its logits kept
    longest = max(range(len(PROMPTS)), key=lambda i: len(PROMPTS[i]))  # no left padding: a plain forward matches it
    row, ranks = record.output_ids[longest:longest + 1], record.logits[longest]
    with torch.inference_mode():  # the unsplit model's logits for the ranks' own tokens, teacher-forced
        logits = model(input_ids=row).logits[0, batch[0].shape[1] - 1:-1]
    same = gh.compare_outputs(row, logits[None], row, ranks[None], torch.bfloat16)
    assert same["agree"] and same["first_divergence"] is None
    flipped = row.clone()
    flipped[0, -2] += 1  # parts one step before the end: that step still saw the same tokens, the last did not
    tie = gh.compare_outputs(row, logits[None], flipped, ranks[None], torch.bfloat16)
    assert tie["agree"] and tie["first_divergence"] == logits.shape[0] - 2
    wrong = gh.compare_outputs(row, logits[None], row, (ranks + 0.5 * logits.abs().max())[None], torch.bfloat16)
    assert not wrong["agree"] and wrong["largest_logit_difference"] > wrong["tolerance"], wrong


@pytest.mark.timeout(300)
def test_seeded_sampling_equals_generate_text(runs, tiny):
    model, tokenizer = tiny
    _texts, expected = gh.generate_text(model, tokenizer, PROMPTS, NEW, **SAMPLING)
    assert torch.equal(runs[2].output_ids, expected.output_ids)
    other = gh.generate_text(model, tokenizer, PROMPTS, NEW, **{**SAMPLING, "seed": 8})[1]
    assert not torch.equal(runs[2].output_ids[:, :other.output_ids.shape[1]], other.output_ids)  # it can fail


@pytest.mark.timeout(300)
def test_record_memory_and_collectives(runs, tiny, batch):
    model, _tokenizer = tiny
    ids, _mask = batch
    config = model.config
    largest = max(p.numel() * 4 for p in model.parameters())
    for record in runs:
        variant = record.settings["variant"]
        assert record.mode == "tensor-parallel" and len(record.memory) == 2
        for rank, row in enumerate(record.memory):
            planned = record.plan.devices[rank]
            assert row.param_bytes == planned.param_bytes
            steps = record.output_ids.shape[1] - ids.shape[1]
            per_layer = kv_cache_bytes_per_layer(config, torch.float32, ids.shape[1] + steps - 1, ids.shape[0])
            assert row.kv_cache_bytes == config.n_layer * per_layer // 2  # half the heads' keys and values
            # torch's DTensor keeps about 25 MB of its own (sharding caches): at this tiny size, that shows
            extra = 64 * 2**20 if variant == "torch" else 0
            assert row.peak_rss_bytes <= 1.1 * planned.total_bytes + largest + extra
        per_step = {"torch": 2 * config.n_layer, "block": config.n_layer}[variant]
        for rank in (0, 1):
            reduces = [e for e in record.events if e.stage == rank and e.kind == "all-reduce"]
            assert len(reduces) == per_step * steps, variant
            assert sum(e.kind == "all-gather" and e.stage == rank for e in record.events) == steps
        compute = {(e.stage, e.step): e for e in record.events if e.kind == "compute"}
        for step in range(steps):  # both ranks work on the same token at the same time
            a, b = compute[(0, step)], compute[(1, step)]
            assert max(a.start, b.start) < min(a.end, b.end)


def test_planner_shares_and_refusals():
    six = gh.gptj_6b_config()
    plan = gh.plan_tensor_parallel(six, "2x8GiB", torch.float16, prompt_tokens=512, max_new_tokens=256,
                                   model_name="GPT-J-6B")
    whole = gh.module_sizes(six, torch.float16)
    share = plan.devices[0]
    assert share.param_bytes == plan.devices[1].param_bytes
    # the embedding on both, half of every block and of the head
    assert abs(share.param_bytes - (whole["embedding"] + (whole["total"] - whole["embedding"]) / 2)) < 2**20
    assert share.kv_cache_bytes == kv_cache_bytes_per_layer(six, torch.float16, 768) * 28 // 2
    with pytest.raises(ValueError, match="16 attention heads cannot be split 3 ways.*use 1, 2, 4, 8, 16 ranks"):
        gh.plan_tensor_parallel(six, "3x9GiB", torch.float16, model_name="GPT-J-6B")
    with pytest.raises(ValueError, match="32 ranks but GPT-J-6B has only 16 attention heads"):
        check_head_split(six, 32, "GPT-J-6B")
    with pytest.raises(MemoryError, match=r"device 0 \(cpu\) needs .*: use more devices"):
        gh.plan_tensor_parallel(six, "2x4GiB", torch.float16, model_name="GPT-J-6B")


@pytest.mark.parametrize("devices, kwargs, error, match", [
    ("3xcpu", {}, ValueError, "8 attention heads cannot be split 3 ways"),
    ("16xcpu", {}, ValueError, "16 ranks but .* has only 8 attention heads"),
    ("2x1MiB", {}, MemoryError, "does not fit"),
    ("cpu,cpu", {"temperature": 0}, ValueError, "temperature=0"),
    ("cpu,cpu", {"variant": "rows"}, ValueError, "variant='rows'"),
])
def test_bad_input_refused_before_starting(tiny_path, monkeypatch, devices, kwargs, error, match):
    monkeypatch.setattr(gptj_split.tensor_parallel, "start_ranks", lambda *a, **k: pytest.fail("processes started"))
    with pytest.raises(error, match=match):
        gh.run_tensor_parallel(str(tiny_path), PROMPTS, devices, max_new_tokens=NEW, **kwargs)


@pytest.fixture(scope="module")
def six_heads(tmp_path_factory):
    """A second small GPT-J: 6 heads of 16, so 3 ranks, and a vocabulary of 1024 that 3 ranks cut unevenly."""
    from transformers import GPTJConfig

    folder = tmp_path_factory.mktemp("six-heads")
    config = GPTJConfig(vocab_size=1024, n_positions=128, n_embd=96, n_layer=3, n_head=6, rotary_dim=8,
                        initializer_range=0.1, bos_token_id=0, eos_token_id=0, tie_word_embeddings=False)
    write_random_model(config, folder, seed=3)
    save_tokenizer(folder)
    return folder


@pytest.mark.floor
@pytest.mark.timeout(300)
def test_second_config_three_ranks(six_heads, batch):
    ids, mask = batch
    model = gh.load_model(str(six_heads), dtype=torch.float32)
    expected, logits = greedy_reference(model, ids, mask)
    job = gh.variant_job(gh.make_job(ids, mask, max_new_tokens=NEW, greedy=True), "block", True)
    record = gh.run_tensor_parallel(str(six_heads), [job], "3xcpu", options=gh.LaunchOptions(timeout=30))[0]
    assert torch.equal(record.output_ids, expected)
    assert torch.allclose(record.logits, logits[:, :record.logits.shape[1]], rtol=0, atol=1e-5)


def test_rotary_table_is_recomputed_after_to_empty(tiny_path):
    from transformers.models.gptj.modeling_gptj import create_sinusoidal_positions

    rank = gh.build_rank_model(tiny_path, 0, 1, torch.float32)
    table = next(b for n, b in rank.model.named_buffers() if n.endswith("embed_positions"))  # 5.24: one, 5.17: each
    assert torch.equal(table, create_sinusoidal_positions(table.shape[0], table.shape[1]))


def children_left(before: set[int]) -> list:
    return [p for p in psutil.Process().children(recursive=True) if p.pid not in before and p.is_running()
            and not any(server in " ".join(p.cmdline()) for server in ("resource_tracker", "forkserver"))]


def generate_stdout(tiny_path, *flags) -> str:
    """What `python -m gptj_helpers generate` prints, run in this process (the reference output)."""
    out = call_cli("generate", "--model", tiny_path, "--devices", "cpu", *flags)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.timeout(120)
def test_self_launched_rank_that_dies_ends_run_naming_it(tiny_path, capsys, monkeypatch):
    """The CLI starting its own ranks (run_tensor_parallel with jobs): rank 1 exits mid-generation."""
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    monkeypatch.setenv(FAULT_VARIABLE, "1:2:exit")  # the test-only route to the ranks
    with pytest.raises(SystemExit, match="^error: tensor-parallel rank 1 failed: process exited with code 3$") as info:
        gh.main(["tensor-parallel", "--model", str(tiny_path), "--devices", "cpu,cpu", "--prompt", PROMPTS[0],
                 "--max-new-tokens", str(NEW), "--timeout", "20"])
    error = info.value.__cause__
    assert isinstance(error, gh.TensorParallelError) and error.rank == 1
    assert time.time() - error.failed_at < 30
    assert children_left(before) == []
    assert capsys.readouterr().out == ""


def run_torchrun(args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)


@pytest.mark.timeout(200)
def test_torchrun_prints_what_generate_prints(tiny_path):
    """A failed rank under torchrun: tests/test_ranks.py (the same serve_torchrun, in this process)."""
    flags = ["--prompt", PROMPTS[1], "--prompt", PROMPTS[0], "--max-new-tokens", str(NEW), "--stream", *sum(
        ([f"--{k.replace('_', '-')}", str(v)] for k, v in SAMPLING.items()), [])]
    common = ["--standalone", "--nproc-per-node", "2", "--max-restarts", "0", "--monitor-interval", "0.5", "-m",
              "gptj_helpers", "tensor-parallel", "--model", str(tiny_path), "--devices", "cpu,cpu", "--timeout", "20"]
    proc = run_torchrun([*common, *flags])
    try:
        out, err = proc.communicate(timeout=150)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert out == generate_stdout(tiny_path, *flags)


@pytest.mark.timeout(240)
def test_tensor_parallel_drives_the_widget_streaming_and_stopping(tiny):
    """Notebook 06's widget on notebook 07's ranks: text streamed from rank 0 as it is picked, and Stop ending every
    rank after the same token; the text is the start of the same seeded generate_text run."""
    pytest.importorskip("ipywidgets")
    model, tokenizer = tiny
    widget = gh.prompt_widget("tiny", tokenizer, generate=gh.tensor_parallel_generate(
        "cpu,cpu", options=gh.LaunchOptions(timeout=60)))
    widget.prompt.value = "The list"
    widget.max_new_tokens.value, widget.seed.value = 300, 1
    updates = []

    def stop_once_text_shows(change):
        updates.append(widget.text)
        if widget.text and not widget.stop_event.is_set():
            widget.stop_button.click()

    widget.output.observe(stop_once_text_shows, "value")
    widget.generate_button.click()
    assert widget.wait(timeout=180)
    assert widget.error is None, widget.message.value
    got = widget.record.new_tokens
    assert 1 <= got < 300 and widget.record.mode == "tensor-parallel"
    assert f"stopped after {got} of 300 tokens" in widget.status.value
    prefix, _ = gh.generate_text(model, tokenizer, "The list", max_new_tokens=got, seed=1)
    assert widget.text == prefix[0] and len([u for u in updates if u]) >= 1
