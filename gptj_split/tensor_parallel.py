"""Notebook 07, part 2: tensor parallelism, a client of the rank runtime (ranks.py) and the twin of pipeline.py. One
rank per device, started from a notebook or by torchrun: rank 0 tokenizes and plans, every rank builds its own shards
(shards.py), all ranks compute every token together, and rank 0 picks each token (greedy or sampled, on its own
device, as generate does there) and broadcasts it with a stop flag.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from .models import as_dtype, default_dtype, dtype_name, gptj_modeling
from .devices import Device, parse_devices, peak_rss, reset_peak_rss
from .hub import load_config, load_tokenizer
from .plan import Plan, check_free_memory
from .records import MemoryRow, RunRecord
from .place import kv_bytes
from .sampling import Sampling, as_sampling
from .generate import make_streamer
from .relay import TokenRelay
from .hardware import Hardware
from .launch import Launch, RankPlace, check_place_dtype, notebook_places, plan_spec, torchrun_places, with_plan
from .ranks import LaunchOptions, RankContext, RankError, RankJob, loading, run_jobs, start_ranks
from .jobs import PipelineJob, locate_model, make_job, merge_results, model_folder, next_tokens, prompts_job
from .shards import VARIANTS, RankModel, build_rank_model, forward_rank, plan_tensor_parallel

TP_VARIANT = "block"  # the default: one all-reduce per block (notebook 07 measures both)


@dataclass
class TensorParallelJob(PipelineJob):
    """A batch for the tensor-parallel ranks: a pipeline job plus the variant; `keep_logits` (tests) keeps every
    step's logits (notebook 07)."""

    variant: str = TP_VARIANT
    keep_logits: bool = False


def tensor_parallel_job(job: PipelineJob, variant: str = TP_VARIANT, keep_logits: bool = False) -> TensorParallelJob:
    """A pipeline job (from `make_job` or `prompts_job`) for the tensor-parallel ranks, checked (notebook 07)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r}: use 'torch' (parallelize_module, an all-reduce per layer) or 'block' "
                         "(one all-reduce per block)")
    fields = {f.name: getattr(job, f.name) for f in dataclasses.fields(PipelineJob)}
    return TensorParallelJob(**fields, variant=variant, keep_logits=keep_logits)


class TensorParallelError(RankError):
    """A tensor-parallel rank failed; `rank` (and `stage`) names it (notebook 07)."""

    kind = "tensor-parallel rank"


@dataclass
class TensorParallelSettings:
    """What every rank of one tensor-parallel run needs, the same under both launchers (notebook 07)."""

    model: str  # a model name or folder: each node finds its own copy
    spec: str  # the device spec: one rank per entry (launch.py decides where each runs)
    plan_json: str | None = None
    prompts: list[str] | None = None  # the texts to continue (rank 0), or else `jobs`
    jobs: list[TensorParallelJob] | None = None
    max_new_tokens: int = 50
    sampling: Sampling = dataclasses.field(default_factory=Sampling)
    variant: str = TP_VARIANT
    dtype: str | None = None  # None: the plan's
    relay: object = None  # rank 0 streams every job's tokens there and reads the caller's Stop


def tensor_parallel_settings(model, devices: str | list[Device] | None = None, plan: Plan | None = None,
                             prompts: list[str] | None = None, jobs: list[TensorParallelJob] | None = None,
                             max_new_tokens: int = 50, sampling: Sampling | None = None, variant: str = TP_VARIANT,
                             dtype=None, relay=None) -> TensorParallelSettings:
    """The settings of one tensor-parallel run, for the notebook launcher and torchrun alike; the device spec is read
    once, by the runtime, where the ranks start (notebook 07)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r}: use one of {VARIANTS}")
    return TensorParallelSettings(str(model), plan_spec(devices, plan), plan.to_json() if plan else None, prompts, jobs,
                                  max_new_tokens, sampling or Sampling(), variant,
                                  dtype_name(dtype) if dtype else None, relay)


def tensor_parallel_rank_job(settings: TensorParallelSettings, options: LaunchOptions | None = None) -> RankJob:
    """What the rank runtime runs for a tensor-parallel run: one rank per device (notebook 07)."""
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


def prepare_tensor_parallel(settings: TensorParallelSettings, places: list[RankPlace],
                            model_path: Path) -> tuple[Plan, list[TensorParallelJob]]:
    """On rank 0: the jobs and the plan over every rank's device and budget, checked; nothing loaded yet (notebook
    07)."""
    config = load_config(str(model_path))
    jobs = settings.jobs
    if jobs is None:
        jobs = [tensor_parallel_job(prompts_job(model_path, config, settings.prompts, 1, settings.max_new_tokens,
                                                sampling=settings.sampling), settings.variant)]
    if settings.plan_json:
        plan = Plan.from_json(settings.plan_json)
    else:
        plan = plan_for_jobs(config, [p.as_device for p in places], jobs, settings.dtype, settings.model)
    check_variant_backend(jobs, places)
    return plan, jobs


def plan_for_jobs(config, devices: list[Device], jobs: list[PipelineJob], dtype, model_name: str) -> Plan:
    """The tensor-parallel plan with KV cache room for the longest and widest job (notebook 07)."""
    return plan_tensor_parallel(config, devices, dtype, max_new_tokens=max(j.input_ids.shape[1] + j.max_new_tokens
                                                                           for j in jobs),
                                batch_size=max(j.input_ids.shape[0] for j in jobs), model_name=model_name)


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

    def run(job, t0):
        rm = built["model"]
        if rm is None or rm.variant != job.variant:
            built["model"] = rm = None  # one model at a time: free the other variant first
            gc.collect()
            built["baseline"] = reset_peak_rss()
            start = time.perf_counter()
            with loading(context, max(st.param_bytes for st in plan.devices)):
                rm = built["model"] = build_rank_model(model_path, rank, world, dtype, device, job.variant, mesh,
                                                       str(context.comm_device))
                built["load_seconds"] = time.perf_counter() - start
        report = run_rank(rm, job, t0, settings.relay if rank == 0 else None)
        report["memory"].load_seconds = built["load_seconds"]
        if built["baseline"] is not None:  # host memory of this rank over its RSS after imports, before building
            report["memory"].peak_rss_bytes = peak_rss() - built["baseline"]
        return report

    def merge(reports, job):
        record = merge_rank_results(reports, job, tokenizer, plan, built["model"].eos_token_id)
        record.settings["backend"] = context.backend  # as the runtime decided it (launch.py)
        record.prompts = list(settings.prompts or [])
        return record

    return run_jobs(context, jobs, run, merge)


def run_rank(rm: RankModel, job: TensorParallelJob, t0: float, relay=None) -> dict:
    """One rank's share of a generation: every step, the forward on its shards, then rank 0 picks the tokens on its
    own device (a CUDA generator there, as generate_text's seed gives) and broadcasts them with a stop flag
    (notebook 07)."""
    import torch.distributed as dist
    from transformers import DynamicCache

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
            kept += [logits.cpu()] if job.keep_logits else []
            if not unfinished.any() or message[batch]:  # every rank sees the same tokens and flag: all stop here
                break
            x = token.view(batch, 1).to(dev)
            mask = torch.cat([mask, mask.new_ones((batch, 1))], dim=-1)
    if relay is not None:
        relay.end()
    kv = sum(kv_bytes(layer) for layer in cache.layers)
    memory = MemoryRow(rm.rank, str(dev), rm.param_bytes, kv,
                       cuda_peak_bytes=torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None)
    return {"events": rm.clock.events(), "memory": memory, "new_tokens": torch.stack(tokens, dim=1),
            "logits": torch.stack(kept, dim=1) if kept else None}


def merge_rank_results(results: list[dict], job: TensorParallelJob, tokenizer, plan: Plan, eos: int) -> RunRecord:
    """The ranks' reports as one RunRecord, trimmed like generate; `record.logits` when the job kept them (notebook
    07)."""
    record = merge_results(results, job, tokenizer, plan, eos)
    record.mode = "tensor-parallel"
    record.settings.pop("micro_batches", None)
    record.settings["variant"] = job.variant
    if results[0]["logits"] is not None:
        record.logits = results[0]["logits"]
    return record


def run_tensor_parallel_jobs(model, devices: str | list[Device] | None, jobs: list[TensorParallelJob],
                             dtype: torch.dtype | None = None, options: LaunchOptions | None = None,
                             relay=None) -> list[RunRecord]:
    """Several generations in one start of the ranks (tests and benchmarks); everything is planned and checked here,
    before any process starts (notebook 07)."""
    model_path = model_folder(model)
    config = load_config(str(model_path))
    if not devices:
        raise ValueError("give devices, one per rank (like 'cpu,cpu')")
    parsed = parse_devices(devices) if isinstance(devices, str) else list(devices)
    plan = plan_for_jobs(config, parsed, jobs, as_dtype(dtype), str(model))
    check_free_memory(plan, "the tensor-parallel ranks")
    settings = tensor_parallel_settings(model_path, plan=plan, jobs=jobs, dtype=dtype or plan.dtype, relay=relay)
    job = tensor_parallel_rank_job(settings, options)
    check_variant_backend(jobs, notebook_places(job))
    return start_ranks(job, model_path)


def run_tensor_parallel(model, prompts: str | list[str], devices: str | list[Device] | None = None,
                        max_new_tokens: int = 50, variant: str = TP_VARIANT, dtype: torch.dtype | None = None,
                        options: LaunchOptions | None = None, stream=False, stopping_criteria=None,
                        sampling: Sampling | None = None, **knobs) -> tuple[list[str], RunRecord]:
    """Generate with one process per device, every block cut across all of them (notebook 07).

    Returns `(texts, record)` like generate_text, with its sampling keywords and defaults (greedy, temperature,
    top_p, top_k, seed, or `sampling=`). Greedy tokens equal `model.generate`; seeded sampling equals
    `generate_text(seed=...)` on rank 0's device: rank 0 alone samples, from the gathered logits with a generator
    of its device seeded as generate's, and broadcasts each token. `variant`: "block" (one all-reduce per block) or
    "torch" (parallelize_module, one per layer). `stream` and `stopping_criteria` work as in generate_text (notebook
    06's widget uses both): rank 0 sends each token to this process as it is picked, the criteria run here, and a
    stop travels with the next token's broadcast, so every rank ends after the same token (usually one token later
    than in generate). `options` (a LaunchOptions): timeouts, threads, cores.
    """
    import multiprocessing

    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    model_path = model_folder(model)
    job = tensor_parallel_job(prompts_job(model_path, load_config(str(model_path)), prompts, 1, max_new_tokens,
                                          sampling=as_sampling(sampling, **knobs)), variant)
    if stream is False and stopping_criteria is None:
        record = run_tensor_parallel_jobs(model_path, devices, [job], dtype, options)[0]
    else:
        streamer = make_streamer(load_tokenizer(str(model_path)), prompts, stream)
        with TokenRelay(multiprocessing.get_context("spawn"), job.input_ids, streamer, stopping_criteria) as relay:
            record = run_tensor_parallel_jobs(model_path, devices, [job], dtype, options, relay.worker_end())[0]
    record.prompts = prompts
    return record.texts, record


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
    job = tensor_parallel_rank_job(tensor_parallel_settings(model, devices, variant=variant, dtype=dtype))
    places = torchrun_places(job, launch, hardware) if launch else notebook_places(job, hardware)
    config = load_config(str(model))
    parsed = [p.as_device for p in places]
    plan = plan_tensor_parallel(config, parsed, as_dtype(dtype) or default_dtype(config, parsed), prompt_tokens,
                                max_new_tokens, batch_size, model_name=str(model))
    check_variant_backend([tensor_parallel_job(make_job(torch.ones(1, 1, dtype=torch.long), torch.ones(1, 1)),
                                               variant)], places)
    n, heads = len(places), config.n_head
    holds = [f"heads {r * heads // n}-{(r + 1) * heads // n - 1} of every block + embedding + 1/{n} of the head"
             for r in range(n)]
    return with_plan(places, plan, holds, TensorParallelError.kind)
