"""The command line, part 2 (notebooks 05, 07): the subcommands that run on ranks, `pipeline` and `tensor-parallel`,
started from here or as torchrun's entry point (each process one rank), their dry runs, and the sampling their flags
describe.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from pathlib import Path

from .models import as_dtype
from .hub import load_tokenizer
from .sampling import Sampling
from .generate import format_timing
from .relay import PrintRelay
from .ranks import LaunchOptions, RankError, leave_process, serve_torchrun
from .jobs import prompt_jobs
from .launch import launch_notes, torchrun_launch
from .pipeline import pipeline_dry_run, pipeline_job, pipeline_settings, run_pipeline
from .tensor_parallel import (run_tensor_parallel, tensor_parallel_dry_run, tensor_parallel_job,
                              tensor_parallel_settings, variant_job)


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a text file, one per line (blank lines skipped)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"prompts file {path} does not exist: write one prompt per line")
    prompts = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompts file {path} has no prompts: write one prompt per line")
    return prompts


def under_torchrun() -> bool:
    """Whether torchrun started this process as one rank (it sets RANK and WORLD_SIZE)."""
    return "RANK" in os.environ


def launch_ranks(start, rank_job) -> list:
    """The one path of the pipeline and tensor-parallel subcommands: under torchrun, this process is one rank of
    `rank_job()` (rank 0 returns the records, the others leave); else `start()` starts the ranks from here. A failed
    rank ends the command with one line naming it."""
    if under_torchrun():
        return serve_torchrun(rank_job())
    try:
        return start()
    except RankError as err:
        raise SystemExit(f"error: {err}") from err


def dry_run(args: argparse.Namespace, plan_places) -> None:
    """--dry-run: each rank's line (under torchrun, this rank's alone), or --json the same as JSON; nothing loads and
    no group forms. A spec the real run would refuse is refused the same way (exit 2)."""
    launch = torchrun_launch() if under_torchrun() else None
    places = plan_places(args.model, args.devices, prompt_tokens=args.prompt_tokens,
                         max_new_tokens=args.max_new_tokens, dtype=as_dtype(args.dtype), launch=launch)
    shown = [places[launch.rank]] if launch else places
    if args.json:
        print(json.dumps([p.to_dict() for p in shown], indent=1))
    else:
        print("\n".join(p.line() for p in shown))
    for note in launch_notes(places) if not launch or launch.rank == 0 else []:
        print(f"note: {note}", file=sys.stderr)


def cmd_pipeline(args: argparse.Namespace) -> None:
    """pipeline: generate with one process per stage; under torchrun this process is one stage."""
    if args.dry_run:
        return dry_run(args, pipeline_dry_run)
    if not args.prompts_file:
        raise ValueError("pipeline needs --prompts-file (or --dry-run)")
    sampling, options = sampling_of(args), LaunchOptions(timeout=args.timeout)
    knobs = dict(micro_batches=args.micro_batches, max_new_tokens=args.max_new_tokens, sampling=sampling,
                 dtype=as_dtype(args.dtype))
    first = not under_torchrun() or int(os.environ["RANK"]) == 0  # only rank 0 needs the prompts file
    prompts = read_prompts(args.prompts_file) if first else None
    records = launch_ranks(
        lambda: [run_pipeline(args.model, prompts, args.devices, options=options, **knobs)[1]],
        lambda: pipeline_job(pipeline_settings(args.model, args.devices, prompts=prompts, **knobs), options))
    record = records[0]
    print("\n\n".join(prompt + text for prompt, text in zip(record.prompts, record.texts)), flush=True)
    print(format_timing(record), file=sys.stderr)
    if under_torchrun():
        leave_process()


def cmd_tensor_parallel(args: argparse.Namespace) -> None:
    """tensor-parallel: generate with every block cut over one process per device; under torchrun this process is
    one rank. Standard output is exactly what `generate` prints for the same settings (notebook 07)."""
    if args.dry_run:
        return dry_run(args, functools.partial(tensor_parallel_dry_run, variant=args.variant))
    if not args.prompt:
        raise ValueError("tensor-parallel needs --prompt (or --dry-run)")
    sampling, options, dtype = sampling_of(args), LaunchOptions(timeout=args.timeout), as_dtype(args.dtype)
    groups = [[p] for p in args.prompt] if args.stream else [args.prompt]  # like generate: one prompt at a time
    first = not under_torchrun() or int(os.environ["RANK"]) == 0

    def jobs():
        return [variant_job(j, args.variant) for j in prompt_jobs(args.model, groups, args.max_new_tokens,
                                                                  sampling)] if first else None

    def start():
        if not args.stream:
            return run_tensor_parallel(args.model, jobs(), args.devices, dtype=dtype, options=options)
        records = []  # one start of the ranks per prompt, its text relayed here token by token
        for prompts in groups:
            records.append(run_tensor_parallel(args.model, prompts, args.devices, args.max_new_tokens, args.variant,
                                               dtype, options, stream=True, sampling=sampling)[1])
            if prompts is not groups[-1]:
                print(flush=True)
        return records

    def rank_job():
        relay = PrintRelay(load_tokenizer(args.model), args.prompt) if args.stream and first else None
        settings = tensor_parallel_settings(args.model, args.devices, jobs=jobs(), variant=args.variant,
                                            dtype=dtype, relay=relay)
        return tensor_parallel_job(settings, options)

    records = launch_ranks(start, rank_job)
    if not args.stream:  # streamed: already printed as it came
        print("\n\n".join(p + t for p, t in zip(args.prompt, [t for r in records for t in r.texts])), flush=True)
    for record in records:
        print(format_timing(record), file=sys.stderr)
    if under_torchrun():
        leave_process()


def sampling_of(args: argparse.Namespace) -> Sampling:
    """The `Sampling` that generate's and pipeline's flags describe, checked."""
    return Sampling(greedy=args.greedy, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                    seed=args.seed)
