"""Notebooks 05 and 07: what both clients share as plain types. A job is what the ranks of one run generate
(left-padded prompt ids, micro-batches, sampling), checked in the caller before any process starts; a rank report is
what each rank measured; the rank that picks tokens picks them as `generate` does; the reports merge into one
RunRecord, trimmed as `generate` trims.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from .hub import load_config, load_tokenizer, resolve_model
from .plan import Plan
from .records import MemoryRow, RunRecord
from .sampling import Sampling, as_sampling, check_max_new_tokens, check_prompts, pad_left


@dataclass
class GenerationJob:
    """One batch for the ranks: left-padded token ids, micro-batch count, sampling (notebooks 05, 07). Each
    micro-batch samples with its own torch.Generator seeded with `sampling.seed`."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    micro_batches: int = 1
    max_new_tokens: int = 50
    sampling: Sampling = dataclasses.field(default_factory=lambda: Sampling(seed=0))
    stoppable: bool = False  # a one-number "go on / stop" message goes ahead of each hidden state (Stop, eos)


@dataclass
class RankReport:
    """What one rank measured in one job (notebooks 05, 07): its timing events, its memory row, and on the rank that
    picks the tokens, the new tokens (and each step's logits, where the job kept them)."""

    events: list
    memory: MemoryRow
    new_tokens: torch.Tensor | None = None
    logits: torch.Tensor | None = None


def make_job(input_ids: torch.Tensor, attention_mask: torch.Tensor, micro_batches: int = 1,
             max_new_tokens: int = 50, sampling: Sampling | None = None, stoppable: bool = False,
             **knobs) -> GenerationJob:
    """Check the options of one generation on the ranks and bundle them; `knobs` or `sampling` as generate_text's;
    `stoppable` lets the run end early, on a Stop or when every row has ended (notebook 05)."""
    batch = input_ids.shape[0]
    if not 1 <= micro_batches <= batch:
        raise ValueError(f"micro_batches={micro_batches}: use between 1 and the number of prompts ({batch})")
    if stoppable and micro_batches != 1:
        raise ValueError(f"streaming and stopping criteria need micro_batches=1, got {micro_batches}")
    check_max_new_tokens(max_new_tokens)
    sampling = as_sampling(sampling, **knobs)
    if sampling.seed is None:  # like generate without a seed: whatever torch's global generator gives
        sampling = dataclasses.replace(sampling, seed=int(torch.randint(2**62, ())))
    return GenerationJob(input_ids, attention_mask, micro_batches, max_new_tokens, sampling, stoppable)


def model_folder(model) -> Path:
    """The local folder of a model name, folder or loaded model."""
    return resolve_model(str(getattr(getattr(model, "config", None), "_name_or_path", None) or model))


def locate_model(settings) -> Path:
    """This node's own folder of the run's model (settings.model: a name, or a path on this node), downloaded here if
    need be, before any group forms (notebooks 05, 07)."""
    return resolve_model(settings.model)


def prompts_job(model_path: Path, config, prompts: list[str], micro_batches: int = 1, max_new_tokens: int = 50,
                sampling: Sampling | None = None, stoppable: bool = False, **knobs) -> GenerationJob:
    """Tokenize and left-pad prompts as generate_text does, checked the same way, into a job (notebooks 05, 07)."""
    sampling = as_sampling(sampling, **knobs)
    tokenizer = load_tokenizer(str(model_path))
    ids = check_prompts(config, tokenizer, prompts, max_new_tokens)
    input_ids, mask = pad_left(ids, tokenizer.eos_token_id, "cpu")
    return make_job(input_ids, mask, micro_batches, max_new_tokens, sampling=sampling, stoppable=stoppable)


def prompt_jobs(model, groups: list[list[str]], max_new_tokens: int, sampling: Sampling) -> list[GenerationJob]:
    """One job per group of prompts, tokenized and checked as generate_text does (the command line)."""
    path = model_folder(model)
    config = load_config(str(path))
    return [prompts_job(path, config, prompts, 1, max_new_tokens, sampling=sampling) for prompts in groups]


def next_tokens(logits: torch.Tensor, job: GenerationJob, warpers, generator: torch.Generator | None,
                unfinished: torch.Tensor, eos: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens a rank picks from one step's logits, as `generate` picks them (greedy, or sampled with `generator`),
    with eos after a row's end; and which rows go on (notebooks 05, 07)."""
    token = job.sampling.pick(logits, warpers, generator)
    unfinished = unfinished.to(token.device)
    token = token * unfinished + eos * (1 - unfinished)  # pad = eos after eos
    return token, unfinished & (token != eos).long()


def merge_results(results: list[RankReport], job: GenerationJob, tokenizer, plan: Plan | None,
                  eos: int) -> RunRecord:
    """The ranks' reports (events, memory, and the last rank's new tokens) as one RunRecord, trimmed like generate:
    each row ends at its eos (notebooks 05, 07)."""
    new = next(r.new_tokens for r in reversed(results) if r.new_tokens is not None)
    done = (new == eos).int()
    finished_at = torch.where(done.any(1), done.argmax(1), torch.full_like(done[:, 0], new.shape[1] - 1))
    length = int(finished_at.max()) + 1
    output = torch.cat([job.input_ids, new[:, :length]], dim=1)
    counts = (finished_at + 1).tolist()  # each row's tokens up to its eos, as generate_text counts them
    texts = [tokenizer.decode(row[:n], skip_special_tokens=True) for row, n in zip(new, counts)]
    events = sorted((e for r in results for e in r.events), key=lambda e: (e.start, e.stage))
    memory = [r.memory for r in results]
    for row in memory if plan else []:
        row.budget_bytes = plan.devices[row.stage].budget_bytes
    last = len(results) - 1
    ttft = max(e.end for e in events if e.stage == last and e.kind == "compute" and e.step == 0)
    total = max(e.end for e in events)
    after_first = sum(counts) - len(counts)
    return RunRecord(texts=texts, prompts=[], mode="pipeline", new_tokens=sum(counts), time_to_first_token=ttft,
                     tokens_per_second=after_first / (total - ttft) if total > ttft else float("nan"),
                     total_seconds=total, events=events, memory=memory, plan=plan,
                     settings={"max_new_tokens": job.max_new_tokens, **job.sampling.settings(),
                               "batch_size": len(counts), "micro_batches": job.micro_batches},
                     output_ids=output)
