"""Where each rank runs (notebooks 05, 07), decided once from the device spec, the node's hardware and the launch:
proven for the machines learners have (Colab's T4, Kaggle's two, 4 x 8 GB, the 2021 post's 3 x 10 GB, two nodes under
torchrun, slices of one GPU) on described hardware, and the dry run on a machine whose CUDA is described to torch as
two T4s, alone and as the second node of a torchrun launch."""
import json
import os

import pytest
import torch

import gptj_helpers as gh
from gptj_split.devices import GPU_RESERVE, read_spec
from gptj_split.hardware import CARDS
from gptj_split.launch import Launch, decide_ranks, notebook_launch, notebook_places
from gptj_split.pipeline import pipeline_job, pipeline_settings
from gptj_split.ranks import DEFAULT_DEADLINE, DEFAULT_TIMEOUT, RankJob, load_timeout
from gptj_split.processes import start_ranks
import gptj_split.launch
from conftest import call_cli


def decide(spec: str, hardware: str, launch: Launch | None = None, dtype: str | None = None) -> list:
    """Every rank's place for `spec` on described hardware, from a notebook unless a torchrun launch is given."""
    launch = launch or notebook_launch(len(read_spec(spec)))
    return decide_ranks(spec, gh.describe_hardware(hardware), launch, dtype)


def summary(places) -> list[tuple]:
    """(node, local rank, device, backend) of each rank."""
    return [(p.node, p.local_rank, p.device, p.backend) for p in places]


T4 = CARDS["T4"]
FREE_LESS_RESERVE = T4.free_bytes - GPU_RESERVE

MATRIX = [  # (setup, hardware, spec, launch, [(node, local rank, device, backend), ...])
    ("Colab 1 x T4, one stage or one rank", "1 x T4", "cuda:0=14GiB", None, [(0, 0, "cuda:0", "nccl")]),
    ("Colab 1 x T4, bare cuda", "T4", "cuda", None, [(0, 0, "cuda:0", "nccl")]),
    ("Kaggle 2 x T4", "2 x T4", "cuda:0,cuda:1", None, [(0, 0, "cuda:0", "nccl"), (0, 1, "cuda:1", "nccl")]),
    ("Kaggle 2 x T4, budgets", "2 x T4", "cuda:0=14GiB,cuda:1=14GiB", None,
     [(0, 0, "cuda:0", "nccl"), (0, 1, "cuda:1", "nccl")]),
    ("Kaggle 2 x T4, sizes", "2 x T4", "2x14GiB", None, [(0, 0, "cuda:0", "nccl"), (0, 1, "cuda:1", "nccl")]),
    ("4 x 8 GB", "4 x 8GB", "4x7GiB", None, [(0, r, f"cuda:{r}", "nccl") for r in range(4)]),
    ("the 2021 post's 3 x 10 GB", "3 x 10GB", "3x9GiB", None, [(0, r, f"cuda:{r}", "nccl") for r in range(3)]),
    ("slices of one GPU (gloo)", "1 x T4", "cuda:0=7GiB,cuda:0=7GiB", None,
     [(0, 0, "cuda:0", "gloo"), (0, 1, "cuda:0", "gloo")]),
    ("slices of one GPU, sizes (gloo)", "1 x T4", "2x7GiB", None, [(0, 0, "cuda:0", "gloo"), (0, 1, "cuda:0", "gloo")]),
    ("the CPU", "cpu", "cpu,cpu", None, [(0, 0, "cpu", "gloo"), (0, 1, "cpu", "gloo")]),
    ("the CPU, sizes", "cpu", "3x4MiB", None, [(0, r, "cpu", "gloo") for r in range(3)]),
] + [(f"2 nodes x 2 T4 under torchrun, {form}", "2 x T4", spec, Launch(4, 2, 0),
      [(n, r, f"cuda:{r}", "nccl") for n in range(2) for r in range(2)])
     for form, spec in [("one entry", "cuda"), ("one entry with a budget", "cuda=14GiB"),
                        ("node-local", "cuda:0,cuda:1"),
                        ("global", "cuda:0=14GiB,cuda:1=14GiB,cuda:0=14GiB,cuda:1=14GiB"),
                        ("bare sizes", "4x14GiB")]]


@pytest.mark.parametrize("setup, hardware, spec, launch, expected", MATRIX, ids=[m[0] for m in MATRIX])
def test_each_ranks_device_and_backend_on_the_hardware_people_have(setup, hardware, spec, launch, expected):
    places = decide(spec, hardware, launch)
    assert summary(places) == expected
    for place in places:  # a missing budget is what the card has free, less the reserve
        if place.device.startswith("cuda") and "=" not in spec and "GiB" not in spec:
            assert place.budget_bytes == FREE_LESS_RESERVE


@pytest.mark.parametrize("hardware, dtype, weights, allowed", [
    ("1 x T4", "float16", ("int8", "nf4"), True), ("1 x T4", "bfloat16", (), False),  # a T4 emulates bfloat16
    ("1 x P100", "float16", ("nf4",), True), ("1 x P100", "bfloat16", (), False),  # LLM.int8 needs 7.5
    ("1 x 8GB", "bfloat16", ("int8", "nf4"), True), ("cpu", "bfloat16", ("int8", "nf4"), True),
])
def test_dtype_and_weight_formats_follow_the_card(hardware, dtype, weights, allowed):
    spec = "cpu" if hardware == "cpu" else "cuda:0=3GiB"
    if not allowed:
        with pytest.raises(ValueError, match=rf"rank 0 is on cuda:0, a Tesla [\w-]+ .*which does not compute {dtype}: "
                           "use dtype float16"):
            decide(spec, hardware, dtype=dtype)
        return
    place = decide(spec, hardware, dtype=dtype)[0]
    assert place.dtype == dtype and set(weights) <= set(place.formats)
    if hardware == "1 x P100":
        assert "int8" not in place.formats


def test_gpt_j_6b_defaults_to_float16_on_every_gpu_and_bfloat16_on_the_cpu():
    for spec, hardware, dtype in (("cuda:0,cuda:1", "2 x T4", "float16"), ("2x7GiB", "cpu", "bfloat16")):
        places = gh.pipeline_dry_run("gpt-j-6b", spec, hardware=gh.describe_hardware(hardware))
        assert {p.dtype for p in places} == {dtype}


@pytest.mark.parametrize("spec, hardware, launch, message", [
    ("cuda:0,cuda:1,cuda:0", "2 x T4", Launch(4, 2, 1), "the device spec has 3 entries, which fits no form for 4 "
     "ranks on 2 node(s) of 2: give 1 entry (every rank takes its local GPU: 'cuda' or 'cuda=14GiB'), 2 (node-local: "
     "the same list on every node, entry LOCAL_RANK) or 4 (global, in rank order)"),
    ("cuda:0=15GiB,cuda:1=14GiB", "2 x T4", None, "device spec part 'cuda:0=15GiB': cuda:0 is a Tesla T4 with 14.75 "
     "GiB in all, less than the budget of 15.00 GiB"),
    ("cuda:0,cuda:2", "2 x T4", None, "rank 1 was given cuda:2, which its node does not have (cuda:0, cuda:1): name "
     "each node's own GPUs, e.g. 'cuda:0,cuda:1'"),
    ("cuda:0,cuda:1", "cpu", None, "rank 0 was given cuda:0, which its node does not have (no GPU): name each node's "
     "own GPUs, e.g. 'cpu,cpu'"),
    ("cuda,cuda,cuda", "2 x T4", None, "device spec part 'cuda': cuda:2 does not exist, this node has 2 GPU(s)"),
    ("tpu:0", "2 x T4", None, "device spec part 'tpu:0': 'tpu:0' is not a device name (cpu, cuda, cuda:N"),
    ("mps", "2 x T4", None, "device spec part 'mps': only cpu and cuda devices are supported, not mps"),
])
def test_a_spec_that_cannot_run_is_refused_naming_the_part_and_what_works(spec, hardware, launch, message):
    with pytest.raises(ValueError) as info:
        decide(spec, hardware, launch)
    assert message in str(info.value)


def test_a_world_size_that_does_not_match_is_refused():
    with pytest.raises(ValueError, match="WORLD_SIZE 3 is not a multiple of LOCAL_WORLD_SIZE 2"):
        decide("cuda", "2 x T4", Launch(3, 2, 0))
    with pytest.raises(ValueError, match=r"3 device\(s\) for 2 rank\(s\): give one device per rank"):
        decide_ranks("cpu,cpu,cpu", gh.describe_hardware("cpu"), notebook_launch(2))


def test_ranks_started_from_a_kernel_under_torchrun_ignore_its_variables(monkeypatch):
    """A kernel that itself runs under torchrun (or accelerate, SLURM) keeps RANK, LOCAL_RANK...: the ranks it starts
    are its own run's, one per entry on this node, and never see those variables."""
    for name, value in (("RANK", "3"), ("WORLD_SIZE", "4"), ("LOCAL_RANK", "1"), ("LOCAL_WORLD_SIZE", "2"),
                        ("GROUP_RANK", "1"), ("MASTER_PORT", "29500")):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(gptj_split.launch, "read_hardware", lambda free=False: gh.describe_hardware("2 x T4"))
    job = pipeline_job(pipeline_settings("tiny", "cuda:0,cuda:1"))
    assert summary(notebook_places(job)) == [(0, 0, "cuda:0", "nccl"), (0, 1, "cuda:1", "nccl")]
    assert not set(gptj_split.launch.TORCHRUN_VARIABLES) & set(gptj_split.launch.without_launcher_variables(
        dict(os.environ)))


def report_environment(context, payload, prepared) -> dict:
    """What a real rank process sees (the kernel-under-torchrun test)."""
    return {"device": str(context.device), "rank": context.rank, "RANK": os.environ.get("RANK"),
            "LOCAL_RANK": os.environ.get("LOCAL_RANK")}


def prepare_nothing(payload, places, located) -> None:
    """Rank 0's preparation: none."""


@pytest.mark.timeout(60)
def test_real_ranks_from_a_kernel_under_torchrun_see_none_of_its_variables(monkeypatch):
    for name, value in (("RANK", "3"), ("WORLD_SIZE", "4"), ("LOCAL_RANK", "1"), ("LOCAL_WORLD_SIZE", "2")):
        monkeypatch.setenv(name, value)
    job = RankJob(gh.PipelineError, prepare_nothing, report_environment, "cpu,cpu", None)
    assert start_ranks(job) == {"device": "cpu", "rank": 0, "RANK": None, "LOCAL_RANK": None}


@pytest.fixture
def two_t4s(monkeypatch):
    """This machine's CUDA, as torch describes it, is two T4s (no GPU is touched: nothing loads in a dry run)."""
    class Props:
        name, total_memory, major, minor = T4.name, T4.total_bytes, 7, 5

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: Props())
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda index: (T4.free_bytes, T4.total_bytes))


DRY_RUN_PIPELINE = [
    "rank 0: node 0, local rank 0, device cuda:0, backend nccl, dtype float16, budget 13.64 GiB, holds embedding + "
    "blocks 0-13",
    "rank 1: node 0, local rank 1, device cuda:1, backend nccl, dtype float16, budget 13.64 GiB, holds blocks 14-27 + "
    "head"]


@pytest.mark.parametrize("spec", ["cuda:0,cuda:1", "cuda", "2xcuda"])
def test_pipeline_dry_run_on_two_t4s_prints_each_ranks_line(two_t4s, capsys, spec):
    launch = None if spec != "cuda" else "torchrun"
    argv = ["pipeline", "--model", "gpt-j-6b", "--devices", spec, "--dry-run"]
    if launch:  # one entry: under torchrun on one node of two, each rank its local GPU; rank 1 prints its own line
        env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
        with pytest.MonkeyPatch.context() as mp:
            for k, v in env.items():
                mp.setenv(k, v)
            assert gh.main(argv) == 0
        assert capsys.readouterr().out.splitlines() == DRY_RUN_PIPELINE[1:]
        return
    assert gh.main(argv) == 0
    assert capsys.readouterr().out.splitlines() == DRY_RUN_PIPELINE


def test_dry_runs_on_the_second_node_of_a_torchrun_launch(two_t4s, capsys, monkeypatch):
    """Rank 2 of 2 nodes x 2: its own line, its node 1, its local GPU 0, budget read on its own card."""
    for name, value in (("RANK", "2"), ("WORLD_SIZE", "4"), ("LOCAL_RANK", "0"), ("LOCAL_WORLD_SIZE", "2")):
        monkeypatch.setenv(name, value)
    for command, holds in (("pipeline", "blocks 14-20"), ("tensor-parallel", "heads 8-11 of every block + embedding + "
                                                          "1/4 of the head")):
        assert gh.main([command, "--model", "gpt-j-6b", "--devices", "cuda:0,cuda:1", "--dry-run"]) == 0
        line = capsys.readouterr().out.strip()
        assert line.startswith("rank 2: node 1, local rank 0, device cuda:0, backend nccl, dtype float16, budget "
                               "13.64 GiB, holds ") and line.endswith(holds), line
    assert gh.main(["pipeline", "--model", "gpt-j-6b", "--devices", "4x14GiB", "--dry-run", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert len(got) == 1 and got[0]["rank"] == 2 and got[0]["node"] == 1 and got[0]["device"] == "cuda:0"
    assert got[0]["budget_bytes"] == 14 * 2**30 and got[0]["backend"] == "nccl" and "bfloat16" not in got[0]["formats"]


def test_tensor_parallel_dry_run_on_two_t4s(two_t4s, capsys):
    assert gh.main(["tensor-parallel", "--model", "gpt-j-6b", "--devices", "cuda:0=14GiB,cuda:1=14GiB",
                    "--dry-run"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"rank {r}: node 0, local rank {r}, device cuda:{r}, backend nccl, dtype float16, budget 14.00 GiB, holds "
        f"heads {8 * r}-{8 * r + 7} of every block + embedding + 1/2 of the head" for r in range(2)]


@pytest.mark.parametrize("argv, message", [
    (["pipeline", "--model", "gpt-j-6b", "--devices", "cuda:0,cuda:1", "--dtype", "bfloat16"],
     "error: pipeline stage 0 is on cuda:0, a Tesla T4 (compute capability 7.5), which does not compute bfloat16"),
    (["tensor-parallel", "--model", "gpt-j-6b", "--devices", "cuda:0,cuda:5"],
     "error: tensor-parallel rank 1 was given cuda:5, which its node does not have (cuda:0, cuda:1)"),
    (["pipeline", "--model", "gpt-j-6b", "--devices", "cuda:0=15GiB"], "cuda:0 is a Tesla T4 with 14.75 GiB in all"),
    (["pipeline", "--model", "gpt-j-6b", "--devices", "cuda:0=4GiB,cuda:1=4GiB"],
     "error: the model does not fit: it needs 11.29 GiB"),
    (["tensor-parallel", "--model", "gpt-j-6b", "--devices", "cuda:0=7GiB,cuda:0=7GiB", "--variant", "torch"],
     "variant='torch' (DTensor's parallelize_module) needs NCCL"),
])
def test_a_dry_run_refuses_what_the_real_run_would_refuse_with_a_non_zero_exit(two_t4s, capsys, argv, message):
    assert gh.main([*argv, "--dry-run"]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.timeout(60)
def test_the_dry_run_command_says_the_same_in_a_process_of_its_own(tiny_path):
    """`python -m gptj_helpers pipeline --dry-run` on this machine: one line per rank, nothing loaded."""
    r = call_cli("pipeline", "--model", tiny_path, "--devices", "3x4MiB", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "rank 0: node 0, local rank 0, device cpu, backend gloo, dtype float32, budget 4.00 MiB, holds embedding + "
        "blocks 0-2", "rank 1: node 0, local rank 1, device cpu, backend gloo, dtype float32, budget 4.00 MiB, holds "
        "blocks 3-5", "rank 2: node 0, local rank 2, device cpu, backend gloo, dtype float32, budget 4.00 MiB, holds "
        "blocks 6-7 + head"]


def test_times_across_nodes_are_each_ranks_own_durations():
    """Ranks on rank 0's node share its clock (one time axis); a rank on another node times from its own clock's
    start, never from another machine's time.time()."""
    import gptj_split.ranks

    assert gptj_split.ranks.clock_start(0, 100.0, 5.0) == 100.0  # rank 0's machine: its start
    assert gptj_split.ranks.clock_start(1, 100.0, 5.0) == 5.0  # another machine: its own


def test_a_run_has_a_default_deadline_and_its_load_limit_follows_the_bytes():
    assert gh.LaunchOptions().deadline == DEFAULT_DEADLINE == 3600
    assert load_timeout(0) == DEFAULT_TIMEOUT
    full = load_timeout(int(12.1e9) // 2)  # half of GPT-J-6B, a stage of two: minutes, not the step's 60 s
    assert 300 < full < 400


def gpu_rehearsal_module(monkeypatch):
    """benchmarks/gpu_rehearsal.py, imported into this process (its stage processes stay processes)."""
    import importlib

    from conftest import ROOT

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    return importlib.import_module("gpu_rehearsal")


@pytest.mark.timeout(120)
def test_the_gpu_rehearsals_harness_runs_on_the_cpu_and_its_bounds_can_fail(monkeypatch, capsys):
    """`make gpu-check`'s rehearsal of Colab's and Kaggle's lines, on the tiny model: each bound decides it; with
    Kaggle's RAM shrunk to 1 MB the same run fails."""
    rehearsal = gpu_rehearsal_module(monkeypatch)
    assert rehearsal.main(["--device", "cpu", "--tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "host peak RSS" in out and "2 line(s) fit" in out and ": False" not in out
    assert rehearsal.line_spec("kaggle", "cuda:0") in ("cuda:0=14GiB,cuda:0=14GiB", "cuda:0=14GiB,cuda:1=14GiB")
    monkeypatch.setitem(rehearsal.HOST_RAM, "kaggle", 1e6)
    assert rehearsal.main(["--device", "cpu", "--tokens", "4", "--only", "kaggle"]) == 1
    assert "within Kaggle's 0 GB: False" in capsys.readouterr().out


def test_the_dry_run_says_when_one_rank_runs_alone_or_ranks_share_a_gpu(two_t4s, capsys):
    """Colab's one T4: one stage, said so; budget slices of one GPU: gloo, said so."""
    assert gh.main(["pipeline", "--model", "gpt-j-6b", "--devices", "cuda:0=14GiB", "--dry-run"]) == 0
    assert "note: one rank: everything on one device" in capsys.readouterr().err
    assert gh.main(["tensor-parallel", "--model", "gpt-j-6b", "--devices", "cuda:0=7GiB,cuda:0=7GiB", "--dry-run"]) == 0
    out = capsys.readouterr()
    assert "backend gloo" in out.out and "note: ranks share a GPU (budget slices): they talk over gloo" in out.err
    assert gh.main(["pipeline", "--model", "gpt-j-6b", "--devices", "cuda:0,cuda:1", "--dry-run"]) == 0
    assert "note:" not in capsys.readouterr().err
