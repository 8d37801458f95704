"""What the benchmarks share: the tiny tokenizer beside a random model, and a saved random GPT-J. (Timing one
`generate` into its prefill and decode steps is the package's own `gptj_split.compare.time_generate`, on the one
clock.)"""
import shutil
from pathlib import Path

import torch

import gptj_helpers as gh
from gptj_split.quiet import quiet_progress

TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def copy_tiny_tokenizer(folder: Path) -> None:
    """Put the tiny default's tokenizer beside a model (random weights: the ids decode to noise, which is fine)."""
    tiny = gh.resolve_model("tiny")
    for name in TOKENIZER_FILES:
        if (tiny / name).exists():
            shutil.copy(tiny / name, Path(folder) / name)


def save_random_model(config, out: Path, seed: int = 0) -> Path:
    """A GPT-J of `config` with weights drawn from `seed`, saved as safetensors with the tiny tokenizer."""
    from transformers import GPTJForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPTJForCausalLM(config).eval()
    with quiet_progress():
        model.save_pretrained(str(out))
    copy_tiny_tokenizer(out)
    return Path(out)
