"""Notebook 00: what GPT-J-6B is made of. Its configuration and the tiny default's (tiny.py builds that model),
sizes counted on the meta device, the one dtype rule, and the seeded weights of `gpt-j-6b-random`.
"""

from __future__ import annotations

import functools
import json
import zlib
from pathlib import Path

import torch

from .quiet import quiet_imports

GPTJ_6B_REPO = "EleutherAI/gpt-j-6b"
GPTJ_6B_REVISION = "float16"
EOS_TOKEN = "<|endoftext|>"
REPO_DIR = Path(__file__).resolve().parent.parent  # the repository (or site-packages, when pip-installed)
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
GPTJ_6B_RANDOM = "gpt-j-6b-random"  # GPT-J-6B's shapes with seeded random weights: rehearse a setup before downloading


def gptj_modeling():
    """transformers' GPT-J modeling module (GPTJForCausalLM, GPTJModel). Its first import also imports torchao where
    that is installed, which logs lines about kernels this torch cannot load: they are silenced (notebook 00)."""
    with quiet_imports():
        import transformers.models.gptj.modeling_gptj as modeling
    return modeling


def gptj_6b_config():
    """The real GPT-J-6B configuration, known offline (notebook 00)."""
    from transformers import GPTJConfig

    return GPTJConfig(
        vocab_size=50400, n_positions=2048, n_embd=4096, n_layer=28, n_head=16,
        rotary_dim=64, n_inner=None, activation_function="gelu_new",
        layer_norm_epsilon=1e-5, bos_token_id=50256, eos_token_id=50256,
        tie_word_embeddings=False,
    )


def tiny_config():
    """The embedded default: GPT-J's shape, shrunk; every size divisible by 8 (notebook 00)."""
    from transformers import GPTJConfig

    return GPTJConfig(
        vocab_size=1024, n_positions=512, n_embd=128, n_layer=8, n_head=8,
        rotary_dim=8, n_inner=None, activation_function="gelu_new",
        layer_norm_epsilon=1e-5, bos_token_id=0, eos_token_id=0,
        tie_word_embeddings=False,
    )


def meta_model(config):
    """Instantiate a model on the meta device: shapes and counts without memory (notebook 00)."""
    from accelerate import init_empty_weights
    GPTJForCausalLM = gptj_modeling().GPTJForCausalLM

    with init_empty_weights():
        return GPTJForCausalLM(config)


def module_sizes(config, dtype: torch.dtype = torch.float16) -> dict[str, int]:
    """Parameter bytes of the embedding, one block, and the head (ln_f + lm_head), and their total (notebook 00)."""
    counts = count_parameters(config.to_json_string())
    sizes = {k: v * dtype.itemsize for k, v in counts.items() if k != "params"}
    sizes["total"] = sizes["embedding"] + config.n_layer * sizes["block"] + sizes["head"]
    return {**sizes, "params": counts["params"]}


@functools.lru_cache(maxsize=32)
def count_parameters(config_json: str) -> dict[str, int]:
    """Parameters of the embedding, one block, the head and the whole model, counted on the meta device."""
    from transformers import GPTJConfig

    model = meta_model(GPTJConfig(**json.loads(config_json)))

    def count(*modules) -> int:
        return sum(p.numel() for m in modules for p in m.parameters())

    return {"embedding": count(model.transformer.wte), "block": count(model.transformer.h[0]),
            "head": count(model.transformer.ln_f, model.lm_head), "params": count(model)}


def mini_config():
    """A "mini" GPT-J for benchmarks: the tiny default widened to 512 (8 heads of 64), same tokenizer (notebook 04)."""
    config = tiny_config()
    config.n_embd, config.rotary_dim = 512, 16
    return config


def sliced_config(config, blocks: int):
    """A copy of `config` with only its first `blocks` blocks: a slice of the model (notebooks 00, 02, 04, 05)."""
    import copy

    sliced = copy.deepcopy(config)
    sliced.n_layer = blocks
    return sliced


def reference_blocks(config, n_devices: int = 1) -> int | None:
    """How many blocks a check or reference run may use beside the model: all of them (None) while a second copy is
    small (under 1 GiB in float16); at GPT-J-6B's size the first blocks, at least one per device, with the embedding
    and head, since a second 12 GB copy would not fit (notebooks 00, 02, 04, 05)."""
    if module_sizes(config, torch.float16)["total"] < 2**30:
        return None
    return min(config.n_layer, max(2, n_devices))


def is_gptj_6b(config) -> bool:
    """Whether a config has GPT-J-6B's shape (the real weights or `gpt-j-6b-random`)."""
    real = gptj_6b_config()
    return all(getattr(config, k, None) == getattr(real, k) for k in ("n_layer", "n_embd", "n_head", "vocab_size"))


def eos_token_id(config) -> int:
    """The end-of-text token id of a config (a list in some configs: the first) (notebooks 05, 07)."""
    return config.eos_token_id if isinstance(config.eos_token_id, int) else config.eos_token_id[0]


def default_dtype(config, devices=None) -> torch.dtype:
    """The one rule for a missing dtype: GPT-J-6B float16 on GPUs and bfloat16 on the CPU; else the dtype the
    folder's config names; else float32 (the tiny default). `devices`: names or `Device`s (notebooks 00 to 05)."""
    if is_gptj_6b(config):
        names = [getattr(d, "name", d) for d in (devices or ["cpu"])]
        return torch.float16 if all(str(n).startswith("cuda") for n in names) else torch.bfloat16
    saved = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return as_dtype(saved) if saved else torch.float32


def as_dtype(dtype) -> torch.dtype:
    """A torch dtype from itself, "float16", "torch.float16" or None (None stays None)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype) -> str:
    """"float16" for torch.float16 (and for "float16")."""
    return str(as_dtype(dtype)).removeprefix("torch.")


RANDOM_WEIGHTS = "random_weights.json"  # in a model folder instead of weights: {"seed": S}, weights made from seeds


def seeded_tensor(name: str, shape, config, seed: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """One parameter initialised as GPT-J's `_init_weights` does, from its own seed: the same on any process."""
    if name.endswith("bias") or (".ln_" in name and name.endswith("weight")):
        fill = 1.0 if name.endswith("weight") else 0.0
        return torch.full(shape, fill, dtype=dtype, device=device)
    generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return torch.empty(shape, dtype=dtype, device=device).normal_(0.0, config.initializer_range, generator=generator)
