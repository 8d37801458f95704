"""Notebook 08, part 1: quantized weights with the tools people already use. Each backend (torchao, bitsandbytes)
checked against the device before anything loads, blocks quantized one at a time as they are placed (this project's
placement and pipeline stages), and the plan handed to stock `from_pretrained(..., device_map=plan.device_map())`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

import torch

from .hardware import INT8_CAPABILITY
from .devices import card_capability, trim_host_heap
from .models import RANDOM_WEIGHTS, as_dtype, gptj_modeling
from .quiet import quiet_imports, quiet_progress
from .hub import resolve_model
from .plan import QUANTIZED_FORMATS, Plan
from .place import place_stages

BACKENDS = {"int8": ("torchao", "bitsandbytes"), "nf4": ("bitsandbytes",)}  # weight format -> backends, default first
BACKEND_DEVICES = {"torchao": ("cpu", "cuda"), "bitsandbytes": ("cpu", "cuda", "xpu")}  # device types each runs on
INSTALL_HINT = 'pip install "gptj-helpers[quant]" (or: pip install torchao bitsandbytes)'


class MissingBackend(ImportError):
    """A quantization backend that is not installed; the message says how to install it (notebook 08)."""


quiet_backends = quiet_imports  # notebook 08's name for the same silencing


def import_backend(backend: str):
    """Import torchao or bitsandbytes quietly; a missing one says how to install it (notebook 08)."""
    if backend not in BACKEND_DEVICES:
        raise ValueError(f"unknown quantization backend {backend!r}: use one of {', '.join(BACKEND_DEVICES)}")
    try:
        with quiet_backends():
            module = importlib.import_module(backend)
            if backend == "torchao":  # transformers imports more of torchao with its quantizers: quietly, now
                importlib.import_module("transformers.quantizers.auto")
            return module
    except ImportError as err:
        raise MissingBackend(f"{backend} is not installed ({err}): {INSTALL_HINT}") from None


def backend_versions() -> str:
    """The installed backends' versions, or how to install them, for a notebook's versions cell (notebook 08)."""
    parts = []
    for backend in BACKEND_DEVICES:
        try:
            parts.append(f"{backend} {import_backend(backend).__version__}")
        except MissingBackend:
            parts.append(f"{backend} missing")
    return " | ".join(parts) + ("" if all("missing" not in p for p in parts) else f": {INSTALL_HINT}")


def check_backend(weights: str, backend: str | None = None, devices=("cpu",)) -> str:
    """The backend that will store `weights` on these devices (None: the format's default); refuse an unknown format
    or backend, or a device the backend cannot run on, before anything loads (notebook 08)."""
    if weights not in BACKENDS:
        raise ValueError(f"unknown quantized weight format {weights!r}: use one of {', '.join(QUANTIZED_FORMATS)}")
    backend = backend or BACKENDS[weights][0]
    if backend not in BACKENDS[weights]:
        raise ValueError(f"{backend} does not store {weights} weights here: use {' or '.join(BACKENDS[weights])}")
    module = import_backend(backend)
    for device in devices:
        kind = torch.device(getattr(device, "name", device)).type
        if kind not in BACKEND_DEVICES[backend] or (kind == "cuda" and not torch.cuda.is_available()):
            raise ValueError(f"{backend} {module.__version__} cannot run {weights} weights on {device} "
                             f"(it runs on {', '.join(BACKEND_DEVICES[backend])}"
                             f"{'' if torch.cuda.is_available() else '; this torch has no CUDA'})")
        card = card_capability(str(getattr(device, "name", device)))
        if backend == "bitsandbytes" and weights == "int8" and card and card[1] < INT8_CAPABILITY:
            raise ValueError(f"{device} is a {card[0]} (compute capability {card[1][0]}.{card[1][1]}): bitsandbytes' "
                             f"LLM.int8 needs 7.5 or more; use weights='nf4', or int8 through torchao")
    return backend


def quantize_linear(linear: torch.nn.Module, weights: str, backend: str, dtype: torch.dtype) -> torch.nn.Module:
    """A linear layer with its weight quantized on the device where it is: the same module (torchao) or a
    bitsandbytes layer to put in its place; other modules come back unchanged (notebook 08)."""
    if type(linear) is not torch.nn.Linear:
        return linear
    if backend == "torchao":
        with quiet_backends():
            from torchao.quantization import Int8WeightOnlyConfig, quantize_

            quantize_(linear, Int8WeightOnlyConfig(set_inductor_config=False))  # fp32 scale, int8 zero point per row
        return linear
    return bnb_linear(import_backend("bitsandbytes"), linear, weights, dtype)


def quantize_block(block: torch.nn.Module, weights: str, backend: str, dtype: torch.dtype) -> torch.nn.Module:
    """Quantize a loaded block's linear layers in place, one at a time, on their devices; biases and layer norms stay
    in `dtype` (notebook 08)."""
    from .place import replace_module

    names = [name for name, module in block.named_modules() if type(module) is torch.nn.Linear]  # names: no refs
    for name in names:
        replace_module(block, name, quantize_linear(block.get_submodule(name), weights, backend, dtype))
    return block


CHUNK_ELEMENTS = 1 << 22  # weights quantized per slice of rows: bitsandbytes' temporaries are float32 copies


def row_chunks(weight: torch.Tensor):
    """(first row, slice of whole rows) of `weight`, each slice about CHUNK_ELEMENTS elements (notebook 08)."""
    rows = max(1, CHUNK_ELEMENTS // weight.shape[1])
    for start in range(0, weight.shape[0], rows):
        yield start, weight[start:start + rows]


def bnb_quantize(bnb, weight: torch.Tensor, weights: str):
    """bitsandbytes' own quantizer, run on slices of rows written into the whole result: int8 scales are per row and
    nf4 blocks of 64 never cross a row (GPT-J's widths are multiples of 64), so it equals quantizing the whole
    weight at once, with float32 temporaries of one slice instead of several of the whole weight (notebook 08)."""
    functional, (n, m) = bnb.functional, weight.shape
    if weights == "int8":  # as Int8Params: float16 rows scaled to [-127, 127] by their absmax
        codes = torch.empty((n, m), dtype=torch.int8, device=weight.device)
        scales = torch.empty(n, dtype=torch.float32, device=weight.device)
        for start, rows in row_chunks(weight):
            codes[start:start + len(rows)], scales[start:start + len(rows)] = \
                functional.int8_vectorwise_quant(rows.to(torch.float16))[:2]
        return bnb.nn.Int8Params(codes, requires_grad=False, has_fp16_weights=False, CB=codes, SCB=scales)
    chunks = list(row_chunks(weight)) if m % 64 == 0 else [(0, weight)]  # else a block would cross rows
    packed = torch.empty((n * m + 1) // 2, 1, dtype=torch.uint8, device=weight.device)
    absmax = torch.empty(-(-n * m // 64), dtype=torch.float32, device=weight.device)
    for start, rows in chunks:
        part, state = functional.quantize_4bit(rows.contiguous(), blocksize=64, compress_statistics=False,
                                               quant_type="nf4", quant_storage=torch.uint8)
        packed[start * m // 2:start * m // 2 + len(part)] = part
        absmax[start * m // 64:start * m // 64 + len(state.absmax)] = state.absmax
    state.absmax, state.shape = absmax, weight.shape
    return bnb.nn.Params4bit(packed, requires_grad=False, quant_state=state, blocksize=64, compress_statistics=False,
                             quant_type="nf4", quant_storage=torch.uint8, bnb_quantized=True)


def bnb_linear(bnb, linear: torch.nn.Linear, weights: str, dtype: torch.dtype) -> torch.nn.Module:
    """A bitsandbytes layer holding `linear`'s weights in int8 (a float32 scale per row) or nf4 (blocks of 64, no
    double quantization), quantized on the weights' device, a slice of rows at a time (notebook 08)."""
    from accelerate import init_empty_weights

    bias = linear.bias is not None
    with init_empty_weights():  # no second full-precision copy
        if weights == "int8":
            layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=bias, has_fp16_weights=False,
                                        threshold=6.0)
        else:
            layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=bias, compute_dtype=dtype,
                                      quant_type="nf4", compress_statistics=False)
    with quiet_backends(), torch.no_grad():
        layer.weight = bnb_quantize(bnb, linear.weight.data, weights)
    if weights == "nf4":
        layer.weight.module = layer
        layer.quant_state = layer.weight.quant_state
    if bias:
        layer.bias = linear.bias
    return layer


@dataclass
class BlockQuantizer:
    """The `transform` that `place_stages` and `load_stage` call on each module of the blocks once loaded: a linear
    layer is quantized there, before the next tensor is read, so a stage never holds more than one linear layer
    (let alone a block) in full precision; picklable for stage processes (notebook 08)."""

    weights: str
    backend: str
    dtype: str

    def __call__(self, name: str, module: torch.nn.Module) -> torch.nn.Module:
        quantized = quantize_linear(module, self.weights, self.backend, as_dtype(self.dtype))
        if type(module) is torch.nn.Linear:
            trim_host_heap()  # the full-precision weight and the temporaries, freed between kept tensors
        return quantized


def place_quantized(model_path, plan: Plan, backend: str | None = None, **options):
    """`place_stages` with the plan's weight format: every linear layer of the blocks quantized on its device right
    after loading, by torchao or bitsandbytes, checked before anything loads; `options` as place_stages' (notebook
    08)."""
    return place_stages(model_path, plan, transform=quantizer_for(plan, backend), **options)


def quantizer_for(plan: Plan, backend: str | None = None) -> BlockQuantizer | None:
    """The `transform` that quantizes a plan's blocks as they load, its backend checked against the plan's devices
    before anything loads (None for unquantized weights): for place_stages, and for `run_pipeline(...,
    options=LaunchOptions(transform=...))`, whose stage processes each quantize their own blocks (notebook 08)."""
    if not plan.quantized:
        return None
    backend = check_backend(plan.weights, backend, [s.device for s in plan.devices])
    return BlockQuantizer(plan.weights, backend, plan.dtype)


def has_weight_files(model_path) -> bool:
    """Whether a model folder holds weight files that `from_pretrained` can read (`gpt-j-6b-random` has a seed
    instead) (notebook 08)."""
    path = resolve_model(str(model_path)) if isinstance(model_path, (str, Path)) else None
    return path is not None and not (path / RANDOM_WEIGHTS).exists()


def pretrained_config(plan: Plan, backend: str | None = None):
    """transformers' quantization config for a plan's weight format (None for unquantized weights), refused where
    stock transformers cannot place it (notebook 08)."""
    if not plan.quantized:
        return None
    kinds = {torch.device(s.device).type for s in plan.devices}
    backend = backend or BACKENDS.get(plan.weights, ("",))[0]
    if backend == "bitsandbytes" and "cpu" in kinds and len(kinds) > 1:  # refused before asking the devices
        raise ValueError("bitsandbytes through from_pretrained refuses a device_map with some stages on the CPU "
                         "and others on GPUs unless llm_int8_enable_fp32_cpu_offload=True, which leaves the CPU "
                         "stages unquantized: put every stage on a GPU, or use gh.place_quantized")
    if backend == "torchao" and kinds != {"cuda"}:
        raise ValueError("transformers' torchao path moves \"cpu\" entries of a device_map to CUDA to quantize them: "
                         "on these devices use gh.place_quantized (this project's placement), or backend=bitsandbytes")
    backend = check_backend(plan.weights, backend, [s.device for s in plan.devices])
    if backend == "bitsandbytes":
        from transformers import BitsAndBytesConfig

        if plan.weights == "int8":
            return BitsAndBytesConfig(load_in_8bit=True)
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=False,
                                  bnb_4bit_compute_dtype=as_dtype(plan.dtype))
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import TorchAoConfig

    return TorchAoConfig(Int8WeightOnlyConfig(set_inductor_config=False))


def load_pretrained(model_path, plan: Plan, backend: str | None = None):
    """Stock transformers: `from_pretrained(path, device_map=plan.device_map(), quantization_config=...)`, the one
    line people already know, driven by the plan (notebook 08)."""
    GPTJForCausalLM = gptj_modeling().GPTJForCausalLM

    if not has_weight_files(model_path):
        raise ValueError(f"{model_path} has no weight files (random weights made from a seed): from_pretrained needs "
                         "a downloaded model; use gh.place_quantized")
    quantization = pretrained_config(plan, backend)
    options = {"quantization_config": quantization} if quantization is not None else {}
    with quiet_backends(), quiet_progress():
        model = GPTJForCausalLM.from_pretrained(str(resolve_model(str(model_path))), device_map=plan.device_map(),
                                                dtype=as_dtype(plan.dtype), **options)
    model.plan = plan  # as a placed model carries it: measure_memory and the timings count it stage by stage
    return model.eval()


def quantized_bytes(model) -> dict[str, int]:
    """Bytes the blocks' linear weights, and everything else, really hold (`stored_bytes`), against what
    `numel x element_size` would say (notebook 08)."""
    from .place import stored_bytes

    out = {"blocks": 0, "other": 0, "naive": 0}
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        out["blocks" if ".h." in f".{name}" else "other"] += stored_bytes(tensor)
        out["naive"] += tensor.numel() * tensor.element_size()
    return out
