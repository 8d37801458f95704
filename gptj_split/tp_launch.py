"""Notebook 07, part 2: running tensor parallelism. One process per device, started from a notebook (notebook 05's
launcher) or by torchrun; rank 0 tokenizes and plans, every rank builds its own shards, all ranks compute every
token together, and rank 0 picks each token (greedy or sampled) and broadcasts it with a stop flag.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass

import torch

from .models import as_dtype, dtype_name, gptj_modeling
from .devices import Device, parse_devices, peak_rss, reset_peak_rss
from .hub import load_config, load_tokenizer, resolve_model
from .plan import Plan
from .records import MemoryRow, RunRecord, TimingEvent
from .place import kv_bytes
from .sampling import Sampling, as_sampling
from .generate import make_streamer
from .relay import TokenRelay
from .pipeline import PIPELINE_TIMEOUT, PipelineJob, merge_stage_results
from .launch import LaunchSettings, PipelineError, join_run, launch_stages, model_folder, prompts_job
from .tensor_parallel import VARIANTS, RankModel, build_rank_model, forward_rank, plan_tensor_parallel

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


@dataclass
class TensorParallelSettings(LaunchSettings):
    """What every rank of one tensor-parallel run needs, the same under both launchers (notebook 07)."""

    variant: str = TP_VARIANT  # `relay` (LaunchSettings): rank 0 streams every job's tokens there, reads Stop


class TensorParallelError(PipelineError):
    """A tensor-parallel rank failed; `stage` is its rank (notebook 07)."""


def inject_rank_fault(rank: int, fail: tuple | None, step: int) -> None:
    """Test hook: rank R raises (or exits at once) when it reaches token K; `fail` = (R, K, "raise" | "exit")."""
    if not fail or fail[0] != rank or fail[1] != step:
        return
    message = f"injected fault: tensor-parallel rank {rank} stops after {step} token(s)"
    if len(fail) > 2 and fail[2] == "exit":
        print(message + " (process exits)", file=sys.stderr, flush=True)
        os._exit(3)
    raise RuntimeError(message)


def run_rank(rm: RankModel, job: TensorParallelJob, t0: float, fail: tuple | None = None, relay=None) -> dict:
    """One rank's share of a generation: every step, the forward on its shards, then rank 0 picks the tokens and
    broadcasts them with a stop flag (notebook 07)."""
    import torch.distributed as dist
    from transformers import DynamicCache

    dev, batch = rm.device, job.input_ids.shape[0]
    comm = dev if dist.is_initialized() and dist.get_backend() == "nccl" else torch.device("cpu")
    x, mask = job.input_ids.to(dev), job.attention_mask.to(dev)
    cache = DynamicCache(config=rm.config)
    rm.clock.t0, rm.clock.events = t0, []
    events: list[TimingEvent] = []
    unfinished = torch.ones(batch, dtype=torch.long)
    generator = (torch.Generator().manual_seed(job.sampling.seed) if rm.rank == 0 and not job.sampling.greedy
                 else None)
    warpers = job.sampling.warpers()
    tokens, kept = [], []
    with torch.inference_mode():
        for step in range(job.max_new_tokens):
            inject_rank_fault(rm.rank, fail, step)
            rm.clock.step = step
            start = rm.clock.now()
            logits = forward_rank(rm, x, mask, cache)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            events.append(TimingEvent(rm.rank, "prefill" if step == 0 else "decode", step, start, rm.clock.now()))
            message = torch.zeros(batch + 1, dtype=torch.long)
            if rm.rank == 0:  # one sampler: the other ranks never draw, so they cannot disagree
                token = job.sampling.pick(logits.cpu(), warpers, generator)
                message[:batch] = token * unfinished + rm.eos_token_id * (1 - unfinished)  # pad = eos after eos
                message[batch] = int(relay is not None and relay.stop_requested())
            if rm.ranks > 1:
                message = message.to(comm)
                start = rm.clock.now()
                dist.broadcast(message, src=0)
                rm.clock.note("broadcast", start)
                message = message.cpu()
            token = message[:batch]
            if relay is not None:
                relay.put(token.view(batch, 1))
            tokens.append(token)
            kept += [logits.cpu()] if job.keep_logits else []
            unfinished = unfinished & (token != rm.eos_token_id).long()
            if not unfinished.any() or message[batch]:  # every rank sees the same tokens and flag: all stop here
                break
            x = token.view(batch, 1).to(dev)
            mask = torch.cat([mask, mask.new_ones((batch, 1))], dim=-1)
    if relay is not None:
        relay.end()
    kv = sum(kv_bytes(layer) for layer in cache.layers)
    memory = MemoryRow(rm.rank, str(dev), rm.param_bytes, kv,
                       cuda_peak_bytes=torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None)
    return {"events": events + rm.clock.events, "memory": memory, "new_tokens": torch.stack(tokens, dim=1),
            "logits": torch.stack(kept, dim=1) if kept else None}


def prepare_tensor_parallel(settings: TensorParallelSettings) -> tuple[Plan, list[TensorParallelJob], object]:
    """On rank 0: the jobs and the plan, checked; nothing loaded yet (notebook 07)."""
    model_path = resolve_model(settings.model)
    config = load_config(str(model_path))
    jobs = settings.jobs
    if jobs is None:
        jobs = [tensor_parallel_job(prompts_job(model_path, config, settings.prompts, 1, settings.max_new_tokens,
                                                sampling=settings.sampling), settings.variant)]
    if settings.plan_json:
        plan = Plan.from_json(settings.plan_json)
    else:
        plan = plan_for_jobs(config, settings.devices, jobs, settings.dtype, settings.model)
    if len(plan.devices) != settings.world_size:
        raise ValueError(f"{settings.world_size} process(es) for {len(plan.devices)} device(s): start one process per "
                         f"device (torchrun --nproc-per-node {len(plan.devices)})")
    return plan, jobs, model_path


def plan_for_jobs(config, devices, jobs: list[PipelineJob], dtype, model_name: str) -> Plan:
    """The tensor-parallel plan with KV cache room for the longest and widest job (notebook 07)."""
    return plan_tensor_parallel(config, devices, dtype, max_new_tokens=max(j.input_ids.shape[1] + j.max_new_tokens
                                                                           for j in jobs),
                                batch_size=max(j.input_ids.shape[0] for j in jobs), model_name=model_name)


def serve_tensor_parallel(rank: int, settings: TensorParallelSettings) -> list[RunRecord] | None:
    """One rank under run_tensor_parallel or torchrun: rank 0 plans and broadcasts, every rank builds its shards and
    runs every job; rank 0 returns the records (notebook 07)."""
    import gc
    import time

    import torch.distributed as dist

    world = settings.world_size
    backend, setup = join_run(rank, settings, prepare_tensor_parallel)
    try:
        plan, jobs, model_path = setup
        dtype = as_dtype(settings.dtype or plan.dtype)
        tokenizer = load_tokenizer(str(model_path)) if rank == 0 else None
        device = plan.devices[rank].device
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(torch.device(device).type, (world,)) if world > 1 else None
        import accelerate.utils  # noqa: F401  (libraries belong to the baseline, not to the rank)
        import safetensors  # noqa: F401
        from torch.distributed.tensor import parallel  # noqa: F401
        import transformers.masking_utils  # noqa: F401
        from transformers import DynamicCache  # noqa: F401

        gptj_modeling()

        records, rm = [], None
        for job in jobs:
            if rm is None or rm.variant != job.variant:
                rm = None  # one model at a time: free the other variant first
                gc.collect()
                baseline = reset_peak_rss()
                start = time.perf_counter()
                rm = build_rank_model(model_path, rank, world, dtype, device, job.variant, mesh,
                                      device if backend == "nccl" else "cpu")
                load_seconds = time.perf_counter() - start
            dist.barrier()
            t0 = [time.time()]
            dist.broadcast_object_list(t0, src=0)
            relay = settings.relay if rank == 0 else None
            result = run_rank(rm, job, t0[0], settings.fail, relay)
            result["memory"].load_seconds = load_seconds
            if baseline is not None:  # host memory of this rank over its RSS after imports, before building
                result["memory"].peak_rss_bytes = peak_rss() - baseline
            gathered = [None] * world if rank == 0 else None
            dist.gather_object(result, gathered, dst=0)
            if rank == 0:
                records.append(merge_rank_results(gathered, job, tokenizer, plan, rm.eos_token_id))
                records[-1].prompts = list(settings.prompts or [])
        dist.barrier()
        return records if rank == 0 else None
    finally:
        dist.destroy_process_group()


def merge_rank_results(results: list[dict], job: TensorParallelJob, tokenizer, plan: Plan, eos: int) -> RunRecord:
    """The ranks' reports as one RunRecord, trimmed like generate; `record.logits` when the job kept them (notebook
    07)."""
    record = merge_stage_results(results, job, tokenizer, plan, eos)
    record.mode = "tensor-parallel"
    record.settings.pop("micro_batches", None)
    record.settings["variant"] = job.variant
    if results[0]["logits"] is not None:
        record.logits = results[0]["logits"]
    return record


def tensor_parallel_settings(model, world_size: int, devices: str | list[Device] | None = None,
                             plan: Plan | None = None, prompts: list[str] | None = None,
                             jobs: list[TensorParallelJob] | None = None, max_new_tokens: int = 50,
                             sampling: Sampling | None = None, variant: str = TP_VARIANT, dtype=None,
                             timeout: float = PIPELINE_TIMEOUT, threads: int | None = None,
                             affinity: list[list[int]] | None = None, fail: tuple | None = None,
                             relay=None) -> TensorParallelSettings:
    """The settings of one tensor-parallel run, checked, for the notebook launcher and torchrun alike (notebook 07)."""
    if isinstance(devices, list):
        devices = ",".join(f"{d.name}={d.budget_bytes}" for d in devices)
    names = [s.device for s in plan.devices] if plan else [d.name for d in parse_devices(devices or "", check=False)]
    if len(names) != world_size:
        raise ValueError(f"{world_size} process(es) for the {len(names)} device(s) in "
                         f"{devices if plan is None else 'the plan'!r}: start one process per device")
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r}: use one of {VARIANTS}")
    return TensorParallelSettings(str(model), world_size, names, devices=devices,
                                  plan_json=plan.to_json() if plan else None, prompts=prompts, jobs=jobs,
                                  max_new_tokens=max_new_tokens, sampling=sampling or Sampling(),
                                  dtype=dtype_name(dtype) if dtype else None, timeout=timeout, threads=threads,
                                  affinity=affinity, fail=fail, variant=variant, relay=relay)


def run_tensor_parallel_jobs(model, devices: str | list[Device] | None, jobs: list[TensorParallelJob],
                             dtype: torch.dtype | None = None, timeout: float = PIPELINE_TIMEOUT,
                             threads: int | None = None, affinity: list[list[int]] | None = None,
                             fail: tuple | None = None, relay=None) -> list[RunRecord]:
    """Several generations in one start of the ranks (tests and benchmarks); everything is planned and checked here,
    before any process starts (notebook 07)."""
    model_path = model_folder(model)
    config = load_config(str(model_path))
    if devices is None:
        raise ValueError("give devices, one per rank (like 'cpu,cpu')")
    plan = plan_for_jobs(config, devices, jobs, as_dtype(dtype), str(model))
    settings = tensor_parallel_settings(model_path, len(plan.devices), plan=plan, jobs=jobs, dtype=dtype,
                                        timeout=timeout, threads=threads, affinity=affinity, fail=fail, relay=relay)
    try:
        return launch_stages(settings, serve=serve_tensor_parallel)
    except TensorParallelError:
        raise
    except PipelineError as err:  # notebook 05's launcher names a "stage": here it is a rank
        text = str(err).replace(f"pipeline stage {err.stage}", f"tensor-parallel rank {err.stage}", 1)
        raise TensorParallelError(text, err.stage, err.failed_at) from err.__cause__


def run_tensor_parallel(model, prompts: str | list[str], devices: str | list[Device] | None = None,
                        max_new_tokens: int = 50, sampling: Sampling | None = None, variant: str = TP_VARIANT,
                        dtype: torch.dtype | None = None, timeout: float = PIPELINE_TIMEOUT,
                        threads: int | None = None, affinity: list[list[int]] | None = None,
                        fail: tuple | None = None, stream=False, stopping_criteria=None,
                        **knobs) -> tuple[list[str], RunRecord]:
    """Generate with one process per device, every block cut across all of them (notebook 07).

    Returns `(texts, record)` like generate_text, with its sampling keywords and defaults (greedy, temperature,
    top_p, top_k, seed, or `sampling=`). Greedy tokens equal `model.generate`; seeded sampling equals
    `generate_text(seed=...)`: rank 0 alone samples, from the gathered logits with a generator seeded like
    generate's, and broadcasts each token. `variant`: "block" (one all-reduce per block) or "torch"
    (parallelize_module, one per layer). `stream` and `stopping_criteria` work as in generate_text (notebook 06's
    widget uses both): rank 0 sends each token to this process as it is picked, the criteria run here, and a stop
    travels with the next token's broadcast, so every rank ends after the same token (usually one token later than
    in generate).
    """
    import multiprocessing

    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    model_path = model_folder(model)
    job = tensor_parallel_job(prompts_job(model_path, load_config(str(model_path)), prompts, 1, max_new_tokens,
                                          sampling=as_sampling(sampling, **knobs)), variant)
    options = dict(dtype=dtype, timeout=timeout, threads=threads, affinity=affinity, fail=fail)
    if stream is False and stopping_criteria is None:
        record = run_tensor_parallel_jobs(model_path, devices, [job], **options)[0]
    else:
        streamer = make_streamer(load_tokenizer(str(model_path)), prompts, stream)
        relay = TokenRelay(multiprocessing.get_context("spawn"), job.input_ids, streamer, stopping_criteria)
        with relay:
            record = run_tensor_parallel_jobs(model_path, devices, [job], relay=relay.worker_end(), **options)[0]
    record.prompts = prompts
    return record.texts, record


def prompt_jobs(model, groups: list[list[str]], max_new_tokens: int, sampling: Sampling,
                variant: str = TP_VARIANT) -> list[TensorParallelJob]:
    """One job per group of prompts, tokenized and checked as generate_text does (notebook 07's command line)."""
    path = resolve_model(str(model))
    config = load_config(str(path))
    return [tensor_parallel_job(prompts_job(path, config, prompts, 1, max_new_tokens, sampling=sampling), variant)
            for prompts in groups]


def tensor_parallel_generate(devices: str | list[Device], **options):
    """A function with generate_text's signature that runs tensor parallelism on `devices`, for notebook 06's widget:
    `prompt_widget("tiny", tokenizer, generate=tensor_parallel_generate("cpu,cpu"))` (notebook 07)."""

    def generate(model, tokenizer, prompts, **kwargs) -> tuple[list[str], RunRecord]:
        return run_tensor_parallel(model, prompts, devices, **options, **kwargs)

    return generate


class PrintRelay:
    """Under torchrun, rank 0 streams to its own standard output as `generate --stream` prints: each job's prompt,
    then its text as the tokens are picked, a blank line between prompts (notebook 07)."""

    def __init__(self, tokenizer, prompts: list[str]):
        self.tokenizer, self.prompts, self.streamer = tokenizer, list(prompts), None

    def put(self, token_ids: torch.Tensor) -> None:
        if self.streamer is None:  # a new job: print its prompt; the streamer skips the first thing it is given
            self.streamer = make_streamer(self.tokenizer, [self.prompts.pop(0)], True)
            self.streamer.put(token_ids.view(-1))
        self.streamer.put(token_ids.view(-1))

    def stop_requested(self) -> bool:
        return False

    def end(self) -> None:
        if self.streamer is not None:
            self.streamer.end()
            self.streamer = None
            if self.prompts:
                print(flush=True)
