"""Notebook 09: how fast one prompt can go. A placed model's decode step compiled with `torch.compile` over a
static KV cache (transformers' `StaticCache`), so a step is a few fused kernels instead of hundreds of small ones;
on CUDA with CUDA graphs (`mode="reduce-overhead"`), which replay a whole step's kernels at once.

Which shapes compile: the prefill (any prompt length) runs eagerly; a decode step always has one new token per row
and a cache of `max_cache_len` positions, so it compiles once per batch size, at most `MAX_GRAPHS` of them. Where
all stages share one device (the CPU, or budget slices of one GPU) the whole forward is one compiled region; a split
across devices is refused by name, since a CUDA graph holds one device's work (one region per device is not built).
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import shutil
import time

import torch

from .generate import run_generate, stage_modules
from .records import RunRecord
from .sampling import Sampling, check_prompts

MAX_GRAPHS = 4  # decode graphs per compiled model, one per batch size; dynamo's own limit is 8, then silently eager


def compile_problem(devices: list[torch.device]) -> str | None:
    """Why the decode step cannot be compiled here, or None: a split across devices, no C++ compiler for the CPU's
    inductor, no triton for CUDA's (notebook 09)."""
    if len({(d.type, d.index or 0) for d in devices}) > 1:
        return (f"the stages span {len(set(map(str, devices)))} devices ({', '.join(sorted(set(map(str, devices))))}):"
                " one compiled region (and one CUDA graph) holds one device's work, and regions per device are not "
                "built here")
    if devices[0].type == "cpu" and not (shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")):
        return "torch.compile's CPU backend needs a C++ compiler (g++ or clang++), and none is on PATH"
    if devices[0].type == "cuda" and importlib.util.find_spec("triton") is None:
        return "torch.compile's CUDA backend needs triton, which is not installed"
    return None


def cache_keyword(model) -> str:
    """The name `generate` takes a cache under: `cache` (transformers 5.2x) or `past_key_values` (5.15, 5.17)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class CompiledDecode:
    """A placed (or whole) model whose decode steps run compiled, over one static KV cache per batch size
    (notebook 09). Build it with `compile_stages`; generate with `generate_compiled`."""

    def __init__(self, model, max_cache_len: int, mode: str | None, backend: str = "inductor"):
        from transformers import StaticCache

        self.model, self.max_cache_len, self.mode = model, max_cache_len, mode
        self.static_cache = StaticCache
        self.eager = model.forward
        self.compiled = torch.compile(model.forward, mode=mode, backend=backend, dynamic=False)
        self.caches: dict[int, object] = {}  # batch size -> its StaticCache
        self.compile_seconds: dict[int, float] = {}  # batch size -> the first decode step's seconds (compiling)
        self.keyword = cache_keyword(model)

    def forward(self, *args, **kwargs):
        """The model's forward while generating: one new token per row runs compiled, a prompt eagerly."""
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None or ids.shape[1] != 1:
            return self.eager(*args, **kwargs)
        batch = ids.shape[0]
        if batch in self.compile_seconds:
            return self.compiled(*args, **kwargs)
        start = time.perf_counter()
        out = self.compiled(*args, **kwargs)
        self.compile_seconds[batch] = time.perf_counter() - start
        return out

    def cache_for(self, batch: int):
        """The static cache of this batch size, emptied; a new batch size past MAX_GRAPHS is refused."""
        if batch not in self.caches:
            if len(self.caches) >= MAX_GRAPHS:
                raise ValueError(f"the compiled decode holds graphs for batch sizes {sorted(self.caches)}; a batch of "
                                 f"{batch} would compile a {len(self.caches) + 1}th: use one of those sizes, or "
                                 "compile_stages again")
            self.caches[batch] = self.static_cache(config=self.model.config, max_cache_len=self.max_cache_len)
        cache = self.caches[batch]
        cache.reset()
        return cache

    @contextlib.contextmanager
    def installed(self):
        """The model's forward is the compiled dispatch inside the block, its own afterwards."""
        self.model.forward = self.forward
        try:
            yield
        finally:
            del self.model.forward  # back to the class's forward


def compile_stages(model, max_cache_len: int | None = None, mode: str | None = None,
                   backend: str = "inductor") -> CompiledDecode | None:
    """Compile a placed (or whole) model's decode step over a static KV cache of `max_cache_len` positions (default:
    the model's context); `mode` and `backend`: torch.compile's, mode "reduce-overhead" (CUDA graphs) by default on
    CUDA ("aot_eager" traces without generating kernels, to debug). Returns None, after one printed line saying why,
    where it cannot be compiled: generate eagerly then (notebook 09)."""
    devices = [device for _, device in stage_modules(model)]
    problem = compile_problem(devices)
    if problem:
        print(f"compiled decode: not available ({problem}); generating eagerly")
        return None
    if mode is None and devices[0].type == "cuda":
        mode = "reduce-overhead"
    return CompiledDecode(model, max_cache_len or model.config.n_positions, mode, backend)


def generate_compiled(compiled: CompiledDecode, tokenizer, prompts: str | list[str], max_new_tokens: int = 50,
                      greedy: bool = False, temperature: float = 1.0, top_p: float = 0.7, top_k: int = 0,
                      seed: int | None = None, stream=False, stopping_criteria=None,
                      sampling: Sampling | None = None, keep_logits: bool = False) -> tuple[list[str], RunRecord]:
    """generate_text through the compiled decode step and its static cache: the same arguments and `(texts, record)`,
    the record timing the whole run (no per-stage hooks inside a compiled region); refuses, before anything runs, a
    prompt that does not fit the static cache. `keep_logits`: `record.logits` holds every step's logits, to compare
    with eager's (`run_generate(..., output_logits=True)`) (notebook 09)."""
    sampling = sampling or Sampling(greedy=greedy, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    ids = check_prompts(compiled.model.config, tokenizer, prompts, max_new_tokens)
    longest = max(len(x) for x in ids)
    if longest + max_new_tokens > compiled.max_cache_len:
        raise ValueError(f"a prompt of {longest} tokens plus max_new_tokens={max_new_tokens} needs "
                         f"{longest + max_new_tokens} positions; the static cache holds {compiled.max_cache_len}: ask "
                         f"for at most {compiled.max_cache_len - longest} new tokens, or compile_stages with a larger "
                         "max_cache_len")
    with compiled.installed():
        texts, record = run_generate(compiled.model, tokenizer, prompts, max_new_tokens, sampling, stream,
                                     stopping_criteria, hooks=False, disable_compile=True,  # ours, not generate's
                                     output_logits=keep_logits, **{compiled.keyword: compiled.cache_for(len(prompts))})
    record.mode = "compiled"
    return texts, record
