"""Notebook 03, part 2: generating through the split model. transformers' own `generate` (KV cache, sampling,
streamers) runs on the placed model; hooks at the stage boundaries time each stage, and the result comes back as
`(texts, RunRecord)`.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch

from .devices import format_size
from .plan import Plan
from .records import EventClock, RunRecord, TimingEvent
from .hooks import ModuleHook, add_hook
from .place import measure_memory, plan_of, tensor_bytes
from .sampling import Sampling, check_prompts, pad_left


def plan_modules(plan: Plan) -> list[tuple[list[str], torch.device]]:
    """Each stage's module names in forward order and its device (notebook 03)."""
    return [((["transformer.wte"] if s.embedding else []) + [f"transformer.h.{b}" for b in range(*s.blocks)]
             + (["transformer.ln_f", "lm_head"] if s.head else []), torch.device(s.device)) for s in plan.devices]


def stage_modules(model) -> list[tuple[list[str], torch.device]]:
    """`plan_modules` of a placed model; an unsplit model is one stage (notebook 03)."""
    plan = plan_of(model)
    if plan:
        return plan_modules(plan)
    names = ["transformer.wte", *(f"transformer.h.{b}" for b in range(model.config.n_layer)), "transformer.ln_f",
             "lm_head"]
    return [(names, model.transformer.wte.weight.device)]


class StageRecorder:
    """Times each stage's share of every forward pass from hooks at the stage boundaries (notebooks 03 and 04).

    Hooks (hooks.py's style, all observing) on a stage's first module and its last one stamp start and end on the
    one `EventClock` of every way of generating: host seconds on the CPU, CUDA events on a GPU, read after one
    synchronize at the end, so the times are the device's and the hooks never stall it.
    The first forward of a run is the prefill, every later one a decode step. During the prefill, hooks on
    every module also note tensor sizes, for an estimate of each stage's peak activation memory (notebook 04).
    """

    def __init__(self, model, hooks: bool = True, stages: list[tuple[list[str], torch.device]] | None = None,
                 sizes: bool = True):
        self.model, self.hooks = model, hooks  # hooks=False: the clock alone (a compiled forward, notebook 09)
        self.stages = stages or stage_modules(model)  # any runs of modules: notebook 05 times every block alone
        self.sizes = sizes  # False: time only (no size hooks in the prefill)
        self.cuda = sorted({d for _, d in self.stages if d.type == "cuda"}, key=str)
        self.step = -1
        self.clock = EventClock()  # restarted when the recording starts
        self.handles: list = []
        self.size_handles: list = []  # removed after the prefill
        self.activations = [0] * len(self.stages)  # bytes, an estimate; see note_sizes
        self.opened: dict[int, object] = {}  # stage -> the clock's stamp as it started (StageStart)
        self.entry_bytes: dict[int, int] = {}  # stage -> bytes that entered it in the prefill (StageEntry)
        self.peaks: dict[torch.device, int] = {}  # CUDA only: torch.cuda.max_memory_allocated during the run

    def now(self) -> float:
        """Host seconds since the recording started."""
        return self.clock.now()

    def __enter__(self) -> StageRecorder:
        modules = dict(self.model.named_modules())
        for d in self.cuda:
            torch.cuda.synchronize(d)
            torch.cuda.reset_peak_memory_stats(d)
        self.clock = EventClock()
        for d in self.cuda:
            self.clock.stamp(d)  # each device's zero
        if not self.hooks:
            return self

        self.handles.append(add_hook(self.model, CountSteps(self)))
        for s, (names, device) in enumerate(self.stages):
            if not names:
                continue
            self.handles += [add_hook(modules[names[0]], StageStart(self, s, device)),
                             add_hook(modules[names[-1]], StageEnd(self, s, device))]
            if self.sizes:
                self.size_handles.append(add_hook(modules[names[0]], StageEntry(self, s)))
                self.size_handles += [add_hook(sub, ModuleSizes(self, s))
                                      for name in names for sub in modules[name].modules()]
        self.handles += self.size_handles
        return self

    def note_sizes(self, stage: int, entry_bytes: int, args, kwargs, output) -> None:
        """Activation estimate of a stage: the hidden states that entered it (kept for the residual) plus
        the largest inputs + output of any one of its modules."""
        size = entry_bytes + tensor_bytes(args) + tensor_bytes({k: v for k, v in kwargs.items() if k != "cache"}) \
            + tensor_bytes(output)
        self.activations[stage] = max(self.activations[stage], size)

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        for d in self.cuda:
            torch.cuda.synchronize(d)
            self.peaks[d] = torch.cuda.max_memory_allocated(d)

    def events(self) -> list[TimingEvent]:
        """The recorded busy intervals, in seconds since the start, in the order they happened."""
        return self.clock.events()


class CountSteps(ModuleHook):
    """Observes the model's forward passes: the first is the prefill, every later one a decode step; once the prefill
    is over, the size hooks go (its tensors were the largest) (notebook 04)."""

    def __init__(self, recorder: StageRecorder):
        self.recorder = recorder

    def pre_forward(self, module, args, kwargs):
        self.recorder.step += 1
        if self.recorder.step == 1:
            for handle in self.recorder.size_handles:
                handle.remove()
        return args, kwargs


class StageStart(ModuleHook):
    """Observes a stage's first module: a stamp on the run's clock, on the stage's device, as it starts (notebooks
    03, 04)."""

    def __init__(self, recorder: StageRecorder, stage: int, device: torch.device):
        self.recorder, self.stage, self.device = recorder, stage, device

    def pre_forward(self, module, args, kwargs):
        self.recorder.opened[self.stage] = self.recorder.clock.stamp(self.device)
        return args, kwargs


class StageEnd(ModuleHook):
    """Observes a stage's last module: the interval since its StageStart noted as the stage's, as it ends (notebooks
    03, 04)."""

    def __init__(self, recorder: StageRecorder, stage: int, device: torch.device):
        self.recorder, self.stage, self.device = recorder, stage, device

    def post_forward(self, module, args, kwargs, output):
        r = self.recorder
        r.clock.note(self.stage, r.opened.pop(self.stage), self.device, step=r.step)
        return output


class StageEntry(ModuleHook):
    """Observes, during the prefill, the bytes that enter a stage: the hidden states it keeps for the residual
    (notebook 04)."""

    def __init__(self, recorder: StageRecorder, stage: int):
        self.recorder, self.stage = recorder, stage

    def pre_forward(self, module, args, kwargs):
        self.recorder.entry_bytes[self.stage] = tensor_bytes(args)
        return args, kwargs


class ModuleSizes(StageEntry):
    """Observes, during the prefill, one module's inputs and output, for `StageRecorder.note_sizes` (notebook 04)."""

    pre_forward = ModuleHook.pre_forward  # only after the forward

    def post_forward(self, module, args, kwargs, output):
        self.recorder.note_sizes(self.stage, self.recorder.entry_bytes[self.stage], args, kwargs, output)
        return output


class TokenTimes:
    """A transformers streamer that notes when each step's tokens arrive, then hands them on to `inner` (notebook
    03)."""

    def __init__(self, clock, inner=None):
        self.clock, self.inner, self.times, self.prompt_seen = clock, inner, [], False

    def put(self, value) -> None:
        if self.prompt_seen:  # generate first puts the prompt, then one batch of tokens per step
            self.times.append(self.clock())
        self.prompt_seen = True
        if self.inner is not None:
            self.inner.put(value)

    def end(self) -> None:
        if self.inner is not None:
            self.inner.end()


def make_streamer(tokenizer, prompts: list[str], stream=False):
    """`stream=True`: print the prompt, then a TextStreamer prints each piece of text (one prompt only); a streamer
    passes through; False gives None (notebook 03, reused by the pipeline and tensor parallelism)."""
    if stream is True and len(prompts) > 1:
        raise ValueError(f"stream=True prints one prompt at a time, got {len(prompts)}: generate them one by one, "
                         "or pass your own streamer that handles a batch")
    if stream is True:
        from transformers import TextStreamer

        print(prompts[0], end="", flush=True)
        return TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    return stream or None


def generate_text(model, tokenizer, prompts: str | list[str], max_new_tokens: int = 50, greedy: bool = False,
                  temperature: float = 1.0, top_p: float = 0.7, top_k: int = 0, seed: int | None = None,
                  stream=False, stopping_criteria=None, sampling: Sampling | None = None,
                  keep_logits: bool = False) -> tuple[list[str], RunRecord]:
    """Generate continuations with transformers' `generate` and KV cache through a split (or whole) model (notebook 03).

    Returns `(texts, record)`: `texts[i]` is the continuation of `prompts[i]` alone (the prompt is not
    repeated; print `prompt + text` for what the seed printed), and `record.texts is texts`.
    Sampling uses the seed's settings by default (top_p=0.7, top_k=0 = no top-k filter, temperature 1.0);
    `seed` seeds torch's generator right before `generate`, inside `torch.random.fork_rng`, so the caller's
    random state is left as it was. `sampling=Sampling(...)` may replace those five keywords. Prompts of
    different lengths are left-padded with the end-of-text token. `stream=True` prints the prompt and then
    each piece of text as it is produced (one prompt only); any transformers streamer may be passed instead.
    `stopping_criteria`, a list of transformers stopping criteria, can end generation early (notebook 06's Stop).
    `keep_logits`: `record.logits` holds every step's logits, (batch, steps, vocab), for `compare_outputs`.
    """
    given = dict(greedy=greedy, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    if sampling is not None and given != dataclasses.asdict(Sampling()):
        raise ValueError("give either sampling=Sampling(...) or greedy/temperature/top_p/top_k/seed, not both")
    sampling = sampling if sampling is not None else Sampling(**given)
    return run_generate(model, tokenizer, prompts, max_new_tokens, sampling, stream, stopping_criteria,
                        **({"output_logits": True} if keep_logits else {}))


def run_generate(model, tokenizer, prompts: str | list[str], max_new_tokens: int, sampling: Sampling, stream=False,
                 stopping_criteria=None, hooks: bool = True, **generate_kwargs) -> tuple[list[str], RunRecord]:
    """generate_text's work once its sampling is settled; `hooks=False` times the whole run only (a compiled forward
    must not call back into Python), `generate_kwargs` go to `generate` (a static cache, notebook 09)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    ids = check_prompts(model.config, tokenizer, prompts, max_new_tokens)
    stream = make_streamer(tokenizer, prompts, stream)
    eos = tokenizer.eos_token_id
    stages = stage_modules(model)
    input_ids, mask = pad_left(ids, eos, stages[0][1])
    extra = {}
    if stopping_criteria is not None:
        from transformers import StoppingCriteriaList

        extra["stopping_criteria"] = StoppingCriteriaList(stopping_criteria)
    with StageRecorder(model, hooks) as recorder, seeded(sampling.seed, recorder.cuda):
        times = TokenTimes(recorder.now, inner=stream)
        out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             pad_token_id=eos, streamer=times, return_dict_in_generate=True,
                             **sampling.generate_kwargs(), **extra, **generate_kwargs)
        total = recorder.now()
    cache = getattr(out, "cache", None)
    if cache is None:  # older transformers call it past_key_values
        cache = getattr(out, "past_key_values", None)
    new = out.sequences[:, input_ids.shape[1]:].cpu()
    counts = [int((row == eos).nonzero()[0, 0]) + 1 if (row == eos).any() else len(row) for row in new]
    texts = [tokenizer.decode(row[:n], skip_special_tokens=True) for row, n in zip(new, counts)]
    first, last = times.times[0], times.times[-1]
    memory = measure_memory(model, cache, recorder.activations)
    for row in memory:  # on CUDA, the allocator's own peak: an independent total to check the parts against
        row.cuda_peak_bytes = recorder.peaks.get(torch.device(row.device))
    after_first = sum(counts) - len(prompts)
    record = RunRecord(
        texts=texts, prompts=prompts, mode="naive" if len(stages) > 1 else "single", new_tokens=sum(counts),
        time_to_first_token=first, tokens_per_second=after_first / (last - first) if last > first else float("nan"),
        total_seconds=total, events=recorder.events(), memory=memory, plan=plan_of(model),
        output_ids=out.sequences.cpu(),
        settings={"max_new_tokens": max_new_tokens, **sampling.settings(), "batch_size": len(prompts),
                  "prompt_tokens": [len(x) for x in ids]})
    if getattr(out, "logits", None) is not None:  # output_logits=True: every step's, (batch, steps, vocab)
        record.logits = torch.stack(out.logits, dim=1).cpu()
    return texts, record


@contextlib.contextmanager
def seeded(seed: int | None, cuda_devices=()):
    """Inside the block torch's generators start from `seed`; outside, the caller's random state is untouched."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=list(cuda_devices)):
        torch.manual_seed(seed)
        yield


def format_timing(record: RunRecord) -> str:
    """Time to first token, tokens/s, total time, and each stage's busy time and KV cache, as a small table
    (notebook 03)."""
    busy = record.busy_seconds()
    lines = [f"time to first token {record.time_to_first_token * 1000:9.1f} ms",
             f"tokens/s after it   {record.tokens_per_second:9.1f}   (batch of {len(record.prompts)})",
             f"total               {record.total_seconds * 1000:9.1f} ms for {record.new_tokens} new tokens",
             "stage  device   busy ms  share of total  KV cache at the end"]
    for s, row in enumerate(record.memory):
        b = busy[s] if s < len(busy) else 0.0
        lines.append(f"{s:5}  {row.device:7} {b * 1000:8.1f}  {b / record.total_seconds:14.0%}  "
                     f"{format_size(row.kv_cache_bytes):>12}")
    return "\n".join(lines)
