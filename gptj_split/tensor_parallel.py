"""Notebook 07, part 2: tensor parallelism, a client of the rank runtime (ranks.py) and the twin of pipeline.py, in the
same order: settings; the plan, made and checked on one path; the rank's build; the step loop (`run_rank`); the one
run function; the widget's generate function; the dry run. One rank per device, started from a notebook or by
torchrun: every rank builds its own shards (shards.py), all ranks compute every token together, and rank 0 picks each
token (greedy or sampled, on its own device, as generate does there) and broadcasts it with a stop flag.
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
from .plan import Plan, check_free_memory
from .records import MemoryRow, RunRecord
from .place import kv_bytes
from .sampling import Sampling, as_sampling
from .generate import make_streamer
from .relay import RelayEnd, TokenRelay
from .launch import Launch, RankPlace, check_place_dtype, notebook_places, plan_spec, torchrun_places, with_plan
from .ranks import LaunchOptions, RankContext, RankError, RankJob, loading, run_jobs
from .processes import start_ranks
from .jobs import GenerationJob, RankReport, locate_model, merge_results, model_folder, next_tokens, prompts_job
from .shards import VARIANTS, RankModel, build_rank_model, forward_rank, plan_tensor_parallel

TP_VARIANT = "block"  # the default: one all-reduce per block (notebook 07 measures both)


class TensorParallelError(RankError):
    """A tensor-parallel rank failed; `rank` (and `stage`) names it (notebook 07)."""

    kind = "tensor-parallel rank"


@dataclass
class TensorParallelJob:
    """A job for the tensor-parallel ranks: the shared GenerationJob, the variant that cuts the blocks, and whether
    to keep every step's logits (notebook 07)."""

    job: GenerationJob
    variant: str = TP_VARIANT
    keep_logits: bool = False


def variant_job(job: GenerationJob, variant: str = TP_VARIANT, keep_logits: bool = False) -> TensorParallelJob:
    """A job (from `make_job` or `prompts_job`) for the tensor-parallel ranks, with its variant, checked (notebook
    07)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r}: use 'torch' (parallelize_module, an all-reduce per layer) or 'block' "
                         "(one all-reduce per block)")
    if job.micro_batches != 1:
        raise ValueError(f"tensor parallelism runs the whole batch at once: micro_batches={job.micro_batches}, use 1")
    return TensorParallelJob(job, variant, keep_logits)


@dataclass
class TensorParallelSettings:
    """What every rank of one tensor-parallel run needs, the same under both launchers (notebook 07)."""

    model: str  # a model name or folder: each node finds its own copy
    spec: str  # the device spec: one rank per entry (launch.py decides where each runs)
    plan_json: str | None = None  # the plan, when the caller made it; else rank 0 plans over the ranks' places
    prompts: list[str] | None = None  # the texts to continue (rank 0), or else `jobs`
    jobs: list[TensorParallelJob] | None = None
    max_new_tokens: int = 50
    sampling: Sampling = dataclasses.field(default_factory=Sampling)
    variant: str = TP_VARIANT
    dtype: str | None = None  # None: the plan's
    relay: RelayEnd | None = None  # rank 0 streams every job's tokens there and reads the caller's Stop


def tensor_parallel_settings(model, devices: str | list[Device] | None = None, plan: Plan | None = None,
                             prompts: list[str] | None = None, jobs: list[TensorParallelJob] | None = None,
                             max_new_tokens: int = 50, sampling: Sampling | None = None, variant: str = TP_VARIANT,
                             dtype=None, relay=None) -> TensorParallelSettings:
    """The settings of one tensor-parallel run, for the notebook launcher and torchrun alike; the device spec is read
    once, by the runtime, where the ranks start (notebook 07)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r}: use one of {VARIANTS}")
    return TensorParallelSettings(str(model), plan_spec(devices, plan), plan.to_json() if plan else None, prompts,
                                  jobs, max_new_tokens, sampling or Sampling(), variant,
                                  dtype_name(dtype) if dtype else None, relay)


def tensor_parallel_job(settings: TensorParallelSettings, options: LaunchOptions | None = None) -> RankJob:
    """What the rank runtime runs for a tensor-parallel run: one rank per device (notebook 07; its twin is
    pipeline_job)."""
    return RankJob(TensorParallelError, prepare_tensor_parallel, serve_tensor_parallel, settings.spec, settings,
                   options or LaunchOptions(), locate_model, settings.dtype)


def check_variant_backend(jobs: list[TensorParallelJob], places: list[RankPlace]):
    """Refuse torch's variant where ranks share a GPU: DTensor's CUDA mesh would run over gloo, which it does not
    support (the first GPU run ended in a SIGSEGV there) (notebook 07)."""
    devices = [p.device for p in places]
    cuda = any(torch.device(d).type == "cuda" for d in devices)
    if cuda and any(j.variant == "torch" for j in jobs) and places[0].backend != "nccl":
        raise ValueError(f"variant='torch' (DTensor's parallelize_module) needs NCCL, one GPU per rank; the devices "
                         f"{', '.join(devices)} share a GPU, so the ranks talk over gloo, and DTensor on a CUDA mesh "
                         "over gloo is not supported: use variant='block', or one GPU per rank")


def plan_tensor_parallel_run(config, places: list[RankPlace], jobs: list[TensorParallelJob],
                             dtype: torch.dtype | None, model_name: str, options: LaunchOptions | None = None,
                             plan_json: str | None = None, check_free: bool = True) -> Plan:
    """The one path to a tensor-parallel run's plan, in the caller before any process starts and on rank 0 under
    torchrun: the plan given, or every block cut over the ranks with KV cache room for the longest and widest job;
    then every check (the variant against the backend, no quantized weights, and with `check_free` free memory on
    this node now) (notebook 07)."""
    if plan_json:
        plan = Plan.from_json(plan_json)
    else:
        devices = [p.as_device for p in places]
        plan = plan_tensor_parallel(config, devices, dtype or default_dtype(config, devices),
                                    max_new_tokens=max(j.job.input_ids.shape[1] + j.job.max_new_tokens for j in jobs),
                                    batch_size=max(j.job.input_ids.shape[0] for j in jobs), model_name=model_name)
    check_variant_backend(jobs, places)
    if check_free:
        check_free_memory(plan, "the tensor-parallel ranks", {p.rank for p in places if p.node == 0})
    if plan.quantized or (options is not None and options.transform is not None):
        raise ValueError("tensor parallelism cuts full-precision weights by heads: quantized blocks (notebook 08) run "
                         "on the naive split or the pipeline")
    return plan


def prepare_tensor_parallel(settings: TensorParallelSettings, places: list[RankPlace],
                            model_path: Path) -> tuple[Plan, list[TensorParallelJob]]:
    """On rank 0: the jobs and the plan over every rank's place, checked; nothing loaded yet (notebook 07)."""
    config = load_config(str(model_path))
    jobs = settings.jobs
    if jobs is None:
        jobs = [variant_job(prompts_job(model_path, config, settings.prompts, 1, settings.max_new_tokens,
                                        sampling=settings.sampling), settings.variant)]
    plan = plan_tensor_parallel_run(config, places, jobs, as_dtype(settings.dtype), settings.model, None,
                                    settings.plan_json, check_free=settings.plan_json is None)
    return plan, jobs


def serve_tensor_parallel(context: RankContext, settings: TensorParallelSettings, setup) -> list[RunRecord] | None:
    """One rank: build its shards (once per variant), run every job, and on rank 0 merge the ranks' reports (notebook
    07)."""
    import gc
    import time

    plan, jobs = setup
    model_path, rank, world, device = context.located, context.rank, context.world_size, str(context.device)
    check_place_dtype(context.place, plan.dtype, TensorParallelError.kind)
    dtype = as_dtype(settings.dtype or plan.dtype)
    tokenizer = load_tokenizer(str(model_path)) if rank == 0 else None
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(context.device.type, (world,)) if world > 1 else None  # the CUDA device is set already
    import accelerate.utils  # noqa: F401  (libraries belong to the baseline, not to the rank)
    import safetensors  # noqa: F401
    from torch.distributed.tensor import parallel  # noqa: F401
    import transformers.masking_utils  # noqa: F401
    from transformers import DynamicCache  # noqa: F401

    gptj_modeling()
    built = {"model": None}

    def run(work, t0):
        rm = built["model"]
        if rm is None or rm.variant != work.variant:
            built["model"] = rm = None  # one model at a time: free the other variant first
            gc.collect()
            built["baseline"] = reset_peak_rss()
            start = time.perf_counter()
            with loading(context, max(st.param_bytes for st in plan.devices)):
                rm = built["model"] = build_rank_model(model_path, rank, world, dtype, device, work.variant, mesh,
                                                       str(context.comm_device))
                built["load_seconds"] = time.perf_counter() - start
        report = run_rank(rm, work, t0, settings.relay if rank == 0 else None)
        report.memory.load_seconds = built["load_seconds"]
        if built["baseline"] is not None:  # host memory of this rank over its RSS after imports, before building
            report.memory.peak_rss_bytes = peak_rss() - built["baseline"]
        return report

    def merge(reports, work):
        record = merge_rank_results(reports, work, tokenizer, plan, built["model"].eos_token_id)
        record.settings["backend"] = context.backend  # as the runtime decided it (launch.py)
        record.prompts = list(settings.prompts or [])
        return record

    return run_jobs(context, jobs, run, merge)


def run_rank(rm: RankModel, work: TensorParallelJob, t0: float, relay=None) -> RankReport:
    """One rank's share of a generation: every step, the forward on its shards, then rank 0 picks the tokens on its
    own device (a CUDA generator there, as generate_text's seed gives) and broadcasts them with a stop flag
    (notebook 07)."""
    import torch.distributed as dist
    from transformers import DynamicCache

    job = work.job
    dev, batch = rm.device, job.input_ids.shape[0]
    x, mask = job.input_ids.to(dev), job.attention_mask.to(dev)
    cache = DynamicCache(config=rm.config)
    rm.clock.restart(t0)
    unfinished = torch.ones(batch, dtype=torch.long, device=dev)
    generator = (torch.Generator(device=dev).manual_seed(job.sampling.seed) if rm.rank == 0 and not job.sampling.greedy
                 else None)
    warpers = job.sampling.warpers()
    tokens, kept = [], []
    with torch.inference_mode():
        for step in range(job.max_new_tokens):
            rm.clock.step = step
            start = rm.clock.stamp(dev)
            logits = forward_rank(rm, x, mask, cache)
            rm.clock.note(rm.rank, start, dev)
            message = torch.zeros(batch + 1, dtype=torch.long, device=rm.comm)
            if rm.rank == 0:  # one sampler: the other ranks never draw, so they cannot disagree
                token, unfinished = next_tokens(logits, job, warpers, generator, unfinished, rm.eos_token_id)
                message[:batch] = token.to(rm.comm)
                message[batch] = int(relay is not None and relay.stop_requested())
            if rm.ranks > 1:
                start = rm.clock.stamp(rm.comm)
                dist.broadcast(message, src=0)
                rm.clock.note(rm.rank, start, rm.comm, "broadcast")
            message = message.cpu()
            token = message[:batch]
            if rm.rank != 0:
                unfinished = unfinished & (token.to(dev) != rm.eos_token_id).long()
            if relay is not None:
                relay.put(token.view(batch, 1))
            tokens.append(token)
            kept += [logits.cpu()] if work.keep_logits else []
            if not unfinished.any() or message[batch]:  # every rank sees the same tokens and flag: all stop here
                break
            x = token.view(batch, 1).to(dev)
            mask = torch.cat([mask, mask.new_ones((batch, 1))], dim=-1)
    if relay is not None:
        relay.end()
    kv = sum(kv_bytes(layer) for layer in cache.layers)
    memory = MemoryRow(rm.rank, str(dev), rm.param_bytes, kv,
                       cuda_peak_bytes=torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None)
    return RankReport(rm.clock.events(), memory, torch.stack(tokens, dim=1), torch.stack(kept, dim=1) if kept else None)


def merge_rank_results(results: list[RankReport], work: TensorParallelJob, tokenizer, plan: Plan,
                       eos: int) -> RunRecord:
    """The ranks' reports as one RunRecord, trimmed like generate; `record.logits` when the job kept them (notebook
    07)."""
    record = merge_results(results, work.job, tokenizer, plan, eos)
    record.mode = "tensor-parallel"
    record.settings.pop("micro_batches", None)
    record.settings["variant"] = work.variant
    if results[0].logits is not None:
        record.logits = results[0].logits
    return record


def run_tensor_parallel(model, prompts: str | list[str] | list[TensorParallelJob],
                        devices: str | list[Device] | None = None, max_new_tokens: int = 50,
                        variant: str = TP_VARIANT, dtype: torch.dtype | None = None,
                        options: LaunchOptions | None = None, stream=False, stopping_criteria=None,
                        sampling: Sampling | None = None, **knobs):
    """Generate with one process per device, every block cut across all of them (notebook 07).

    Returns `(texts, record)` like generate_text, with its sampling keywords and defaults (greedy, temperature,
    top_p, top_k, seed, or `sampling=`). `prompts` may instead be a list of jobs (`variant_job`): several generations
    in one start of the ranks, one RunRecord each, returned as a list. Greedy tokens equal `model.generate`; seeded
    sampling equals `generate_text(seed=...)` on rank 0's device: rank 0 alone samples, from the gathered logits with
    a generator of its device seeded as generate's, and broadcasts each token. `variant`: "block" (one all-reduce per
    block) or "torch" (parallelize_module, one per layer). `stream` and `stopping_criteria` work as in generate_text
    (notebook 06's widget uses both): rank 0 sends each token to this process as it is picked, the criteria run here,
    and a stop travels with the next token's broadcast, so every rank ends after the same token (usually one token
    later than in generate). `options` (a LaunchOptions): timeouts, threads, cores. The plan is made and checked
    here, before any process starts.
    """
    import multiprocessing

    model_path = model_folder(model)
    config = load_config(str(model_path))
    if isinstance(prompts, list) and prompts and isinstance(prompts[0], TensorParallelJob):
        return start_tensor_parallel(model_path, config, devices, prompts, dtype, options)
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    work = variant_job(prompts_job(model_path, config, prompts, 1, max_new_tokens,
                                   sampling=as_sampling(sampling, **knobs)), variant)
    if stream is False and stopping_criteria is None:
        record = start_tensor_parallel(model_path, config, devices, [work], dtype, options)[0]
    else:
        streamer = make_streamer(load_tokenizer(str(model_path)), prompts, stream)
        with TokenRelay(multiprocessing.get_context("spawn"), work.job.input_ids, streamer,
                        stopping_criteria) as relay:
            record = start_tensor_parallel(model_path, config, devices, [work], dtype, options,
                                           relay.worker_end())[0]
    record.prompts = prompts
    return record.texts, record


def start_tensor_parallel(model_path: Path, config, devices, jobs: list[TensorParallelJob], dtype,
                          options: LaunchOptions | None, relay: RelayEnd | None = None) -> list[RunRecord]:
    """Plan and check on the one path, then start the ranks once for every job (notebook 07)."""
    if not devices:
        raise ValueError("give devices, one per rank (like 'cpu,cpu')")
    settings = tensor_parallel_settings(model_path, devices, jobs=jobs, dtype=dtype, relay=relay)
    job = tensor_parallel_job(settings, options)
    places = notebook_places(job)
    plan = plan_tensor_parallel_run(config, places, jobs, as_dtype(dtype), str(model_path), job.options)
    settings.plan_json, settings.dtype = plan.to_json(), settings.dtype or plan.dtype
    job.dtype = settings.dtype
    return start_ranks(job, model_path)


def tensor_parallel_generate(devices: str | list[Device], **options):
    """A function with generate_text's signature that runs tensor parallelism on `devices`, for notebook 06's widget:
    `prompt_widget("tiny", tokenizer, generate=tensor_parallel_generate("cpu,cpu"))`; `options` go to
    run_tensor_parallel (notebook 07; its twin is pipeline_generate)."""

    def generate(model, tokenizer, prompts, **kwargs) -> tuple[list[str], RunRecord]:
        return run_tensor_parallel(model, prompts, devices, **options, **kwargs)

    return generate


def tensor_parallel_dry_run(model, devices: str, prompt_tokens: int = 0, max_new_tokens: int = 50,
                            batch_size: int = 1, variant: str = TP_VARIANT, dtype=None,
                            hardware: Hardware | None = None, launch: Launch | None = None) -> list[RankPlace]:
    """Where each rank of a tensor-parallel run would go, decided as the real run decides it, and which shards it
    would hold; nothing is loaded and no group forms (notebook 07; `tensor-parallel --dry-run`). A spec the real
    run would refuse is refused here, the same way."""
    job = tensor_parallel_job(tensor_parallel_settings(model, devices, variant=variant, dtype=dtype))
    places = torchrun_places(job, launch, hardware) if launch else notebook_places(job, hardware)
    config = load_config(str(model))
    ids = torch.zeros(batch_size, prompt_tokens or 1, dtype=torch.long)
    shape = variant_job(GenerationJob(ids, torch.ones_like(ids), 1, max_new_tokens), variant)
    plan = plan_tensor_parallel_run(config, places, [shape], as_dtype(dtype), str(model), LaunchOptions())
    n, heads = len(places), config.n_head
    holds = [f"heads {r * heads // n}-{(r + 1) * heads // n - 1} of every block + embedding + 1/{n} of the head"
             for r in range(n)]
    return with_plan(places, plan, holds, TensorParallelError.kind)
