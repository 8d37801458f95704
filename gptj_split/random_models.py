"""Notebooks 00, 01, 05 and 07: GPT-J models with seeded random weights, built in memory or written to a folder.

Folders with a seed instead of weights (`gpt-j-6b-random`: GPT-J-6B's shapes, built tensor by tensor where it is
loaded), the tiny random model in either layout, and the wider random models that notebooks 05 and 07 time.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .models import (GPTJ_6B_RANDOM, GPTJ_6B_REPO, RANDOM_WEIGHTS, default_dtype, dtype_name, gptj_6b_config,
                     gptj_modeling, module_sizes, seeded_tensor, tiny_config)
from .tiny import TINY_SEED, random_tiny_model, tiny_folder, write_tiny_model
from .files import build_atomically, cache_dir
from .devices import available_memory, format_size
from .convert import write_jax_checkpoint


def write_random_model(config, out_dir: str | Path, seed: int = 0) -> Path:
    """A model folder with a config and a seed instead of weights: every process rebuilds any tensor of it
    (notebooks 00, 04)."""
    out_dir = Path(out_dir)
    config.save_pretrained(str(out_dir))
    (out_dir / RANDOM_WEIGHTS).write_text(json.dumps({"seed": seed}))
    return out_dir


def random_gptj_folder(seed: int = TINY_SEED) -> Path:
    """The folder of "gpt-j-6b-random": GPT-J-6B's config, a seed instead of 12 GB of weights, and a tokenizer:
    GPT-J's own where the local hub cache has it (no network), else the tiny one (notebook 00)."""
    def build(tmp: Path) -> None:
        write_random_model(gptj_6b_config(), tmp, seed)
        save_tokenizer(tmp)

    return build_atomically(cache_dir() / f"{GPTJ_6B_RANDOM}-seed{seed}", build)


def random_gptj_files(seed: int = TINY_SEED, dtype: torch.dtype = torch.bfloat16) -> Path:
    """"gpt-j-6b-random" written out once as safetensors under the cache folder (11.3 GiB in bfloat16), so stock
    `from_pretrained` and every loader read it as they read the real weights (the rehearsal; notebooks 06, 08)."""
    seeded = random_gptj_folder(seed)
    return build_atomically(cache_dir() / f"{seeded.name}-{dtype_name(dtype)}-safetensors",
                            lambda tmp: write_seeded_files(seeded, tmp, dtype))


def write_seeded_files(seeded: str | Path, out_dir: str | Path, dtype: torch.dtype) -> Path:
    """A seed folder's weights as safetensors, one file per block, holding one file's tensors at a time: the same
    tensors `build_seeded_model` makes (the rehearsal)."""
    from safetensors.torch import save_file
    from transformers import GPTJConfig
    GPTJForCausalLM = gptj_modeling().GPTJForCausalLM

    seeded, out_dir = Path(seeded), Path(out_dir)
    config = GPTJConfig.from_pretrained(str(seeded))
    seed = json.loads((seeded / RANDOM_WEIGHTS).read_text())["seed"]
    with torch.device("meta"):
        shapes = {n: p.shape for n, p in GPTJForCausalLM(config).named_parameters()}
    groups: dict[str, list[str]] = {}
    for name in shapes:
        groups.setdefault(f"model-{name.split('.')[2] if '.h.' in name else 'rest'}.safetensors", []).append(name)
    out_dir.mkdir(parents=True, exist_ok=True)
    for file, names in groups.items():
        tensors = {n: seeded_tensor(n, shapes[n], config, seed, dtype, torch.device("cpu")) for n in names}
        save_file(tensors, str(out_dir / file), metadata={"format": "pt"})
        del tensors
    weight_map = {name: file for file, names in groups.items() for name in names}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config.dtype = dtype
    config.save_pretrained(str(out_dir))
    save_tokenizer(out_dir)
    return out_dir


def save_tokenizer(folder: Path) -> None:
    """GPT-J's tokenizer from the local hub cache (never the network), else the tiny default's, saved to `folder`."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(GPTJ_6B_REPO, local_files_only=True)
    except OSError:  # not cached here: the ids then mostly decode to nothing, so checks compare ids
        tokenizer = AutoTokenizer.from_pretrained(str(tiny_folder()))
    tokenizer.save_pretrained(str(folder))


def build_seeded_model(path: Path, config, dtype: torch.dtype | None, device: str):
    """A model folder with a seed instead of weights, built tensor by tensor straight onto `device`, after checking
    that the device has room for it (notebook 00)."""
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    GPTJForCausalLM = gptj_modeling().GPTJForCausalLM

    dtype = dtype or default_dtype(config, [device])
    check_room(module_sizes(config, dtype)["total"], device, f"{path.name} in {str(dtype).removeprefix('torch.')}")
    seed = json.loads((path / RANDOM_WEIGHTS).read_text())["seed"]
    with init_empty_weights():
        model = GPTJForCausalLM(config)
    for name, param in list(model.named_parameters()):
        value = seeded_tensor(name, param.shape, config, seed, dtype, torch.device(device))
        set_module_tensor_to_device(model, name, device, value=value, dtype=dtype)
    return model.to(device).eval()  # the buffers (rotary table) follow


def check_room(nbytes: int, device: str, what: str) -> None:
    """Refuse, before anything is built, to put `nbytes` on a device that has less free (notebook 00)."""
    free = available_memory(str(device))
    if nbytes > free:
        raise MemoryError(f"{what} needs {format_size(nbytes)} on {device}, which has {format_size(free)} free: "
                          "split it over several devices (notebook 02), or free some memory first")


def make_tiny_gptj(out_dir: str | Path, seed: int = TINY_SEED, format: str = "hf") -> Path:
    """Write the tiny random GPT-J: format="hf" safetensors and tokenizer, "jax-slim" the JAX layout (notebooks 00,
    01)."""
    if format == "jax-slim":
        return write_jax_checkpoint(random_tiny_model(seed).state_dict(), tiny_config(), out_dir)
    if format != "hf":
        raise ValueError(f"unknown format {format!r}: use hf or jax-slim")
    return write_tiny_model(out_dir, seed)


def mini_gptj_folder(out: str | Path, layers: int = 8, width: int = 512, vocab: int = 50400, seed: int = 0) -> Path:
    """A seeded random GPT-J of `layers` blocks, `width` wide, with GPT-J's vocabulary and an untied head: big
    enough that compute, not Python, dominates a step (notebook 05). Its eos is an id it practically never picks."""
    from transformers import GPTJConfig

    eos = vocab - 1
    config = GPTJConfig(vocab_size=vocab, n_positions=1024, n_embd=width, n_layer=layers, n_head=width // 64,
                        rotary_dim=16, bos_token_id=eos, eos_token_id=eos, tie_word_embeddings=False)
    return write_random_model(config, out, seed)


def bench_config(layers: int = 4, width: int = 4096, vocab: int = 50400):
    """GPT-J's block shape (heads of 256, rotary 64) at any width and depth, with an end token that random weights
    practically never pick, so every run makes all its tokens (notebook 07)."""
    from transformers import GPTJConfig

    return GPTJConfig(vocab_size=vocab, n_positions=2048, n_embd=width, n_layer=layers, n_head=max(1, width // 256),
                      rotary_dim=min(64, width // max(1, width // 256)), bos_token_id=vocab - 1,
                      eos_token_id=vocab - 1, tie_word_embeddings=False)


def write_bench_model(folder: str | Path, config, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> Path:
    """Random weights saved as safetensors, one file per block: each tensor cut from one seeded pool of normal values
    (fast to make; every row different), norms 1, biases 0 (notebook 07)."""
    from safetensors.torch import save_file
    GPTJForCausalLM = gptj_modeling().GPTJForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pool = torch.randn(1_000_003, generator=torch.Generator().manual_seed(seed)) * config.initializer_range
    pool = pool.to(dtype)
    with torch.device("meta"):
        shapes = {n: p.shape for n, p in GPTJForCausalLM(config).named_parameters()}
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for i, (name, shape) in enumerate(shapes.items()):
        if name.endswith("bias") or ".ln_" in name:
            value = seeded_tensor(name, shape, config, seed, dtype, torch.device("cpu"))
        else:  # the pool, rotated per tensor, repeated: copies at memory speed
            value, rolled = torch.empty(shape.numel(), dtype=dtype), pool.roll(-(i * 7919) % len(pool))
            for start in range(0, len(value), len(pool)):
                piece = value[start:start + len(pool)]
                piece.copy_(rolled[:len(piece)])
            value = value.view(shape)
        part = name.split(".")[2] if ".h." in name else "rest"
        groups.setdefault(f"model-{part}.safetensors", {})[name] = value
    weight_map = {}
    for file, tensors in groups.items():
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        weight_map |= {name: file for name in tensors}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config.dtype = dtype  # the saved dtype: every path computes in it by default
    config.save_pretrained(str(folder))
    save_tokenizer(folder)
    return folder
