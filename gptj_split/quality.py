"""Notebook 08, part 2: what a weight format costs. Quality on the trained tiny model's held-out text against float32
(loss, top-1 agreement, KL divergence, greedy tokens before the first divergence), and decode time per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .hardware import describe_hardware
from .devices import parse_devices
from .hub import load_tokenizer
from .plan import plan_split
from .records import compare_outputs
from .compare import time_generate
from .quantize import place_quantized, quiet_backends

HELD_OUT = 0.10  # the last 10% of the help topics in sorted order: assets/train_tiny.py's held-out text
WINDOW = 128  # tokens per teacher-forced window, as train_tiny.py scores the tiny model
FORMAT_ROWS = {  # row label -> (compute dtype, weight format, backend)
    "float32": ("float32", None, None),
    "bfloat16": ("bfloat16", None, None),
    "int8 (torchao)": ("float32", "int8", "torchao"),
    "int8 (bitsandbytes)": ("float32", "int8", "bitsandbytes"),
    "nf4 (bitsandbytes)": ("float32", "nf4", "bitsandbytes"),
}
GREEDY_PROMPTS = ("The list", "A dictionary is", "import os", "Hello, world", "The with statement", "class Foo:")
PUBLISHED_QUALITY = (  # quality from the papers, on other models of GPT-J's scale (not GPT-J-6B): not measured here
    "LLM.int8() (Dettmers et al. 2022, arXiv:2208.07339), Table 1: C4 validation perplexity of dense models trained "
    "by the authors; at 6.7B parameters 13.30 in 32-bit float and 13.24 with LLM.int8() (bitsandbytes' int8), "
    "while plain int8 absmax rose to 14.59.",
    "QLoRA (Dettmers et al. 2023, arXiv:2305.14314), Table 2: mean Pile Common Crawl perplexity over OPT, BLOOM, "
    "LLaMA and Pythia models of 125M to 13B: Int4 34.34, FP4 31.07 (E2M1) and 29.48 (E3M0), NF4 with double "
    "quantization 27.41.",
)


def held_out_ids(tokenizer) -> torch.Tensor:
    """The tiny model's held-out text as token ids: the last 10% of the help topics, each ended by end-of-text, as
    `make tiny-model` scores it (notebook 08)."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    ids: list[int] = []
    for name in names[len(names) - round(HELD_OUT * len(names)):]:
        ids += tokenizer(topics[name], verbose=False).input_ids + [tokenizer.eos_token_id]
    return torch.tensor(ids)


def load_format(model_name: str, label: str, devices: str = "cpu"):
    """The model placed on `devices` in one of FORMAT_ROWS, its blocks quantized as they load (notebook 08)."""
    dtype, weights, backend = FORMAT_ROWS[label]
    plan = plan_split(model_name, devices, dtype=dtype, weights=weights, model_name=model_name)
    return place_quantized(model_name, plan, backend=backend)


@torch.inference_mode()
def window_logits(model, ids: torch.Tensor, windows: int | None = None, batch: int = 32) -> torch.Tensor:
    """float32 logits of the first `windows` (None: all) non-overlapping windows of WINDOW tokens, `batch` windows
    per forward: (windows, WINDOW, vocab) (notebook 08)."""
    n = (len(ids) - 1) // WINDOW if windows is None else windows
    x = ids[:n * WINDOW].view(n, WINDOW)
    with quiet_backends():
        return torch.cat([model(input_ids=x[i:i + batch]).logits.float() for i in range(0, n, batch)])


@torch.inference_mode()
def greedy_ids(model, tokenizer, prompts=GREEDY_PROMPTS, new_tokens: int = 32) -> list[list[int]]:
    """Greedy continuations of the prompts, generated as one left-padded batch (notebook 08)."""
    from .sampling import pad_left

    rows = [tokenizer(p)["input_ids"] for p in prompts]
    ids, mask = pad_left(rows, tokenizer.eos_token_id, model.device)
    with quiet_backends():
        seq = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                             pad_token_id=tokenizer.eos_token_id)
    return seq[:, ids.shape[1]:].tolist()


def score_logits(ref: torch.Tensor, test: torch.Tensor, ids: torch.Tensor) -> dict:
    """A weight format's quality on held-out text, teacher-forced: the loss of `test`, its top-1 agreement with
    `ref`, and the mean KL(ref || test) per position (notebook 08; two greedy runs are compared by
    records.compare_outputs)."""
    n, window, vocab = test.shape
    targets = torch.stack([ids[i * window + 1:(i + 1) * window + 1] for i in range(n)])
    loss = torch.nn.functional.cross_entropy(test.reshape(-1, vocab), targets.reshape(-1)).item()
    ref_log, test_log = ref.log_softmax(-1), test.log_softmax(-1)
    kl = (ref_log.exp() * (ref_log - test_log)).sum(-1).mean().item()
    agree = (ref.argmax(-1) == test.argmax(-1)).float().mean().item()
    return {"positions": n * window, "loss": loss, "top1_agreement": agree, "kl": kl}


def measure_quality(model_name: str = "tiny", labels=tuple(FORMAT_ROWS), windows: int | None = None,
                    new_tokens: int = 32) -> list[dict]:
    """Each weight format of the model against float32 on the held-out text: loss, top-1 agreement, KL, and greedy
    tokens before the first divergence, summed over GREEDY_PROMPTS (notebook 08)."""
    tokenizer = load_tokenizer(model_name)
    ids = held_out_ids(tokenizer)
    rows, ref, ref_greedy = [], None, None
    for label in ("float32", *[x for x in labels if x != "float32"]):
        model = load_format(model_name, label)
        logits, greedy = window_logits(model, ids, windows), greedy_ids(model, tokenizer, new_tokens=new_tokens)
        del model
        if ref is None:
            ref, ref_greedy = logits, greedy
        row = {"format": label, **score_logits(ref, logits, ids),
               "greedy_same": sum(compare_outputs(torch.tensor([a]), None, torch.tensor([b]), None)["same_tokens"]
                                  for a, b in zip(ref_greedy, greedy)),
               "greedy_total": sum(len(a) for a in ref_greedy)}
        if label in labels:
            rows.append(row)
    return rows


def format_quality(rows: list[dict]) -> str:
    """The quality table as text, one format a line (notebook 08)."""
    lines = [f"{'format':20} {'held-out loss':>13} {'top-1 agreement':>15} {'KL vs float32':>13} "
             f"{'greedy tokens before divergence':>32}"]
    lines += [f"{r['format']:20} {r['loss']:13.4f} {r['top1_agreement']:15.4f} {r['kl']:13.2e} "
              f"{r['greedy_same']:>20} of {r['greedy_total']:<8}" for r in rows]
    return "\n".join(lines)


@dataclass
class DecodeTime:
    """Milliseconds per decode token of one weight format, and the kernel behind its matmuls (notebook 08)."""

    label: str
    kernel: str
    ms_per_token: float


KERNELS = {  # what computes a batch-1 matmul on the CPU, per format (the question: which reads fewer bytes?)
    "float32": "dense float32 matmul",
    "bfloat16": "dense bfloat16 matmul",
    "int8 (torchao)": "dequantize the whole weight to float, then matmul (no torch.compile)",
    "int8 (bitsandbytes)": "bitsandbytes int8 matmul (LLM.int8(): inputs quantized per row, outliers in float)",
    "nf4 (bitsandbytes)": "dequantize nf4 blocks to the compute dtype, then matmul",
    "int4 (torchao prototype)": "packed int4 kernel with bfloat16 activations (torchao.prototype)",
}


@torch.inference_mode()
def time_decode(model, new_tokens: int = 8, prompt_tokens: int = 8, reps: int = 2) -> float:
    """Best of `reps` mean seconds per decode step at batch 1 (prefill excluded) (notebook 08)."""
    ids = torch.arange(1, prompt_tokens + 1).unsqueeze(0).to(next(model.parameters()).device)
    best = float("inf")
    for _ in range(reps):
        with quiet_backends():
            best = min(best, time_generate(model, ids, new_tokens + 1)["decode_step"])  # the one clock
    return best


def format_decode(times: list[DecodeTime]) -> str:
    """Decode times with their ratios to float32 and bfloat16 measured in the same run (notebook 08)."""
    base = {t.label: t.ms_per_token for t in times}
    lines = [f"{'format':26} {'ms/token':>9} {'vs float32':>10} {'vs bfloat16':>11}  kernel"]
    for t in times:
        ratios = [f"{t.ms_per_token / base[k]:.2f}x" if k in base else "n/a" for k in ("float32", "bfloat16")]
        lines.append(f"{t.label:26} {t.ms_per_token:9.1f} {ratios[0]:>10} {ratios[1]:>11}  {t.kernel}")
    return "\n".join(lines)


MEMORY_SETUPS = {  # notebook 08's table: name -> (devices, the machine described), budgets before the reserve
    "Colab, 1 x T4 16 GB": ("cuda:0=14GiB", "T4"),
    "Kaggle, 2 x T4 16 GB": ("cuda:0=14GiB,cuda:1=14GiB", "2 x T4"),
    "laptop GPU, 8 GB": ("cuda:0=7.5GiB", "8GB"),
    "laptop GPU, 4 GB": ("cuda:0=3.7GiB", "4GB"),
    "4 x 4 GB": ("4x3.7GiB", "4 x 4GB"),
}


def memory_table(model_name: str = "gpt-j-6b", formats=("float16", "int8", "nf4"), reserve: str = "0.5GiB",
                 prompt_tokens: int = 512, max_new_tokens: int = 256) -> str:
    """GPT-J-6B planned in each weight format on each of MEMORY_SETUPS: the fullest device, or "does not fit"
    (notebook 08)."""
    rows = [f"| setup | {' | '.join(formats)} |", "|---|" + "---|" * len(formats)]
    for name, (spec, machine) in MEMORY_SETUPS.items():
        devices, cells = parse_devices(spec, describe_hardware(machine)), []
        for fmt in formats:
            try:
                plan = plan_split(model_name, devices, dtype="float16", weights=fmt, reserve=reserve,
                                  prompt_tokens=prompt_tokens, max_new_tokens=max_new_tokens)
            except MemoryError:
                cells.append("does not fit")
                continue
            fullest = max(plan.devices, key=lambda s: s.fill)
            cells.append(f"{fullest.total_bytes / 2**30:.2f} of {fullest.budget_bytes / 2**30:.1f} GiB "
                         f"({fullest.fill:.0%})")
        rows.append(f"| {name} | {' | '.join(cells)} |")
    return "\n".join(rows)
