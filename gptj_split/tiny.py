"""Notebook 00: the tiny default, a GPT-J of the same architecture small enough for any laptop: trained weights ship
with the package (`tiny-gptj/`); where they are missing the same model is built from a seed, with a byte-level BPE
tokenizer trained on the help texts that ship with Python.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .models import EOS_TOKEN, gptj_modeling, tiny_config
from .files import build_atomically, cache_dir
from .quiet import quiet_progress

TINY_SEED = 0
TINY_VERSION = 1  # bump when the tiny recipe changes, so old caches are not reused
TINY_TRAINED = Path(__file__).resolve().parent / "tiny-gptj"  # package data: `make tiny-model` trains it


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


def tiny_folder() -> Path:
    """The folder "tiny" names: the trained weights shipped in `TINY_TRAINED`, else the seeded random model
    (notebook 00)."""
    return TINY_TRAINED if (TINY_TRAINED / "model.safetensors").exists() else tiny_model_path()


def tiny_model_path(seed: int = TINY_SEED) -> Path:
    """The tiny random GPT-J's folder, built on first use; "tiny" without the repository's trained one (notebook 00)."""
    final = cache_dir() / f"tiny-v{TINY_VERSION}-seed{seed}"
    return build_atomically(final, lambda tmp: write_tiny_model(tmp, seed=seed))
