"""Notebook 05, part 3: the pipeline, a client of the rank runtime (ranks.py) and the twin of tensor_parallel.py, in
the same order: settings; the plan, made and checked on one path; the rank's build; the step loop (`run_stage`); the
one run function; the widget's generate function; the dry run. One rank per stage, started from a notebook or by
torchrun: every rank loads only its own stage (stage.py) and runs the schedule, and the last stage's tokens come back
as `(texts, RunRecord)`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from .models import as_dtype, default_dtype, dtype_name, gptj_modeling
from .devices import Device, peak_rss, reset_peak_rss
from .hardware import Hardware
from .hub import load_config, load_tokenizer
from .plan import Plan, check_free_memory, plan_split
from .records import EventClock, MemoryRow, RunRecord
from .place import kv_bytes
from .sampling import Sampling, as_sampling
from .generate import make_streamer
from .relay import RelayEnd, TokenRelay
from .launch import (Launch, RankPlace, check_place_dtype, notebook_places, plan_spec, stage_holds, torchrun_places,
                     with_plan)
from .ranks import LaunchOptions, RankContext, RankError, RankJob, loading, run_jobs
from .processes import start_ranks
from .jobs import GenerationJob, RankReport, locate_model, merge_results, model_folder, next_tokens, prompts_job
from .stage import Inbox, Outbox, PipelineStage, check_pipeline_plan, check_stage_count, forward_stage, load_stage
from .stage import new_stage_cache


class PipelineError(RankError):
    """A pipeline stage failed; `stage` names it (notebook 05)."""

    kind = "pipeline stage"


@dataclass
class PipelineSettings:
    """What every stage of one pipelined run needs, the same under both launchers (notebook 05)."""

    model: str  # a model name or folder: each node finds its own copy
    spec: str  # the device spec: one stage per rank (launch.py decides where each runs)
    plan_json: str | None = None  # the plan, when the caller made it; else rank 0 plans over the ranks' places
    prompts: list[str] | None = None  # the texts to continue (rank 0), or else `jobs`
    jobs: list[GenerationJob] | None = None
    micro_batches: int = 1
    max_new_tokens: int = 50
    sampling: Sampling = dataclasses.field(default_factory=Sampling)
    dtype: str | None = None  # None: the plan's
    relay: RelayEnd | None = None  # the last stage streams its tokens here and reads the caller's Stop


def pipeline_settings(model, devices: str | list[Device] | None = None, plan: Plan | None = None,
                      prompts: list[str] | None = None, jobs: list[GenerationJob] | None = None,
                      micro_batches: int = 1, max_new_tokens: int = 50, sampling: Sampling | None = None, dtype=None,
                      relay=None) -> PipelineSettings:
    """The settings of one pipelined run, for the notebook launcher and torchrun alike; the device spec is read once,
    by the runtime, where the ranks start (notebook 05)."""
    return PipelineSettings(str(model), plan_spec(devices, plan), plan.to_json() if plan else None, prompts, jobs,
                            micro_batches, max_new_tokens, sampling or Sampling(),
                            dtype_name(dtype) if dtype else None, relay)


def pipeline_job(settings: PipelineSettings, options: LaunchOptions | None = None) -> RankJob:
    """What the rank runtime runs for a pipelined run: one stage per device (notebook 05; its twin is
    tensor_parallel_job)."""
    return RankJob(PipelineError, prepare_pipeline, serve_pipeline, settings.spec, settings,
                   options or LaunchOptions(), locate_model, settings.dtype)


def plan_pipeline(config, places: list[RankPlace], jobs: list[GenerationJob], dtype: torch.dtype | None,
                  model_name: str, options: LaunchOptions | None = None, plan_json: str | None = None,
                  check_free: bool = True) -> Plan:
    """The one path to a pipelined run's plan, in the caller before any process starts and on rank 0 under torchrun:
    the plan given, or one stage per rank with KV cache room for the longest and widest job; then every check
    (stages against blocks, a quantized plan's transform where the launch's `options` are known, and with
    `check_free` free memory on this node now) (notebook 05)."""
    check_stage_count(len(places), config.n_layer)
    if plan_json:
        plan = Plan.from_json(plan_json)
    else:
        devices = [p.as_device for p in places]
        plan = plan_split(config, devices, dtype=dtype or default_dtype(config, devices),
                          max_new_tokens=max(j.input_ids.shape[1] + j.max_new_tokens for j in jobs),
                          batch_size=max(j.input_ids.shape[0] for j in jobs), model_name=model_name)
    check_pipeline_plan(plan, config.n_layer, len(places))
    if check_free:
        check_free_memory(plan, "the pipeline's stage processes", {p.rank for p in places if p.node == 0})
    if plan.quantized and options is not None and options.transform is None:
        raise ValueError(f"the plan stores the blocks in {plan.weights}: pass options=gh.LaunchOptions(transform="
                         "gh.quantizer_for(plan)), which quantizes each block as its stage loads it (notebook 08)")
    return plan


def prepare_pipeline(settings: PipelineSettings, places: list[RankPlace],
                     model_path: Path) -> tuple[Plan, list[GenerationJob]]:
    """On rank 0: the jobs and the plan over every rank's place, checked; nothing loaded yet (notebook 05)."""
    config = load_config(str(model_path))
    jobs = settings.jobs
    if jobs is None:
        jobs = [prompts_job(model_path, config, settings.prompts, settings.micro_batches, settings.max_new_tokens,
                            sampling=settings.sampling)]
    plan = plan_pipeline(config, places, jobs, as_dtype(settings.dtype), settings.model, None, settings.plan_json,
                         check_free=settings.plan_json is None)  # a caller's plan was checked before the start
    return plan, jobs


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
        report.memory.load_seconds = load_seconds
        if baseline is not None:  # host memory of this stage process over its RSS after imports, before loading
            report.memory.peak_rss_bytes = peak_rss() - baseline
        return report

    def merge(reports, job):
        record = merge_results(reports, job, tokenizer, plan, stage.eos_token_id)
        record.settings["backend"] = context.backend  # as the runtime decided it (launch.py)
        record.prompts = list(settings.prompts or [])
        return record

    return run_jobs(context, jobs, run, merge)


def run_stage(stage: PipelineStage, job: GenerationJob, clock: EventClock, relay=None) -> RankReport:
    """One stage's share of a pipelined generation, micro-batches in the same order on every stage: events (on the
    run's one `clock`), memory, and on the last stage the new tokens, also handed to `relay` (a RelayEnd) step by
    step (notebook 05).

    In a stoppable job, the last stage decides after each step's first micro-batch whether to go on (no Stop asked,
    some row not ended); a stop goes to the first stage in place of the tokens, and from stage to stage as the
    one-number message that precedes each hidden state, so every stage ends after the same token."""
    rank, n, dev = stage.rank, stage.world_size, stage.device
    first, last = rank == 0, rank == n - 1
    rows = torch.arange(job.input_ids.shape[0]).tensor_split(job.micro_batches)
    ids = [job.input_ids[r].to(dev) for r in rows]
    masks = [job.attention_mask[r].to(dev) for r in rows]
    caches = [new_stage_cache(stage) for _ in rows]
    prompt_len, steps, width = job.input_ids.shape[1], job.max_new_tokens, stage.config.n_embd
    go, stop = torch.ones(1, dtype=torch.long), torch.full((1,), -1, dtype=torch.long)
    inbox = None
    if not first:  # hidden states from the previous stage, in schedule order (each after a go/stop if stoppable)
        shapes = [((len(r), prompt_len if s == 0 else 1, width), stage.dtype) for s in range(steps) for r in rows]
        if job.stoppable:
            shapes = [m for shape in shapes for m in (((1,), torch.long), shape)]
        inbox = Inbox(stage, rank - 1, shapes, clock, ahead=1 if job.stoppable else 2)
    elif n > 1:  # token ids from the last stage, for every step but the last
        inbox = Inbox(stage, n - 1, [((len(r),), torch.long) for s in range(steps - 1) for r in rows], clock,
                      ahead=1 if job.stoppable else 2)
    outbox = Outbox(stage, clock)
    tokens = [[] for _ in rows]
    unfinished = [torch.ones(len(r), dtype=torch.long, device=dev) for r in rows]
    generators = ([torch.Generator(device=dev).manual_seed(job.sampling.seed) for _ in rows]
                  if last and not job.sampling.greedy else None)
    warpers = job.sampling.warpers()
    stopping = False  # last stage: a stop was sent, this step is the last
    with torch.inference_mode():
        for step in range(steps):
            clock.step = step
            for m in range(len(rows)):
                if first:
                    x = ids[m] if step == 0 else (inbox.get(step, m) if n > 1 else tokens[m][-1])
                    if step > 0 and n > 1 and bool((x < 0).all()):  # the last stage said stop
                        outbox.send(stop, rank + 1, step, m)
                        break
                    x = x.view(len(rows[m]), -1)
                else:
                    if job.stoppable and bool((inbox.get(step, m) < 0).all()):
                        if not last:
                            outbox.send(stop, rank + 1, step, m)
                        break
                    x = inbox.get(step, m)
                start = clock.stamp(dev)
                out = forward_stage(stage, x, masks[m], caches[m])
                if last:
                    out, unfinished[m] = next_tokens(out, job, warpers, generators[m] if generators else None,
                                                     unfinished[m], stage.eos_token_id)
                    tokens[m].append(out)
                clock.note(rank, start, dev, micro_batch=m)
                masks[m] = torch.cat([masks[m], masks[m].new_ones((len(rows[m]), 1))], dim=-1)
                if last and relay is not None:
                    relay.put(out)
                if last and job.stoppable and m == 0 and step < steps - 1:
                    stopping = (relay is not None and relay.stop_requested()) or not any(u.any() for u in unfinished)
                if not last:
                    if job.stoppable:
                        outbox.send(go, rank + 1, step, m)
                    outbox.send(out, rank + 1, step, m)
                elif n > 1 and step < steps - 1 and not (stopping and m > 0):
                    outbox.send(stop.expand(len(out)) if stopping else out, 0, step, m)
            else:
                if not (stopping and n == 1):
                    continue
            break  # a stop: this stage's last step is done
        outbox.flush()
    if relay is not None:
        relay.end()
    kv = sum(kv_bytes(layer) for c in caches for layer in c.layers)
    memory = MemoryRow(rank, str(dev), stage.param_bytes, kv,
                       cuda_peak_bytes=torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None)
    new = torch.cat([torch.stack(t, dim=1) for t in tokens]).cpu() if last else None
    return RankReport(clock.events(), memory, new)


def run_pipeline(model, prompts: str | list[str] | list[GenerationJob], devices: str | list[Device] | None = None,
                 micro_batches: int = 1, plan: Plan | None = None, dtype: torch.dtype | None = None,
                 max_new_tokens: int = 50, options: LaunchOptions | None = None, stream=False,
                 stopping_criteria=None, sampling: Sampling | None = None, **knobs):
    """Generate with one process per stage, micro-batches flowing through them at once (notebook 05).

    Returns `(texts, record)` like generate_text: `model` is a name or folder ("tiny", "gpt-j-6b", a path);
    `max_new_tokens` and the sampling keywords (greedy, temperature, top_p, top_k, seed, or `sampling=`) are
    generate_text's, and `texts[i]` continues `prompts[i]`. `prompts` may instead be a list of jobs (`make_job`,
    `prompts_job`): several generations in one start of the stage processes, one RunRecord each, returned as a list.
    Greedy tokens equal `model.generate` on the whole batch; seeded sampling equals `torch.manual_seed(seed);
    model.generate(...)` run on each micro-batch alone (each micro-batch has its own generator), so on the whole batch
    when micro_batches=1. `stream` and `stopping_criteria` work as in generate_text (notebook 06's widget uses both),
    with one prompt per micro-batch: the last stage sends each token to this process as it is picked, the criteria
    run here on what has arrived, and a stop ends every stage after the same token, usually one token later than in
    generate. `options` (a LaunchOptions): timeouts, threads, cores, and for int8 or nf4 plans the `transform` that
    quantizes each block as it loads, `gh.quantizer_for(plan)` (notebook 08). The plan is made and checked here,
    before any process starts.
    """
    import multiprocessing

    model_path = model_folder(model)
    config = load_config(str(model_path))
    if isinstance(prompts, list) and prompts and isinstance(prompts[0], GenerationJob):
        return start_pipeline(model_path, config, devices, prompts, plan, dtype, options)
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    stoppable = stream is not False or stopping_criteria is not None
    job = prompts_job(model_path, config, prompts, micro_batches, max_new_tokens,
                      sampling=as_sampling(sampling, **knobs), stoppable=stoppable)
    if not stoppable:
        record = start_pipeline(model_path, config, devices, [job], plan, dtype, options)[0]
    else:
        streamer = make_streamer(load_tokenizer(str(model_path)), prompts, stream)
        with TokenRelay(multiprocessing.get_context("spawn"), job.input_ids, streamer, stopping_criteria) as relay:
            record = start_pipeline(model_path, config, devices, [job], plan, dtype, options, relay.worker_end())[0]
    record.prompts = prompts
    return record.texts, record


def start_pipeline(model_path: Path, config, devices, jobs: list[GenerationJob], plan: Plan | None, dtype,
                   options: LaunchOptions | None, relay: RelayEnd | None = None) -> list[RunRecord]:
    """Plan and check on the one path, then start the stage processes once for every job (notebook 05)."""
    settings = pipeline_settings(model_path, devices, plan=plan, jobs=jobs, dtype=dtype, relay=relay)
    job = pipeline_job(settings, options)
    places = notebook_places(job)
    plan = plan_pipeline(config, places, jobs, as_dtype(dtype), str(model_path), job.options, settings.plan_json)
    settings.plan_json, settings.dtype = plan.to_json(), settings.dtype or plan.dtype
    job.dtype = settings.dtype
    return start_ranks(job, model_path)


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
    ids = torch.zeros(batch_size, prompt_tokens or 1, dtype=torch.long)
    shape = GenerationJob(ids, torch.ones_like(ids), 1, max_new_tokens)  # the lengths the plan makes room for
    plan = plan_pipeline(config, places, [shape], as_dtype(dtype), str(model), LaunchOptions())
    return with_plan(places, plan, [stage_holds(st) for st in plan.devices], PipelineError.kind)
