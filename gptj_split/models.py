"""Notebook 00: what GPT-J-6B is made of. Configurations, the tiny default, sizes counted on the meta device, dtypes.

The tiny default is a GPT-J of the same architecture, small enough for any laptop: trained weights ship with the
package (`tiny-gptj/`), and where they are missing the same model is built from a seed.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import tempfile
import zlib
from pathlib import Path

import torch

GPTJ_6B_REPO = "EleutherAI/gpt-j-6b"
GPTJ_6B_REVISION = "float16"
TINY_SEED = 0
TINY_VERSION = 1  # bump when the tiny recipe changes, so old caches are not reused
EOS_TOKEN = "<|endoftext|>"
REPO_DIR = Path(__file__).resolve().parent.parent  # the repository (or site-packages, when pip-installed)
TINY_TRAINED = Path(__file__).resolve().parent / "tiny-gptj"  # package data: `make tiny-model` trains it
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
GPTJ_6B_RANDOM = "gpt-j-6b-random"  # GPT-J-6B's shapes with seeded random weights: rehearse a setup before downloading


NOISY_LOGGERS = ("torchao", "bitsandbytes", "torch.utils._pytree")  # import notes on CPU-only torch; bnb per matmul


@contextlib.contextmanager
def quiet_imports():
    """Silence the log lines optional libraries write while being imported or run (torchao's notes about CUDA kernels
    a CPU-only torch cannot load, torch's deprecation notes about them, bitsandbytes' "MatMul8bitLt: inputs will be
    cast..." on every CPU matmul), then restore the levels found (notebooks 00, 08)."""
    import logging

    loggers = [logging.getLogger(name) for name in NOISY_LOGGERS]
    old = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, old):
            logger.setLevel(level)


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


def training_text() -> str:
    """English text that ships with Python: the standard library's help topics (notebook 00)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def train_tiny_tokenizer(out_dir: str | Path, vocab_size: int = 1024) -> Path:
    """Train a byte-level BPE (GPT-2's recipe, smaller) and save it where `AutoTokenizer` finds it (notebook 00)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2TokenizerFast

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    text = training_text()
    chunks = [text[i:i + 4096] for i in range(0, len(text), 4096)]
    bpe.train_from_iterator(chunks, vocab_size=vocab_size, min_frequency=2,
                            special_tokens=[EOS_TOKEN], show_progress=False)
    bpe.save_model(str(out_dir))
    vocab = (out_dir / "vocab.json").read_text(encoding="utf-8")
    merges = (out_dir / "merges.txt").read_text(encoding="utf-8")

    pairs = [tuple(line.split(" ")) for line in merges.splitlines()[1:] if line]
    tok = GPT2TokenizerFast(vocab=json.loads(vocab), merges=pairs,
                            unk_token=EOS_TOKEN, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN)
    tok.model_max_length = tiny_config().n_positions
    tok.save_pretrained(str(out_dir))
    return out_dir


@contextlib.contextmanager
def quiet_progress():
    """Silence transformers' progress bars inside the block, then restore the setting found (local, quick work)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def random_tiny_model(seed: int = TINY_SEED):
    """The tiny GPT-J with weights drawn from `seed`, leaving the caller's random generator as it was (notebook 00)."""
    GPTJForCausalLM = gptj_modeling().GPTJForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return GPTJForCausalLM(tiny_config()).eval()


def write_tiny_model(out_dir: str | Path, seed: int = TINY_SEED) -> Path:
    """Write the tiny random GPT-J and its tokenizer to `out_dir`, as safetensors (notebook 00)."""
    out_dir = Path(out_dir)
    with quiet_progress():
        random_tiny_model(seed).save_pretrained(str(out_dir))
    train_tiny_tokenizer(out_dir)
    return out_dir


def cache_dir() -> Path:
    """Where built models live: $GPTJ_HELPERS_CACHE, else ~/.cache/gptj_helpers (notebook 00)."""
    return Path(os.environ.get("GPTJ_HELPERS_CACHE", Path.home() / ".cache" / "gptj_helpers"))


def build_atomically(final: Path, build) -> Path:
    """Run `build(tmp_dir)` once and rename the result to `final`; concurrent builders wait and share it (notebook
    00)."""
    if final.exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with build_lock(final.parent / f".{final.name}.lock"):
        if final.exists():  # another builder finished while we waited
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
        try:
            build(tmp)
            try:
                os.rename(tmp, final)
            except OSError:  # a builder that did not take the lock (no fcntl) got there first
                if not final.exists():
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return final


@contextlib.contextmanager
def build_lock(path: Path):
    """An exclusive lock on `path` across threads and processes (flock; without fcntl, on Windows, no lock)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
            Path(path).unlink(missing_ok=True)


def tiny_folder() -> Path:
    """The folder "tiny" names: the trained weights shipped in `TINY_TRAINED`, else the seeded random model
    (notebook 00)."""
    return TINY_TRAINED if (TINY_TRAINED / "model.safetensors").exists() else tiny_model_path()


def tiny_model_path(seed: int = TINY_SEED) -> Path:
    """The tiny random GPT-J's folder, built on first use; "tiny" without the repository's trained one (notebook 00)."""
    final = cache_dir() / f"tiny-v{TINY_VERSION}-seed{seed}"
    return build_atomically(final, lambda tmp: write_tiny_model(tmp, seed=seed))


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
