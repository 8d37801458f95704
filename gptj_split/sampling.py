"""Notebook 03, part 1: what to generate. `Sampling` holds greedy, temperature, top-p, top-k and seed, checked once;
it becomes `generate`'s keyword arguments (the naive split) or transformers' own logits warpers (the pipeline).
Prompts are checked and left-padded here too, the same way for every path.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

SAMPLING_DEFAULTS = {"temperature": 1.0, "top_p": 0.7, "top_k": 0}  # the seed's settings; top_k=0: no top-k filter


@dataclass(frozen=True)
class Sampling:
    """How to pick each next token: greedy, or sampled with temperature, top-p and top-k; `seed` makes it
    reproducible. Building one checks it (notebook 03)."""

    greedy: bool = False
    temperature: float = SAMPLING_DEFAULTS["temperature"]
    top_p: float = SAMPLING_DEFAULTS["top_p"]
    top_k: int = SAMPLING_DEFAULTS["top_k"]
    seed: int | None = None

    def __post_init__(self) -> None:
        if not self.greedy and not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature}: sampling needs a temperature above 0 "
                             "(1.0 is the model's own distribution); for the single most likely text use greedy")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p}: it must be in (0, 1]; 1.0 keeps every token, the seed used 0.7")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k={self.top_k}: it must be 0 (no top-k filter, as in the seed) or a positive count")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed={self.seed!r}: give an integer, or None for an unseeded run")

    def generate_kwargs(self) -> dict:
        """The keyword arguments of transformers' `generate` (the seed is applied by the caller)."""
        if self.greedy:
            return {"do_sample": False}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k}

    def warpers(self):
        """transformers' own temperature, top-k and top-p warpers, in `generate`'s order (notebook 05)."""
        from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        warpers = LogitsProcessorList()
        if not self.greedy and self.temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(self.temperature))
        if not self.greedy and self.top_k:
            warpers.append(TopKLogitsWarper(top_k=self.top_k, min_tokens_to_keep=1))
        if not self.greedy and self.top_p < 1.0:
            warpers.append(TopPLogitsWarper(top_p=self.top_p, min_tokens_to_keep=1))
        return warpers

    def pick(self, logits: torch.Tensor, warpers, generator: torch.Generator | None) -> torch.Tensor:
        """Greedy argmax, or softmax + multinomial with `generator`, as `generate` does (notebook 05)."""
        if self.greedy:
            return torch.argmax(logits, dim=-1)
        probs = torch.nn.functional.softmax(warpers(None, logits), dim=-1)
        return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)

    def settings(self) -> dict:
        """What a RunRecord notes: greedy and seed, plus the knobs that matter when sampling."""
        knobs = asdict(self)
        return {k: v for k, v in knobs.items() if not self.greedy or k in ("greedy", "seed")}


def as_sampling(sampling: Sampling | None = None, **knobs) -> Sampling:
    """A `Sampling` from one, or from generate_text's keywords (greedy, temperature, top_p, top_k, seed)."""
    if sampling is not None and knobs:
        raise ValueError(f"give either sampling=Sampling(...) or the keywords {sorted(knobs)}, not both")
    return sampling if sampling is not None else Sampling(**knobs)


def check_max_new_tokens(max_new_tokens: int) -> None:
    """At least one new token (notebook 03)."""
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r}: generate at least 1 new token")


def check_sampling(max_new_tokens: int, greedy: bool = False, temperature: float = 1.0, top_p: float = 0.7,
                   top_k: int = 0) -> None:
    """Refuse bad generation settings, saying what to do (notebook 03)."""
    check_max_new_tokens(max_new_tokens)
    Sampling(greedy, temperature, top_p, top_k)


def check_prompts(config, tokenizer, prompts: str | list[str], max_new_tokens: int) -> list[list[int]]:
    """Each prompt's token ids, refusing empty prompts and any that would outgrow the context (notebook 03)."""
    check_max_new_tokens(max_new_tokens)
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("no prompts given: pass a string or a non-empty list of strings")
    ids = []
    for i, prompt in enumerate(prompts):
        tokens = tokenizer(prompt)["input_ids"] if isinstance(prompt, str) else []
        if not tokens:
            raise ValueError(f"prompt {i} ({prompt!r}) is empty: every prompt needs at least one token")
        if len(tokens) + max_new_tokens > config.n_positions:
            raise ValueError(f"prompt {i} has {len(tokens)} tokens; with max_new_tokens={max_new_tokens} that is "
                             f"{len(tokens) + max_new_tokens}, more than the model's context of {config.n_positions} "
                             f"tokens: shorten the prompt or ask for at most {config.n_positions - len(tokens)} new "
                             "tokens")
        ids.append(tokens)
    return ids


def check_generation(config, tokenizer, prompts: str | list[str], max_new_tokens: int, greedy: bool = False,
                     temperature: float = 1.0, top_p: float = 0.7, top_k: int = 0) -> list[list[int]]:
    """Refuse bad settings before any work, saying what to do; returns each prompt's token ids (notebook 03)."""
    check_sampling(max_new_tokens, greedy, temperature, top_p, top_k)
    return check_prompts(config, tokenizer, prompts, max_new_tokens)


def pad_left(ids: list[list[int]], pad_id: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token ids into one batch with its attention mask, so every prompt ends where generation starts;
    the same as the tokenizer's own `padding_side="left"`, for ids already checked (notebook 03)."""
    width = max(len(x) for x in ids)
    input_ids = torch.tensor([[pad_id] * (width - len(x)) + x for x in ids], device=device)
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device)
    return input_ids, mask


def position_ids(mask: torch.Tensor, new: int) -> torch.Tensor:
    """generate's position ids under left padding for the last `new` positions: the count of real tokens before each,
    padding at 0; every stage and rank derives them from the mask alone (notebooks 05, 07)."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)[:, -new:]
