"""Notebook 02, part 1: the plan. Which device holds the embedding, which blocks and the head, and how many bytes
each needs (parameters, KV cache, reserve) against its budget: an exact min-max partition, and a clear refusal
with the smallest change that would fit. Placement, the pipeline and the plots all read the same `Plan`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from .models import DTYPES, as_dtype, default_dtype, dtype_name, meta_model, module_sizes
from .devices import Device, available_memory, check_dtype_on_devices, format_size, parse_devices, parse_size
from .hub import load_config


@dataclass
class StagePlan:
    """One device's share of the model: contiguous modules and the bytes they need (notebook 02)."""

    device: str
    embedding: bool
    blocks: tuple[int, int]  # half-open range of transformer blocks
    head: bool
    param_bytes: int
    kv_cache_bytes: int
    reserve_bytes: int
    total_bytes: int
    budget_bytes: int
    cost: float = 0.0

    @property
    def fill(self) -> float:
        """Load over budget: 1.0 is a full device."""
        return self.total_bytes / self.budget_bytes


@dataclass
class Plan:
    """The planner's answer, read by placement, the pipeline and the plots; `--json` prints exactly this (notebook
    02)."""

    model: str
    dtype: str
    total_params: int
    devices: list[StagePlan]
    module_bytes: dict[str, int] = dataclasses.field(default_factory=dict)  # embedding, one block, head
    weights: str = ""  # the blocks' linear weights: int8, nf4, or the compute dtype (plans saved before: "")

    def __post_init__(self):
        self.weights = self.weights or self.dtype  # a plan saved before weight formats: unquantized

    @property
    def quantized(self) -> bool:
        """Whether the blocks' linear weights are stored in 8 or 4 bits (notebook 08)."""
        return self.weights in QUANTIZED_FORMATS

    def to_json(self) -> str:
        """The plan as JSON text."""
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        """Read a plan written by `to_json`."""
        data = json.loads(text)
        stages = [StagePlan(**{**s, "blocks": tuple(s["blocks"])}) for s in data.pop("devices")]
        return cls(**data, devices=stages)

    def stage_of_module(self, name: str) -> int:
        """Which stage holds a parameter or module named like `transformer.h.3.attn.q_proj.weight`."""
        if name.startswith("transformer.wte"):
            return 0
        if name.startswith(("transformer.ln_f", "lm_head")):
            return len(self.devices) - 1
        block = int(name.split(".")[2])
        return next(i for i, s in enumerate(self.devices) if s.blocks[0] <= block < s.blocks[1])

    def device_map(self) -> dict[str, int | str]:
        """The `device_map` dict that stock `from_pretrained(..., device_map=...)` and accelerate take: every
        module of the model on its stage's device, GPU numbers as ints (notebook 08)."""
        last = len(self.devices) - 1
        where = {"transformer.wte": 0, **{f"transformer.{c}": 0 for c in extra_modules()},
                 **{f"transformer.h.{b}": s for s, st in enumerate(self.devices) for b in range(*st.blocks)},
                 "transformer.ln_f": last, "lm_head": last}
        return {name: map_device(self.devices[s].device) for name, s in where.items()}


def map_device(name: str) -> int | str:
    """accelerate's name of a device: 0 for "cuda:0" (and "cuda"), else the name ("cpu")."""
    device = torch.device(name)
    if device.type == "cuda":
        return device.index or 0
    return str(device)


@functools.cache
def extra_modules() -> tuple[str, ...]:
    """`transformer`'s children with tensors other than the embedding, blocks and final norm: the model-wide rotary
    table in transformers 5.24, none in 5.17 (it sits in each block there); they go with the first stage."""
    from transformers import GPTJConfig

    model = meta_model(GPTJConfig(vocab_size=8, n_embd=8, n_layer=1, n_head=2, rotary_dim=2, n_positions=8,
                                  bos_token_id=0, eos_token_id=0))
    return tuple(name for name, child in model.transformer.named_children()
                 if name not in ("wte", "h", "ln_f") and [*child.parameters(), *child.buffers()])


QUANTIZED_FORMATS = {  # weight format -> (bytes per weight, bytes per output row, bytes per layer): scales too
    "int8": (1.0, 5, 0),  # torchao: int8 weights, a float32 scale and an int8 zero point per row (bitsandbytes: 4)
    "nf4": (0.5 + 4 / 64, 0, 64),  # bitsandbytes: two weights per byte, a float32 absmax per 64, a 16-value code
}


def check_weights(weights: str | None, dtype: torch.dtype) -> str:
    """A weight format's name: int8, nf4, or the compute dtype's (unquantized); refuse others, listing the known
    ones (notebook 08)."""
    if weights is None or weights == dtype_name(dtype):
        return dtype_name(dtype)
    if weights in QUANTIZED_FORMATS:
        return weights
    if weights in DTYPES:  # unquantized weights are stored in the compute dtype
        raise ValueError(f"weights={weights} with dtype={dtype_name(dtype)}: unquantized weights are stored in the "
                         f"compute dtype; use dtype={weights}, or weights=int8 or nf4")
    raise ValueError(f"unknown weight format {weights!r}: use one of {', '.join([*DTYPES, *QUANTIZED_FORMATS])}")


def linear_bytes(out_features: int, in_features: int, weights: str, dtype: torch.dtype) -> int:
    """Bytes of one linear layer's weight matrix stored in a weight format, scales and zero points included
    (notebook 08)."""
    if weights not in QUANTIZED_FORMATS:
        return out_features * in_features * dtype.itemsize
    per_weight, per_row, per_layer = QUANTIZED_FORMATS[weights]
    return math.ceil(out_features * in_features * per_weight) + out_features * per_row + per_layer


@functools.lru_cache(maxsize=32)
def block_linear_shapes(config_json: str) -> tuple[tuple[int, int], ...]:
    """(out, in) of each linear weight in one block, counted on the meta device (notebook 08)."""
    from transformers import GPTJConfig

    block = meta_model(GPTJConfig(**json.loads(config_json))).transformer.h[0]
    return tuple(tuple(m.weight.shape) for m in block.modules() if isinstance(m, torch.nn.Linear))


def planned_sizes(config, dtype: torch.dtype, weights: str | None = None) -> dict[str, int]:
    """`module_sizes` with the blocks' linear weights in a weight format: the KV cache, embedding, head and layer
    norms stay in the compute dtype (notebooks 02, 08)."""
    sizes = module_sizes(config, dtype)
    weights = check_weights(weights, dtype)
    if weights in QUANTIZED_FORMATS:
        shapes = block_linear_shapes(config.to_json_string())
        others = sizes["block"] - sum(o * i for o, i in shapes) * dtype.itemsize
        sizes["block"] = others + sum(linear_bytes(o, i, weights, dtype) for o, i in shapes)
        sizes["total"] = sizes["embedding"] + config.n_layer * sizes["block"] + sizes["head"]
    return sizes


def kv_cache_bytes_per_layer(config, dtype: torch.dtype, tokens: int, batch_size: int = 1) -> int:
    """Keys and values of one layer for `tokens` positions of `batch_size` sequences (notebook 02)."""
    return 2 * config.n_embd * dtype.itemsize * tokens * batch_size


def as_config(model_or_config):
    """Accept a model name, a model or a config; return the config."""
    if isinstance(model_or_config, (str, Path)):
        return load_config(str(model_or_config))
    return getattr(model_or_config, "config", model_or_config)


def plan_split(model_or_config, devices: str | list[Device], dtype: torch.dtype | str | None = None,
               reserve: int | str = 0, prompt_tokens: int = 0, max_new_tokens: int = 0, batch_size: int = 1,
               cost: list[float] | None = None, model_name: str | None = None,
               weights: str | None = None) -> Plan:
    """Split embedding, blocks and head into contiguous stages minimising the fullest device, or with `cost` (one
    number per module) the slowest stage within every budget: a min-max partition by dynamic programming.
    `dtype=None`: `default_dtype` of the model on these devices; `weights`: the blocks' linear weights in int8 or
    nf4 (notebooks 02, 08)."""
    config = as_config(model_or_config)
    devices = parse_devices(devices) if isinstance(devices, str) else list(devices)
    dtype = as_dtype(dtype) or (DTYPES.get(weights) if weights else None) or default_dtype(config, devices)
    weights = check_weights(weights, dtype)
    check_dtype_on_devices(dtype, devices)
    reserve = parse_size(reserve) if isinstance(reserve, str) else int(reserve)
    sizes = planned_sizes(config, dtype, weights)
    kv = kv_cache_bytes_per_layer(config, dtype, prompt_tokens + max_new_tokens, batch_size)
    n_layer, n = config.n_layer, len(devices)
    if cost is not None and len(cost) != n_layer + 2:
        raise ValueError(f"cost needs {n_layer + 2} numbers (embedding, {n_layer} blocks, head), got {len(cost)}")

    def stage(s: int, a: int, b: int) -> StagePlan:
        params = (b - a) * sizes["block"] + (sizes["embedding"] if s == 0 else 0) + (sizes["head"] if s == n - 1 else 0)
        kv_stage = (b - a) * kv
        c = 0.0 if cost is None else (sum(cost[1 + a:1 + b]) + (cost[0] if s == 0 else 0)
                                      + (cost[-1] if s == n - 1 else 0))
        return StagePlan(devices[s].name, s == 0, (a, b), s == n - 1, params, kv_stage, reserve,
                         params + kv_stage + reserve, devices[s].budget_bytes, c)

    def score(st: StagePlan) -> float:
        if cost is None:
            return st.fill
        return st.cost if st.fill <= 1 else math.inf

    # best[s][j]: the smallest possible worst score of stages 0..s-1 holding blocks [0, j)
    best = [[math.inf] * (n_layer + 1) for _ in range(n + 1)]
    cut = [[0] * (n_layer + 1) for _ in range(n + 1)]
    best[0][0] = 0.0
    for s in range(1, n + 1):
        for j in range(n_layer + 1):
            for i in range(j + 1):
                value = max(best[s - 1][i], score(stage(s - 1, i, j)))
                if value < best[s][j]:
                    best[s][j], cut[s][j] = value, i
    bounds, j = [], n_layer
    for s in range(n, 0, -1):
        bounds.append((cut[s][j], j))
        j = cut[s][j]
    stages = [stage(s, a, b) for s, (a, b) in enumerate(reversed(bounds))]
    if model_name is None:
        model_name = str(model_or_config) if isinstance(model_or_config, (str, Path)) else "gptj"
    plan = Plan(model_name, dtype_name(dtype),
                sizes["params"], stages, {k: sizes[k] for k in ("embedding", "block", "head")}, weights)
    if best[n][n_layer] == math.inf or max(s.fill for s in stages) > 1:
        raise DoesNotFit(config, devices, dtype, reserve, prompt_tokens, max_new_tokens, batch_size, weights)
    return plan


class DoesNotFit(MemoryError):
    """The planner's refusal (notebooks 02, 08). Its message, what is needed and the smallest change that would fit
    (`explain_infeasible`, which plans again to find it), is worked out when first read: a caller that only asks
    whether something fits pays nothing for it."""

    def __init__(self, *why):
        super().__init__()
        self.why, self.message = why, None

    def __str__(self) -> str:
        if self.message is None:
            self.message = explain_infeasible(*self.why)
        return self.message

    def __reduce__(self):  # crosses processes as the plain MemoryError it reads as
        return MemoryError, (str(self),)


def explain_infeasible(config, devices: list[Device], dtype: torch.dtype, reserve: int, prompt_tokens: int,
                       max_new_tokens: int, batch_size: int, weights: str | None = None) -> str:
    """Say what is needed, what the devices give, and the smallest change that would fit (notebooks 02, 08)."""
    weights = check_weights(weights, dtype)
    sizes = planned_sizes(config, dtype, weights)
    tokens = prompt_tokens + max_new_tokens
    kv_total = kv_cache_bytes_per_layer(config, dtype, tokens, batch_size) * config.n_layer
    need = sizes["total"] + kv_total + reserve * len(devices)
    give = sum(d.budget_bytes for d in devices)
    stored = dtype_name(dtype) if weights == dtype_name(dtype) else f"{dtype_name(dtype)}, blocks in {weights}"
    msg = (f"the model does not fit: it needs {format_size(need)} (weights {format_size(sizes['total'])} in "
           f"{stored}, KV cache {format_size(kv_total)}"
           + (f", reserve {format_size(reserve)} x {len(devices)}" if reserve else "")
           + f"), your {len(devices)} device(s) give {format_size(give)}")
    one_block = sizes["block"] + kv_total // config.n_layer + reserve
    if all(one_block > d.budget_bytes for d in devices):
        msg += f"; one block alone needs {format_size(one_block)} with its KV cache and the reserve"
    ideas = []

    def fits(devs, dt=dtype, res=reserve, pt=prompt_tokens, mnt=max_new_tokens, w=weights) -> bool:
        try:
            plan_split(config, devs, dtype=dt, reserve=res, prompt_tokens=pt, max_new_tokens=mnt, batch_size=batch_size,
                       weights=w if w in QUANTIZED_FORMATS else None)
            return True
        except MemoryError:
            return False

    biggest = max(devices, key=lambda d: d.budget_bytes)
    for extra in range(1, config.n_layer + 2):
        if fits(devices + [biggest] * extra):
            ideas.append(f"add {extra} device(s) of {format_size(biggest.budget_bytes)}")
            break
    if dtype.itemsize > 2 and fits(devices, dt=torch.float16):
        ideas.append("use dtype=float16")
    for fmt, what in (("int8", "8-bit"), ("nf4", "4-bit")):  # smaller weights, only where the current ones are bigger
        if planned_sizes(config, dtype, fmt)["block"] < sizes["block"] and fits(devices, w=fmt):
            ideas.append(f"store the blocks' weights in {what} (weights={fmt}, notebook 08)")
            break
    if tokens and fits(devices, pt=0, mnt=0):
        low, high = 0, tokens  # bisect the longest context that fits
        while high - low > 1:
            mid = (low + high) // 2
            low, high = (mid, high) if fits(devices, pt=0, mnt=mid) else (low, mid)
        ideas.append(f"use a shorter context (at most {low} tokens in all)")
    if reserve and fits(devices, res=0):
        ideas.append("lower the per-device reserve")
    return msg + (": " + ", or ".join(ideas) if ideas else "") + "."


def check_free_memory(plan: Plan, who: str = "the stages", stages: set[int] | None = None) -> None:
    """Refuse, before any process starts, a launch whose stages need more than their devices have free right now
    (a split model still held by this kernel, say): named by device, with what is free and what is needed; `stages`:
    only those (the ones on this node) (notebooks 05 to 07)."""
    need: dict[str, int] = {}
    for i, st in enumerate(plan.devices):
        if stages is not None and i not in stages:  # another node's device: not this process's to look at
            continue
        if st.device.startswith("cuda") and not torch.cuda.is_initialized():
            continue  # this process holds nothing on the GPUs, and asking would create a CUDA context on each
        need[st.device] = need.get(st.device, 0) + st.total_bytes
    for name, nbytes in need.items():
        free = available_memory(name)
        if nbytes > free:
            where = "the host" if name == "cpu" else name
            raise MemoryError(f"{who} need {format_size(nbytes)} on {where}, which has {format_size(free)} free now: "
                              "a model this kernel still holds may take it (del it, then gh.release_memory()), or "
                              "plan for less")


def format_plan(plan: Plan) -> str:
    """A plan as a small text table, one device a line (notebook 02)."""
    weights = f", blocks' weights in {plan.weights}" if plan.quantized else ""
    lines = [f"{plan.model} in {plan.dtype}{weights}: {plan.total_params:,} parameters on {len(plan.devices)} "
             "device(s)"]
    for i, s in enumerate(plan.devices):
        parts = (["embedding"] if s.embedding else []) + [f"blocks {s.blocks[0]}-{s.blocks[1] - 1}"
                                                          if s.blocks[1] > s.blocks[0] else "no blocks"]
        parts += ["head"] if s.head else []
        lines.append(f"  {i}: {s.device:7} {', '.join(parts):28} params {format_size(s.param_bytes):>11} "
                     f"+ KV {format_size(s.kv_cache_bytes):>10} + reserve {format_size(s.reserve_bytes):>9} "
                     f"= {format_size(s.total_bytes):>11} of {format_size(s.budget_bytes):>10} ({s.fill:.0%})")
    return "\n".join(lines)


def accelerate_plan(config, devices: list[Device], dtype: torch.dtype = torch.float16,
                    balanced: bool = True) -> list[int]:
    """Parameter bytes per device as accelerate would place them (`device_map="auto"` when balanced, else a greedy
    fill)."""
    import logging

    from accelerate.utils import get_balanced_memory, infer_auto_device_map

    model = meta_model(config)
    max_memory = {i: d.budget_bytes for i, d in enumerate(devices)}
    old = logging.getLogger("accelerate").level
    logging.getLogger("accelerate").setLevel(logging.ERROR)
    try:
        if balanced:
            max_memory = get_balanced_memory(model, max_memory=max_memory, no_split_module_classes=["GPTJBlock"],
                                             dtype=dtype)
        device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=["GPTJBlock"],
                                           dtype=dtype)
    finally:
        logging.getLogger("accelerate").setLevel(old)
    loads = [0] * len(devices)
    for name, p in model.named_parameters():
        owner = max((k for k in device_map if k == "" or name == k or name.startswith(k + ".")), key=len)
        target = device_map[owner]
        if isinstance(target, int):
            loads[target] += p.numel() * dtype.itemsize
    return loads
