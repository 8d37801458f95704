"""Train the tiny GPT-J briefly on Python's help texts, so the offline default speaks (`make tiny-model`).

Usage:  python assets/train_tiny.py gptj_split/tiny-gptj            # train (minutes on a CPU), save, evaluate
        python assets/train_tiny.py gptj_split/tiny-gptj --evaluate # only evaluate the saved model

The text is `training_text()`'s source, the standard library's pydoc help topics; the last 10% of the
topics (in sorted order) are held out from the weights. The tokenizer is `train_tiny_tokenizer`'s, the very one
the random tiny model uses (its merges were counted on all topics), so both models' losses are in the same units.
Not used by the notebooks: they load the result.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import gptj_helpers as gh  # noqa: E402
from gptj_split.tiny import tiny_model_path, train_tiny_tokenizer
from gptj_split.quiet import quiet_progress

# Settings: one seed, a fixed number of steps (not a time budget), so a rerun gives the same weights.
SEED = 0
HELD_OUT = 0.10          # fraction of the help topics, taken from the end of the sorted list
STEPS = 1000
BATCH = 8
SEQ_LEN = 128
LEARNING_RATE = 3e-3
WARMUP = 50
WEIGHT_DECAY = 0.1
DROPOUT = 0.0
THREADS = 1              # one thread: the same sums on every run, and faster than two on busy shared cores
# How the samples are drawn for the word test
SAMPLES, WORDS, TOP_P, TEMPERATURE = 20, 50, 0.9, 0.8
WORD = re.compile(r"[A-Za-z]+(?:'[a-z]+)?")


def split_topics() -> tuple[list[str], list[str]]:
    """Names of the training topics and the held-out topics (the last 10% in sorted order)."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    cut = len(names) - round(HELD_OUT * len(names))
    return names[:cut], names[cut:]


def encode_topics(tokenizer, names: list[str]) -> torch.Tensor:
    """Token ids of the topics, each followed by the end-of-text token, as one long 1-D tensor."""
    from pydoc_data.topics import topics

    ids: list[int] = []
    for name in names:
        ids += tokenizer(topics[name], verbose=False).input_ids + [tokenizer.eos_token_id]
    return torch.tensor(ids)


def text_vocabulary(names: list[str]) -> set[str]:
    """Every word (letters only, lower case) of the given topics."""
    from pydoc_data.topics import topics

    return {w.lower() for name in names for w in WORD.findall(topics[name])}


def learning_rate(step: int) -> float:
    """Linear warm-up, then cosine decay to a tenth."""
    if step < WARMUP:
        return LEARNING_RATE * (step + 1) / WARMUP
    progress = (step - WARMUP) / max(1, STEPS - WARMUP)
    return LEARNING_RATE * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def held_out_loss(model, ids: torch.Tensor, seq_len: int = SEQ_LEN, max_tokens: int | None = None) -> float:
    """Mean next-token cross-entropy (nats) over non-overlapping windows of the held-out ids."""
    if max_tokens is not None:
        ids = ids[:max_tokens]
    n = (len(ids) - 1) // seq_len
    if n == 0:
        raise ValueError(f"held-out text has {len(ids)} tokens, fewer than one window of {seq_len + 1}")
    was_training = model.training
    model.eval()
    total = 0.0
    for i in range(n):
        window = ids[i * seq_len: i * seq_len + seq_len + 1].unsqueeze(0)
        logits = model(input_ids=window[:, :-1]).logits[0]
        total += torch.nn.functional.cross_entropy(logits, window[0, 1:]).item()
    model.train(was_training)
    return total / n


def sample_texts(model, tokenizer, samples: int = SAMPLES, words: int = WORDS) -> list[str]:
    """`samples` texts seeded 0..samples-1, each cut to its first `words` words (top-p 0.9, temperature 0.8)."""
    from transformers import StoppingCriteriaList

    def enough_words(input_ids, scores, **kwargs) -> torch.Tensor:  # one word past, so the last one is whole
        return torch.tensor([len(WORD.findall(tokenizer.decode(input_ids[0, 1:]))) > words])

    start = torch.tensor([[tokenizer.eos_token_id]])
    texts = []
    for seed in range(samples):
        torch.manual_seed(seed)
        out = model.generate(start, attention_mask=torch.ones_like(start), do_sample=True, top_p=TOP_P,
                             temperature=TEMPERATURE, top_k=0, max_new_tokens=6 * words,
                             stopping_criteria=StoppingCriteriaList([enough_words]),
                             pad_token_id=tokenizer.eos_token_id, eos_token_id=None)
        text = tokenizer.decode(out[0, 1:])
        matches = list(WORD.finditer(text))
        texts.append(text[:matches[words - 1].end()] if len(matches) >= words else text)
    return texts


def word_fraction(texts: list[str], vocabulary: set[str], words: int = WORDS) -> float:
    """Fraction of the words (the first `words` of each text) that occur in the vocabulary."""
    found = [w.lower() for text in texts for w in WORD.findall(text)[:words]]
    return sum(w in vocabulary for w in found) / max(1, len(found))


def train(out_dir: Path) -> float:
    """Train from the random tiny model's starting point and save weights + tokenizer into out_dir; seconds spent."""
    from transformers import AutoTokenizer, GPTJForCausalLM

    train_tiny_tokenizer(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(out_dir))
    train_names, held_names = split_topics()
    train_ids, held_ids = encode_topics(tokenizer, train_names), encode_topics(tokenizer, held_names)
    print(f"training text: {len(train_names)} topics, {len(train_ids):,} tokens; "
          f"held out: {len(held_names)} topics ({', '.join(held_names)}), {len(held_ids):,} tokens")
    config = gh.tiny_config()
    config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = DROPOUT
    torch.manual_seed(SEED)
    model = GPTJForCausalLM(config).train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=LEARNING_RATE, betas=(0.9, 0.95))
    windows = torch.Generator().manual_seed(SEED)
    start = time.perf_counter()
    for step in range(STEPS):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step)
        starts = torch.randint(0, len(train_ids) - SEQ_LEN - 1, (BATCH,), generator=windows)
        batch = torch.stack([train_ids[s:s + SEQ_LEN + 1] for s in starts.tolist()])
        logits = model(input_ids=batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == STEPS - 1:
            print(f"step {step:5d}  train loss {loss.item():.3f}  held-out loss "
                  f"{held_out_loss(model, held_ids, max_tokens=4096):.3f}  {time.perf_counter() - start:6.0f} s",
                  flush=True)
    seconds = time.perf_counter() - start
    model.config.resid_pdrop = model.config.embd_pdrop = model.config.attn_pdrop = 0.0
    with quiet_progress():
        model.eval().save_pretrained(str(out_dir))
    return seconds


def evaluate(path: Path) -> dict:
    """Held-out loss and perplexity, and the word test, of the model at `path` and of the random tiny model."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    train_names, held_names = split_topics()
    held_ids = encode_topics(tokenizer, held_names)
    vocabulary = text_vocabulary(train_names)
    results = {}
    for label, folder in (("trained", path), ("random", tiny_model_path())):
        model = gh.load_model(str(folder))
        loss = held_out_loss(model, held_ids)
        texts = sample_texts(model, tokenizer)
        results[label] = {"held_out_loss": loss, "perplexity": math.exp(loss),
                          "word_fraction": word_fraction(texts, vocabulary), "first_sample": texts[0]}
    print(f"held-out text: {len(held_names)} topics, {len(held_ids):,} tokens, windows of {SEQ_LEN}; "
          f"uniform guess: loss {math.log(len(tokenizer)):.3f}")
    print(f"words: first {WORDS} of {SAMPLES} samples seeded 0..{SAMPLES - 1} from <|endoftext|>, "
          f"top_p {TOP_P}, temperature {TEMPERATURE}; vocabulary: {len(vocabulary):,} words of the training topics")
    print(f"{'model':8} {'held-out loss':>14} {'perplexity':>11} {'words in vocabulary':>20}")
    for label, r in results.items():
        print(f"{label:8} {r['held_out_loss']:14.3f} {r['perplexity']:11.1f} {r['word_fraction']:20.3f}")
    print(f"loss ratio trained/random: {results['trained']['held_out_loss'] / results['random']['held_out_loss']:.3f}")
    for label, r in results.items():
        print(f"\n{label}, sample 0:\n{r['first_sample']}")
    return results


def main(argv: list[str] | None = None) -> int:
    """Train into OUT_DIR (replacing it when complete), then evaluate; or only evaluate with --evaluate."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--evaluate", action="store_true", help="only evaluate the model already in OUT_DIR")
    args = parser.parse_args(argv)
    torch.set_num_threads(THREADS)
    out = args.out_dir
    if args.evaluate:
        if not (out / "model.safetensors").exists():
            print(f"error: {out} has no model.safetensors; train it first: python {sys.argv[0]} {out}", file=sys.stderr)
            return 2
        evaluate(out)
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        seconds = train(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        old = out.with_name(f".{out.name}.old")
        if out.exists():
            os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    size = (out / "model.safetensors").stat().st_size
    print(f"trained {STEPS} steps of {BATCH} x {SEQ_LEN} tokens in {seconds:.0f} s "
          f"({torch.get_num_threads()} threads); weights {gh.format_size(size)} in {out}")
    evaluate(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
