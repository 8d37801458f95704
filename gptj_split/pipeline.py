"""Notebook 05, part 3: the pipeline, a client of the rank runtime (ranks.py) and the twin of tensor_parallel.py. One
rank per stage, started from a notebook or by torchrun: rank 0 plans and tokenizes, every rank loads only its own
stage (stage.py) and runs the schedule, and the last stage's tokens come back as `(texts, RunRecord)`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from .models import as_dtype, default_dtype, dtype_name, gptj_modeling
from .devices import Device, parse_devices, peak_rss, reset_peak_rss
from .hub import load_config, load_tokenizer
from .plan import Plan, check_free_memory, plan_split
from .records import EventClock, RunRecord
from .sampling import Sampling, as_sampling
from .generate import make_streamer
from .relay import RelayEnd, TokenRelay
from .hardware import Hardware
from .launch import (Launch, RankPlace, check_place_dtype, notebook_places, plan_spec, stage_holds, torchrun_places,
                     with_plan)
from .ranks import DEFAULT_TIMEOUT, LaunchOptions, RankContext, RankError, RankJob, loading, run_jobs, start_ranks
from .jobs import PipelineJob, locate_model, merge_results, model_folder, prompts_job
from .stage import check_pipeline_plan, check_stage_count, load_stage, run_stage

PIPELINE_TIMEOUT = DEFAULT_TIMEOUT  # seconds a stage waits for a neighbour before the run fails


class PipelineError(RankError):
    """A pipeline stage failed; `stage` names it (notebook 05)."""

    kind = "pipeline stage"


@dataclass
class PipelineSettings:
    """What every stage of one pipelined run needs, the same under both launchers (notebook 05)."""

    model: str  # a model name or folder: each node finds its own copy
    spec: str  # the device spec: one stage per rank (launch.py decides where each runs)
    plan_json: str | None = None  # the plan, when the caller made it; else rank 0 plans over `devices`
    prompts: list[str] | None = None  # the texts to continue (rank 0), or else `jobs`
    jobs: list[PipelineJob] | None = None
    micro_batches: int = 1
    max_new_tokens: int = 50
    sampling: Sampling = dataclasses.field(default_factory=Sampling)
    dtype: str | None = None  # None: the plan's
    relay: RelayEnd | None = None  # the last stage streams its tokens here and reads the caller's Stop


def pipeline_settings(model, devices: str | list[Device] | None = None, plan: Plan | None = None,
                      prompts: list[str] | None = None, jobs: list[PipelineJob] | None = None, micro_batches: int = 1,
                      max_new_tokens: int = 50, sampling: Sampling | None = None, dtype=None,
                      relay=None) -> PipelineSettings:
    """The settings of one pipelined run, for the notebook launcher and torchrun alike; the device spec is read once,
    by the runtime, where the ranks start (notebook 05)."""
    return PipelineSettings(str(model), plan_spec(devices, plan), plan.to_json() if plan else None, prompts, jobs,
                            micro_batches, max_new_tokens, sampling or Sampling(),
                            dtype_name(dtype) if dtype else None, relay)


def pipeline_job(settings: PipelineSettings, options: LaunchOptions | None = None) -> RankJob:
    """What the rank runtime runs for a pipelined run: one stage per device (notebook 05)."""
    return RankJob(PipelineError, prepare_pipeline, serve_pipeline, settings.spec, settings,
                   options or LaunchOptions(), locate_model, settings.dtype)


def prepare_pipeline(settings: PipelineSettings, places: list[RankPlace], model_path: Path) -> tuple[Plan,
                                                                                                      list[PipelineJob]]:
    """On rank 0: the plan (given, or made from every rank's device and budget) and the jobs, checked; nothing loaded
    yet (notebook 05)."""
    config = load_config(str(model_path))
    devices = [p.as_device for p in places]
    jobs = settings.jobs
    if jobs is None:
        jobs = [prompts_job(model_path, config, settings.prompts, settings.micro_batches, settings.max_new_tokens,
                            sampling=settings.sampling)]
    if settings.plan_json:
        plan = Plan.from_json(settings.plan_json)
    else:
        plan = plan_pipeline(config, devices, jobs, as_dtype(settings.dtype), settings.model)
    check_pipeline_plan(plan, config.n_layer, len(devices))
    return plan, jobs


def plan_pipeline(config, devices: list[Device], jobs: list[PipelineJob], dtype: torch.dtype | None,
                  model_name: str) -> Plan:
    """Plan one stage per device, with KV cache room for the longest and widest job (notebook 05)."""
    check_stage_count(len(devices), config.n_layer)
    return plan_split(config, devices, dtype=dtype or default_dtype(config, devices),
                      max_new_tokens=max(j.input_ids.shape[1] + j.max_new_tokens for j in jobs),
                      batch_size=max(j.input_ids.shape[0] for j in jobs), model_name=model_name)


def serve_pipeline(context: RankContext, settings: PipelineSettings, setup) -> list[RunRecord] | None:
    """One stage: load its blocks, run every job, and on rank 0 merge the stages' reports (notebook 05)."""
    import time

    plan, jobs = setup
    model_path, rank, last = context.located, context.rank, context.rank == context.world_size - 1
    check_place_dtype(context.place, plan.dtype, PipelineError.kind)
    tokenizer = load_tokenizer(str(model_path)) if rank == 0 else None
    import accelerate.utils  # noqa: F401  (libraries belong to the baseline, not to the stage)
    import safetensors  # noqa: F401
    import transformers.masking_utils  # noqa: F401
    from transformers import DynamicCache  # noqa: F401

    gptj_modeling()
    baseline = reset_peak_rss()
    start = time.perf_counter()
    with loading(context, max(st.param_bytes for st in plan.devices)):
        stage = load_stage(model_path, plan, rank, as_dtype(settings.dtype or plan.dtype), context.device,
                           str(context.comm_device), transform=context.options.transform)
        load_seconds = time.perf_counter() - start

    def run(job, t0):
        report = run_stage(stage, job, EventClock(t0), settings.relay if last else None)
        report["memory"].load_seconds = load_seconds
        if baseline is not None:  # host memory of this stage process over its RSS after imports, before loading
            report["memory"].peak_rss_bytes = peak_rss() - baseline
        return report

    def merge(reports, job):
        record = merge_results(reports, job, tokenizer, plan, stage.eos_token_id)
        record.settings["backend"] = context.backend  # as the runtime decided it (launch.py)
        record.prompts = list(settings.prompts or [])
        return record

    return run_jobs(context, jobs, run, merge)


def run_pipeline_jobs(model, devices: str | list[Device] | None, jobs: list[PipelineJob], plan: Plan | None = None,
                      dtype: torch.dtype | None = None, options: LaunchOptions | None = None,
                      relay: RelayEnd | None = None) -> list[RunRecord]:
    """Several generations in one start of the stage processes (benchmarks and tests reuse the loaded stages);
    everything is planned and checked here, before any process starts (notebook 05)."""
    model_path = model_folder(model)
    config = load_config(str(model_path))
    options = options or LaunchOptions()
    if plan is None:
        plan = plan_pipeline(config, parse_devices(devices) if isinstance(devices, str) else list(devices or []), jobs,
                             as_dtype(dtype), str(model))
    check_pipeline_plan(plan, config.n_layer)
    if plan.quantized and options.transform is None:
        raise ValueError(f"the plan stores the blocks in {plan.weights}: pass options=gh.LaunchOptions(transform="
                         "gh.quantizer_for(plan)), which quantizes each block as its stage loads it (notebook 08)")
    check_free_memory(plan, "the pipeline's stage processes")
    settings = pipeline_settings(model_path, plan=plan, jobs=jobs, dtype=dtype or plan.dtype, relay=relay)
    return start_ranks(pipeline_job(settings, options), model_path)


def run_pipeline(model, prompts: str | list[str], devices: str | list[Device] | None = None,
                 micro_batches: int = 1, plan: Plan | None = None, dtype: torch.dtype | None = None,
                 max_new_tokens: int = 50, options: LaunchOptions | None = None, stream=False,
                 stopping_criteria=None, sampling: Sampling | None = None, **knobs) -> tuple[list[str], RunRecord]:
    """Generate with one process per stage, micro-batches flowing through them at once (notebook 05).

    Returns `(texts, record)` like generate_text: `model` is a name or folder ("tiny", "gpt-j-6b", a path);
    `max_new_tokens` and the sampling keywords (greedy, temperature, top_p, top_k, seed, or `sampling=`) are
    generate_text's, and `texts[i]` continues `prompts[i]`. Greedy tokens equal `model.generate` on the whole
    batch; seeded sampling equals `torch.manual_seed(seed); model.generate(...)` run on each micro-batch alone
    (each micro-batch has its own generator), so on the whole batch when micro_batches=1. `stream` and
    `stopping_criteria` work as in generate_text (notebook 06's widget uses both), with one prompt per
    micro-batch: the last stage sends each token to this process as it is picked, the criteria run here on what
    has arrived, and a stop ends every stage after the same token, usually one token later than in generate.
    `options` (a LaunchOptions): timeouts, threads, cores, and for int8 or nf4 plans the `transform` that
    quantizes each block as it loads, `gh.quantizer_for(plan)` (notebook 08).
    """
    import multiprocessing

    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    model_path = model_folder(model)
    stoppable = stream is not False or stopping_criteria is not None
    job = prompts_job(model_path, load_config(str(model_path)), prompts, micro_batches, max_new_tokens,
                      sampling=as_sampling(sampling, **knobs), stoppable=stoppable)
    if not stoppable:
        record = run_pipeline_jobs(model_path, devices, [job], plan=plan, dtype=dtype, options=options)[0]
    else:
        streamer = make_streamer(load_tokenizer(str(model_path)), prompts, stream)
        with TokenRelay(multiprocessing.get_context("spawn"), job.input_ids, streamer, stopping_criteria) as relay:
            record = run_pipeline_jobs(model_path, devices, [job], plan=plan, dtype=dtype, options=options,
                                       relay=relay.worker_end())[0]
    record.prompts = prompts
    return record.texts, record


def pipeline_generate(devices: str | list[Device], **options):
    """A function with generate_text's signature that runs the pipeline on `devices`, for notebook 06's widget:
    `prompt_widget("tiny", tokenizer, generate=pipeline_generate("cpu,cpu"))`; `options` go to run_pipeline
    (notebook 05; its twin is tensor_parallel_generate)."""

    def generate(model, tokenizer, prompts, **kwargs) -> tuple[list[str], RunRecord]:
        return run_pipeline(model, prompts, devices, **options, **kwargs)

    return generate


def pipeline_dry_run(model, devices: str, prompt_tokens: int = 0, max_new_tokens: int = 50, batch_size: int = 1,
                     dtype=None, hardware: Hardware | None = None, launch: Launch | None = None) -> list[RankPlace]:
    """Where each stage of a pipelined run would go, decided as the real run decides it, and what it would hold;
    nothing is loaded and no group forms (notebook 05; `pipeline --dry-run`). `launch`: a torchrun launch, None from
    here; `hardware`: this node as read now, or a described one. A spec the real run would refuse is refused here,
    the same way."""
    job = pipeline_job(pipeline_settings(model, devices, dtype=dtype))
    places = torchrun_places(job, launch, hardware) if launch else notebook_places(job, hardware)
    config = load_config(str(model))
    check_stage_count(len(places), config.n_layer)
    parsed = [p.as_device for p in places]
    plan = plan_split(config, parsed, dtype=as_dtype(dtype) or default_dtype(config, parsed),
                      prompt_tokens=prompt_tokens, max_new_tokens=max_new_tokens, batch_size=batch_size,
                      model_name=str(model))
    return with_plan(places, plan, [stage_holds(st) for st in plan.devices], PipelineError.kind)
