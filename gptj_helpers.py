"""Helpers for the notebook series "GPT-J-6B when no single GPU is big enough".

Sections follow the notebooks: 00 models and devices, 01 download and convert,
02 plan and place, 03 generate and time, 04 measure and plot, 05 pipeline,
06 prompt widget, and the command line (`python -m gptj_helpers --help`).
Nothing runs at import; transformers and friends are imported inside functions.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

# --------------------------------------------------------------------------
# 00 · models and devices
# --------------------------------------------------------------------------

GPTJ_6B_REPO = "EleutherAI/gpt-j-6b"
GPTJ_6B_REVISION = "float16"
TINY_SEED = 0
TINY_VERSION = 1  # bump when the tiny recipe changes, so old caches are not reused
EOS_TOKEN = "<|endoftext|>"
REPO_DIR = Path(__file__).resolve().parent


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
    """Silence transformers' progress bars inside the block (local, quick work)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.enable_progress_bar()


def make_tiny_gptj(out_dir: str | Path, seed: int = TINY_SEED) -> Path:
    """Write the tiny random GPT-J (safetensors + config.json) and its tokenizer to `out_dir` (notebook 00)."""
    from transformers import GPTJForCausalLM

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    model = GPTJForCausalLM(tiny_config()).eval()
    with quiet_progress():
        model.save_pretrained(str(out_dir))
    train_tiny_tokenizer(out_dir)
    return out_dir


def cache_dir() -> Path:
    """Where built models live: $GPTJ_HELPERS_CACHE, else ~/.cache/gptj_helpers (notebook 00)."""
    return Path(os.environ.get("GPTJ_HELPERS_CACHE", Path.home() / ".cache" / "gptj_helpers"))


def build_atomically(final: Path, build) -> Path:
    """Run `build(tmp_dir)` and rename the result to `final`; concurrent builders all get one folder (notebook 00)."""
    if final.exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def tiny_model_path(seed: int = TINY_SEED) -> Path:
    """The tiny default's folder, built on first use (notebook 00)."""
    final = cache_dir() / f"tiny-v{TINY_VERSION}-seed{seed}"
    return build_atomically(final, lambda tmp: make_tiny_gptj(tmp, seed=seed))


def hub_id(name: str) -> tuple[str, str | None]:
    """Map a model name to (hub repo id, revision); "gpt-j-6b" is the float16 branch of EleutherAI's repo."""
    if name.lower() in ("gpt-j-6b", "gptj-6b", GPTJ_6B_REPO.lower()):
        return GPTJ_6B_REPO, GPTJ_6B_REVISION
    return name, None


def resolve_model(name: str = "tiny") -> Path:
    """Turn "tiny", a local folder, "gpt-j-6b" or a hub id into a local folder with config and weights (notebook 00)."""
    if name == "tiny":
        return tiny_model_path()
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path} has no config.json: is it a converted model folder? "
                                    "See notebook 01 to download or convert one.")
        return path
    if name.count("/") > 1 or name.startswith((".", "/", "~")):
        raise FileNotFoundError(f"model folder {path} does not exist")
    repo_id, revision = hub_id(name)
    return download_model(repo_id, revision=revision)


def load_config(name: str = "tiny"):
    """The model's GPTJConfig; GPT-J-6B's is known offline, so it can be planned without weights (notebook 00)."""
    from transformers import AutoConfig

    if hub_id(name)[0] == GPTJ_6B_REPO:
        return gptj_6b_config()
    return AutoConfig.from_pretrained(str(resolve_model(name)))


def load_tokenizer(name: str = "tiny"):
    """The model's tokenizer, via the same transformers class that loads GPT-J's (notebook 00)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(resolve_model(name)))


def load_model(name: str = "tiny", dtype: torch.dtype | None = None, device: str = "cpu"):
    """Load a whole model onto one device, in eval mode (notebook 00; notebook 02 splits it instead)."""
    from transformers import GPTJForCausalLM

    path = resolve_model(name)
    with quiet_progress():  # local loads are quick; keeps notebook outputs clean
        model = GPTJForCausalLM.from_pretrained(str(path), dtype=dtype or "auto")
    return model.to(device).eval()


def meta_model(config):
    """Instantiate a model on the meta device: shapes and counts without memory (notebook 00)."""
    from accelerate import init_empty_weights
    from transformers import GPTJForCausalLM

    with init_empty_weights():
        return GPTJForCausalLM(config)


def module_sizes(config, dtype: torch.dtype = torch.float16) -> dict[str, int]:
    """Parameter bytes of the embedding, one block, and the head (ln_f + lm_head), and their total (notebook 00)."""
    counts = count_parameters(config.to_json_string())
    itemsize = torch.empty((), dtype=dtype).element_size()
    sizes = {k: v * itemsize for k, v in counts.items() if k != "params"}
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


UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """Parse "10GiB", "512 MB", "1.5gb" or a plain byte count into bytes (notebook 00)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in UNITS:
        raise ValueError(f"cannot read the size {text!r}: write a number and a unit, like 10GiB, 5GB or 512MiB")
    return int(float(match.group(1)) * UNITS[match.group(2).lower()])


def format_size(nbytes: float) -> str:
    """Bytes as a short human string in binary units (notebook 00)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(nbytes) < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.2f} {unit}"
        nbytes /= 1024
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class Device:
    """A place for a stage: a torch device name plus a memory budget in bytes. Several may share one device."""

    name: str
    budget_bytes: int

    @property
    def torch(self) -> torch.device:
        """The torch.device this budget lives on."""
        return torch.device(self.name)

    def __str__(self) -> str:
        return f"{self.name}={format_size(self.budget_bytes).replace(' ', '')}"


def available_memory(name: str) -> int:
    """Free memory of a device right now: host RAM for the CPU, free GPU memory for CUDA (notebook 00)."""
    if name.startswith("cuda"):
        free, _total = torch.cuda.mem_get_info(torch.device(name))
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)


def list_devices() -> list[Device]:
    """What this machine offers: each CUDA GPU with its free memory, else the CPU (notebook 00)."""
    if torch.cuda.is_available():
        names = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    else:
        names = ["cpu"]
    return [Device(n, available_memory(n)) for n in names]


def check_device_name(name: str, part: str, check: bool = True) -> str:
    """Validate a device name like "cpu" or "cuda:1" (against this machine's GPUs when `check`)."""
    try:
        dev = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"device spec part {part!r}: {name!r} is not a device name (use cpu, cuda or cuda:N)") from err
    if dev.type == "cuda" and not check:
        return f"cuda:{dev.index or 0}"
    if dev.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0:
            raise ValueError(f"device spec part {part!r}: this machine has no CUDA GPU; use cpu or a size like 3x5GiB")
        index = 0 if dev.index is None else dev.index
        if index >= count:
            raise ValueError(f"device spec part {part!r}: cuda:{index} does not exist, this machine has {count} GPU(s)")
        return f"cuda:{index}"
    if dev.type != "cpu":
        raise ValueError(f"device spec part {part!r}: only cpu and cuda devices are supported, not {dev.type}")
    return "cpu"


def parse_devices(spec: str, check: bool = True) -> list[Device]:
    """Parse a device spec: "3x5GiB", "cuda:0=10GiB,cuda:1=10GiB", "cpu,cpu,cpu", "2xcpu=4GiB" (notebook 00).

    With `check=False` (planning only) CUDA devices need not exist here, but then need a budget.
    """
    if not spec or not spec.strip():
        raise ValueError("empty device spec: try 'cpu,cpu' or '2x5GiB' or 'cuda:0=10GiB,cuda:1=10GiB'")
    devices: list[Device] = []
    for part in spec.split(","):
        part = part.strip()
        count_match = re.fullmatch(r"(\d+)\s*[x×]\s*(.+)", part)
        count, body = (int(count_match.group(1)), count_match.group(2)) if count_match else (1, part)
        if count < 1:
            raise ValueError(f"device spec part {part!r}: the count must be at least 1")
        name, _, size = body.partition("=")
        name = name.strip()
        if re.match(r"^\d", name):  # a bare size: lay the slices on the GPUs in order, else on the CPU
            if size:
                raise ValueError(f"device spec part {part!r}: write either NxSIZE or DEVICE=SIZE")
            budget = parse_size(name)
            gpus = torch.cuda.device_count()
            names = [f"cuda:{i * gpus // count}" if gpus else "cpu" for i in range(count)]
            devices += [Device(n, budget) for n in names]
            continue
        name = check_device_name(name, part, check)
        if not size and not check and name.startswith("cuda"):
            raise ValueError(f"device spec part {part!r}: give a budget, like {name}=10GiB")
        budget = parse_size(size) if size else available_memory(name)
        devices += [Device(name, budget) for _ in range(count)]
    return devices


def describe_environment() -> str:
    """Library versions and this machine's devices, for the top of every notebook (notebook 00)."""
    import platform

    import transformers

    lines = [f"python {platform.python_version()} | torch {torch.__version__} | transformers {transformers.__version__}"]
    lines += [f"device {d.name}: {format_size(d.budget_bytes)} free" for d in list_devices()]
    return "\n".join(lines)


# --------------------------------------------------------------------------
# 01 · download and convert
# --------------------------------------------------------------------------

def download_model(repo_id: str, revision: str | None = None, local_dir: str | Path | None = None,
                   endpoint: str | None = None, cache_dir: str | Path | None = None) -> Path:
    """Download a model's config, tokenizer and weights from the hub with progress bars; resumable (notebook 01)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    patterns = ["*.json", "*.safetensors", "*.txt", "*.model"]
    kwargs = dict(repo_id=repo_id, revision=revision, allow_patterns=patterns, endpoint=endpoint,
                  cache_dir=cache_dir, local_dir=local_dir)
    try:  # already there? then no network at all
        return Path(snapshot_download(**kwargs, local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    check_online(endpoint)
    return Path(snapshot_download(**kwargs))


def check_online(endpoint: str | None = None, timeout: float = 3.0) -> None:
    """Fail fast, with what to do, when the hub cannot be reached (notebook 01)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(endpoint or constants.ENDPOINT)
    why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else None
    if why is None:
        try:
            socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                     timeout=timeout).close()
            return
        except OSError as err:
            why = f"cannot reach {url.hostname}: {err}"
    raise ConnectionError(f"{why}. Downloading weights needs the internet: run this where it is available, "
                          "or pass the path of a local model folder, or use model='tiny' (the offline default).")


# --------------------------------------------------------------------------
# 02 · plan and place
# --------------------------------------------------------------------------

@dataclass
class StagePlan:
    """One device's share of the model: contiguous modules and the bytes they need (notebook 02)."""

    device: str
    embedding: bool
    blocks: tuple[int, int]  # half-open range of transformer blocks
    head: bool
    param_bytes: int
    kv_cache_bytes: int
    reserve_bytes: int
    total_bytes: int
    budget_bytes: int
    cost: float = 0.0

    @property
    def fill(self) -> float:
        """Load over budget: 1.0 is a full device."""
        return self.total_bytes / self.budget_bytes


@dataclass
class Plan:
    """The planner's answer, read by placement, the pipeline and the plots; `--json` prints exactly this (notebook 02)."""

    model: str
    dtype: str
    total_params: int
    devices: list[StagePlan]

    def to_json(self) -> str:
        """The plan as JSON text."""
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        """Read a plan written by `to_json`."""
        data = json.loads(text)
        stages = [StagePlan(**{**s, "blocks": tuple(s["blocks"])}) for s in data.pop("devices")]
        return cls(**data, devices=stages)

    def stage_of_module(self, name: str) -> int:
        """Which stage holds a parameter or module named like `transformer.h.3.attn.q_proj.weight`."""
        if name.startswith("transformer.wte"):
            return 0
        if name.startswith(("transformer.ln_f", "lm_head")):
            return len(self.devices) - 1
        block = int(name.split(".")[2])
        return next(i for i, s in enumerate(self.devices) if s.blocks[0] <= block < s.blocks[1])


def kv_cache_bytes_per_layer(config, dtype: torch.dtype, tokens: int, batch_size: int = 1) -> int:
    """Keys and values of one layer for `tokens` positions of `batch_size` sequences (notebook 02)."""
    return 2 * config.n_embd * torch.empty((), dtype=dtype).element_size() * tokens * batch_size


def as_config(model_or_config):
    """Accept a model name, a model or a config; return the config."""
    if isinstance(model_or_config, (str, Path)):
        return load_config(str(model_or_config))
    return getattr(model_or_config, "config", model_or_config)


def plan_split(model_or_config, devices: str | list[Device], dtype: torch.dtype = torch.float16,
               reserve: int | str = 0, prompt_tokens: int = 0, max_new_tokens: int = 0, batch_size: int = 1,
               cost: list[float] | None = None, model_name: str | None = None) -> Plan:
    """Split embedding, blocks and head into contiguous stages, minimising the fullest device (notebook 02).

    With `cost` (one number per module: embedding, each block, head) it minimises the slowest stage
    instead, still within every budget. An optimal min-max partition by dynamic programming.
    """
    config = as_config(model_or_config)
    devices = parse_devices(devices, check=False) if isinstance(devices, str) else list(devices)
    reserve = parse_size(reserve) if isinstance(reserve, str) else int(reserve)
    sizes = module_sizes(config, dtype)
    kv = kv_cache_bytes_per_layer(config, dtype, prompt_tokens + max_new_tokens, batch_size)
    n_layer, n = config.n_layer, len(devices)
    if cost is not None and len(cost) != n_layer + 2:
        raise ValueError(f"cost needs {n_layer + 2} numbers (embedding, {n_layer} blocks, head), got {len(cost)}")

    def stage(s: int, a: int, b: int) -> StagePlan:
        params = (b - a) * sizes["block"] + (sizes["embedding"] if s == 0 else 0) + (sizes["head"] if s == n - 1 else 0)
        kv_bytes = (b - a) * kv
        c = 0.0 if cost is None else sum(cost[1 + a:1 + b]) + (cost[0] if s == 0 else 0) + (cost[-1] if s == n - 1 else 0)
        return StagePlan(devices[s].name, s == 0, (a, b), s == n - 1, params, kv_bytes, reserve,
                         params + kv_bytes + reserve, devices[s].budget_bytes, c)

    def score(st: StagePlan) -> float:
        if cost is None:
            return st.fill
        return st.cost if st.fill <= 1 else math.inf

    # best[s][j]: the smallest possible worst score of stages 0..s-1 holding blocks [0, j)
    best = [[math.inf] * (n_layer + 1) for _ in range(n + 1)]
    cut = [[0] * (n_layer + 1) for _ in range(n + 1)]
    best[0][0] = 0.0
    for s in range(1, n + 1):
        for j in range(n_layer + 1):
            for i in range(j + 1):
                value = max(best[s - 1][i], score(stage(s - 1, i, j)))
                if value < best[s][j]:
                    best[s][j], cut[s][j] = value, i
    bounds, j = [], n_layer
    for s in range(n, 0, -1):
        bounds.append((cut[s][j], j))
        j = cut[s][j]
    stages = [stage(s, a, b) for s, (a, b) in enumerate(reversed(bounds))]
    plan = Plan(model_name or getattr(config, "name_or_path", "") or "gptj", str(dtype).replace("torch.", ""),
                sizes["params"], stages)
    if best[n][n_layer] == math.inf or max(s.fill for s in stages) > 1:
        raise MemoryError(explain_infeasible(config, devices, dtype, reserve, prompt_tokens, max_new_tokens, batch_size))
    return plan


def explain_infeasible(config, devices: list[Device], dtype: torch.dtype, reserve: int, prompt_tokens: int,
                       max_new_tokens: int, batch_size: int) -> str:
    """Say what is needed, what the devices give, and the smallest change that would fit (notebook 02)."""
    sizes = module_sizes(config, dtype)
    tokens = prompt_tokens + max_new_tokens
    kv_total = kv_cache_bytes_per_layer(config, dtype, tokens, batch_size) * config.n_layer
    need = sizes["total"] + kv_total + reserve * len(devices)
    give = sum(d.budget_bytes for d in devices)
    msg = (f"the model does not fit: it needs {format_size(need)} (weights {format_size(sizes['total'])} in "
           f"{str(dtype).replace('torch.', '')}, KV cache {format_size(kv_total)}"
           + (f", reserve {format_size(reserve)} x {len(devices)}" if reserve else "")
           + f"), your {len(devices)} device(s) give {format_size(give)}")
    if any(sizes["block"] + reserve > d.budget_bytes for d in devices):
        msg += f" and one block alone needs {format_size(sizes['block'] + reserve)} with the reserve"
    ideas = []

    def fits(devs, dt=dtype, res=reserve, pt=prompt_tokens, mnt=max_new_tokens) -> bool:
        try:
            plan_split(config, devs, dtype=dt, reserve=res, prompt_tokens=pt, max_new_tokens=mnt, batch_size=batch_size)
            return True
        except MemoryError:
            return False

    biggest = max(devices, key=lambda d: d.budget_bytes)
    for extra in range(1, config.n_layer + 2):
        if fits(devices + [biggest] * extra):
            ideas.append(f"add {extra} device(s) of {format_size(biggest.budget_bytes)}")
            break
    if torch.empty((), dtype=dtype).element_size() > 2 and fits(devices, dt=torch.float16):
        ideas.append("use dtype=float16")
    if tokens and fits(devices, pt=0, mnt=0):
        low, high = 0, tokens  # bisect the longest context that fits
        while high - low > 1:
            mid = (low + high) // 2
            low, high = (mid, high) if fits(devices, pt=0, mnt=mid) else (low, mid)
        ideas.append(f"use a shorter context (at most {low} tokens in all)")
    if reserve and fits(devices, res=0):
        ideas.append("lower the per-device reserve")
    return msg + (": " + ", or ".join(ideas) if ideas else "") + "."


def format_plan(plan: Plan) -> str:
    """A plan as a small text table, one device a line (notebook 02)."""
    lines = [f"{plan.model} in {plan.dtype}: {plan.total_params:,} parameters on {len(plan.devices)} device(s)"]
    for i, s in enumerate(plan.devices):
        parts = (["embedding"] if s.embedding else []) + [f"blocks {s.blocks[0]}-{s.blocks[1] - 1}"
                                                          if s.blocks[1] > s.blocks[0] else "no blocks"]
        parts += ["head"] if s.head else []
        lines.append(f"  {i}: {s.device:7} {', '.join(parts):28} params {format_size(s.param_bytes):>11} "
                     f"+ KV {format_size(s.kv_cache_bytes):>10} + reserve {format_size(s.reserve_bytes):>9} "
                     f"= {format_size(s.total_bytes):>11} of {format_size(s.budget_bytes):>10} ({s.fill:.0%})")
    return "\n".join(lines)


def accelerate_plan(config, devices: list[Device], dtype: torch.dtype = torch.float16, balanced: bool = True) -> list[int]:
    """Parameter bytes per device as accelerate would place them (`device_map="auto"` when balanced, else a greedy fill)."""
    from accelerate.utils import get_balanced_memory, infer_auto_device_map
    from transformers.utils import logging as hf_logging

    model = meta_model(config)
    max_memory = {i: d.budget_bytes for i, d in enumerate(devices)}
    quiet = hf_logging.get_logger("accelerate")
    old = quiet.level
    import logging

    logging.getLogger("accelerate").setLevel(logging.ERROR)
    try:
        if balanced:
            max_memory = get_balanced_memory(model, max_memory=max_memory, no_split_module_classes=["GPTJBlock"],
                                             dtype=dtype)
        device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=["GPTJBlock"],
                                           dtype=dtype)
    finally:
        logging.getLogger("accelerate").setLevel(old)
    itemsize = torch.empty((), dtype=dtype).element_size()
    loads = [0] * len(devices)
    for name, p in model.named_parameters():
        owner = max((k for k in device_map if k == "" or name == k or name.startswith(k + ".")), key=len)
        target = device_map[owner]
        if isinstance(target, int):
            loads[target] += p.numel() * itemsize
    return loads


def stage_parameter_names(model_path: str | Path) -> dict[str, str]:
    """Map every tensor name of a saved model to the safetensors file that holds it (notebook 02)."""
    path = Path(model_path)
    index = path / "model.safetensors.index.json"
    if index.exists():
        return json.loads(index.read_text())["weight_map"]
    from safetensors import safe_open

    with safe_open(path / "model.safetensors", framework="pt") as f:
        return {k: "model.safetensors" for k in f.keys()}


def move_to(value, device: torch.device, dtype: torch.dtype | None):
    """Move tensors (also inside tuples, lists and dicts) to a device, casting floating ones to `dtype`."""
    if isinstance(value, torch.Tensor):
        if dtype is not None and value.is_floating_point():
            return value.to(device=device, dtype=dtype)
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(move_to(v, device, dtype) for v in value)
    if isinstance(value, dict):
        return {k: move_to(v, device, dtype) for k, v in value.items()}
    return value


def boundary_hook(device: torch.device, dtype: torch.dtype | None):
    """A forward pre-hook moving everything a module receives to its stage's device: the seed's patch, as a hook."""
    def hook(module, args, kwargs):
        return move_to(args, device, dtype), move_to(kwargs, device, dtype)
    return hook


def place_stages(model_path: str | Path, plan: Plan, dtype: torch.dtype | list[torch.dtype] | None = None):
    """Load each stage's tensors straight from safetensors onto its device, and hook the stage boundaries (notebook 02).

    `dtype` may be one dtype or one per stage. Returns a `GPTJForCausalLM` that runs across the devices.
    """
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from safetensors import safe_open
    from transformers import AutoConfig, GPTJForCausalLM

    model_path = resolve_model(str(model_path))
    config = AutoConfig.from_pretrained(str(model_path))
    n = len(plan.devices)
    if plan.devices[-1].blocks[1] != config.n_layer:
        raise ValueError(f"the plan covers {plan.devices[-1].blocks[1]} blocks but {model_path} has {config.n_layer}")
    dtypes = list(dtype) if isinstance(dtype, (list, tuple)) else [dtype or getattr(torch, plan.dtype)] * n
    with init_empty_weights():
        model = GPTJForCausalLM(config)
    files = stage_parameter_names(model_path)
    expected = {name for name, _ in model.named_parameters()}
    missing = expected - set(files)
    if missing:
        raise ValueError(f"{model_path} lacks {len(missing)} tensor(s), e.g. {sorted(missing)[0]}")
    for file in sorted(set(files.values())):
        names = [k for k, f in files.items() if f == file and k in expected]
        by_stage: dict[int, list[str]] = {}
        for name in names:
            by_stage.setdefault(plan.stage_of_module(name), []).append(name)
        for s, stage_names in by_stage.items():
            device = torch.device(plan.devices[s].device)
            with safe_open(model_path / file, framework="pt", device=str(device)) as f:
                for name in stage_names:
                    set_module_tensor_to_device(model, name, device, value=f.get_tensor(name), dtype=dtypes[s])
    model.transformer.rotary_emb.to(plan.devices[0].device)
    # every block after the first stage gets the hook: the first one moves the hidden states across the
    # boundary; all of them need the mask, position ids and rotary sin/cos, which the model hands each block
    model.hooks = {}  # module name -> hook handle, so a test can remove one and watch it fail
    for s, st in enumerate(plan.devices[1:], start=1):
        for b in range(*st.blocks):
            model.hooks[f"transformer.h.{b}"] = model.transformer.h[b].register_forward_pre_hook(
                boundary_hook(torch.device(st.device), dtypes[s]), with_kwargs=True)
    last = torch.device(plan.devices[-1].device)
    model.hooks["transformer.ln_f"] = model.transformer.ln_f.register_forward_pre_hook(
        boundary_hook(last, dtypes[-1]), with_kwargs=True)
    first_device = torch.device(plan.devices[0].device)
    # logits go back to the first device, where generate keeps the token ids
    model.hooks["lm_head"] = model.lm_head.register_forward_hook(lambda m, a, out: out.to(first_device))
    model.plan = plan
    return model.eval()


def measure_memory(model, cache=None) -> list[dict]:
    """Bytes per stage from the tensors actually placed there: parameters, buffers, KV cache (notebook 02)."""
    plan: Plan | None = getattr(model, "plan", None)
    stages = plan.devices if plan else [None]
    rows = [{"stage": s, "device": st.device if st else str(model.device), "param_bytes": 0, "kv_cache_bytes": 0}
            for s, st in enumerate(stages)]
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        s = plan.stage_of_module(name) if plan and not name.startswith("transformer.rotary") else 0
        rows[s]["param_bytes"] += tensor.numel() * tensor.element_size()
    if cache is not None:
        for layer_index, layer in enumerate(cache.layers):
            s = plan.stage_of_module(f"transformer.h.{layer_index}") if plan else 0
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if isinstance(t, torch.Tensor):
                    rows[s]["kv_cache_bytes"] += t.numel() * t.element_size()
    for row in rows:
        row["total_bytes"] = row["param_bytes"] + row["kv_cache_bytes"]
    if torch.cuda.is_available():
        for row in rows:
            if row["device"].startswith("cuda"):
                row["cuda_allocated_bytes"] = torch.cuda.memory_allocated(row["device"])
    return rows


# --------------------------------------------------------------------------
# 03 · generate and time
# --------------------------------------------------------------------------

@dataclass
class TimingEvent:
    """One busy interval of one stage: seconds since the run started (notebooks 03 to 05)."""

    stage: int
    phase: str  # "prefill" or "decode"
    step: int  # 0 for the prefill, then one per generated token
    start: float
    end: float
    kind: str = "compute"  # the pipeline also records "send" and "recv"
    micro_batch: int = 0


@dataclass
class RunRecord:
    """What one generation measured; the naive split and the pipeline both return one (notebooks 03 to 05)."""

    texts: list[str]
    prompts: list[str]
    mode: str  # "single", "naive" or "pipeline"
    new_tokens: int  # tokens generated, summed over the batch
    time_to_first_token: float
    tokens_per_second: float  # after the first token, summed over the batch
    total_seconds: float
    events: list[TimingEvent] = dataclasses.field(default_factory=list)
    memory: list[dict] = dataclasses.field(default_factory=list)  # one row per stage, see measure_memory
    plan: Plan | None = None
    settings: dict = dataclasses.field(default_factory=dict)  # what was asked: max_new_tokens, sampling, batch

    def busy_seconds(self) -> list[float]:
        """Compute time of each stage."""
        n = max((e.stage for e in self.events), default=-1) + 1
        busy = [0.0] * n
        for e in self.events:
            if e.kind == "compute":
                busy[e.stage] += e.end - e.start
        return busy


SAMPLING_DEFAULTS = {"temperature": 1.0, "top_p": 0.7, "top_k": 0}  # the seed's settings; top_k=0: no top-k filter


def check_generation(config, tokenizer, prompts: str | list[str], max_new_tokens: int, greedy: bool = False,
                     temperature: float = 1.0, top_p: float = 0.7, top_k: int = 0) -> list[list[int]]:
    """Refuse bad settings before any work, saying what to do; returns each prompt's token ids (notebook 03)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("no prompts given: pass a string or a non-empty list of strings")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r}: generate at least 1 new token")
    if not greedy and not temperature > 0:
        raise ValueError(f"temperature={temperature}: sampling needs a temperature above 0 "
                         "(1.0 is the model's own distribution); for the single most likely text use greedy")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p}: it must be in (0, 1]; 1.0 keeps every token, the seed used 0.7")
    if top_k < 0:
        raise ValueError(f"top_k={top_k}: it must be 0 (no top-k filter, as in the seed) or a positive count")
    ids = []
    for i, prompt in enumerate(prompts):
        tokens = tokenizer(prompt)["input_ids"] if isinstance(prompt, str) else []
        if not tokens:
            raise ValueError(f"prompt {i} ({prompt!r}) is empty: every prompt needs at least one token")
        if len(tokens) + max_new_tokens > config.n_positions:
            raise ValueError(f"prompt {i} has {len(tokens)} tokens; with max_new_tokens={max_new_tokens} that is "
                             f"{len(tokens) + max_new_tokens}, more than the model's context of {config.n_positions} "
                             f"tokens: shorten the prompt or ask for at most {config.n_positions - len(tokens)} new tokens")
        ids.append(tokens)
    return ids


def pad_left(ids: list[list[int]], pad_id: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token ids into one batch with its attention mask, so every prompt ends where generation starts (notebook 03)."""
    width = max(len(x) for x in ids)
    input_ids = torch.tensor([[pad_id] * (width - len(x)) + x for x in ids], device=device)
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device)
    return input_ids, mask


def stage_modules(model) -> list[tuple[list[str], torch.device]]:
    """Each stage's module names in forward order and its device; an unsplit model is one stage (notebook 03)."""
    plan: Plan | None = getattr(model, "plan", None)
    n_layer = model.config.n_layer
    parts = [(s.embedding, s.blocks, s.head, torch.device(s.device)) for s in plan.devices] if plan else \
        [(True, (0, n_layer), True, model.transformer.wte.weight.device)]
    return [((["transformer.wte"] if emb else []) + [f"transformer.h.{b}" for b in range(*blocks)]
             + (["transformer.ln_f", "lm_head"] if head else []), device) for emb, blocks, head, device in parts]


class StageRecorder:
    """Times each stage's share of every forward pass from hooks at the stage boundaries (notebooks 03 and 04).

    A forward pre-hook on a stage's first module and a forward hook on its last one stamp start and end.
    On the CPU a stamp is `time.perf_counter()`; on CUDA it is an event on the stage's device, read after
    one synchronize at the end, so the times are the device's and the hooks never stall it.
    The first forward of a run is the prefill, every later one a decode step.
    """

    def __init__(self, model):
        self.model = model
        self.stages = stage_modules(model)
        self.cuda = sorted({d for _, d in self.stages if d.type == "cuda"}, key=str)
        self.step = -1
        self.stamps: list[tuple[int, int, object, object]] = []  # (stage, step, start, end)
        self.handles: list = []

    def now(self) -> float:
        """Host seconds since the recording started."""
        import time

        return time.perf_counter() - self.t0

    def stamp(self, device: torch.device):
        """A point in time on `device`: host seconds on the CPU, a recorded CUDA event on a GPU."""
        if device.type != "cuda":
            return self.now()
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(device))
        return event

    def seconds(self, stamp, device: torch.device) -> float:
        """A stamp as seconds since the start (CUDA events are measured from that device's start event)."""
        return stamp if device.type != "cuda" else self.origin[device].elapsed_time(stamp) / 1000

    def __enter__(self) -> "StageRecorder":
        import time

        modules = dict(self.model.named_modules())
        for d in self.cuda:
            torch.cuda.synchronize(d)
        self.t0 = time.perf_counter()
        self.origin = {d: self.stamp(d) for d in self.cuda}

        def count_step(module, args):
            self.step += 1

        self.handles.append(self.model.register_forward_pre_hook(count_step))
        for s, (names, device) in enumerate(self.stages):
            if not names:
                continue
            opened = {}
            self.handles.append(modules[names[0]].register_forward_pre_hook(
                lambda m, a, s=s, device=device, opened=opened: opened.__setitem__(s, self.stamp(device))))
            self.handles.append(modules[names[-1]].register_forward_hook(
                lambda m, a, out, s=s, device=device, opened=opened:
                self.stamps.append((s, self.step, opened.pop(s), self.stamp(device)))))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        for d in self.cuda:
            torch.cuda.synchronize(d)

    def events(self) -> list[TimingEvent]:
        """The recorded busy intervals, in seconds since the start, in the order they happened."""
        devices = [d for _, d in self.stages]
        return [TimingEvent(s, "prefill" if step == 0 else "decode", step, self.seconds(a, devices[s]),
                            self.seconds(b, devices[s])) for s, step, a, b in self.stamps]


class TokenTimes:
    """A transformers streamer that notes when each step's tokens arrive, then hands them on to `inner` (notebook 03)."""

    def __init__(self, clock, inner=None):
        self.clock, self.inner, self.times, self.prompt_seen = clock, inner, [], False

    def put(self, value) -> None:
        if self.prompt_seen:  # generate first puts the prompt, then one batch of tokens per step
            self.times.append(self.clock())
        self.prompt_seen = True
        if self.inner is not None:
            self.inner.put(value)

    def end(self) -> None:
        if self.inner is not None:
            self.inner.end()


def generate_text(model, tokenizer, prompts: str | list[str], max_new_tokens: int = 50, greedy: bool = False,
                  temperature: float = 1.0, top_p: float = 0.7, top_k: int = 0, seed: int | None = None,
                  stream=False) -> tuple[list[str], RunRecord]:
    """Generate continuations with transformers' `generate` and KV cache through a split (or whole) model (notebook 03).

    Returns `(texts, record)`: `texts[i]` is the continuation of `prompts[i]` alone (the prompt is not
    repeated; print `prompt + text` for what the seed printed), and `record.texts is texts`.
    Sampling uses the seed's settings by default (top_p=0.7, top_k=0 = no top-k filter, temperature 1.0);
    `seed` calls `torch.manual_seed(seed)` right before `generate`. Prompts of different lengths are
    left-padded with the end-of-text token. `stream=True` prints the prompt and then each piece of text as
    it is produced (one prompt only); any transformers streamer (`TextIteratorStreamer`...) may be passed instead.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    ids = check_generation(model.config, tokenizer, prompts, max_new_tokens, greedy, temperature, top_p, top_k)
    if stream is True and len(prompts) > 1:
        raise ValueError(f"stream=True prints one prompt at a time, got {len(prompts)}: generate them one by one, "
                         "or pass your own streamer that handles a batch")
    if stream is True:
        from transformers import TextStreamer

        print(prompts[0], end="", flush=True)
        stream = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    eos = tokenizer.eos_token_id
    stages = stage_modules(model)
    input_ids, mask = pad_left(ids, eos, stages[0][1])
    knobs = {"do_sample": False} if greedy else {"do_sample": True, "temperature": temperature, "top_p": top_p,
                                                 "top_k": top_k}
    with StageRecorder(model) as recorder:
        times = TokenTimes(recorder.now, inner=None if stream is False else stream)
        if seed is not None:
            torch.manual_seed(seed)
        out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             pad_token_id=eos, streamer=times, return_dict_in_generate=True, **knobs)
        total = recorder.now()
    cache = getattr(out, "cache", None)
    if cache is None:  # older transformers call it past_key_values
        cache = getattr(out, "past_key_values", None)
    new = out.sequences[:, input_ids.shape[1]:].cpu()
    counts = [int((row == eos).nonzero()[0, 0]) + 1 if (row == eos).any() else len(row) for row in new]
    texts = [tokenizer.decode(row[:n], skip_special_tokens=True) for row, n in zip(new, counts)]
    first, last = times.times[0], times.times[-1]
    after_first = sum(counts) - len(prompts)
    record = RunRecord(
        texts=texts, prompts=prompts, mode="naive" if len(stages) > 1 else "single", new_tokens=sum(counts),
        time_to_first_token=first, tokens_per_second=after_first / (last - first) if last > first else float("nan"),
        total_seconds=total, events=recorder.events(), memory=measure_memory(model, cache),
        plan=getattr(model, "plan", None),
        settings={"max_new_tokens": max_new_tokens, "greedy": greedy, **({} if greedy else knobs), "seed": seed,
                  "batch_size": len(prompts), "prompt_tokens": [len(x) for x in ids]})
    return texts, record


def format_timing(record: RunRecord) -> str:
    """Time to first token, tokens/s, total time, and each stage's busy time and KV cache, as a small table (notebook 03)."""
    busy = record.busy_seconds()
    lines = [f"time to first token {record.time_to_first_token * 1000:9.1f} ms",
             f"tokens/s after it   {record.tokens_per_second:9.1f}   (batch of {len(record.prompts)})",
             f"total               {record.total_seconds * 1000:9.1f} ms for {record.new_tokens} new tokens",
             "stage  device   busy ms  share of total  KV cache at the end"]
    for s, row in enumerate(record.memory):
        b = busy[s] if s < len(busy) else 0.0
        lines.append(f"{s:5}  {row['device']:7} {b * 1000:8.1f}  {b / record.total_seconds:14.0%}  "
                     f"{format_size(row['kv_cache_bytes']):>12}")
    return "\n".join(lines)


# --------------------------------------------------------------------------
# 04 · measure and plot
# --------------------------------------------------------------------------


# --------------------------------------------------------------------------
# 05 · pipeline parallelism
# --------------------------------------------------------------------------


# --------------------------------------------------------------------------
# 06 · prompt widget
# --------------------------------------------------------------------------


# --------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------

def output_dir() -> Path | None:
    """Where notebooks save figures: $GPTJ_HELPERS_OUT when set (`make demo` sets build/), else nowhere."""
    out = os.environ.get("GPTJ_HELPERS_OUT")
    return Path(out) if out else None


def run_notebooks(paths: list[str | Path], out_dir: str | Path | None = None, inplace: bool = False,
                  timeout: int = 900) -> list[tuple[Path, float]]:
    """Execute notebooks in order, headless; write copies to `out_dir`, or back in place, cleaned."""
    import time

    import nbformat
    from nbclient import NotebookClient

    if out_dir is not None:
        out_dir = Path(out_dir).resolve()
        (out_dir / "figures").mkdir(parents=True, exist_ok=True)
        os.environ["GPTJ_HELPERS_OUT"] = str(out_dir / "figures")
    times = []
    for path in map(Path, sorted(paths)):
        nb = nbformat.read(path, as_version=4)
        start = time.perf_counter()
        NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=False,
                       resources={"metadata": {"path": str(path.parent.resolve())}}).execute()
        times.append((path, time.perf_counter() - start))
        nb.metadata.pop("widgets", None)  # widget state blobs are noise in a committed notebook
        target = path if inplace else (out_dir / path.name if out_dir else None)
        if target is not None:
            tmp = target.with_suffix(".tmp")
            nbformat.write(nb, tmp)
            os.replace(tmp, target)
        print(f"{path.name}: {times[-1][1]:.1f} s", flush=True)
    return times


def cmd_make_tiny(args: argparse.Namespace) -> None:
    """make-tiny OUT_DIR: write the tiny default model."""
    out = Path(args.out_dir)
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"make-tiny: {out} exists and is not empty; choose a new folder")
    build_atomically(out, lambda tmp: make_tiny_gptj(tmp, seed=args.seed))
    print(out)


def cmd_devices(args: argparse.Namespace) -> None:
    """devices [SPEC]: list this machine's devices, or parse a device spec."""
    for d in parse_devices(args.spec) if args.spec else list_devices():
        print(d)


def cmd_run_notebooks(args: argparse.Namespace) -> None:
    """run-notebooks NB...: execute notebooks headless, copies under --out (or --inplace)."""
    if not args.inplace and not args.out:
        raise ValueError("run-notebooks needs --out DIR or --inplace")
    times = run_notebooks(args.notebooks, out_dir=args.out, inplace=args.inplace)
    print(f"all {len(times)} notebooks: {sum(t for _, t in times):.1f} s")
    if args.out:
        print(f"executed notebooks are in {Path(args.out).resolve()}/, figures in {Path(args.out).resolve()}/figures/")


def cmd_plan(args: argparse.Namespace) -> None:
    """plan: print how the model splits over the devices, as a table or as the Plan's JSON."""
    plan = plan_split(args.model, args.devices, dtype=getattr(torch, args.dtype), reserve=args.reserve,
                      prompt_tokens=args.prompt_tokens, max_new_tokens=args.max_new_tokens,
                      batch_size=args.batch_size, model_name=args.model)
    print(plan.to_json() if args.json else format_plan(plan))


def cmd_generate(args: argparse.Namespace) -> None:
    """generate: continue prompts through the model split over --devices; text on stdout, timings on stderr."""
    dtype = getattr(torch, args.dtype) if args.dtype else None
    tokenizer = load_tokenizer(args.model)
    config = load_config(args.model)
    knobs = dict(greedy=args.greedy, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    ids = check_generation(config, tokenizer, args.prompt, args.max_new_tokens, **knobs)  # before any loading
    devices = parse_devices(args.devices)
    dtype = dtype or (torch.float16 if all(d.name.startswith("cuda") for d in devices) else torch.float32)
    batch = 1 if args.stream else len(ids)
    plan = plan_split(config, devices, dtype=dtype, prompt_tokens=max(map(len, ids)),
                      max_new_tokens=args.max_new_tokens, batch_size=batch, model_name=args.model)
    print(format_plan(plan), file=sys.stderr)
    model = place_stages(resolve_model(args.model), plan)
    groups = [[p] for p in args.prompt] if args.stream else [args.prompt]  # streaming shows one prompt at a time
    first = True
    for prompts in groups:
        texts, record = generate_text(model, tokenizer, prompts, args.max_new_tokens, seed=args.seed,
                                      stream=args.stream, **knobs)
        for prompt, text in zip(prompts, texts):
            if not first and not args.stream:
                print()
            if not args.stream:
                print(prompt + text, flush=True)
            first = False
        if args.stream and prompts is not groups[-1]:
            print(flush=True)
        print(format_timing(record), file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    """The command line: one subcommand per task of the series."""
    parser = argparse.ArgumentParser(prog="python -m gptj_helpers", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("make-tiny", help="write the tiny default GPT-J (random weights) and its tokenizer")
    p.add_argument("out_dir")
    p.add_argument("--seed", type=int, default=TINY_SEED)
    p.set_defaults(func=cmd_make_tiny)

    p = sub.add_parser("devices", help="list this machine's devices, or parse a device spec like 3x5GiB")
    p.add_argument("spec", nargs="?")
    p.set_defaults(func=cmd_devices)

    p = sub.add_parser("plan", help="plan the split of a model over devices with memory budgets")
    p.add_argument("--model", default="tiny", help="tiny, gpt-j-6b, or a model folder")
    p.add_argument("--devices", required=True, help='e.g. "3x5GiB" or "cuda:0=6GiB,cuda:1=10GiB"')
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--prompt-tokens", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--reserve", default="0", help="bytes kept free on every device, e.g. 1GiB")
    p.add_argument("--json", action="store_true", help="print the Plan object as JSON")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("run-notebooks", help="execute notebooks headless (make demo, make notebooks)")
    p.add_argument("notebooks", nargs="+")
    p.add_argument("--out", help="folder for the executed copies and their figures")
    p.add_argument("--inplace", action="store_true", help="write the outputs back into the notebooks")
    p.set_defaults(func=cmd_run_notebooks)

    p = sub.add_parser("generate", help="generate text through the model split over devices (sampling like the seed)")
    p.add_argument("--model", default="tiny", help="tiny, gpt-j-6b, a hub id, or a model folder")
    p.add_argument("--devices", required=True, help='e.g. "cpu", "4xcpu" or "cuda:0=6GiB,cuda:1=10GiB"')
    p.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for a batch")
    p.add_argument("--max-new-tokens", type=int, default=50)
    p.add_argument("--greedy", action="store_true", help="always take the most likely token (no sampling)")
    p.add_argument("--temperature", type=float, default=SAMPLING_DEFAULTS["temperature"])
    p.add_argument("--top-p", type=float, default=SAMPLING_DEFAULTS["top_p"])
    p.add_argument("--top-k", type=int, default=SAMPLING_DEFAULTS["top_k"], help="0: no top-k filter (the seed's)")
    p.add_argument("--seed", type=int, help="seed the sampler for a reproducible text")
    p.add_argument("--stream", action="store_true", help="print tokens as they come (prompts one at a time)")
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"],
                   help="default: float16 on GPUs, float32 on the CPU")
    p.set_defaults(func=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m gptj_helpers`."""
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, ConnectionError, MemoryError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
