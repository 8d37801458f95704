"""What the benchmarks share: the tiny tokenizer beside a random model, a saved random GPT-J, and timing one
`generate` split into its prefill (up to the first logits) and its decode steps."""
import shutil
import time
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


def time_generate(model, ids: torch.Tensor, new_tokens: int, mask: torch.Tensor | None = None) -> dict:
    """Greedy `generate`: its output, the prefill seconds (start to the first logits), the mean seconds per decode
    step after it, and the whole call's seconds."""
    from transformers import LogitsProcessor, LogitsProcessorList

    marks: list[float] = []

    class Mark(LogitsProcessor):  # called once per step, right after that step's logits
        def __call__(self, input_ids, scores):
            marks.append(time.perf_counter())
            return scores

    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids) if mask is None else mask, do_sample=False,
                             max_new_tokens=new_tokens, pad_token_id=model.config.eos_token_id,
                             return_dict_in_generate=True, logits_processor=LogitsProcessorList([Mark()]))
    end = time.perf_counter()
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)  # older transformers
    return {"sequences": out.sequences, "cache": cache, "prefill": marks[0] - start,
            "decode": (end - marks[0]) / max(1, len(marks) - 1), "seconds": end - start}
