"""Notebook 02, part 2: placement. Each stage's tensors are read from safetensors (or made from a seed) straight onto
its device, and forward pre-hooks at the stage boundaries move what crosses them: the seed post's patched
forward, as hooks on transformers' own model.

A placed model carries its plan as the attribute `model.plan` (and its hooks as `model.hooks`); `plan_of(model)`
reads it, None for a model loaded whole. That attribute is the only state placement leaves on a model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .models import RANDOM_WEIGHTS, reference_blocks, seeded_tensor, sliced_config, gptj_modeling
from .hub import resolve_model
from .devices import Device, parse_devices
from .plan import Plan
from .hooks import ModuleHook, add_hook
from .records import MemoryRow


def stage_parameter_names(model_path: str | Path) -> dict[str, str]:
    """Map every tensor name of a saved model to the safetensors file that holds it (notebook 02)."""
    path = Path(model_path)
    index = path / "model.safetensors.index.json"
    if index.exists():
        return json.loads(index.read_text())["weight_map"]
    from safetensors import safe_open

    with safe_open(path / "model.safetensors", framework="pt") as f:
        return {k: "model.safetensors" for k in f.keys()}  # noqa: SIM118 (a safe_open handle is no dict)


def move_to(value, device: torch.device, dtype: torch.dtype | None):
    """Move tensors (also inside tuples, lists and dicts) to a device, casting floating ones to `dtype`."""
    if isinstance(value, torch.Tensor):
        if dtype is not None and value.is_floating_point() and value.dtype != dtype:
            return value.to(device=device, dtype=dtype)
        return value if value.device == device else value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(move_to(v, device, dtype) for v in value)
    if isinstance(value, dict):
        return {k: move_to(v, device, dtype) for k, v in value.items()}
    return value


class BoundaryHook(ModuleHook):
    """The 2021 post's patch, as a hook (notebook 02). It does more than observe: before the module runs, it moves
    everything the module receives (hidden states, mask, position ids, rotary sin/cos) to the module's stage's device,
    casting floating tensors to that stage's dtype."""

    def __init__(self, device: torch.device, dtype: torch.dtype | None):
        self.device, self.dtype = device, dtype

    def pre_forward(self, module, args, kwargs):
        return move_to(args, self.device, self.dtype), move_to(kwargs, self.device, self.dtype)


class ReturnHook(ModuleHook):
    """It does more than observe: the head's logits go back to the first stage's device, where `generate` keeps the
    token ids (notebook 02)."""

    def __init__(self, device: torch.device):
        self.device = device

    def post_forward(self, module, args, kwargs, output):
        return output.to(self.device)


class WeightReader:
    """A model's config and a way to get any one of its tensors, from safetensors files or from seeds (notebook 02)."""

    def __init__(self, model_path, seed: int = 0):
        from transformers import AutoConfig

        self.path, self.seed, self.files = None, seed, None  # files: tensor name -> safetensors file; None: seeded
        if not isinstance(model_path, (str, Path)):  # a config: random weights from the seed
            self.config = model_path
            return
        self.path = resolve_model(str(model_path))
        self.config = AutoConfig.from_pretrained(str(self.path))
        if (self.path / RANDOM_WEIGHTS).exists():
            self.seed = json.loads((self.path / RANDOM_WEIGHTS).read_text())["seed"]
        else:
            self.files = stage_parameter_names(self.path)

    def check(self, names) -> None:
        """Refuse a folder that lacks any of these tensors, before anything is loaded."""
        missing = set(names) - set(self.files) if self.files is not None else set()
        if missing:
            raise ValueError(f"{self.path} lacks {len(missing)} tensor(s), e.g. {sorted(missing)[0]}")

    def read(self, name: str, shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """One tensor on `device`: read alone from its file (a mapping never holds more), or made from its seed."""
        from safetensors import safe_open

        if self.files is None:
            return seeded_tensor(name, shape, self.config, self.seed, dtype, device)
        with safe_open(self.path / self.files[name], framework="pt", device=str(device)) as f:
            return f.get_tensor(name)


def place_stages(model_path, plan: Plan, dtype: torch.dtype | list[torch.dtype] | None = None,
                 stages: list[int] | None = None, seed: int = 0, blocks: int | None = None, transform=None):
    """Load each stage's tensors from safetensors onto its device and hook the boundaries; a config instead of a
    folder gives seeded random weights; `dtype` is one or one per stage; `stages`: load only those; `blocks`: only
    the model's first blocks (with embedding and head), a slice planned as such; `transform(name, module)` is called
    on each module inside the blocks as soon as its tensors are loaded, before the next tensor is read, and what it
    returns takes the module's place (notebook 08 quantizes there) (notebook 02)."""
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    GPTJForCausalLM = gptj_modeling().GPTJForCausalLM

    weights = WeightReader(model_path, seed)
    if blocks is not None:
        weights.config = sliced_config(weights.config, blocks)
    config = weights.config
    n = len(plan.devices)
    if plan.devices[-1].blocks[1] != config.n_layer:
        raise ValueError(f"the plan covers {plan.devices[-1].blocks[1]} blocks but {model_path} has {config.n_layer}")
    dtypes = list(dtype) if isinstance(dtype, (list, tuple)) else [dtype or getattr(torch, plan.dtype)] * n
    with init_empty_weights():  # parameters on the meta device; buffers (rotary sin/cos) computed for real
        model = GPTJForCausalLM(config)
    weights.check(name for name, _ in model.named_parameters())
    params = list(model.named_parameters())
    for i, (name, param) in enumerate(params):  # in file order: one tensor in flight at a time
        s = plan.stage_of_module(name)
        if stages is not None and s not in stages:
            continue
        device = torch.device(plan.devices[s].device)
        set_module_tensor_to_device(model, name, device, value=weights.read(name, param.shape, dtypes[s], device),
                                    dtype=dtypes[s])
        owner = name.rpartition(".")[0]
        if transform is not None and block_prefix(name) and (i + 1 == len(params) or
                                                                  params[i + 1][0].rpartition(".")[0] != owner):
            replace_module(model, owner, transform(owner, model.get_submodule(owner)))  # its last tensor is in
    for name, _ in list(model.named_buffers()):  # the rotary sin/cos tables, computed on the CPU
        set_module_tensor_to_device(model, name, torch.device(plan.devices[tensor_stage(plan, name)].device))
    return hook_stages(model, plan, dtypes).eval()


def block_prefix(name: str) -> str | None:
    """`transformer.h.3` for any tensor of block 3 (`h.3` for a stage model's local name); None outside the blocks."""
    parts = name.split(".")
    if parts[0] == "transformer" and len(parts) > 2 and parts[1] == "h":
        return ".".join(parts[:3])
    return ".".join(parts[:2]) if parts[0] == "h" and len(parts) > 1 else None


def replace_module(root: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    """Put `module` at `name` inside `root` (notebook 08's quantized layers replace the float ones)."""
    parent, _, child = name.rpartition(".")
    holder = root.get_submodule(parent) if parent else root
    if getattr(holder, child) is not module:
        setattr(holder, child, module)


def tensor_stage(plan: Plan, name: str) -> int:
    """The stage holding a parameter or buffer: its module's. The model-wide rotary table (`transformer.rotary_emb`,
    transformers 5.24) sits on the first stage; 5.17 keeps one per attention module, in its block (notebook 02)."""
    return 0 if name.startswith("transformer.rotary") else plan.stage_of_module(name)


def hook_stages(model, plan: Plan, dtypes: list[torch.dtype]):
    """Hook every block after the first stage: the first one moves the hidden states across the boundary, and all
    need the mask, position ids and rotary sin/cos, which the model hands each block (notebook 02)."""
    model.hooks = {}  # module name -> hook handle, so a test can remove one and watch it fail
    for s, st in enumerate(plan.devices[1:], start=1):
        for b in range(*st.blocks):  # moves tensors: every block of a later stage, each a boundary for the cache
            model.hooks[f"transformer.h.{b}"] = add_hook(model.transformer.h[b],
                                                         BoundaryHook(torch.device(st.device), dtypes[s]))
    model.hooks["transformer.ln_f"] = add_hook(model.transformer.ln_f,
                                               BoundaryHook(torch.device(plan.devices[-1].device), dtypes[-1]))
    model.hooks["lm_head"] = add_hook(model.lm_head, ReturnHook(torch.device(plan.devices[0].device)))
    model.plan = plan
    return model


def plan_of(model) -> Plan | None:
    """The plan a placed model carries (`model.plan`, set by `hook_stages`); None for a model loaded whole."""
    return getattr(model, "plan", None)


def tensor_bytes(value) -> int:
    """Bytes of all tensors in a value (tuples, lists, dicts and model outputs are searched); a quantized tensor
    counts what it stores (`stored_bytes`)."""
    if isinstance(value, torch.Tensor):
        return stored_bytes(value)
    if isinstance(value, dict) or hasattr(value, "to_tuple"):
        return sum(tensor_bytes(v) for v in value.values())
    if isinstance(value, (tuple, list)):
        return sum(tensor_bytes(v) for v in value)
    return 0


def stored_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor really holds: a tensor subclass's parts (`__tensor_flatten__`: torchao's int8 data, scales
    and zero points), plus bitsandbytes' row scales (`SCB`) and quant state (absmax, code), where present; for a
    plain tensor, numel x element size (notebooks 02, 08)."""
    if hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(stored_bytes(getattr(tensor, n)) for n in names if getattr(tensor, n) is not None)
    parts, state = [getattr(tensor, "SCB", None)], getattr(tensor, "quant_state", None)
    while state is not None and not isinstance(state, (dict, list)):
        parts += [getattr(state, k, None) for k in ("absmax", "code", "offset")]
        state = getattr(state, "state2", None)
    extra = sum(stored_bytes(p) for p in parts if isinstance(p, torch.Tensor))
    return tensor.numel() * tensor.element_size() + extra


def kv_bytes(layer) -> int:
    """Bytes of one KV cache layer's keys and values."""
    return tensor_bytes([getattr(layer, "keys", None), getattr(layer, "values", None)])


def measure_memory(model, cache=None, activations: list[int] | None = None) -> list[MemoryRow]:
    """Bytes per stage of the tensors placed there: parameters, buffers, KV cache, plus `activations` (notebook 02)."""
    plan = plan_of(model)
    stages = plan.devices if plan else [None]
    rows = [MemoryRow(s, st.device if st else str(model.device), activation_bytes=activations[s] if activations else 0,
                      budget_bytes=st.budget_bytes if st else None) for s, st in enumerate(stages)]
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        s = tensor_stage(plan, name) if plan else 0
        rows[s].param_bytes += tensor_bytes(tensor)
    if cache is not None:
        for layer_index, layer in enumerate(cache.layers):
            s = plan.stage_of_module(f"transformer.h.{layer_index}") if plan else 0
            rows[s].kv_cache_bytes += kv_bytes(layer)
    if torch.cuda.is_available():
        for row in rows:
            if row.device.startswith("cuda"):
                row.cuda_allocated_bytes = torch.cuda.memory_allocated(row.device)
    return rows


@dataclass
class SplitCheck:
    """Greedy tokens of a split model and of the unsplit one on the same weights, and how much of the model both
    held: all of it, or a slice of its first blocks at full size (notebook 02)."""

    blocks: int
    n_layer: int
    split_ids: torch.Tensor
    whole_ids: torch.Tensor

    @property
    def equal(self) -> bool:
        """Whether the split made exactly the unsplit model's tokens."""
        return torch.equal(self.split_ids, self.whole_ids)

    def __str__(self) -> str:
        what = (f"all {self.n_layer} blocks" if self.blocks == self.n_layer else
                f"a slice: the first {self.blocks} of {self.n_layer} blocks, with the embedding and head, since a "
                "second copy of the whole model would not fit")
        return f"split == unsplit ({what}): {self.equal}"


def check_split(model_name, devices, dtype: torch.dtype | None, input_ids: torch.Tensor,
                max_new_tokens: int = 24) -> SplitCheck:
    """Place the model split over `devices` and whole on the first one, generate greedily with both and keep the
    tokens; at GPT-J-6B's size both hold only a slice, then both are freed (notebook 02)."""
    from .plan import plan_split

    config = WeightReader(model_name).config
    parsed = parse_devices(devices) if isinstance(devices, str) else list(devices)
    blocks = reference_blocks(config, len(parsed)) or config.n_layer
    sliced = sliced_config(config, blocks)
    ids = {}
    whole = [Device(parsed[0].name, sum(d.budget_bytes for d in parsed))]  # the same room, on one device
    for key, devs in (("split", parsed), ("whole", whole)):
        plan = plan_split(sliced, devs, dtype=dtype, prompt_tokens=input_ids.shape[1], max_new_tokens=max_new_tokens)
        model = place_stages(model_name, plan, blocks=blocks)
        with torch.inference_mode():
            ids_here = input_ids.to(plan.devices[0].device)
            out = model.generate(ids_here, attention_mask=torch.ones_like(ids_here),
                                 do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=config.eos_token_id)
        ids[key] = out.cpu()
        del model
    return SplitCheck(blocks, config.n_layer, ids["split"], ids["whole"])
