"""The one rank runtime under the pipeline (05) and tensor parallelism (07): each rank's device and backend on a
multi-node launch (CUDA mocked), the CUDA device set before any group, refusals before anything starts, and a rank
that raises, exits or hangs named in its caller's words, with no process left behind, through the same code for
both clients."""
import time

import psutil
import pytest
import torch

import gptj_helpers as gh
from gptj_split.devices import read_spec
from gptj_split.launch import decide_ranks, notebook_launch, pick_backend
from gptj_split.ranks import RankJob
from gptj_split.processes import free_port, start_ranks
from gptj_split.tensor_parallel import check_variant_backend
import gptj_split.launch
import gptj_split.ranks
from conftest import FAULT_VARIABLE, call_cli

PROMPTS = ["The list", "A dictionary is a mapping of"]


def prepare_setup(payload, places, located) -> str:
    """Rank 0's preparation in the launches below."""
    return "prepared"


def serve_placement(context, payload, prepared) -> tuple:
    """What a rank reports in the mocked launches below: its device and backend."""
    return str(context.device), context.backend


def serve_forever(context, payload, prepared) -> None:
    """A rank that never finishes (the deadline test)."""
    while True:
        time.sleep(1)


@pytest.fixture
def mocked_group(monkeypatch):
    """A process group that only records, and CUDA that only records the device set: every call, in order."""
    import torch.distributed as dist

    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", str(d))))
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: calls.append(("group", backend, kw["rank"])))
    monkeypatch.setattr(dist, "all_gather_object", lambda out, obj: out.__setitem__(slice(None), [obj] * len(out)))
    monkeypatch.setattr(dist, "broadcast_object_list", lambda objects, src: None)
    monkeypatch.setattr(dist, "barrier", lambda: None)
    monkeypatch.setattr(dist, "destroy_process_group", lambda: None)
    return calls


def launch_two_nodes(monkeypatch, spec: str) -> list:
    """Each rank of a torchrun launch of 2 nodes x 2 processes, each node two T4s, run in turn in this process as
    torchrun would set it up (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE); returns what each rank served, or the
    error it raised."""
    job = RankJob(gh.PipelineError, prepare_setup, serve_placement, spec, None)
    served = []
    for rank in range(4):
        for name, value in (("RANK", rank), ("WORLD_SIZE", 4), ("LOCAL_RANK", rank % 2), ("LOCAL_WORLD_SIZE", 2)):
            monkeypatch.setenv(name, str(value))
        try:
            served.append(gptj_split.ranks.serve_torchrun(job, gh.describe_hardware("2 x T4")))
        except ValueError as err:
            served.append(err)
    return served


@pytest.mark.parametrize("spec", ["cuda:0=7GiB,cuda:1=7GiB,cuda:0=7GiB,cuda:1=7GiB", "cuda:0=7GiB,cuda:1=7GiB",
                                  "cuda=7GiB", "4x14GiB", "4xcuda=7GiB"])
def test_two_nodes_of_two_gpus_each_rank_gets_its_nodes_own_gpu_and_nccl(monkeypatch, mocked_group, spec):
    monkeypatch.setattr(gptj_split.ranks, "leave_process", lambda code=0: None)  # ranks 1-3 would leave here
    served = launch_two_nodes(monkeypatch, spec)
    assert served == [("cuda:0", "nccl"), ("cuda:1", "nccl"), ("cuda:0", "nccl"), ("cuda:1", "nccl")]
    for rank in range(4):  # the device is set before the group forms (NCCL and DeviceMesh use the current device)
        assert mocked_group[2 * rank:2 * rank + 2] == [("set_device", f"cuda:{rank % 2}"), ("group", "nccl", rank)]


def test_a_gpu_the_node_does_not_have_is_refused_by_rank_before_any_group(monkeypatch, mocked_group):
    served = launch_two_nodes(monkeypatch, "cuda:0=7GiB,cuda:1=7GiB,cuda:2=7GiB,cuda:3=7GiB")
    for rank in range(4):  # every rank decides every rank's place: the node-1 entries are refused everywhere
        assert isinstance(served[rank], ValueError)
        assert str(served[rank]).startswith("pipeline stage 2 was given cuda:2, which its node does not have "
                                            "(cuda:0, cuda:1): name each node's own GPUs, e.g. 'cuda' (each rank "
                                            "its local GPU) or 'cuda:0,cuda:1' (node-local)")
    assert mocked_group == []  # no device set, no group formed
    # from a notebook the same refusal comes before any process starts (this node read from torch: two T4s)
    monkeypatch.setattr(gptj_split.launch, "read_hardware", lambda free=False: gh.describe_hardware("2 x T4"))
    job = RankJob(gh.TensorParallelError, prepare_setup, serve_placement, "cuda:0=1GiB,cuda:5=1GiB", None)
    with pytest.raises(ValueError, match="^tensor-parallel rank 1 was given cuda:5, which its node does not have"):
        start_ranks(job)


def test_backend_is_nccl_only_when_every_rank_has_a_gpu_of_its_own():
    assert pick_backend([["cuda:0", "cuda:1"]]) == "nccl"
    assert pick_backend([["cuda:0", "cuda:1"], ["cuda:0", "cuda:1"]]) == "nccl"  # per node
    assert pick_backend([["cuda:0", "cuda:0"]]) == "gloo"  # budget slices of one GPU
    assert pick_backend([["cuda:0", "cuda:1", "cuda:0", "cuda:1"]]) == "gloo"  # one node: two ranks per GPU
    assert pick_backend([["cpu", "cuda:0"]]) == "gloo"


def places_of(spec: str, hardware: str = "2 x T4"):
    """Every rank's place for a notebook launch on described hardware."""
    return decide_ranks(spec, gh.describe_hardware(hardware), notebook_launch(len(read_spec(spec))))


def test_torchs_variant_is_refused_where_ranks_share_a_gpu():
    job = gh.variant_job(gh.make_job(torch.ones(1, 2, dtype=torch.long), torch.ones(1, 2)), "torch")
    with pytest.raises(ValueError, match="variant='torch' .* needs NCCL, one GPU per rank.*use variant='block'"):
        check_variant_backend([job], places_of("cuda:0=1GiB,cuda:0=1GiB"))
    check_variant_backend([job], places_of("cuda:0,cuda:1"))
    check_variant_backend([job], places_of("cpu,cpu"))
    check_variant_backend([gh.variant_job(job.job, "block")], places_of("cuda:0=1GiB,cuda:0=1GiB"))


def processes_left(before: set[int]) -> list:
    """This process's descendants that were not there before, but multiprocessing's own servers, which stay."""
    return [p for p in psutil.Process().children(recursive=True) if p.pid not in before and p.is_running()
            and not any(server in " ".join(p.cmdline()) for server in ("resource_tracker", "forkserver"))]


def run_client(client: str, tiny_path, options):
    if client == "pipeline":
        return gh.run_pipeline(str(tiny_path), PROMPTS, "cpu,cpu", max_new_tokens=6, greedy=True, options=options)
    return gh.run_tensor_parallel(str(tiny_path), PROMPTS, "cpu,cpu", max_new_tokens=6, greedy=True, options=options)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("client, error", [("pipeline", gh.PipelineError), ("tensor parallel", gh.TensorParallelError)])
@pytest.mark.parametrize("mode, detail", [
    ("raise", "failed: RuntimeError: injected fault: {kind} 1 stops after 3 token(s)"),
    ("exit", "failed: process exited with code 3"),
    ("hang", "hung: no answer within the 4 s timeout ({kind} 0 waited for it: "),
], ids=["raise", "exit", "hang"])
def test_a_rank_that_raises_exits_or_hangs_is_named_in_one_line(tiny_path, monkeypatch, client, error, mode, detail):
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    monkeypatch.setenv(FAULT_VARIABLE, f"1:3:{mode}")  # the test-only route to the ranks
    started = time.time()
    with pytest.raises(error) as info:
        run_client(client, tiny_path, gh.LaunchOptions(timeout=4, deadline=60))
    got = info.value
    assert str(got).startswith(f"{error.kind} 1 " + detail.format(kind=error.kind)), str(got)
    assert got.rank == 1 and "\n" not in str(got) and got.failed_at >= started
    assert (got.__cause__ is not None) == (mode != "exit")
    assert time.time() - started < 40
    assert processes_left(before) == []


@pytest.mark.timeout(60)
def test_a_run_past_its_deadline_is_ended_naming_the_ranks_still_running():
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    job = RankJob(gh.TensorParallelError, prepare_setup, serve_forever, "cpu,cpu", None,
                     gh.LaunchOptions(deadline=3))
    started = time.time()
    with pytest.raises(gh.TensorParallelError, match=r"^tensor-parallel rank 0 did not finish within the run's "
                       r"deadline of 3 s \(still running: 0, 1\)$"):
        start_ranks(job, "tiny")
    assert time.time() - started < 15
    assert processes_left(before) == []


def test_launch_options_are_checked():
    with pytest.raises(ValueError, match="timeout=0"):
        gh.LaunchOptions(timeout=0)
    with pytest.raises(ValueError, match="deadline=-1"):
        gh.LaunchOptions(deadline=-1)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("command, kind", [("pipeline", "pipeline stage"), ("tensor-parallel", "tensor-parallel rank")])
def test_under_torchrun_a_rank_that_fails_ends_the_command_naming_it(tiny_path, tmp_path, monkeypatch, command, kind):
    """This process as the one rank of a torchrun launch (torchrun's variables set): the command's one line names
    the rank in its own words. (torchrun itself stops the other ranks of a larger launch.)"""
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("LOCAL_WORLD_SIZE", "1"),
                        ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(free_port()))):
        monkeypatch.setenv(name, value)
    monkeypatch.setenv(FAULT_VARIABLE, "0:1:raise")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The list\n")
    given = ["--prompts-file", prompts] if command == "pipeline" else ["--prompt", "The list"]
    r = call_cli(command, "--model", tiny_path, "--devices", "cpu", *given, "--max-new-tokens", "3", "--greedy")
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == (f"error: {kind} 0 failed: RuntimeError: injected fault: {kind} 0 "
                                                 "stops after 1 token(s)")
