"""Notebook 05, part 2: starting the stages. One process per stage, started from a notebook (forked from a server
that imported torch once) or by torchrun (also across machines); rank 0 plans and tokenizes, every rank loads its
own stage, and a stage that fails ends the whole run within seconds, naming the stage and its original error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .models import as_dtype, default_dtype, dtype_name, gptj_modeling
from .devices import Device, parse_devices, peak_rss, reset_peak_rss
from .hub import load_config, load_tokenizer, resolve_model
from .plan import Plan, plan_split
from .records import RunRecord
from .relay import RelayEnd, TokenRelay, adopt_environment, process_context
from .sampling import Sampling, as_sampling, check_prompts, pad_left
from .generate import make_streamer
from .pipeline import (PIPELINE_TIMEOUT, PipelineJob, check_pipeline_plan, check_stage_count, load_stage, make_job,
                       merge_stage_results, run_stage)

CONFIG_ERRORS = (ValueError, MemoryError, FileNotFoundError)  # refused before loading: passed on as they are


@dataclass
class LaunchSettings:
    """What every stage process of one pipelined run needs, the same under both launchers (notebook 05)."""

    model: str  # a model name or folder
    world_size: int
    stage_devices: list[str]  # one device name per stage
    devices: str | None = None  # the device spec to plan over, when no plan is given
    plan_json: str | None = None
    prompts: list[str] | None = None  # the texts to continue (rank 0), or else `jobs`
    jobs: list[PipelineJob] | None = None
    micro_batches: int = 1
    max_new_tokens: int = 50
    sampling: Sampling = dataclasses.field(default_factory=Sampling)
    dtype: str | None = None  # None: the plan's
    timeout: float = PIPELINE_TIMEOUT  # seconds a stage waits for a neighbour
    threads: int | None = None
    affinity: list[list[int]] | None = None  # cores per stage
    fail: tuple | None = None  # tests: (stage, token, "raise" | "exit")
    init_method: str = "env://"  # torchrun's rendezvous; launch_stages sets a tcp:// address
    result_path: str | None = None  # launch_stages: where rank 0 leaves its records, and the stages their errors
    error_dir: str | None = None
    launched_here: bool = False
    relay: RelayEnd | None = None  # the last stage streams its tokens here and reads the caller's Stop
    transform: object = None  # load_stage's: called on each block module as it loads (notebook 08 quantizes there)


def launch_settings(model, world_size: int, devices: str | list[Device] | None = None, plan: Plan | None = None,
                    prompts: list[str] | None = None, jobs: list[PipelineJob] | None = None, micro_batches: int = 1,
                    max_new_tokens: int = 50, sampling: Sampling | None = None, dtype=None,
                    timeout: float = PIPELINE_TIMEOUT, threads: int | None = None,
                    affinity: list[list[int]] | None = None, fail: tuple | None = None) -> LaunchSettings:
    """The settings of one pipelined run, checked, for the notebook launcher and torchrun alike (notebook 05)."""
    if isinstance(devices, list):
        devices = ",".join(f"{d.name}={d.budget_bytes}" for d in devices)
    if plan is not None:
        names = [s.device for s in plan.devices]
    elif devices:
        names = [d.name for d in parse_devices(devices, check=False)]
    else:
        raise ValueError("give devices (like 'cpu,cpu') or a plan")
    if len(names) != world_size:
        raise ValueError(f"{world_size} process(es) for the {len(names)} device(s) in "
                         f"{devices if plan is None else 'the plan'!r}: start one process per device")
    if affinity is not None and len(affinity) != world_size:
        raise ValueError(f"affinity needs one list of cores per stage ({world_size}), got {len(affinity)}")
    return LaunchSettings(str(model), world_size, names, devices=devices, plan_json=plan.to_json() if plan else None,
                          prompts=prompts, jobs=jobs, micro_batches=micro_batches, max_new_tokens=max_new_tokens,
                          sampling=sampling or Sampling(), dtype=dtype_name(dtype) if dtype else None,
                          timeout=timeout, threads=threads, affinity=affinity, fail=fail)


def pick_backend(devices: list[str], local_world_size: int | None = None) -> str:
    """NCCL when every stage has a GPU of its own, else gloo (notebook 05)."""
    if all(d.startswith("cuda") for d in devices) and (len(set(devices)) == len(devices) or local_world_size == 1):
        return "nccl"
    return "gloo"


def configure_worker(threads: int | None, cpus: list[int] | None) -> None:
    """Limit this process's threads and pin it to some cores (the benchmark emulates one device per core)."""
    if cpus:
        os.sched_setaffinity(0, set(cpus))
    if threads:
        torch.set_num_threads(threads)
        with contextlib.suppress(RuntimeError):  # only settable before the first parallel work
            torch.set_num_interop_threads(threads)


def join_run(rank: int, settings, prepare) -> tuple[str, tuple]:
    """Every rank's start (stage or tensor-parallel rank): threads, cores, rank 0's `prepare(settings)` (its
    configuration error reaches all), the process group; returns (backend, prepared) (notebooks 05, 07)."""
    import datetime

    import torch.distributed as dist

    world_size = settings.world_size
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    cpus = settings.affinity[rank] if settings.affinity else None
    configure_worker(settings.threads or (max(1, (os.cpu_count() or 1) // local_world)
                                          if settings.launched_here else None), cpus)
    setup: list = [None]
    if rank == 0:
        try:
            setup[0] = prepare(settings)
        except CONFIG_ERRORS as err:
            setup[0] = err
    if world_size == 1 and isinstance(setup[0], Exception):
        raise setup[0]
    backend = pick_backend(settings.stage_devices, local_world)
    if backend == "nccl":
        torch.cuda.set_device(torch.device(settings.stage_devices[rank]))
    dist.init_process_group(backend, init_method=settings.init_method, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=settings.timeout))
    try:
        dist.broadcast_object_list(setup, src=0)
        if isinstance(setup[0], Exception):
            raise setup[0]
    except BaseException:
        dist.destroy_process_group()
        raise
    return backend, setup[0]


def serve_stage(rank: int, settings: LaunchSettings) -> list[RunRecord] | None:
    """One stage process under run_pipeline or torchrun: rank 0 plans and broadcasts, all load and run (notebook 05)."""
    import time

    import torch.distributed as dist

    world_size = settings.world_size
    backend, setup = join_run(rank, settings, prepare_pipeline)
    try:
        plan, jobs, model_path = setup
        dtype = as_dtype(settings.dtype or plan.dtype)
        tokenizer = load_tokenizer(str(model_path)) if rank == 0 else None
        import accelerate.utils  # noqa: F401  (libraries belong to the baseline, not to the stage)
        import safetensors  # noqa: F401
        import transformers.masking_utils  # noqa: F401
        from transformers import DynamicCache  # noqa: F401

        gptj_modeling()

        baseline = reset_peak_rss()
        start = time.perf_counter()
        stage = load_stage(model_path, plan, rank, dtype, plan.devices[rank].device if backend == "nccl" else "cpu",
                           transform=settings.transform)
        load_seconds = time.perf_counter() - start
        records = []
        for job in jobs:
            dist.barrier()
            t0 = [time.time()]
            dist.broadcast_object_list(t0, src=0)
            result = run_stage(stage, job, t0[0], settings.fail, settings.relay if rank == world_size - 1 else None)
            result["memory"].load_seconds = load_seconds
            if baseline is not None:  # host memory of this stage process over its RSS after imports, before loading
                result["memory"].peak_rss_bytes = peak_rss() - baseline
            gathered = [None] * world_size if rank == 0 else None
            dist.gather_object(result, gathered, dst=0)
            if rank == 0:
                records.append(merge_stage_results(gathered, job, tokenizer, plan, stage.eos_token_id))
                records[-1].prompts = list(settings.prompts or [])
        dist.barrier()  # nobody leaves while a neighbour still talks to it
        return records if rank == 0 else None
    finally:
        dist.destroy_process_group()


def prepare_pipeline(settings: LaunchSettings) -> tuple[Plan, list[PipelineJob], Path]:
    """On rank 0: the plan (given, or made from the devices) and the jobs, checked; nothing loaded yet."""
    model_path = resolve_model(settings.model)
    config = load_config(str(model_path))
    jobs = settings.jobs
    if jobs is None:
        jobs = [prompts_job(model_path, config, settings.prompts, settings.micro_batches, settings.max_new_tokens,
                            sampling=settings.sampling)]
    if settings.plan_json:
        plan = Plan.from_json(settings.plan_json)
    else:
        plan = plan_pipeline(config, settings.devices, jobs, as_dtype(settings.dtype), settings.model)
    check_pipeline_plan(plan, config.n_layer, settings.world_size)
    return plan, jobs, model_path


def plan_pipeline(config, devices: str | list[Device], jobs: list[PipelineJob], dtype: torch.dtype | None,
                  model_name: str) -> Plan:
    """Plan one stage per device, with KV cache room for the longest and widest job (notebook 05)."""
    parsed = parse_devices(devices, check=False) if isinstance(devices, str) else list(devices)
    check_stage_count(len(parsed), config.n_layer)
    return plan_split(config, parsed, dtype=dtype or default_dtype(config, parsed),
                      max_new_tokens=max(j.input_ids.shape[1] + j.max_new_tokens for j in jobs),
                      batch_size=max(j.input_ids.shape[0] for j in jobs), model_name=model_name)


def model_folder(model) -> Path:
    """The local folder of a model name, folder or loaded model."""
    return resolve_model(str(getattr(getattr(model, "config", None), "_name_or_path", None) or model))


def pipeline_worker(rank: int, settings: LaunchSettings, serve=None, environ: dict | None = None) -> None:
    """Entry point of a stage process started by run_pipeline; results go to files, errors too (notebook 05).
    `serve`: what the process runs instead of `serve_stage` (notebook 07's tensor-parallel ranks)."""
    import pickle
    import time
    import traceback

    try:
        adopt_environment(environ)
        records = (serve or serve_stage)(rank, settings)
        if rank == 0:
            tmp = Path(settings.result_path + ".tmp")
            tmp.write_bytes(pickle.dumps(records))
            os.replace(tmp, settings.result_path)
    except BaseException as err:
        report = {"stage": rank, "time": time.time(), "error": err, "text": f"{type(err).__name__}: {err}",
                  "traceback": traceback.format_exc(), "neighbour": is_neighbour_error(err)}
        try:
            data = pickle.dumps(report)
        except Exception:  # an exception that cannot be pickled travels as its text
            data = pickle.dumps({**report, "error": None})
        Path(settings.error_dir, f"stage{rank}.pkl").write_bytes(data)
        raise SystemExit(1) from None  # the launcher reports it, naming the stage
    leave_process()


def leave_process(code: int = 0) -> None:
    """Exit a stage process at once: gloo's threads can abort an orderly interpreter shutdown (SIGABRT)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class PipelineError(RuntimeError):
    """A stage process failed; `stage` names it, `failed_at` is when (time.time()); the stage's own exception,
    where it could travel, is the `__cause__` (notebook 05)."""

    def __init__(self, message: str, stage: int, failed_at: float):
        super().__init__(message)
        self.stage, self.failed_at = stage, failed_at


def is_neighbour_error(err: BaseException) -> bool:
    """Did this error come from the transport (a neighbour vanished or timed out), not from this stage itself? gloo
    reports a vanished peer as a plain RuntimeError from its transport."""
    import torch.distributed as dist

    return isinstance(err, (dist.DistError, ConnectionError, TimeoutError)) or (
        isinstance(err, RuntimeError) and any(m in str(err) for m in ("gloo/transport", "by peer")))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_stages(settings: LaunchSettings, serve=None) -> list[RunRecord]:
    """Start one process per stage and return rank 0's records; a failure stops all and names the stage
    (notebook 05). `serve(rank, settings)`, a module-level function, replaces `serve_stage` (notebook 07)."""
    import multiprocessing.connection
    import pickle
    import time

    ctx = process_context(settings.stage_devices, settings.model)
    world_size = settings.world_size
    with tempfile.TemporaryDirectory(prefix="gptj-pipeline-") as tmp:
        settings = dataclasses.replace(settings, result_path=str(Path(tmp, "result.pkl")), error_dir=tmp,
                                       init_method=f"tcp://127.0.0.1:{free_port()}", launched_here=True)
        procs = [ctx.Process(target=pipeline_worker, args=(r, settings, serve, dict(os.environ)), daemon=True,
                             name=f"pipeline-stage-{r}") for r in range(world_size)]
        exits: dict[int, float] = {}
        try:
            for p in procs:
                p.start()
            while len(exits) < world_size:
                multiprocessing.connection.wait([p.sentinel for p in procs if p.exitcode is None], timeout=1.0)
                for r, p in enumerate(procs):
                    if p.exitcode is not None and r not in exits:
                        exits[r] = time.time()
                if any(procs[r].exitcode != 0 for r in exits):
                    break
        finally:
            for p in procs:
                if p.is_alive():
                    p.terminate()
            for p in procs:
                p.join(5)
                if p.is_alive():
                    p.kill()
                    p.join()
        failed = {r: t for r, t in exits.items() if procs[r].exitcode != 0}
        if failed:
            raise describe_stage_failure(tmp, failed, procs)
        return pickle.loads(Path(settings.result_path).read_bytes())


def describe_stage_failure(error_dir: str, failed: dict[int, float], procs) -> Exception:
    """The first stage's own error: a configuration error as it was raised, anything else as a PipelineError
    naming the stage (its own report, or its exit code) with the original exception as its cause."""
    import pickle

    reports = [pickle.loads(p.read_bytes()) for p in Path(error_dir).glob("stage*.pkl")]
    for r, t in failed.items():
        if not any(rep["stage"] == r for rep in reports):  # died without a word: killed, or exited hard
            reports.append({"stage": r, "time": t, "error": None, "text": f"process exited with code "
                            f"{procs[r].exitcode}", "traceback": "", "neighbour": False})
    # a stage's own error beats the transport errors its neighbours then see; among equals, the earliest
    first = min(reports, key=lambda rep: (rep["neighbour"], rep["time"]))
    if isinstance(first["error"], CONFIG_ERRORS):  # a bad configuration, refused before loading
        return first["error"]
    tail = "\n".join(first["traceback"].strip().splitlines()[-6:-1])
    message = f"pipeline stage {first['stage']} failed: {first['text']}" + (f"\n{tail}" if tail else "")
    error = PipelineError(message, first["stage"], first["time"])
    error.__cause__ = first["error"]
    return error


def run_pipeline_jobs(model, devices: str | list[Device] | None, jobs: list[PipelineJob], plan: Plan | None = None,
                      dtype: torch.dtype | None = None, timeout: float = PIPELINE_TIMEOUT, threads: int | None = None,
                      affinity: list[list[int]] | None = None, fail: tuple | None = None,
                      relay: RelayEnd | None = None, transform=None) -> list[RunRecord]:
    """Several generations in one start of the stage processes (benchmarks and tests reuse the loaded stages);
    everything is planned and checked here, before any process starts; `transform` as load_stage's."""
    model_path = model_folder(model)
    config = load_config(str(model_path))
    if plan is None:
        if devices is None:
            raise ValueError("give devices (like 'cpu,cpu') or a plan")
        plan = plan_pipeline(config, devices, jobs, as_dtype(dtype), str(model))
    check_pipeline_plan(plan, config.n_layer)
    if plan.quantized and transform is None:
        raise ValueError(f"the plan stores the blocks in {plan.weights}: pass transform=gh.quantizer_for(plan), "
                         "which quantizes each block as its stage loads it (notebook 08)")
    settings = launch_settings(model_path, len(plan.devices), plan=plan, jobs=jobs, dtype=dtype, timeout=timeout,
                               threads=threads, affinity=affinity, fail=fail)
    return launch_stages(dataclasses.replace(settings, relay=relay, transform=transform))


def prompts_job(model_path: Path, config, prompts: list[str], micro_batches: int = 1, max_new_tokens: int = 50,
                sampling: Sampling | None = None, stoppable: bool = False, **knobs) -> PipelineJob:
    """Tokenize and left-pad prompts as generate_text does, checked the same way, into a job (notebook 05)."""
    sampling = as_sampling(sampling, **knobs)
    tokenizer = load_tokenizer(str(model_path))
    ids = check_prompts(config, tokenizer, prompts, max_new_tokens)
    input_ids, mask = pad_left(ids, tokenizer.eos_token_id, "cpu")
    return make_job(input_ids, mask, micro_batches, max_new_tokens, sampling=sampling, stoppable=stoppable)


def run_pipeline(model, prompts: str | list[str], devices: str | list[Device] | None = None,
                 micro_batches: int = 1, plan: Plan | None = None, dtype: torch.dtype | None = None,
                 timeout: float = PIPELINE_TIMEOUT, threads: int | None = None,
                 affinity: list[list[int]] | None = None, fail: tuple | None = None, max_new_tokens: int = 50,
                 sampling: Sampling | None = None, stream=False, stopping_criteria=None, transform=None,
                 **knobs) -> tuple[list[str], RunRecord]:
    """Generate with one process per stage, micro-batches flowing through them at once (notebook 05).

    Returns `(texts, record)` like generate_text: `model` is a name or folder ("tiny", "gpt-j-6b", a path);
    `max_new_tokens` and the sampling keywords (greedy, temperature, top_p, top_k, seed, or `sampling=`) are
    generate_text's, and `texts[i]` continues `prompts[i]`. Greedy tokens equal `model.generate` on the whole
    batch; seeded sampling equals `torch.manual_seed(seed); model.generate(...)` run on each micro-batch alone
    (each micro-batch has its own generator), so on the whole batch when micro_batches=1. `stream` and
    `stopping_criteria` work as in generate_text (notebook 06's widget uses both), with one prompt per
    micro-batch: the last stage sends each token to this process as it is picked, the criteria run here on what
    has arrived, and a stop ends every stage after the same token, usually one token later than in generate.
    A plan with int8 or nf4 weights needs `transform=gh.quantizer_for(plan)` (notebook 08).
    """
    import multiprocessing

    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    model_path = model_folder(model)
    stoppable = stream is not False or stopping_criteria is not None
    job = prompts_job(model_path, load_config(str(model_path)), prompts, micro_batches, max_new_tokens,
                      sampling=as_sampling(sampling, **knobs), stoppable=stoppable)
    if not stoppable:
        record = run_pipeline_jobs(model_path, devices, [job], plan=plan, dtype=dtype, timeout=timeout,
                                   threads=threads, affinity=affinity, fail=fail, transform=transform)[0]
    else:
        streamer = make_streamer(load_tokenizer(str(model_path)), prompts, stream)
        relay = TokenRelay(multiprocessing.get_context("spawn"), job.input_ids, streamer, stopping_criteria)
        with relay:
            record = run_pipeline_jobs(model_path, devices, [job], plan=plan, dtype=dtype, timeout=timeout,
                                       threads=threads, affinity=affinity, fail=fail, relay=relay.worker_end(),
                                       transform=transform)[0]
    record.prompts = prompts
    return record.texts, record
