"""Notebook 10, part 1: a KV cache of slots across devices. One K and one V tensor per layer, on that layer's device,
with a row per slot and a write position per row, so that sequences of different lengths share one forward: a step
names the slots its rows use and where each row writes. transformers' own GPT-J forward runs over it unchanged (its
attention calls the cache's `update`), with position ids and an attention mask made here from each row's length.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from .devices import Device, format_size
from .plan import Plan, as_config, kv_cache_bytes_per_layer, plan_split


class SlotCache:
    """Keys and values of `slots` sequences of up to `max_len` tokens each, per layer on that layer's device
    (allocated when the layer first writes, so a split model's layers each hold theirs where they run) (notebook 10).
    Before each forward, `at(rows, starts)` says which slot each batch row is and where it writes."""

    def __init__(self, slots: int, max_len: int):
        self.slots, self.max_len = slots, max_len
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.rows = torch.zeros(0, dtype=torch.long)
        self.starts = torch.zeros(0, dtype=torch.long)

    def at(self, rows: torch.Tensor, starts: torch.Tensor) -> None:
        """The next forward's rows: slot `rows[i]` writes its new tokens from position `starts[i]` on."""
        self.rows, self.starts = rows.long().cpu(), starts.long().cpu()

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        """What GPT-J's attention calls: write this step's keys and values (batch, heads, tokens, dim) at each row's
        positions, and return each row's keys and values up to the longest row's end (the mask hides the rest)."""
        if layer_idx not in self.keys:
            shape = (self.slots, key.shape[1], self.max_len, key.shape[3])
            self.keys[layer_idx] = torch.zeros(shape, dtype=key.dtype, device=key.device)
            self.values[layer_idx] = torch.zeros(shape, dtype=value.dtype, device=value.device)
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        rows, positions = self.indices(key.shape[2], keys.device)
        keys[rows[:, None], :, positions] = key.transpose(1, 2).to(keys.dtype)
        values[rows[:, None], :, positions] = value.transpose(1, 2).to(values.dtype)
        end = int((self.starts + key.shape[2]).max())
        return keys[rows, :, :end], values[rows, :, :end]

    def indices(self, tokens: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch rows' slots, and each row's write positions for `tokens` new tokens."""
        positions = self.starts[:, None] + torch.arange(tokens)
        if int(positions.max()) >= self.max_len:
            raise ValueError(f"a slot holds {self.max_len} tokens; this step would write at position "
                             f"{int(positions.max())}")
        return self.rows.to(device), positions.to(device)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """The longest row's length before this step (transformers asks where no position ids are given)."""
        return int(self.starts.max()) if len(self.starts) else 0

    def nbytes(self) -> int:
        """Bytes the allocated layers hold."""
        return sum(t.numel() * t.element_size() for store in (self.keys, self.values) for t in store.values())


def slot_inputs(starts: torch.Tensor, tokens: int, dtype: torch.dtype,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Position ids (batch, tokens) and an additive attention mask (batch, 1, tokens, keys) for rows that start at
    `starts`: query i of row r sees positions 0 .. starts[r] + i of its own slot, nothing after, nothing of another's
    (notebook 10)."""
    positions = starts[:, None] + torch.arange(tokens)
    end = int((starts + tokens).max())
    seen = torch.arange(end)[None, None, :] <= positions[:, :, None]  # (batch, tokens, keys)
    mask = torch.zeros(seen.shape, dtype=dtype).masked_fill(~seen, torch.finfo(dtype).min)
    return positions.to(device), mask[:, None].to(device)


def cache_keyword(model) -> str:
    """What this transformers' GPTJForCausalLM.forward calls its KV cache: `cache` (5.24) or `past_key_values`."""
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def forward_slots(model, cache: SlotCache, rows: torch.Tensor, starts: torch.Tensor,
                  ids: torch.Tensor) -> torch.Tensor:
    """One forward of transformers' GPTJForCausalLM (whole, or split with its boundary hooks) over the slot cache:
    `ids` (batch, tokens) continue the slots `rows` from `starts`; the last position's float32 logits of each row
    (notebook 10)."""
    first = model.transformer.wte.weight.device
    dtype = model.transformer.wte.weight.dtype
    positions, mask = slot_inputs(starts, ids.shape[1], dtype, first)
    cache.at(rows, starts)
    with torch.inference_mode():
        out = model(input_ids=ids.to(first), attention_mask=mask, position_ids=positions, use_cache=True,
                    **{cache_keyword(model): cache})
    return out.logits[:, -1].float()


@dataclass(frozen=True)
class SlotPlan:
    """How many sequences of up to `max_len` tokens the devices hold beside the weights, and the plan that holds them
    (notebook 10)."""

    slots: int
    max_len: int
    plan: Plan

    def __str__(self) -> str:
        fullest = max(self.plan.devices, key=lambda s: s.fill)
        kv = sum(s.kv_cache_bytes for s in self.plan.devices)
        return (f"{self.slots} sequences of {self.max_len} tokens: KV cache {format_size(kv)} beside weights "
                f"{format_size(sum(s.param_bytes for s in self.plan.devices))}; fullest device {fullest.device} at "
                f"{fullest.fill:.0%} of {format_size(fullest.budget_bytes)}")


def plan_slots(model_or_config, devices: list[Device], max_len: int, dtype=None, slots: int | None = None,
               reserve: int | str = 0, model_name: str | None = None) -> SlotPlan:
    """The slot cache sized against every device's budget: `slots` sequences of `max_len` tokens (a MemoryError
    with the numbers where they do not fit), or with `slots=None` the most that fit, 1 at least (notebook 10)."""
    config = as_config(model_or_config)
    if not 1 <= max_len <= config.n_positions:
        raise ValueError(f"max_len={max_len}: a slot holds 1 to {config.n_positions} tokens (the model's context)")

    def planned(n: int) -> Plan:
        return plan_split(config, devices, dtype=dtype, reserve=reserve, max_new_tokens=max_len, batch_size=n,
                          model_name=model_name)

    if slots is not None:
        return SlotPlan(slots, max_len, planned(slots))
    best, low, high = planned(1), 1, 2
    while True:  # double until it no longer fits, then bisect
        try:
            best, low = planned(high), high
            high *= 2
        except MemoryError:
            break
    while high - low > 1:
        middle = (low + high) // 2
        try:
            best, low = planned(middle), middle
        except MemoryError:
            high = middle
    return SlotPlan(low, max_len, best)


def slot_bytes(config, dtype: torch.dtype, max_len: int) -> int:
    """One slot's keys and values over every layer (notebook 10)."""
    return kv_cache_bytes_per_layer(config, dtype, max_len, 1) * config.n_layer


def slot_table(max_len: int = 512, reserve: str = "1GiB") -> str:
    """How many sequences of `max_len` tokens each of README's setups holds at once, beside the weights: the slot
    cache planned against every device's budget, as `serve` plans it (notebook 10)."""
    from .setups import SETUPS, setup_hardware
    from .devices import parse_devices

    rows = [f"| setup | sequences of {max_len} tokens at once | KV cache | weights | fullest device |",
            "|---|---|---|---|---|"]
    for name, (model, spec, dtype) in SETUPS.items():
        length = max_len if model != "tiny" else min(max_len, 128)  # the tiny default: its small budgets
        devices = parse_devices(spec, setup_hardware(name))
        try:
            sp = plan_slots(model, devices, length, dtype, reserve=reserve if model == "gpt-j-6b" else 0,
                            model_name=model)
        except MemoryError:
            rows.append(f"| {name} | none: the weights leave no room for one | | | |")
            continue
        fullest = max(sp.plan.devices, key=lambda s: s.fill)
        kv = sum(s.kv_cache_bytes for s in sp.plan.devices)
        params = sum(s.param_bytes for s in sp.plan.devices)
        rows.append(f"| {name} | {sp.slots} (of {length} tokens) | {format_size(kv)} | {format_size(params)} | "
                    f"{fullest.fill:.0%} of {format_size(fullest.budget_bytes)} |")
    return "\n".join(rows)
