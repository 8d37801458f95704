"""Notebook 05: pipelined generation in stage processes equals generate; torchrun, two "nodes", faults, bad configs.

Starting stage processes costs seconds (each imports torch), so each launch runs several jobs and the
module-scoped fixtures are shared by the tests that check them.
"""
import os
import subprocess
import sys
import time

import psutil
import pytest
import torch

import gptj_helpers as gh
from gptj_split.jobs import RankReport, merge_results
from gptj_split.plan import kv_cache_bytes_per_layer
from gptj_split.ranks import RankJob
from gptj_split.processes import free_port
from gptj_split.stage import check_pipeline_plan, load_stage
import gptj_split.cli
import gptj_split.pipeline
import gptj_split.processes
import gptj_split.ranks
from conftest import ROOT, call_cli

PROMPTS = ["The list", "A dictionary is a mapping of", "Hello", "def f(x): return x +", "import os"]
NEW = 8
SAMPLING = dict(temperature=0.9, top_p=0.7, top_k=0, seed=7)


@pytest.fixture(scope="module")
def batch(tiny):
    model, tokenizer = tiny
    ids = gh.check_generation(model.config, tokenizer, PROMPTS, NEW)
    return gh.pad_left(ids, tokenizer.eos_token_id, "cpu")


@pytest.fixture(scope="module")
def reference(tiny, batch):
    """Greedy tokens of plain generate on the unsplit model, for the whole batch."""
    model, tokenizer = tiny
    ids, mask = batch
    return model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=NEW,
                          pad_token_id=tokenizer.eos_token_id)


def sampled_reference(model, tokenizer, ids, mask, micro_batches, seed=SAMPLING["seed"]):
    """Notebook 03's seeded sampling, run on each micro-batch alone: what the pipeline promises to equal."""
    options = {"do_sample": True, **{k: v for k, v in SAMPLING.items() if k != "seed"}}
    outs = []
    for rows in torch.arange(ids.shape[0]).tensor_split(micro_batches):
        torch.manual_seed(seed)
        outs.append(model.generate(ids[rows], attention_mask=mask[rows], max_new_tokens=NEW,
                                   pad_token_id=tokenizer.eos_token_id, **options))
    return outs


def jobs_for(batch):
    ids, mask = batch
    greedy = [gh.make_job(ids, mask, m, max_new_tokens=NEW, greedy=True) for m in (1, 2, 4)]
    return greedy + [gh.make_job(ids, mask, m, max_new_tokens=NEW, **SAMPLING) for m in (1, 2)]


@pytest.fixture(scope="module", params=[2, 3], ids=["2stages", "3stages"])
def runs(request, tiny_path, batch):
    """One start of n stage processes running greedy (1, 2, 4 micro-batches) and sampling (1, 2) jobs."""
    n = request.param
    records = gh.run_pipeline(str(tiny_path), jobs_for(batch), ",".join(["cpu"] * n),
                                   options=gh.LaunchOptions(timeout=30))
    return n, records


@pytest.mark.floor
@pytest.mark.timeout(300)
def test_greedy_equals_unsplit_and_naive_split(runs, tiny, tiny_path, batch, reference):
    n, records = runs
    model, tokenizer = tiny
    ids, mask = batch
    naive = gh.place_stages(tiny_path, gh.plan_split(model.config, ",".join(["cpu"] * n), dtype=torch.float32))
    naive_out = naive.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=NEW,
                               pad_token_id=tokenizer.eos_token_id)
    assert torch.equal(naive_out, reference)
    for record, m in zip(records[:3], (1, 2, 4)):
        assert torch.equal(record.output_ids, reference), f"{n} stages, {m} micro-batches"
        assert record.texts == continuations(tokenizer, reference, ids.shape[1])


@pytest.mark.floor
@pytest.mark.timeout(300)
def test_seeded_sampling_equals_generate_per_micro_batch(runs, tiny, batch):
    _n, records = runs
    model, tokenizer = tiny
    ids, mask = batch
    for record, m in zip(records[3:], (1, 2)):
        rows = torch.arange(ids.shape[0]).tensor_split(m)
        for r, expected in zip(rows, sampled_reference(model, tokenizer, ids, mask, m)):
            got = record.output_ids[r]
            assert torch.equal(got[:, :expected.shape[1]], expected)
            assert (got[:, expected.shape[1]:] == tokenizer.eos_token_id).all()  # only padding beyond
    # the comparison can fail: another seed samples other tokens
    other = sampled_reference(model, tokenizer, ids, mask, 1, seed=SAMPLING["seed"] + 1)[0]
    assert not torch.equal(records[3].output_ids[:, :other.shape[1]], other)


@pytest.mark.floor
@pytest.mark.timeout(300)
def test_record_has_schedule_and_memory_per_stage(runs, tiny, batch):
    n, records = runs
    model, _tokenizer = tiny
    ids, _mask = batch
    config = model.config
    for record, m in zip(records[:3], (1, 2, 4)):
        assert record.mode == "pipeline" and len(record.memory) == n
        compute = [e for e in record.events if e.kind == "compute"]
        for s in range(n):
            mine = [(e.step, e.micro_batch) for e in compute if e.stage == s]
            assert mine == [(t, b) for t in range(NEW) for b in range(m)]  # every stage, schedule order
        ends = {(e.stage, e.step, e.micro_batch): e for e in compute}
        for e in compute:  # a stage starts a micro-batch only after the previous stage has finished it
            if e.stage > 0:
                assert e.start >= ends[(e.stage - 1, e.step, e.micro_batch)].end
            elif e.step > 0:
                assert e.start >= ends[(n - 1, e.step - 1, e.micro_batch)].end
        kinds = {(e.stage, e.kind) for e in record.events}
        assert {(0, "send"), (n - 1, "recv"), (0, "recv"), (n - 1, "send")} <= kinds
        for s, row in enumerate(record.memory):
            blocks = record.plan.devices[s].blocks
            assert row.param_bytes == record.plan.devices[s].param_bytes
            # keys and values of prompt + all but the last new token, for every row and layer of the stage
            per_layer = kv_cache_bytes_per_layer(config, torch.float32, ids.shape[1] + NEW - 1, ids.shape[0])
            assert row.kv_cache_bytes == (blocks[1] - blocks[0]) * per_layer
        assert 0 < record.time_to_first_token <= record.total_seconds


def test_eos_padding_and_trim_like_generate():
    """Rows that finished are padded with eos, and the output stops when every row has finished."""
    class Tok:
        eos_token_id = 0

        def decode(self, row, skip_special_tokens):
            return " ".join(map(str, row.tolist()))

    job = gh.make_job(torch.tensor([[5, 6], [7, 8]]), torch.ones(2, 2, dtype=torch.long), max_new_tokens=5,
                      greedy=True)
    new = torch.tensor([[3, 0, 0, 0, 0], [4, 4, 0, 0, 0]])
    events = [gh.TimingEvent(0, "prefill", 0, 0.0, 1.0), gh.TimingEvent(0, "decode", 1, 1.0, 2.0)]
    record = merge_results([RankReport(events, None, new)], job, Tok(), None, 0)
    assert record.output_ids.tolist() == [[5, 6, 3, 0, 0], [7, 8, 4, 4, 0]]
    assert record.texts == ["3 0", "4 4 0"] and record.new_tokens == 5  # up to each row's eos, as generate_text
    never = torch.tensor([[3, 1, 2, 1, 2], [4, 4, 0, 0, 0]])
    record = merge_results([RankReport(events, None, never)], job, Tok(), None, 0)
    assert record.output_ids.shape == (2, 7)


class FakeRelay:
    """A RelayEnd stand-in for one stage run in this process: notes tokens, asks to stop after `stop_after`."""

    def __init__(self, stop_after=None):
        self.tokens, self.stop_after, self.ended = [], stop_after, False

    def put(self, token_ids):
        self.tokens.append(token_ids.tolist())

    def stop_requested(self):
        return self.stop_after is not None and len(self.tokens) >= self.stop_after

    def end(self):
        self.ended = True


@pytest.mark.floor
def test_one_stage_streams_each_token_and_stops_on_request_or_when_every_row_ended(tiny, tiny_path, batch, reference):
    """run_stage alone (one stage, no process group): tokens go to the relay as picked; a stop asked after k
    tokens ends after the token in flight (k + 1, as the relay lags one step); rows that all ended end the run."""
    model, tokenizer = tiny
    ids, mask = batch
    plan = gh.plan_split(model.config, "cpu", dtype=torch.float32)
    stage = load_stage(tiny_path, plan, 0, torch.float32, "cpu")
    relay = FakeRelay()
    job = gh.make_job(ids, mask, max_new_tokens=NEW, greedy=True, stoppable=True)
    result = gh.run_stage(stage, job, gh.EventClock(), relay=relay)
    assert torch.equal(result.new_tokens, reference[:, ids.shape[1]:]) and relay.ended
    assert [list(step) for step in zip(*result.new_tokens.tolist())] == relay.tokens
    relay = FakeRelay(stop_after=3)
    job = gh.make_job(ids, mask, max_new_tokens=NEW, greedy=True, stoppable=True)
    result = gh.run_stage(stage, job, gh.EventClock(), relay=relay)
    assert torch.equal(result.new_tokens, reference[:, ids.shape[1]:ids.shape[1] + 3])
    stage.eos_token_id = int(reference[0, ids.shape[1] + 1])  # pretend the second token of row 0 ends text
    first_row = gh.make_job(ids[:1], mask[:1], max_new_tokens=NEW, greedy=True, stoppable=True)
    assert gh.run_stage(stage, first_row, gh.EventClock()).new_tokens.shape == (1, 2)
    plain = gh.make_job(ids[:1], mask[:1], max_new_tokens=NEW, greedy=True)  # not stoppable: runs every step
    assert gh.run_stage(stage, plain, gh.EventClock()).new_tokens.shape == (1, NEW)
    with pytest.raises(ValueError, match="micro_batches=1"):
        gh.make_job(ids, mask, 2, max_new_tokens=NEW, stoppable=True)


class StopAfter:
    """A stopping criterion: every row is done once `n` tokens follow the prompt."""

    def __init__(self, prompt_len, n):
        self.prompt_len, self.n = prompt_len, n

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), input_ids.shape[1] - self.prompt_len >= self.n)


@pytest.mark.timeout(240)
def test_stream_and_stop_across_three_stage_processes(tiny, tiny_path, capsys):
    """The last stage streams to this process; a stop decided here ends all three stages after the same token."""
    model, tokenizer = tiny
    prompt = PROMPTS[1]
    want, _ = gh.generate_text(model, tokenizer, prompt, max_new_tokens=12, seed=5)
    texts, record = gh.run_pipeline(tiny_path, prompt, "cpu,cpu,cpu", max_new_tokens=12, seed=5, stream=True,
                                    options=gh.LaunchOptions(timeout=60))
    assert texts == want and capsys.readouterr().out == prompt + want[0] + "\n"
    prompt_len = len(tokenizer(prompt).input_ids)
    before, children = time.time(), {c.pid for c in psutil.Process().children(recursive=True)}
    texts, record = gh.run_pipeline(tiny_path, prompt, "cpu,cpu,cpu", max_new_tokens=200, seed=5,
                                    options=gh.LaunchOptions(timeout=60),
                                    stopping_criteria=[StopAfter(prompt_len, 4)])
    got = record.new_tokens
    assert 4 <= got < 200
    prefix, _ = gh.generate_text(model, tokenizer, prompt, max_new_tokens=got, seed=5)
    assert texts == prefix
    last_step = {s: max(e.step for e in record.events if e.stage == s and e.kind == "compute") for s in range(3)}
    assert set(last_step.values()) == {got - 1}  # every stage computed the same tokens, then ended
    left = [c for c in psutil.Process().children(recursive=True) if c.pid not in children and c.is_running()
            and c.status() != psutil.STATUS_ZOMBIE]
    assert time.time() - before < 120 and not left  # every stage process has ended


def run_torchrun(args, timeout=180, env=None):
    cmd = [sys.executable, "-m", "torch.distributed.run", *args]
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env, cwd=ROOT)


def continuations(tokenizer, output, prompt_len):
    """What generate_text returns: each row's new tokens up to and including its first eos, decoded."""
    texts = []
    for row in output[:, prompt_len:]:
        ends = row == tokenizer.eos_token_id
        n = int(ends.nonzero()[0, 0]) + 1 if ends.any() else len(row)
        texts.append(tokenizer.decode(row[:n], skip_special_tokens=True))
    return texts


def expected_stdout(texts):
    """What `generate` (and so `pipeline`) prints: prompt + continuation, a blank line between."""
    return "\n\n".join(p + t for p, t in zip(PROMPTS, texts)) + "\n"


@pytest.mark.timeout(240)
def test_two_nodes_on_localhost_sampling(tiny, tiny_path, tmp_path, batch):
    """Two torchrun launchers, one process each, meet at a free port: the same code spans machines."""
    model, tokenizer = tiny
    ids, mask = batch
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    port = str(free_port())
    common = ["--nnodes", "2", "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", port,
              "--max-restarts", "0"]
    cli = ["-m", "gptj_helpers", "pipeline", "--model", str(tiny_path), "--devices", "cpu,cpu", "--prompts-file",
           str(prompts), "--max-new-tokens", str(NEW), "--timeout", "20",
           "--temperature", str(SAMPLING["temperature"]), "--top-p", str(SAMPLING["top_p"]),
           "--top-k", str(SAMPLING["top_k"]), "--seed", str(SAMPLING["seed"])]
    nodes = [run_torchrun([*common, "--node-rank", str(r), *cli]) for r in (0, 1)]
    try:
        results = [p.communicate(timeout=200) for p in nodes]
    finally:
        for p in nodes:
            p.kill()
    assert [p.returncode for p in nodes] == [0, 0], results[0][1][-2000:] + results[1][1][-2000:]
    expected = sampled_reference(model, tokenizer, ids, mask, 1)[0]
    assert results[0][0] == expected_stdout(continuations(tokenizer, expected, ids.shape[1]))
    assert results[1][0] == ""  # only rank 0 prints


def prepare_nothing(payload, places, located) -> None:
    """Rank 0's preparation in the test below: none."""


def report_environment(context, payload, prepared) -> list:
    """A rank's work in the test below: what it sees of its environment, and who started it."""
    import tempfile

    return [os.environ.get("GPTJ_TEST_MARK"), tempfile.gettempdir(), os.getppid()]


@pytest.mark.timeout(120)
def test_stages_fork_from_one_server_and_see_the_callers_environment_of_now(tmp_path, monkeypatch):
    """The rank processes fork from one server (ranks.process_context), yet each run sees the environment as the
    caller has it when the run starts, as a spawned process would."""
    job = RankJob(gh.PipelineError, prepare_nothing, report_environment, "cpu,cpu", None)
    monkeypatch.setenv("GPTJ_TEST_MARK", "first")
    first = gptj_split.processes.start_ranks(job, "tiny")
    monkeypatch.setenv("GPTJ_TEST_MARK", "second")
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    second = gptj_split.processes.start_ranks(job, "tiny")
    assert first[0] == "first" and second[:2] == ["second", str(tmp_path)]
    assert first[2] == second[2] != os.getpid()  # the same server, still running, forked both
    assert "forkserver" in " ".join(psutil.Process(second[2]).cmdline())
    assert gptj_split.processes.process_context(["cuda:0", "cuda:1"]).get_start_method() == "spawn"  # CUDA: fresh
    assert gptj_split.processes.process_context(["cpu", "cpu"], "gpt-j-6b-random").get_start_method() == "spawn"
    assert gptj_split.processes.process_context(["cpu", "cpu"], "tiny").get_start_method() == "forkserver"
    monkeypatch.setattr(sys, "platform", "darwin")  # macOS: its system libraries are not fork-safe
    assert gptj_split.processes.process_context(["cpu", "cpu"]).get_start_method() == "spawn"


@pytest.mark.parametrize("devices, error, match", [
    ("9xcpu", ValueError, "9 stages but the model has only 8 blocks"),
    ("2x2MiB", MemoryError, "does not fit"),
])
def test_bad_configs_refused_before_starting(tiny_path, monkeypatch, devices, error, match):
    monkeypatch.setattr(gptj_split.pipeline, "start_ranks", lambda *a, **k: pytest.fail("stage processes started"))
    with pytest.raises(error, match=match):
        gh.run_pipeline(str(tiny_path), PROMPTS, devices, max_new_tokens=NEW)


def test_bad_job_options_refused(tiny_path, monkeypatch):
    monkeypatch.setattr(gptj_split.pipeline, "start_ranks", lambda *a, **k: pytest.fail("stage processes started"))
    with pytest.raises(ValueError, match="micro_batches=6"):
        gh.run_pipeline(str(tiny_path), PROMPTS, "cpu,cpu", micro_batches=6)
    plan = gh.plan_split(gh.load_config(str(tiny_path)), "cpu,cpu", dtype=torch.float32)
    with pytest.raises(ValueError, match="3 process"):
        check_pipeline_plan(plan, 8, world_size=3)


def test_torchrun_world_size_must_match_stages(tiny_path, tmp_path, monkeypatch):
    """A stage under torchrun (RANK and WORLD_SIZE set, as torchrun sets them) refuses a world of 1 process for 2
    devices before any rendezvous (the launches above run torchrun itself)."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello\n")
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("LOCAL_WORLD_SIZE", "1")):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(gptj_split.ranks, "join_ranks", lambda *a: pytest.fail("the stage started"))
    r = call_cli("pipeline", "--model", tiny_path, "--devices", "cpu,cpu", "--prompts-file", prompts)
    assert r.returncode == 2 and "1 process(es) for the 2 device(s)" in r.stderr
