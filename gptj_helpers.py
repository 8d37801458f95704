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
import zlib
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
TINY_TRAINED = REPO_DIR / "assets" / "tiny-gptj"  # committed; absent when only the module is installed


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


def make_tiny_gptj(out_dir: str | Path, seed: int = TINY_SEED, format: str = "hf") -> Path:
    """Write the tiny random GPT-J and its tokenizer to `out_dir`; format="jax-slim": the JAX layout (notebooks 00, 01)."""
    from transformers import GPTJForCausalLM

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    model = GPTJForCausalLM(tiny_config()).eval()
    if format == "jax-slim":
        return write_jax_checkpoint(model.state_dict(), tiny_config(), out_dir)
    if format != "hf":
        raise ValueError(f"unknown format {format!r}: use hf or jax-slim")
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
    """The tiny random GPT-J's folder, built on first use; "tiny" without the repository's trained one (notebook 00)."""
    final = cache_dir() / f"tiny-v{TINY_VERSION}-seed{seed}"
    return build_atomically(final, lambda tmp: make_tiny_gptj(tmp, seed=seed))


def hub_id(name: str) -> tuple[str, str | None]:
    """Map a model name to (hub repo id, revision); "gpt-j-6b" is the float16 branch of EleutherAI's repo."""
    if name.lower() in ("gpt-j-6b", "gptj-6b", GPTJ_6B_REPO.lower()):
        return GPTJ_6B_REPO, GPTJ_6B_REVISION
    return name, None


def resolve_model(name: str = "tiny") -> Path:
    """Turn "tiny", a local folder, "gpt-j-6b" or a hub id into a local folder with config and weights (notebook 00)."""
    if name == "tiny":  # the trained weights in assets/ (make tiny-model), else the random model
        return TINY_TRAINED if (TINY_TRAINED / "model.safetensors").exists() else tiny_model_path()
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
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device spec part {part!r}: only cpu and cuda devices are supported, not {dev.type}")
    if dev.type == "cpu":
        return "cpu"
    index, count = dev.index or 0, torch.cuda.device_count()
    if check and count == 0:
        raise ValueError(f"device spec part {part!r}: this machine has no CUDA GPU; use cpu or a size like 3x5GiB")
    if check and index >= count:
        raise ValueError(f"device spec part {part!r}: cuda:{index} does not exist, this machine has {count} GPU(s)")
    return f"cuda:{index}"


def parse_devices(spec: str, check: bool = True) -> list[Device]:
    """Parse "3x5GiB", "cuda:0=10GiB,cuda:1=10GiB", "cpu,cpu", "2xcpu=4GiB"; check=False: CUDA need not exist (notebook 00)."""
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

WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")  # first match wins: never fetch both copies


def download_gptj(repo_id: str = GPTJ_6B_REPO, revision: str | None = GPTJ_6B_REVISION,
                  local_dir: str | Path | None = None, endpoint: str | None = None,
                  cache_dir: str | Path | None = None) -> Path:
    """Download config, tokenizer and one copy of the weights with huggingface_hub: progress bars, retries (notebook 01)."""
    from fnmatch import fnmatch

    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    kwargs = dict(repo_id=repo_id, revision=revision, endpoint=endpoint, cache_dir=cache_dir, local_dir=local_dir)
    with contextlib.suppress(LocalEntryNotFoundError):  # complete already? then no network at all
        path = Path(snapshot_download(**kwargs, local_files_only=True, allow_patterns=["*.json"]))
        if model_files_complete(path):
            return path
    check_online(endpoint)
    files = HfApi(endpoint=endpoint).list_repo_files(repo_id, revision=revision)
    weights = next((p for p in WEIGHT_PATTERNS if any(fnmatch(f, p) for f in files)), None)
    if weights is None:
        raise FileNotFoundError(f"{repo_id}@{revision} has no safetensors or pytorch_model.bin weights")
    patterns = ["*.json", "*.txt", "*.model", weights]
    try:
        return Path(snapshot_download(**kwargs, allow_patterns=patterns))
    except Exception as err:  # a dropped connection (httpx's or httpx2's TransportError), after the hub's retries
        if not any(cls.__name__ == "TransportError" for cls in type(err).__mro__):
            raise
        raise ConnectionError(f"downloading {repo_id}@{revision} was interrupted ({type(err).__name__}: {err}). "
                              "Run the same command again: finished files are kept, the rest starts over.") from err


download_model = download_gptj  # the name notebook 00's resolve_model uses


def model_files_complete(path: Path) -> bool:
    """True when a folder has config.json and every weight file its index names (or one unsharded file)."""
    if not (path / "config.json").exists():
        return False
    for index in path.glob("*.index.json"):
        names = set(json.loads(index.read_text())["weight_map"].values())
        return all((path / n).exists() for n in names)
    return any((path / n).exists() for n in ("model.safetensors", "pytorch_model.bin"))


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


# The original mesh-transformer-jax "slim" checkpoint: shard_S/P.npz, facts in ../shared/reference.
GPTJ_6B_JAX_CONFIG = {"layers": 28, "d_model": 4096, "n_heads": 16, "n_vocab": 50400, "pe_rotary_dims": 64,
                      "seq": 2048, "cores_per_replica": 8}
JAX_PIECES = 16  # each shard's leaves are cut into 16 .npz files


def jax_config_of(config) -> dict:
    """A mesh-transformer-jax config dict from a JSON path, a dict, or a GPTJConfig; None is GPT-J-6B's (notebook 01)."""
    if config is None:
        return dict(GPTJ_6B_JAX_CONFIG)
    if isinstance(config, (str, Path)):
        config = json.loads(Path(config).read_text())
    if not isinstance(config, dict):  # a transformers GPTJConfig
        config = {"layers": config.n_layer, "d_model": config.n_embd, "n_heads": config.n_head,
                  "n_vocab": config.vocab_size, "pe_rotary_dims": config.rotary_dim, "seq": config.n_positions,
                  "cores_per_replica": 8}
    missing = [k for k in GPTJ_6B_JAX_CONFIG if k not in config]
    if missing:
        raise ValueError(f"the JAX config lacks {missing}: it needs {sorted(GPTJ_6B_JAX_CONFIG)}")
    return config


def hf_config_of(jax_config: dict):
    """The GPTJConfig that transformers needs for a converted JAX checkpoint (notebook 01)."""
    from transformers import GPTJConfig

    c = jax_config
    eos = 50256 if c["n_vocab"] > 50256 else 0
    return GPTJConfig(vocab_size=c["n_vocab"], n_positions=c["seq"], n_embd=c["d_model"], n_layer=c["layers"],
                      n_head=c["n_heads"], rotary_dim=c["pe_rotary_dims"], n_inner=None,
                      activation_function="gelu_new", layer_norm_epsilon=1e-5, bos_token_id=eos,
                      eos_token_id=eos, tie_word_embeddings=False)


@dataclass(frozen=True)
class JaxLeaf:
    """One leaf of the slim checkpoint: its name, its shape in one shard, and where it goes in Hugging Face."""

    name: str           # "causal_transformer_shard/~/layer_7/~/linear_3/w"
    shard_shape: tuple  # shape of the slice one shard holds
    target: str         # Hugging Face tensor name
    merge: str          # out: rows = shards' w.T | in: columns = shards' w.T | rows: w as is | cat | sum | first


def jax_leaves(jax_config: dict) -> list[JaxLeaf]:
    """The slim checkpoint's leaves in `jax.tree_flatten` order (keys sorted as strings), `step` last (notebook 01)."""
    c = jax_config
    d, v, s = c["d_model"], c["n_vocab"], c["cores_per_replica"]
    ff = 4 * d
    for name, size in (("d_model", d), ("n_vocab", v), ("d_model * 4", ff), ("n_heads", c["n_heads"])):
        if size % s:
            raise ValueError(f"JAX config: {name} = {size} is not divisible by cores_per_replica = {s}")
    top = "causal_transformer_shard/~/"
    spec = {"embedding_shard/~/linear": {"b": ((d,), "transformer.wte.bias", "sum"),
                                         "w": ((v // s, d), "transformer.wte.weight", "rows")},
            "projection_shard/~/linear": {"b": ((v // s,), "lm_head.bias", "cat"),
                                          "w": ((d, v // s), "lm_head.weight", "out")},
            "projection_shard/~/replicated_layer_norm": {"offset": ((d,), "transformer.ln_f.bias", "first"),
                                                         "scale": ((d,), "transformer.ln_f.weight", "first")}}
    for i in range(c["layers"]):
        h, m = f"layer_{i}/~/", f"transformer.h.{i}."
        for lin, proj in (("linear", "q_proj"), ("linear_1", "v_proj"), ("linear_2", "k_proj")):
            spec[h + lin] = {"w": ((d, d // s), f"{m}attn.{proj}.weight", "out")}
        spec[h + "linear_3"] = {"w": ((d // s, d), f"{m}attn.out_proj.weight", "in")}
        spec[h + "linear_4"] = {"b": ((ff // s,), f"{m}mlp.fc_in.bias", "cat"),
                                "w": ((d, ff // s), f"{m}mlp.fc_in.weight", "out")}
        spec[h + "linear_5"] = {"b": ((d,), f"{m}mlp.fc_out.bias", "sum"),
                                "w": ((ff // s, d), f"{m}mlp.fc_out.weight", "in")}
        spec[h + "replicated_layer_norm"] = {"offset": ((d,), f"{m}ln_1.bias", "first"),
                                             "scale": ((d,), f"{m}ln_1.weight", "first")}
    leaves = [JaxLeaf(f"{top}{mod}/{leaf}", *spec[mod][leaf]) for mod in sorted(spec) for leaf in sorted(spec[mod])]
    return leaves + [JaxLeaf("step", (), "", "skip")]


def split_pieces(items: list, n: int = JAX_PIECES) -> list[list]:
    """Cut a list into n contiguous pieces, the first `len % n` one longer (mesh-transformer-jax's split)."""
    k, m = divmod(len(items), n)
    return [items[i * k + min(i, m):(i + 1) * k + min(i + 1, m)] for i in range(n)]


def target_group(name: str) -> str:
    """Which output shard a Hugging Face tensor goes to: "embedding", "block-07", or "head" (notebook 01)."""
    match = re.match(r"transformer\.h\.(\d+)\.", name)
    return f"block-{int(match.group(1)):02d}" if match else "embedding" if "wte" in name else "head"


def write_safetensors_shards(out: Path, groups, total: int, desc: str, progress: bool = True) -> None:
    """Write each (group, {name: tensor}) as it arrives, then `model.safetensors.index.json` (notebook 01)."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    weight_map, size = {}, 0
    with tqdm(total=total, unit="tensor", desc=desc, disable=not progress) as bar:
        for group, tensors in groups(bar):
            fname = f"model-{group}.safetensors"
            save_file(tensors, str(out / fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in tensors})
            size += sum(t.numel() * t.element_size() for t in tensors.values())
            del tensors  # before the next group is built: one group in memory at a time
    index = {"metadata": {"total_size": size}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def check_finite(t: torch.Tensor, what: str) -> None:
    """Refuse NaN or inf in a weight, naming it."""
    if not torch.isfinite(t).all():
        raise ValueError(f"{what} contains NaN or inf (after conversion to {t.dtype}): the checkpoint is damaged, "
                         "or its values overflow this dtype (try --dtype bfloat16 or float32)")


def refuse_existing(out_dir: Path) -> None:
    """Converters never write into an existing folder."""
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists: choose a new output folder or delete it first")


def read_npz_array(npz, path: Path, j: int, leaf: JaxLeaf) -> torch.Tensor:
    """One array of one piece file as a torch tensor; raw 2-byte (V2) arrays are bfloat16 bits."""
    import zipfile

    import numpy as np

    try:
        arr = npz[f"arr_{j}"]
    except (zipfile.BadZipFile, ValueError, EOFError, OSError, KeyError) as err:
        raise ValueError(f"{path}: cannot read arr_{j} ({leaf.name}): {err}. The file is truncated or damaged: "
                         "extract or download it again") from err
    if arr.shape != leaf.shard_shape:
        raise ValueError(f"{path}: arr_{j} ({leaf.name}) has shape {arr.shape}, the config expects "
                         f"{leaf.shard_shape}: does --config match this checkpoint?")
    if arr.dtype.kind == "V":
        return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(arr)


def convert_jax_checkpoint(slim_dir: str | Path, out_dir: str | Path, config=None,
                           dtype: torch.dtype = torch.float16, progress: bool = True) -> Path:
    """Convert the original slim JAX checkpoint to a Hugging Face safetensors folder, one block at a time (notebook 01)."""
    import zipfile

    import numpy as np

    slim_dir, out_dir = Path(slim_dir), Path(out_dir)
    jcfg = jax_config_of(config)
    leaves, shards = jax_leaves(jcfg), jcfg["cores_per_replica"]
    pieces = split_pieces(leaves)
    for s in range(shards):
        folder = slim_dir / f"shard_{s}"
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} is missing: a slim checkpoint has shard_0 ... shard_{shards - 1}")
        for p in range(JAX_PIECES):
            if not (folder / f"{p}.npz").is_file():
                raise FileNotFoundError(f"{folder / f'{p}.npz'} is missing: each shard has 0.npz ... 15.npz")
    refuse_existing(out_dir)

    def merged(leaf: JaxLeaf, files: list, j: int, bias: torch.Tensor | None) -> torch.Tensor:
        parts = (read_npz_array(npz, path, j, leaf) for npz, path in files)
        if leaf.merge == "first":
            t = next(parts).to(dtype)
        elif leaf.merge == "sum":
            t = sum(part.float() for part in parts).to(dtype if leaf.target != "transformer.wte.bias" else torch.float32)
        elif leaf.merge == "cat":
            t = torch.cat([part.to(dtype) for part in parts])
        else:  # a weight: fill the merged (out, in) tensor one shard at a time
            k, d = leaf.shard_shape[::-1] if leaf.merge == "out" else leaf.shard_shape
            t = torch.empty((d, k * shards) if leaf.merge == "in" else (k * shards, d), dtype=dtype)
            for s, part in enumerate(parts):
                if leaf.merge == "rows":  # the embedding: rows as they are, plus the summed bias of all shards
                    t[s * k:(s + 1) * k] = part.float() + bias
                elif leaf.merge == "out":
                    t[s * k:(s + 1) * k] = part.T
                else:
                    t[:, s * k:(s + 1) * k] = part.T
                check_finite(t[s * k:(s + 1) * k] if leaf.merge != "in" else t[:, s * k:(s + 1) * k],
                             f"{leaf.name} in {files[s][1]}")
            return t
        check_finite(t, f"{leaf.name} ({leaf.target})")
        return t

    def groups(bar):
        group, tensors = None, {}
        for p, piece in enumerate(pieces):
            paths = [slim_dir / f"shard_{s}" / f"{p}.npz" for s in range(shards)]
            try:
                files = [(np.load(path), path) for path in paths]
            except (zipfile.BadZipFile, ValueError, OSError, EOFError) as err:
                raise ValueError(f"cannot open a piece of {paths}: {err}; the file is truncated or damaged") from err
            for npz, path in files:
                if len(npz.files) != len(piece):
                    raise ValueError(f"{path} holds {len(npz.files)} arrays, a {jcfg['layers']}-layer config expects "
                                     f"{len(piece)}: does --config match this checkpoint?")
            for j, leaf in enumerate(piece):
                if leaf.merge == "skip":
                    continue
                if target_group(leaf.target) != group and tensors:
                    yield group, tensors
                    tensors = {}
                group = target_group(leaf.target)
                tensors[leaf.target] = merged(leaf, files, j, tensors.pop("transformer.wte.bias", None))
                bar.update()
            for npz, _ in files:
                npz.close()
        yield group, tensors

    def build(tmp: Path) -> None:
        hf_config_of(jcfg).save_pretrained(str(tmp))
        write_safetensors_shards(tmp, groups, len(leaves) - 1, f"converting {slim_dir.name}", progress)

    return build_atomically(out_dir, build)


def write_jax_checkpoint(state_dict: dict, config, out_dir: str | Path) -> Path:
    """Write a Hugging Face GPT-J state dict in the slim JAX layout: bf16, 8 shards x 16 pieces, plus its config (notebook 01)."""
    import numpy as np

    jcfg, out_dir = jax_config_of(config), Path(out_dir)
    leaves, shards = jax_leaves(jcfg), jcfg["cores_per_replica"]

    def shard_slice(leaf: JaxLeaf, s: int):
        if leaf.merge == "skip":
            return np.array(0, dtype=np.int32)
        t = state_dict.get(leaf.target, torch.zeros(leaf.shard_shape))  # wte has no bias in Hugging Face
        k = leaf.shard_shape[1 if leaf.merge == "out" else 0]
        t = {"out": lambda: t[s * k:(s + 1) * k].T, "in": lambda: t[:, s * k:(s + 1) * k].T,
             "rows": lambda: t[s * k:(s + 1) * k], "cat": lambda: t[s * k:(s + 1) * k],
             "sum": lambda: t if s == 0 else torch.zeros_like(t), "first": lambda: t}[leaf.merge]()
        return t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view("V2")  # raw bf16 bits, as JAX saved

    for s in range(shards):
        (out_dir / f"shard_{s}").mkdir(parents=True, exist_ok=True)
        for p, piece in enumerate(split_pieces(leaves)):
            np.savez(out_dir / f"shard_{s}" / f"{p}.npz", *[shard_slice(leaf, s) for leaf in piece])
    (out_dir / "jax_config.json").write_text(json.dumps(jcfg, indent=2))
    return out_dir


def convert_to_safetensors(src: str | Path, out_dir: str | Path, dtype: torch.dtype | None = None,
                           progress: bool = True) -> Path:
    """Turn a pytorch_model.bin (and the config and tokenizer beside it) into safetensors shards, memory-mapped (notebook 01)."""
    import pickle

    src, out_dir = Path(src), Path(out_dir)
    file = src / "pytorch_model.bin" if src.is_dir() else src
    if not file.is_file():
        raise FileNotFoundError(f"{file} does not exist")
    refuse_existing(out_dir)
    try:  # weights_only: the unpickler builds tensors and plain containers, and runs no other code
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        raise ValueError(f"{file} holds more than tensors, so it was not loaded ({str(err).splitlines()[0]}). "
                         "Convert only weight files; never torch.load a pickle you do not trust.") from err
    except RuntimeError as err:
        raise ValueError(f"{file} is not a torch.save zip file that can be memory-mapped: {err}") from err
    if not isinstance(state, dict):
        raise ValueError(f"{file} holds a {type(state).__name__}, not a dict of tensor names to tensors")
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{file}: {name!r} is not a tensor ({type(value).__name__}); this is not a weight file")
    names = [k for k in state if not k.endswith((".attn.bias", ".attn.masked_bias"))]  # old mask buffers

    def groups(bar):
        for group in sorted({target_group(k) for k in names}):
            tensors = {k: state[k].to(dtype or state[k].dtype, copy=True) for k in names if target_group(k) == group}
            for k, t in tensors.items():
                check_finite(t, f"{k} in {file}")
            bar.update(len(tensors))
            yield group, tensors

    def build(tmp: Path) -> None:
        for extra in file.parent.iterdir():  # config and tokenizer files travel along
            if extra.suffix in (".json", ".txt", ".model") and not extra.name.endswith(".bin.index.json"):
                shutil.copy(extra, tmp / extra.name)
        if dtype is not None and (tmp / "config.json").exists():
            cfg = json.loads((tmp / "config.json").read_text())
            cfg["torch_dtype" if "torch_dtype" in cfg else "dtype"] = str(dtype).removeprefix("torch.")
            (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        write_safetensors_shards(tmp, groups, len(names), f"converting {file.name}", progress)

    return build_atomically(out_dir, build)


def measure_command(argv: list[str], timeout: float = 3600) -> dict:
    """Run `python -m gptj_helpers ARGV` in a fresh process: seconds, and peak RSS above its baseline after imports (notebook 01)."""
    import subprocess

    # the peak-RSS window opens after the imports (notebook 05's reset_peak_rss and peak_rss)
    code = ("import json, resource, sys, time, numpy, psutil, safetensors.torch, tqdm.auto, gptj_helpers as gh\n"
            "from transformers import GPTJConfig\n"
            "base = gh.reset_peak_rss() or psutil.Process().memory_info().rss\n"
            "start = time.perf_counter(); rc = gh.main(sys.argv[1:]); seconds = time.perf_counter() - start\n"
            "peak = gh.peak_rss() or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "print(json.dumps(dict(rc=rc, seconds=seconds, baseline=base, peak=peak)))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_DIR), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=timeout, env=env)
    result = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else {"rc": proc.returncode}
    if result["rc"] != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {proc.stderr.strip()[-2000:]}")
    return {**result, "peak_over_baseline": result["peak"] - result["baseline"]}


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
    module_bytes: dict[str, int] = dataclasses.field(default_factory=dict)  # embedding, one block, head

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
    return 2 * config.n_embd * dtype.itemsize * tokens * batch_size


def as_config(model_or_config):
    """Accept a model name, a model or a config; return the config."""
    if isinstance(model_or_config, (str, Path)):
        return load_config(str(model_or_config))
    return getattr(model_or_config, "config", model_or_config)


def plan_split(model_or_config, devices: str | list[Device], dtype: torch.dtype = torch.float16,
               reserve: int | str = 0, prompt_tokens: int = 0, max_new_tokens: int = 0, batch_size: int = 1,
               cost: list[float] | None = None, model_name: str | None = None, explain: bool = True) -> Plan:
    """Split embedding, blocks and head into contiguous stages minimising the fullest device, or with `cost` (one
    number per module) the slowest stage within every budget: a min-max partition by dynamic programming (notebook 02)."""
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
    if model_name is None:
        model_name = str(model_or_config) if isinstance(model_or_config, (str, Path)) else "gptj"
    plan = Plan(model_name, str(dtype).replace("torch.", ""),
                sizes["params"], stages, {k: sizes[k] for k in ("embedding", "block", "head")})
    if best[n][n_layer] == math.inf or max(s.fill for s in stages) > 1:
        raise MemoryError(explain_infeasible(config, devices, dtype, reserve, prompt_tokens, max_new_tokens, batch_size)
                          if explain else "does not fit")
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
    one_block = sizes["block"] + kv_total // config.n_layer + reserve
    if all(one_block > d.budget_bytes for d in devices):
        msg += f"; one block alone needs {format_size(one_block)} with its KV cache and the reserve"
    ideas = []

    def fits(devs, dt=dtype, res=reserve, pt=prompt_tokens, mnt=max_new_tokens) -> bool:
        try:
            plan_split(config, devs, dtype=dt, reserve=res, prompt_tokens=pt, max_new_tokens=mnt, batch_size=batch_size,
                       explain=False)
            return True
        except MemoryError:
            return False

    biggest = max(devices, key=lambda d: d.budget_bytes)
    for extra in range(1, config.n_layer + 2):
        if fits(devices + [biggest] * extra):
            ideas.append(f"add {extra} device(s) of {format_size(biggest.budget_bytes)}")
            break
    if dtype.itemsize > 2 and fits(devices, dt=torch.float16):
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
    import logging

    from accelerate.utils import get_balanced_memory, infer_auto_device_map

    model = meta_model(config)
    max_memory = {i: d.budget_bytes for i, d in enumerate(devices)}
    old = logging.getLogger("accelerate").level
    logging.getLogger("accelerate").setLevel(logging.ERROR)
    try:
        if balanced:
            max_memory = get_balanced_memory(model, max_memory=max_memory, no_split_module_classes=["GPTJBlock"],
                                             dtype=dtype)
        device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=["GPTJBlock"],
                                           dtype=dtype)
    finally:
        logging.getLogger("accelerate").setLevel(old)
    loads = [0] * len(devices)
    for name, p in model.named_parameters():
        owner = max((k for k in device_map if k == "" or name == k or name.startswith(k + ".")), key=len)
        target = device_map[owner]
        if isinstance(target, int):
            loads[target] += p.numel() * dtype.itemsize
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
        if dtype is not None and value.is_floating_point() and value.dtype != dtype:
            return value.to(device=device, dtype=dtype)
        return value if value.device == device else value.to(device)
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


RANDOM_WEIGHTS = "random_weights.json"  # in a model folder instead of weights: {"seed": S}, weights made from seeds


def write_random_model(config, out_dir: str | Path, seed: int = 0) -> Path:
    """A model folder with a config and a seed instead of weights: every process can rebuild it (notebook 04)."""
    out_dir = Path(out_dir)
    config.save_pretrained(str(out_dir))
    (out_dir / RANDOM_WEIGHTS).write_text(json.dumps({"seed": seed}))
    return out_dir


def seeded_tensor(name: str, shape, config, seed: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """One parameter initialised as GPT-J's `_init_weights` does, from its own seed: the same on any process."""
    if name.endswith("bias") or (".ln_" in name and name.endswith("weight")):
        fill = 1.0 if name.endswith("weight") else 0.0
        return torch.full(shape, fill, dtype=dtype, device=device)
    generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return torch.empty(shape, dtype=dtype, device=device).normal_(0.0, config.initializer_range, generator=generator)


def place_stages(model_path, plan: Plan, dtype: torch.dtype | list[torch.dtype] | None = None,
                 stages: list[int] | None = None, seed: int = 0):
    """Load each stage's tensors from safetensors onto its device and hook the boundaries; a config instead of a
    folder gives seeded random weights; `dtype` is one or one per stage; `stages`: load only those (notebook 02)."""
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from safetensors import safe_open
    from transformers import AutoConfig, GPTJForCausalLM

    files = None
    if isinstance(model_path, (str, Path)):
        model_path = resolve_model(str(model_path))
        config = AutoConfig.from_pretrained(str(model_path))
        if (model_path / RANDOM_WEIGHTS).exists():
            seed = json.loads((model_path / RANDOM_WEIGHTS).read_text())["seed"]
        else:
            files = stage_parameter_names(model_path)
    else:
        config = model_path
    n = len(plan.devices)
    if plan.devices[-1].blocks[1] != config.n_layer:
        raise ValueError(f"the plan covers {plan.devices[-1].blocks[1]} blocks but {model_path} has {config.n_layer}")
    dtypes = list(dtype) if isinstance(dtype, (list, tuple)) else [dtype or getattr(torch, plan.dtype)] * n
    with init_empty_weights():
        model = GPTJForCausalLM(config)
    shapes = {name: p.shape for name, p in model.named_parameters()}
    missing = set(shapes) - set(files) if files is not None else set()
    if missing:
        raise ValueError(f"{model_path} lacks {len(missing)} tensor(s), e.g. {sorted(missing)[0]}")
    for name in shapes:  # in file order, one tensor per opening: a file's mapping never holds more than that
        s = plan.stage_of_module(name)
        if stages is not None and s not in stages:
            continue
        device = torch.device(plan.devices[s].device)
        if files is None:
            value = seeded_tensor(name, shapes[name], config, seed, dtypes[s], device)
        else:
            with safe_open(model_path / files[name], framework="pt", device=str(device)) as f:
                value = f.get_tensor(name)
        set_module_tensor_to_device(model, name, device, value=value, dtype=dtypes[s])
    model.transformer.rotary_emb.to(plan.devices[0].device)
    return hook_stages(model, plan, dtypes).eval()


def hook_stages(model, plan: Plan, dtypes: list[torch.dtype]):
    """Hook every block after the first stage: the first one moves the hidden states across the boundary, and all
    need the mask, position ids and rotary sin/cos, which the model hands each block (notebook 02)."""
    model.hooks = {}  # module name -> hook handle, so a test can remove one and watch it fail
    for s, st in enumerate(plan.devices[1:], start=1):
        for b in range(*st.blocks):
            model.hooks[f"transformer.h.{b}"] = model.transformer.h[b].register_forward_pre_hook(
                boundary_hook(torch.device(st.device), dtypes[s]), with_kwargs=True)
    model.hooks["transformer.ln_f"] = model.transformer.ln_f.register_forward_pre_hook(
        boundary_hook(torch.device(plan.devices[-1].device), dtypes[-1]), with_kwargs=True)
    first_device = torch.device(plan.devices[0].device)
    # logits go back to the first device, where generate keeps the token ids
    model.hooks["lm_head"] = model.lm_head.register_forward_hook(lambda m, a, out: out.to(first_device))
    model.plan = plan
    return model


def plot_plan(plan: Plan, title: str | None = None):
    """Draw a plan: one bar per device, filled by embedding, blocks, head, KV cache and reserve, against its budget."""
    import matplotlib.pyplot as plt

    gib = 2**30
    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * len(plan.devices), 3.6))
    colors = {"embedding": "tab:green", "blocks": "tab:blue", "head": "tab:purple", "KV cache": "tab:orange",
              "reserve": "tab:gray"}
    for i, s in enumerate(plan.devices):
        n_blocks = s.blocks[1] - s.blocks[0]
        parts = {"embedding": plan.module_bytes["embedding"] * s.embedding,
                 "blocks": plan.module_bytes["block"] * n_blocks, "head": plan.module_bytes["head"] * s.head,
                 "KV cache": s.kv_cache_bytes, "reserve": s.reserve_bytes}
        bottom = 0.0
        for label, nbytes in parts.items():
            ax.bar(i, nbytes / gib, bottom=bottom, color=colors[label], label=label if i == 0 else None,
                   edgecolor="white", width=0.7)
            bottom += nbytes / gib
        ax.hlines(s.budget_bytes / gib, i - 0.42, i + 0.42, colors="black", linewidth=2,
                  label="budget" if i == 0 else None)
        ax.text(i, bottom, f"{n_blocks} blocks\n{s.fill:.0%}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(plan.devices)), [f"{i}: {s.device}" for i, s in enumerate(plan.devices)], fontsize=8)
    ax.set_ylabel("memory (GiB)")
    ax.set_title(title or f"{plan.model} ({plan.dtype}) split over {len(plan.devices)} devices")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return fig


def tensor_bytes(value) -> int:
    """Bytes of all tensors in a value (tuples, lists, dicts and model outputs are searched)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict) or hasattr(value, "to_tuple"):
        return sum(tensor_bytes(v) for v in value.values())
    if isinstance(value, (tuple, list)):
        return sum(tensor_bytes(v) for v in value)
    return 0


def kv_bytes(layer) -> int:
    """Bytes of one KV cache layer's keys and values."""
    return tensor_bytes([getattr(layer, "keys", None), getattr(layer, "values", None)])


def measure_memory(model, cache=None, activations: list[int] | None = None) -> list[dict]:
    """Bytes per stage of the tensors placed there: parameters, buffers, KV cache, plus `activations` (notebook 02)."""
    plan: Plan | None = getattr(model, "plan", None)
    stages = plan.devices if plan else [None]
    rows = [{"stage": s, "device": st.device if st else str(model.device), "param_bytes": 0, "kv_cache_bytes": 0,
             "activation_bytes": activations[s] if activations else 0, "budget_bytes": st.budget_bytes if st else None}
            for s, st in enumerate(stages)]
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        s = plan.stage_of_module(name) if plan and not name.startswith("transformer.rotary") else 0
        rows[s]["param_bytes"] += tensor_bytes(tensor)
    if cache is not None:
        for layer_index, layer in enumerate(cache.layers):
            s = plan.stage_of_module(f"transformer.h.{layer_index}") if plan else 0
            rows[s]["kv_cache_bytes"] += kv_bytes(layer)
    for row in rows:
        row["total_bytes"] = row["param_bytes"] + row["kv_cache_bytes"] + row["activation_bytes"]
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
    output_ids: torch.Tensor | None = None  # prompt + new token ids, left-padded, like generate's output
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


def check_sampling(max_new_tokens: int, greedy: bool = False, temperature: float = 1.0, top_p: float = 0.7,
                   top_k: int = 0) -> None:
    """Refuse bad generation settings, saying what to do (notebook 03)."""
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r}: generate at least 1 new token")
    if not greedy and not temperature > 0:
        raise ValueError(f"temperature={temperature}: sampling needs a temperature above 0 "
                         "(1.0 is the model's own distribution); for the single most likely text use greedy")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p}: it must be in (0, 1]; 1.0 keeps every token, the seed used 0.7")
    if top_k < 0:
        raise ValueError(f"top_k={top_k}: it must be 0 (no top-k filter, as in the seed) or a positive count")


def check_generation(config, tokenizer, prompts: str | list[str], max_new_tokens: int, greedy: bool = False,
                     temperature: float = 1.0, top_p: float = 0.7, top_k: int = 0) -> list[list[int]]:
    """Refuse bad settings before any work, saying what to do; returns each prompt's token ids (notebook 03)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("no prompts given: pass a string or a non-empty list of strings")
    check_sampling(max_new_tokens, greedy, temperature, top_p, top_k)
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


def plan_modules(plan: Plan) -> list[tuple[list[str], torch.device]]:
    """Each stage's module names in forward order and its device (notebook 03)."""
    return [((["transformer.wte"] if s.embedding else []) + [f"transformer.h.{b}" for b in range(*s.blocks)]
             + (["transformer.ln_f", "lm_head"] if s.head else []), torch.device(s.device)) for s in plan.devices]


def stage_modules(model) -> list[tuple[list[str], torch.device]]:
    """`plan_modules` of a placed model; an unsplit model is one stage (notebook 03)."""
    plan: Plan | None = getattr(model, "plan", None)
    if plan:
        return plan_modules(plan)
    names = ["transformer.wte", *(f"transformer.h.{b}" for b in range(model.config.n_layer)), "transformer.ln_f", "lm_head"]
    return [(names, model.transformer.wte.weight.device)]


class StageRecorder:
    """Times each stage's share of every forward pass from hooks at the stage boundaries (notebooks 03 and 04).

    A forward pre-hook on a stage's first module and a forward hook on its last one stamp start and end.
    On the CPU a stamp is `time.perf_counter()`; on CUDA it is an event on the stage's device, read after
    one synchronize at the end, so the times are the device's and the hooks never stall it.
    The first forward of a run is the prefill, every later one a decode step. During the prefill, hooks on
    every module also note tensor sizes, for an estimate of each stage's peak activation memory (notebook 04).
    """

    def __init__(self, model):
        self.model = model
        self.stages = stage_modules(model)
        self.cuda = sorted({d for _, d in self.stages if d.type == "cuda"}, key=str)
        self.step = -1
        self.stamps: list[tuple[int, int, object, object]] = []  # (stage, step, start, end)
        self.handles: list = []
        self.size_handles: list = []  # removed after the prefill
        self.activations = [0] * len(self.stages)  # bytes, an estimate; see note_sizes
        self.peaks: dict[torch.device, int] = {}  # CUDA only: torch.cuda.max_memory_allocated during the run

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
            torch.cuda.reset_peak_memory_stats(d)
        self.t0 = time.perf_counter()
        self.origin = {d: self.stamp(d) for d in self.cuda}

        def count_step(module, args):
            self.step += 1
            if self.step == 1:  # the prefill is over: its tensors were the largest
                for handle in self.size_handles:
                    handle.remove()

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
            entry = {}
            self.size_handles.append(modules[names[0]].register_forward_pre_hook(
                lambda m, a, entry=entry: entry.__setitem__("bytes", tensor_bytes(a))))
            for name in names:
                for sub in modules[name].modules():
                    self.size_handles.append(sub.register_forward_hook(
                        lambda m, a, kw, out, s=s, entry=entry: self.note_sizes(s, entry["bytes"], a, kw, out),
                        with_kwargs=True))
        self.handles += self.size_handles
        return self

    def note_sizes(self, stage: int, entry_bytes: int, args, kwargs, output) -> None:
        """Activation estimate of a stage: the hidden states that entered it (kept for the residual) plus
        the largest inputs + output of any one of its modules."""
        size = entry_bytes + tensor_bytes(args) + tensor_bytes({k: v for k, v in kwargs.items() if k != "cache"}) \
            + tensor_bytes(output)
        self.activations[stage] = max(self.activations[stage], size)

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        for d in self.cuda:
            torch.cuda.synchronize(d)
            self.peaks[d] = torch.cuda.max_memory_allocated(d)

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
                  stream=False, stopping_criteria=None) -> tuple[list[str], RunRecord]:
    """Generate continuations with transformers' `generate` and KV cache through a split (or whole) model (notebook 03).

    Returns `(texts, record)`: `texts[i]` is the continuation of `prompts[i]` alone (the prompt is not
    repeated; print `prompt + text` for what the seed printed), and `record.texts is texts`.
    Sampling uses the seed's settings by default (top_p=0.7, top_k=0 = no top-k filter, temperature 1.0);
    `seed` calls `torch.manual_seed(seed)` right before `generate`. Prompts of different lengths are
    left-padded with the end-of-text token. `stream=True` prints the prompt and then each piece of text as
    it is produced (one prompt only); any transformers streamer (`TextIteratorStreamer`...) may be passed instead.
    `stopping_criteria`, a list of transformers stopping criteria, can end generation early (notebook 06's Stop).
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
    extra = {}
    if stopping_criteria is not None:
        from transformers import StoppingCriteriaList

        extra["stopping_criteria"] = StoppingCriteriaList(stopping_criteria)
    with StageRecorder(model) as recorder:
        times = TokenTimes(recorder.now, inner=None if stream is False else stream)
        if seed is not None:
            torch.manual_seed(seed)
        out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             pad_token_id=eos, streamer=times, return_dict_in_generate=True, **knobs, **extra)
        total = recorder.now()
    cache = getattr(out, "cache", None)
    if cache is None:  # older transformers call it past_key_values
        cache = getattr(out, "past_key_values", None)
    new = out.sequences[:, input_ids.shape[1]:].cpu()
    counts = [int((row == eos).nonzero()[0, 0]) + 1 if (row == eos).any() else len(row) for row in new]
    texts = [tokenizer.decode(row[:n], skip_special_tokens=True) for row, n in zip(new, counts)]
    first, last = times.times[0], times.times[-1]
    memory = measure_memory(model, cache, recorder.activations)
    for row in memory:  # on CUDA, the allocator's own peak: an independent total to check the parts against
        if torch.device(row["device"]) in recorder.peaks:
            row["cuda_peak_bytes"] = recorder.peaks[torch.device(row["device"])]
    after_first = sum(counts) - len(prompts)
    record = RunRecord(
        texts=texts, prompts=prompts, mode="naive" if len(stages) > 1 else "single", new_tokens=sum(counts),
        time_to_first_token=first, tokens_per_second=after_first / (last - first) if last > first else float("nan"),
        total_seconds=total, events=recorder.events(), memory=memory,
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

def mini_config():
    """A "mini" GPT-J for benchmarks: the tiny default widened to 512 (8 heads of 64), same tokenizer (notebook 04)."""
    config = tiny_config()
    config.n_embd, config.rotary_dim = 512, 16
    return config


def size_unit(nbytes: float) -> tuple[str, int]:
    """MiB or GiB, whichever reads better for sizes up to `nbytes`."""
    return ("GiB", 2**30) if nbytes >= 2**30 else ("MiB", 2**20)


MEMORY_COLORS = {"parameters": "tab:blue", "KV cache": "tab:orange", "activations (estimate)": "tab:green",
                 "activations": "tab:green", "reserve": "tab:gray", "free": "whitesmoke"}


def plot_memory(record: RunRecord, plan: Plan | None = None):
    """Memory per device as stacked bars, planned beside measured (CUDA peak as a dot), against the budgets (notebook 04)."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    plan = plan or record.plan
    rows = record.memory
    budgets = [r.get("budget_bytes") for r in rows]
    top = max([b for b in budgets if b] + [r["total_bytes"] for r in rows])
    unit, scale = size_unit(top)
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(rows) + 2), 4))
    act = "activations (estimate)"
    for i, row in enumerate(rows):
        bars = []
        if plan:
            st = plan.devices[i]
            bars.append((i - 0.2, [("parameters", st.param_bytes), ("KV cache", st.kv_cache_bytes),
                                   ("reserve", st.reserve_bytes)], "planned"))
        bars.append((i + 0.2 if plan else i, [("parameters", row["param_bytes"]), ("KV cache", row["kv_cache_bytes"]),
                                              (act, row.get("activation_bytes", 0))], "measured"))
        for x, parts, label in bars:
            bottom = 0
            for kind, value in parts:
                ax.bar(x, value / scale, 0.36, bottom=bottom / scale, color=MEMORY_COLORS[kind], edgecolor="black",
                       linewidth=0.3)
                bottom += value
            if budgets[i]:
                ax.bar(x, max(budgets[i] - bottom, 0) / scale, 0.36, bottom=bottom / scale, color="whitesmoke",
                       edgecolor="lightgray", linewidth=0.5, hatch="//")
            ax.text(x, bottom / scale, label, ha="center", va="bottom", fontsize=7, rotation=90)
        if budgets[i]:
            ax.hlines(budgets[i] / scale, i - 0.42, i + 0.42, colors="black", linestyles="--", linewidth=1.5)
        if "cuda_peak_bytes" in row:
            ax.plot(i + 0.2, row["cuda_peak_bytes"] / scale, "kD", markersize=5)
    handles = [Patch(color=MEMORY_COLORS[k], label=k) for k in ("parameters", "KV cache", act, "reserve")]
    handles.append(Patch(facecolor="whitesmoke", edgecolor="lightgray", hatch="//", label="free"))
    handles.append(plt.Line2D([], [], color="black", linestyle="--", label="budget"))
    if any("cuda_peak_bytes" in r for r in rows):
        handles.append(plt.Line2D([], [], color="black", marker="D", linestyle="", label="CUDA peak (measured)"))
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.set_xticks(range(len(rows)), [f"stage {r['stage']}\n{r['device']}" for r in rows])
    ax.set_ylabel(f"memory ({unit})")
    ax.set_title(f"Memory per device: planned (left) and measured (right), {record.mode} run")
    fig.tight_layout()
    return fig


TIMELINE_COLORS = {"prefill": "tab:purple", "decode": "tab:blue", "send": "tab:orange", "recv": "tab:green"}


def plot_timeline(record: RunRecord, max_step: int = 3, first_step: int | None = None):
    """A Gantt chart of each stage's busy intervals and sends/receives, steps `first_step` to `max_step` (notebooks 04, 05)."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    if first_step is None:
        first_step = 1 if any(e.step >= 1 for e in record.events) else 0
    events = [e for e in record.events if first_step <= e.step <= max_step]
    if not events:
        raise ValueError("this RunRecord has no timing events to draw")
    t0 = min(e.start for e in events)
    stages = sorted({e.stage for e in events})
    several = len({e.micro_batch for e in events}) > 1
    fig, ax = plt.subplots(figsize=(9, 0.55 * len(stages) + 1.8))
    span = max(e.end for e in events) - t0
    for e in events:
        key = e.phase if e.kind == "compute" else e.kind
        x, w = (e.start - t0) * 1000, (e.end - e.start) * 1000
        y, h = (e.stage - 0.38, 0.76) if e.kind == "compute" else (e.stage + (0.0 if e.kind == "send" else -0.38), 0.38)
        ax.broken_barh([(x, w)], (y, h), facecolors=TIMELINE_COLORS.get(key, "tab:gray"), edgecolor="black",
                       linewidth=0.3)
        if several and w > span * 1000 / 60:
            ax.text(x + w / 2, e.stage, str(e.micro_batch), ha="center", va="center", fontsize=7, color="white")
    kinds = sorted({e.phase if e.kind == "compute" else e.kind for e in events}, key=list(TIMELINE_COLORS).index)
    ax.legend(handles=[Patch(color=TIMELINE_COLORS[k], label=k) for k in kinds], fontsize=8, loc="upper left",
              bbox_to_anchor=(1.01, 1))
    ax.set_yticks(stages, [f"stage {s}" for s in stages])
    ax.invert_yaxis()
    ax.set_xlabel("time since the first event shown (ms)")
    shown = sorted({e.step for e in events})
    steps = f"steps {shown[0]} to {shown[-1]}" if len(shown) > 1 else f"step {shown[0]}"
    ax.set_title(f"Who is busy when: {record.mode} run, {steps} (step 0 = the prefill)"
                 + (" (numbers: micro-batches)" if several else ""))
    fig.tight_layout()
    return fig


def utilisation(record: RunRecord) -> list[float]:
    """Each stage's busy time over the run's wall time (notebook 04)."""
    return [b / record.total_seconds for b in record.busy_seconds()]


def plot_utilisation(record: RunRecord):
    """Utilisation per device as bars, with 1/n, the most a naive split of n stages can give each (notebook 04)."""
    import matplotlib.pyplot as plt

    used = utilisation(record)
    n = len(used)
    fig, ax = plt.subplots(figsize=(max(4, 0.9 * n + 2), 3.5))
    ax.bar(range(n), [u * 100 for u in used], color="tab:blue", label="busy time / wall time")
    ax.axhline(100 / n, color="tab:red", linestyle="--", label=f"naive split ideal: 1/n = {100 / n:.0f}%")
    ax.set_xticks(range(n), [f"stage {s}" for s in range(n)])
    ax.set_ylabel("utilisation (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"Utilisation per device, {record.mode} run (all stages together: {sum(used):.0%})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def prompt_of_length(tokenizer, tokens: int, words: str = "The list of numbers is sorted. ") -> str:
    """The shortest prefix of repeated `words` that is `tokens` tokens long (or just over), for scaling runs (notebook 04)."""
    text = words
    while len(tokenizer(text)["input_ids"]) < tokens:
        text += words
    low, high = 1, len(text)
    while low < high:  # bisect the character length
        mid = (low + high) // 2
        low, high = (mid + 1, high) if len(tokenizer(text[:mid])["input_ids"]) < tokens else (low, mid)
    return text[:low]


def measure_scaling(model_name: str = "tiny", n_devices=(1, 2, 4, 8), prompt_lengths=(8, 64, 256),
                    fixed_devices: int = 4, max_new_tokens: int = 16, device: str = "cpu",
                    dtype: torch.dtype = torch.float32, reps: int = 3, threads: int | None = 1) -> list[dict]:
    """Greedy runs over 1 to 8 virtual devices and over prompt lengths, interleaved, best of `reps` each (notebook 04)."""
    tokenizer = load_tokenizer(model_name)
    path = resolve_model(model_name)
    cases = [(n, prompt_lengths[0]) for n in n_devices] + [(fixed_devices, p) for p in prompt_lengths[1:]]
    models = {n: place_stages(path, plan_split(str(path), f"{n}x{device}", dtype=dtype, model_name=model_name))
              for n in dict.fromkeys(n for n, _ in cases)}
    prompts = {p: prompt_of_length(tokenizer, p) for _, p in cases}
    old_threads = torch.get_num_threads()
    if threads and device == "cpu":
        torch.set_num_threads(threads)
    try:
        runs: dict = {case: [] for case in cases}
        for _ in range(reps):
            for n, length in cases:
                runs[(n, length)].append(generate_text(models[n], tokenizer, prompts[length],
                                                       max_new_tokens=max_new_tokens, greedy=True)[1])
    finally:
        torch.set_num_threads(old_threads)
    rows = []
    for case in cases:
        best = max(runs[case], key=lambda r: r.tokens_per_second)
        rows.append({"n_devices": case[0], "prompt_tokens": best.settings["prompt_tokens"][0],
                     "tokens_per_second": best.tokens_per_second, "ms_per_token": 1000 / best.tokens_per_second,
                     "time_to_first_token_ms": min(r.time_to_first_token for r in runs[case]) * 1000,
                     "utilisation": utilisation(best)})
    return rows


def plot_scaling(rows: list[dict], fixed_devices: int = 4):
    """Tokens/s and per-token latency vs number of devices and vs prompt length, from `measure_scaling` (notebook 04)."""
    import matplotlib.pyplot as plt

    by_n = sorted({r["n_devices"]: r for r in rows if r["prompt_tokens"] == rows[0]["prompt_tokens"]}.values(),
                  key=lambda r: r["n_devices"])
    by_p = sorted([r for r in rows if r["n_devices"] == fixed_devices], key=lambda r: r["prompt_tokens"])
    fig, axes = plt.subplots(2, 2, figsize=(10, 6), sharex="col")
    for col, (data, key, label) in enumerate([(by_n, "n_devices", "number of devices (stages)"),
                                              (by_p, "prompt_tokens", "prompt length (tokens)")]):
        x = [r[key] for r in data]
        axes[0, col].plot(x, [r["tokens_per_second"] for r in data], "o-", label="decode tokens/s")
        axes[1, col].plot(x, [r["ms_per_token"] for r in data], "o-", label="per decode token")
        axes[1, col].plot(x, [r["time_to_first_token_ms"] for r in data], "s--", label="to the first token")
        axes[0, col].set_ylabel("tokens/s")
        axes[1, col].set_ylabel("latency (ms)")
        axes[1, col].set_xlabel(label)
        if key == "n_devices":
            axes[1, col].set_xticks(x)
        else:
            axes[1, col].set_xscale("log", base=2)
            axes[1, col].set_xticks(x, [str(v) for v in x])
            axes[1, col].minorticks_off()
        for ax in axes[:, col]:
            ax.set_ylim(bottom=0)
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
    axes[0, 0].set_title(f"vs devices (prompt of {by_n[0]['prompt_tokens']} tokens)" if by_n else "vs devices")
    axes[0, 1].set_title(f"vs prompt length ({fixed_devices} devices)")
    fig.suptitle("Naive split: speed is set by the sum of the stages, not by their number")
    fig.tight_layout()
    return fig


def copy_seconds(src: str, dst: str, nbytes: int, reps: int = 5) -> float:
    """Time to copy `nbytes` from one device to another (0 when both are the same: placement copies nothing)."""
    import time

    if torch.device(src) == torch.device(dst) or nbytes == 0:
        return 0.0
    x = torch.empty(nbytes, dtype=torch.uint8, device=src)
    best = math.inf
    for _ in range(reps):
        for d in (src, dst):
            if d.startswith("cuda"):
                torch.cuda.synchronize(d)
        start = time.perf_counter()
        x.to(dst)
        if dst.startswith("cuda"):
            torch.cuda.synchronize(dst)
        best = min(best, time.perf_counter() - start)
    return best


def compare_estimates(record: RunRecord, config) -> list[dict]:
    """Estimates beside measurements for one run: memory per device (the planner's formulas for the run's
    tokens) and the mean time per decode step (sum of the stages' mean times plus boundary copies, against
    the mean time between consecutive steps' starts on stage 0) (notebook 04)."""
    import statistics

    plan = record.plan
    dtype = getattr(torch, plan.dtype) if plan else torch.float32
    steps = max(e.step for e in record.events) + 1
    batch = record.settings.get("batch_size", 1)
    tokens = max(record.settings.get("prompt_tokens", [0])) + steps - 1
    rows = []
    for s, row in enumerate(record.memory):
        st = plan.devices[s] if plan else None
        n_blocks = (st.blocks[1] - st.blocks[0]) if st else config.n_layer
        planned_params = st.param_bytes if st else module_sizes(config, dtype)["total"]
        rows.append({"what": f"stage {s} parameters", "unit": "MiB", "estimate": planned_params / 2**20,
                     "measured": row["param_bytes"] / 2**20})
        rows.append({"what": f"stage {s} KV cache", "unit": "MiB",
                     "estimate": n_blocks * kv_cache_bytes_per_layer(config, dtype, tokens, batch) / 2**20,
                     "measured": row["kv_cache_bytes"] / 2**20})
        if "cuda_peak_bytes" in row:
            rows.append({"what": f"stage {s} params+KV+activations vs CUDA peak ({row['device']})", "unit": "MiB",
                         "estimate": sum(r["total_bytes"] for r in record.memory if r["device"] == row["device"])
                         / 2**20, "measured": row["cuda_peak_bytes"] / 2**20})
    decode = [e for e in record.events if e.phase == "decode" and e.kind == "compute"]
    n = len(record.memory)
    per_stage = [statistics.mean([e.end - e.start for e in decode if e.stage == s] or [0.0]) for s in range(n)]
    devices = [r["device"] for r in record.memory]
    hidden = batch * config.n_embd * dtype.itemsize  # one token's hidden states per sequence cross each boundary
    transfer = sum(copy_seconds(devices[s], devices[s + 1], hidden) for s in range(n - 1))
    starts = sorted(e.start for e in decode if e.stage == 0)
    step_wall = statistics.mean(b - a for a, b in zip(starts, starts[1:])) if len(starts) > 1 else float("nan")
    rows.append({"what": "time per decode step (stages + copies)", "unit": "ms",
                 "estimate": (sum(per_stage) + transfer) * 1000, "measured": step_wall * 1000})
    for row in rows:
        row["ratio"] = row["measured"] / row["estimate"] if row["estimate"] else float("nan")
    return rows


def format_estimates(rows: list[dict]) -> str:
    """Estimate | measured | ratio, one line each (notebook 04)."""
    return "\n".join(f"{r['what']:44} estimate {r['estimate']:9.3f} {r['unit']:3} | measured {r['measured']:9.3f} "
                     f"{r['unit']:3} | ratio {r['ratio']:.2f}" for r in rows)


# --------------------------------------------------------------------------
# 05 · pipeline parallelism
# --------------------------------------------------------------------------

PIPELINE_TIMEOUT = 60.0  # seconds a stage waits for a neighbour before the run fails


@dataclass
class PipelineJob:
    """One batch for the stage processes: left-padded token ids, micro-batch count, sampling options (notebook 05)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    micro_batches: int = 1
    max_new_tokens: int = 50
    greedy: bool = False
    temperature: float = 1.0
    top_p: float = 0.7
    top_k: int = 0
    seed: int = 0  # each micro-batch samples with its own torch.Generator seeded with this


def make_job(input_ids: torch.Tensor, attention_mask: torch.Tensor, micro_batches: int = 1,
             max_new_tokens: int = 50, greedy: bool = False, temperature: float = 1.0, top_p: float = 0.7,
             top_k: int = 0, seed: int | None = None) -> PipelineJob:
    """Check the options of one pipelined generation and bundle them; options as generate_text's (notebook 05)."""
    batch = input_ids.shape[0]
    if not 1 <= micro_batches <= batch:
        raise ValueError(f"micro_batches={micro_batches}: use between 1 and the number of prompts ({batch})")
    check_sampling(max_new_tokens, greedy, temperature, top_p, top_k)
    if seed is None:  # like generate without a seed: whatever torch's global generator gives
        seed = int(torch.randint(2**62, ()))
    return PipelineJob(input_ids, attention_mask, micro_batches, max_new_tokens, greedy, temperature, top_p,
                       top_k, seed)


def check_stage_count(n: int, n_layer: int) -> None:
    """A pipeline stage needs at least one block: refuse more stages than blocks (notebook 05)."""
    if n > n_layer:
        raise ValueError(f"{n} stages but the model has only {n_layer} blocks: use at most {n_layer} devices")


def check_pipeline_plan(plan: Plan, n_layer: int, world_size: int | None = None) -> None:
    """Refuse a plan the pipeline cannot run, before anything is loaded (notebook 05)."""
    n = len(plan.devices)
    check_stage_count(n, n_layer)
    if plan.devices[-1].blocks[1] != n_layer:
        raise ValueError(f"the plan covers {plan.devices[-1].blocks[1]} blocks but the model has {n_layer}")
    if world_size is not None and world_size != n:
        raise ValueError(f"{world_size} process(es) for {n} stage(s): start one process per device "
                         f"(torchrun --nproc-per-node {n}, or nodes x processes = {n})")


@dataclass
class PipelineStage:
    """What one stage process holds: its modules (embedding on the first, head on the last) and its place (notebook 05)."""

    rank: int
    world_size: int
    device: torch.device
    dtype: torch.dtype
    config: object  # the model's config with n_layer = this stage's block count (sizes its KV caches)
    blocks: torch.nn.ModuleList
    rotary: torch.nn.Module
    wte: torch.nn.Module | None
    ln_f: torch.nn.Module | None
    lm_head: torch.nn.Module | None
    param_bytes: int
    eos_token_id: int
    comm_device: torch.device  # where tensors cross: the GPU for NCCL, the CPU for gloo


def load_stage(model_path: str | Path, plan: Plan, rank: int, dtype: torch.dtype,
               comm_device: str = "cpu") -> PipelineStage:
    """Build stage `rank` alone: a meta-device model whose own tensors are loaded from safetensors (notebook 05)."""
    import copy

    model = place_stages(model_path, plan, dtype, stages=[rank])  # the other stages stay on the meta device
    for hook in model.hooks.values():  # this process runs its modules itself, nothing crosses inside it
        hook.remove()
    config, st = model.config, plan.devices[rank]
    a, b = st.blocks
    blocks = model.transformer.h[a:b]
    for i, block in enumerate(blocks):  # the stage's own KV cache counts its layers from 0
        block.attn.layer_idx = i
    stage_config = copy.deepcopy(model.config)
    stage_config.n_layer = b - a
    params = sum(tensor_bytes(p) for n, p in model.named_parameters() if plan.stage_of_module(n) == rank)
    eos = config.eos_token_id if isinstance(config.eos_token_id, int) else config.eos_token_id[0]
    return PipelineStage(rank, len(plan.devices), torch.device(st.device), dtype, stage_config, blocks,
                         model.transformer.rotary_emb.to(st.device), model.transformer.wte if st.embedding else None,
                         model.transformer.ln_f if st.head else None, model.lm_head if st.head else None, params,
                         eos, torch.device(comm_device))


def new_stage_cache(stage: PipelineStage):
    """An empty KV cache for this stage's layers, one per micro-batch (notebook 05)."""
    from transformers import DynamicCache

    return DynamicCache(config=stage.config)


def forward_stage(stage: PipelineStage, x: torch.Tensor, mask: torch.Tensor, cache) -> torch.Tensor:
    """Run one stage: token ids or hidden states in; hidden states, or the last position's float32 logits, out."""
    from transformers.masking_utils import create_causal_mask

    hidden = stage.wte(x) if stage.wte is not None else x
    q = hidden.shape[1]
    # generate's position ids: count of real tokens so far, padding at 0; every stage derives them from the mask
    positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)[:, -q:]
    if len(stage.blocks):
        causal = create_causal_mask(config=stage.config, inputs_embeds=hidden, attention_mask=mask, cache=cache,
                                    position_ids=positions)
        rotary = stage.rotary(hidden, position_ids=positions)
        for block in stage.blocks:
            hidden = block(hidden, attention_mask=causal, position_ids=positions, cache=cache, use_cache=True,
                           position_embeddings=rotary)
    if stage.lm_head is None:
        return hidden
    return stage.lm_head(stage.ln_f(hidden)[:, -1:, :])[:, -1].to(copy=True, dtype=torch.float32)


def make_warpers(job: PipelineJob):
    """transformers' own temperature, top-k and top-p warpers, in generate's order (notebook 05)."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    warpers = LogitsProcessorList()
    if not job.greedy and job.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(job.temperature))
    if not job.greedy and job.top_k:
        warpers.append(TopKLogitsWarper(top_k=job.top_k, min_tokens_to_keep=1))
    if not job.greedy and job.top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=job.top_p, min_tokens_to_keep=1))
    return warpers


def pick_tokens(logits: torch.Tensor, job: PipelineJob, warpers, generator: torch.Generator | None) -> torch.Tensor:
    """Greedy argmax, or softmax + multinomial with the micro-batch's own generator, as generate does."""
    if job.greedy:
        return torch.argmax(logits, dim=-1)
    probs = torch.nn.functional.softmax(warpers(None, logits), dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)


class Inbox:
    """The messages a stage will receive from one neighbour, in order; receives are posted ahead (`irecv`)."""

    def __init__(self, stage: PipelineStage, src: int, shapes: list[tuple[tuple[int, ...], torch.dtype]],
                 record, ahead: int = 2):
        self.stage, self.src, self.shapes, self.record, self.ahead = stage, src, shapes, record, ahead
        self.posted: list[tuple[torch.Tensor, object]] = []
        self.next = 0

    def post(self) -> None:
        import torch.distributed as dist

        while self.next < len(self.shapes) and len(self.posted) < self.ahead:
            shape, dtype = self.shapes[self.next]
            buffer = torch.empty(shape, dtype=dtype, device=self.stage.comm_device)
            self.posted.append((buffer, dist.irecv(buffer, src=self.src)))
            self.next += 1

    def get(self, phase: str, step: int, micro_batch: int) -> torch.Tensor:
        """Wait for the next message (timed as a "recv" event) and post the following receives."""
        self.post()
        start = self.record()
        buffer, work = self.posted.pop(0)
        work.wait()
        self.post()
        self.record(start, phase, step, micro_batch, "recv")
        return buffer.to(self.stage.device)


class Outbox:
    """Sends that overlap the next compute (`isend`); buffers are kept alive until their send completes."""

    def __init__(self, stage: PipelineStage, record, limit: int = 8):
        self.stage, self.record, self.limit, self.pending = stage, record, limit, []

    def send(self, tensor: torch.Tensor, dst: int, phase: str, step: int, micro_batch: int) -> None:
        import torch.distributed as dist

        start = self.record()
        buffer = tensor.to(self.stage.comm_device).contiguous()
        self.pending.append((buffer, dist.isend(buffer, dst=dst)))
        while len(self.pending) > self.limit:
            self.pending.pop(0)[1].wait()
        self.record(start, phase, step, micro_batch, "send")

    def flush(self) -> None:
        while self.pending:
            self.pending.pop(0)[1].wait()


def inject_fault(stage: PipelineStage, fail: tuple | None, step: int) -> None:
    """Test hook: stage S raises (or exits at once) when it reaches token K; `fail` = (S, K, "raise" | "exit")."""
    if not fail or fail[0] != stage.rank or fail[1] != step:
        return
    message = f"injected fault: pipeline stage {stage.rank} stops after {step} token(s)"
    if len(fail) > 2 and fail[2] == "exit":
        print(message + " (process exits)", file=sys.stderr, flush=True)
        os._exit(3)
    raise RuntimeError(message)


def run_stage(stage: PipelineStage, job: PipelineJob, t0: float, fail: tuple | None = None) -> dict:
    """One stage's share of a pipelined generation, micro-batches in the same order on every stage: events, memory,
    and on the last stage the new tokens (notebook 05)."""
    import time

    rank, n, dev = stage.rank, stage.world_size, stage.device
    first, last = rank == 0, rank == n - 1
    rows = torch.arange(job.input_ids.shape[0]).tensor_split(job.micro_batches)
    ids = [job.input_ids[r].to(dev) for r in rows]
    masks = [job.attention_mask[r].to(dev) for r in rows]
    caches = [new_stage_cache(stage) for _ in rows]
    prompt_len, steps, width = job.input_ids.shape[1], job.max_new_tokens, stage.config.n_embd
    events: list[TimingEvent] = []

    def record(start=None, phase="", step=0, micro_batch=0, kind="compute"):
        now = time.time() - t0  # one clock for all stages (on one machine; across machines as synced as theirs)
        if start is not None:
            events.append(TimingEvent(rank, phase, step, start, now, kind, micro_batch))
        return now

    inbox = None
    if not first:  # hidden states from the previous stage, in schedule order
        shapes = [((len(r), prompt_len if s == 0 else 1, width), stage.dtype) for s in range(steps) for r in rows]
        inbox = Inbox(stage, rank - 1, shapes, record)
    elif n > 1:  # token ids from the last stage, for every step but the last
        inbox = Inbox(stage, n - 1, [((len(r),), torch.long) for s in range(steps - 1) for r in rows], record)
    outbox = Outbox(stage, record)
    tokens = [[] for _ in rows]
    unfinished = [torch.ones(len(r), dtype=torch.long, device=dev) for r in rows]
    generators = [torch.Generator(device=dev).manual_seed(job.seed) for _ in rows] if last and not job.greedy else None
    warpers = make_warpers(job)
    with torch.inference_mode():
        for step in range(steps):
            inject_fault(stage, fail, step)
            phase = "prefill" if step == 0 else "decode"
            for m in range(len(rows)):
                if first:
                    x = ids[m] if step == 0 else (inbox.get(phase, step, m) if n > 1 else tokens[m][-1])
                    x = x.view(len(rows[m]), -1)
                else:
                    x = inbox.get(phase, step, m)
                start = record()
                out = forward_stage(stage, x, masks[m], caches[m])
                if last:
                    out = pick_tokens(out, job, warpers, generators[m] if generators else None)
                    out = out * unfinished[m] + stage.eos_token_id * (1 - unfinished[m])  # pad = eos after eos
                    unfinished[m] = unfinished[m] & (out != stage.eos_token_id).long()
                    tokens[m].append(out)
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                record(start, phase, step, m)
                masks[m] = torch.cat([masks[m], masks[m].new_ones((len(rows[m]), 1))], dim=-1)
                if not last:
                    outbox.send(out, rank + 1, phase, step, m)
                elif n > 1 and step < steps - 1:
                    outbox.send(out, 0, phase, step, m)
        outbox.flush()
    kv = sum(kv_bytes(layer) for c in caches for layer in c.layers)
    memory = {"stage": rank, "device": str(dev), "param_bytes": stage.param_bytes, "kv_cache_bytes": kv,
              "total_bytes": stage.param_bytes + kv}
    if dev.type == "cuda":
        memory["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated(dev)
    else:
        import psutil

        memory["process_rss_bytes"] = psutil.Process().memory_info().rss
    new = torch.cat([torch.stack(t, dim=1) for t in tokens]).cpu() if last else None
    return {"events": events, "memory": memory, "new_tokens": new}


def merge_stage_results(results: list[dict], job: PipelineJob, tokenizer, plan: Plan | None,
                        eos: int) -> RunRecord:
    """Combine what the stages report into one RunRecord, trimmed like generate (stop when all rows hit eos)."""
    new = results[-1]["new_tokens"]
    done = (new == eos).int()
    finished_at = torch.where(done.any(1), done.argmax(1), torch.full_like(done[:, 0], new.shape[1] - 1))
    length = int(finished_at.max()) + 1
    output = torch.cat([job.input_ids, new[:, :length]], dim=1)
    counts = (finished_at + 1).tolist()  # each row's tokens up to its eos, as generate_text counts them
    texts = [tokenizer.decode(row[:n], skip_special_tokens=True) for row, n in zip(new, counts)]
    events = sorted((e for r in results for e in r["events"]), key=lambda e: (e.start, e.stage))
    last = len(results) - 1
    ttft = max(e.end for e in events if e.stage == last and e.kind == "compute" and e.step == 0)
    total = max(e.end for e in events)
    after_first = sum(counts) - len(counts)
    knobs = {} if job.greedy else {"temperature": job.temperature, "top_p": job.top_p, "top_k": job.top_k}
    return RunRecord(texts=texts, prompts=[], mode="pipeline", new_tokens=sum(counts), time_to_first_token=ttft,
                     tokens_per_second=after_first / (total - ttft) if total > ttft else float("nan"),
                     total_seconds=total, events=events, memory=[r["memory"] for r in results], plan=plan,
                     settings={"max_new_tokens": job.max_new_tokens, "greedy": job.greedy, **knobs, "seed": job.seed,
                               "batch_size": len(counts), "micro_batches": job.micro_batches},
                     output_ids=output)


def default_dtype(config) -> torch.dtype:
    """The dtype the weights were saved in (float32 when the config does not say)."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def pick_backend(devices: list[str], local_world_size: int | None = None) -> str:
    """NCCL when every stage has a GPU of its own, else gloo (notebook 05)."""
    if all(d.startswith("cuda") for d in devices) and (len(set(devices)) == len(devices) or local_world_size == 1):
        return "nccl"
    return "gloo"


def configure_worker(threads: int | None, cpus: list[int] | None) -> None:
    """Limit this process's threads and pin it to some cores (the benchmark emulates one device per core)."""
    if cpus:
        os.sched_setaffinity(0, set(cpus))
    if threads:
        torch.set_num_threads(threads)
        with contextlib.suppress(RuntimeError):  # only settable before the first parallel work
            torch.set_num_interop_threads(threads)


def reset_peak_rss() -> int | None:
    """Start a new peak-RSS window for this process; its RSS now, the baseline (Linux only, else None) (notebook 05)."""
    import psutil

    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        return None
    return psutil.Process().memory_info().rss


def peak_rss() -> int | None:
    """This process's peak RSS since `reset_peak_rss` (VmHWM: its own; ru_maxrss would include its parent's)."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    return int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) * 1024


def serve_stage(rank: int, world_size: int, spec: dict) -> list[RunRecord] | None:
    """One stage process under run_pipeline or torchrun: rank 0 plans and broadcasts, all load and run (notebook 05)."""
    import datetime
    import time

    import torch.distributed as dist

    if spec.get("devices") and len(parse_devices(spec["devices"], check=False)) != world_size:
        raise ValueError(f"{world_size} process(es) for the {len(parse_devices(spec['devices'], check=False))} "
                         f"device(s) in {spec['devices']!r}: start one process per device")
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    cpus = spec["affinity"][rank] if spec.get("affinity") else None
    configure_worker(spec.get("threads") or (max(1, (os.cpu_count() or 1) // local_world)
                                             if spec.get("launched_here") else None), cpus)
    setup: list = [None]
    if rank == 0:
        try:
            setup[0] = prepare_pipeline(spec, world_size)
        except (ValueError, MemoryError, FileNotFoundError) as err:
            setup[0] = err
    if world_size == 1 and isinstance(setup[0], Exception):
        raise setup[0]
    names = spec.get("stage_devices") or [d.name for d in parse_devices(spec["devices"], check=False)]
    backend = spec.get("backend") or pick_backend(names, local_world)
    timeout = datetime.timedelta(seconds=spec.get("timeout", PIPELINE_TIMEOUT))
    if backend == "nccl":
        torch.cuda.set_device(torch.device(names[rank]))
    dist.init_process_group(backend, init_method=spec.get("init_method", "env://"), rank=rank,
                            world_size=world_size, timeout=timeout)
    try:
        dist.broadcast_object_list(setup, src=0)
        if isinstance(setup[0], Exception):
            raise setup[0]
        plan, jobs, model_path = setup[0]
        dtype = getattr(torch, spec.get("dtype") or plan.dtype)
        tokenizer = load_tokenizer(str(model_path)) if rank == 0 else None
        import accelerate.utils  # noqa: F401  (libraries belong to the baseline, not to the stage)
        import safetensors  # noqa: F401
        import transformers.masking_utils  # noqa: F401
        from transformers import DynamicCache, GPTJForCausalLM  # noqa: F401

        baseline = reset_peak_rss()
        start = time.perf_counter()
        stage = load_stage(model_path, plan, rank, dtype, plan.devices[rank].device if backend == "nccl" else "cpu")
        load_seconds = time.perf_counter() - start
        records = []
        for job in jobs:
            dist.barrier()
            t0 = [time.time()]
            dist.broadcast_object_list(t0, src=0)
            result = run_stage(stage, job, t0[0], spec.get("fail"))
            result["memory"]["load_seconds"] = load_seconds
            if baseline is not None:  # host memory of this stage process over its RSS after imports, before loading
                result["memory"]["peak_rss_bytes"] = peak_rss() - baseline
            gathered = [None] * world_size if rank == 0 else None
            dist.gather_object(result, gathered, dst=0)
            if rank == 0:
                records.append(merge_stage_results(gathered, job, tokenizer, plan, stage.eos_token_id))
                records[-1].prompts = list(spec.get("prompts") or [])
        dist.barrier()  # nobody leaves while a neighbour still talks to it
        return records if rank == 0 else None
    finally:
        dist.destroy_process_group()


def prepare_pipeline(spec: dict, world_size: int) -> tuple[Plan, list[PipelineJob], Path]:
    """On rank 0: the plan (given, or made from the devices) and the jobs, checked; nothing loaded yet."""
    model_path = resolve_model(str(spec["model"]))
    config = load_config(str(model_path))
    jobs = spec.get("jobs")
    if jobs is None:
        jobs = [prompts_job(model_path, config, spec["prompts"], spec.get("micro_batches", 1),
                            **spec.get("sampling", {}))]
    if spec.get("plan_json"):
        plan = Plan.from_json(spec["plan_json"])
    else:
        dtype = getattr(torch, spec["dtype"]) if spec.get("dtype") else None
        plan = plan_pipeline(config, spec["devices"], jobs, dtype, str(spec["model"]))
    check_pipeline_plan(plan, config.n_layer, world_size)
    return plan, jobs, model_path


def plan_pipeline(config, devices: str | list[Device], jobs: list[PipelineJob], dtype: torch.dtype | None,
                  model_name: str) -> Plan:
    """Plan one stage per device, with KV cache room for the longest and widest job (notebook 05)."""
    devices = devices if isinstance(devices, str) else ",".join(f"{d.name}={d.budget_bytes}" for d in devices)
    check_stage_count(len(parse_devices(devices, check=False)), config.n_layer)
    return plan_split(config, devices, dtype=dtype or default_dtype(config),
                      max_new_tokens=max(j.input_ids.shape[1] + j.max_new_tokens for j in jobs),
                      batch_size=max(j.input_ids.shape[0] for j in jobs), model_name=model_name)


def model_folder(model) -> Path:
    """The local folder of a model name, folder or loaded model."""
    return resolve_model(str(getattr(getattr(model, "config", None), "_name_or_path", None) or model))


def pipeline_worker(rank: int, spec: dict) -> None:
    """Entry point of a stage process started by run_pipeline; results go to files, errors too (notebook 05)."""
    import pickle
    import time
    import traceback

    try:
        records = serve_stage(rank, spec["world_size"], spec)
        if rank == 0:
            tmp = Path(spec["result_path"] + ".tmp")
            tmp.write_bytes(pickle.dumps(records))
            os.replace(tmp, spec["result_path"])
    except BaseException as err:
        report = {"stage": rank, "time": time.time(), "error": f"{type(err).__name__}: {err}",
                  "traceback": traceback.format_exc(), "neighbour": is_neighbour_error(err)}
        Path(spec["error_dir"], f"stage{rank}.json").write_text(json.dumps(report))
        raise SystemExit(1) from None  # the launcher reports it, naming the stage
    leave_process()


def leave_process(code: int = 0) -> None:
    """Exit a stage process at once: gloo's threads can abort an orderly interpreter shutdown (SIGABRT)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class PipelineError(RuntimeError):
    """A stage process failed; `stage` names it, `failed_at` is when (time.time()) (notebook 05)."""

    def __init__(self, message: str, stage: int, failed_at: float):
        super().__init__(message)
        self.stage, self.failed_at = stage, failed_at


def is_neighbour_error(err: BaseException) -> bool:
    """Did this error come from the transport (a neighbour vanished or timed out), not from this stage itself?"""
    import torch.distributed as dist

    text = str(err).lower()
    return isinstance(err, dist.DistError) or any(w in text for w in ("connection", "gloo", "timed out", "nccl"))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_stages(spec: dict, world_size: int) -> list[RunRecord]:
    """Start one process per stage (spawn) and return rank 0's records; a failure stops all and names the stage (notebook 05)."""
    import multiprocessing
    import multiprocessing.connection
    import pickle
    import time

    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="gptj-pipeline-") as tmp:
        spec = {**spec, "world_size": world_size, "result_path": str(Path(tmp, "result.pkl")), "error_dir": tmp,
                "init_method": f"tcp://127.0.0.1:{free_port()}", "launched_here": True}
        procs = [ctx.Process(target=pipeline_worker, args=(r, spec), daemon=True, name=f"pipeline-stage-{r}")
                 for r in range(world_size)]
        exits: dict[int, float] = {}
        try:
            for p in procs:
                p.start()
            while len(exits) < world_size:
                multiprocessing.connection.wait([p.sentinel for p in procs if p.exitcode is None], timeout=1.0)
                for r, p in enumerate(procs):
                    if p.exitcode is not None and r not in exits:
                        exits[r] = time.time()
                if any(procs[r].exitcode != 0 for r in exits):
                    break
        finally:
            for p in procs:
                if p.is_alive():
                    p.terminate()
            for p in procs:
                p.join(5)
                if p.is_alive():
                    p.kill()
                    p.join()
        failed = {r: t for r, t in exits.items() if procs[r].exitcode != 0}
        if failed:
            raise describe_stage_failure(tmp, failed, procs)
        return pickle.loads(Path(spec["result_path"]).read_bytes())


def describe_stage_failure(error_dir: str, failed: dict[int, float], procs) -> Exception:
    """Name the stage that failed first (its own report, or its exit code) and what it said."""
    reports = [json.loads(p.read_text()) for p in Path(error_dir).glob("stage*.json")]
    for r, t in failed.items():
        if not any(rep["stage"] == r for rep in reports):  # died without a word: killed, or exited hard
            reports.append({"stage": r, "time": t, "error": f"process exited with code {procs[r].exitcode}",
                            "traceback": "", "neighbour": False})
    # a stage's own error beats the transport errors its neighbours then see; among equals, the earliest
    first = min(reports, key=lambda rep: (rep["neighbour"], rep["time"]))
    kind, _, text = first["error"].partition(": ")
    if kind in ("ValueError", "MemoryError", "FileNotFoundError"):  # a bad configuration, refused before loading
        return {"ValueError": ValueError, "MemoryError": MemoryError, "FileNotFoundError": FileNotFoundError}[kind](text)
    tail = "\n".join(first["traceback"].strip().splitlines()[-6:-1])
    message = f"pipeline stage {first['stage']} failed: {first['error']}" + (f"\n{tail}" if tail else "")
    return PipelineError(message, first["stage"], first["time"])


def measure_module_seconds(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                           max_new_tokens: int = 4, repeats: int = 1) -> dict[str, list[float]]:
    """Seconds of each module (embedding, every block, head) for one prefill and one decode step, timed inside
    `generate` with hooks (the fastest of `repeats`): the `cost` to balance a pipeline's stages by (notebook 05)."""
    import time

    if repeats > 1:
        runs = [measure_module_seconds(model, input_ids, attention_mask, max_new_tokens) for _ in range(repeats)]
        return {phase: [min(r[phase][i] for r in runs) for i in range(len(runs[0][phase]))] for phase in runs[0]}
    t = model.transformer
    parts = [(t.wte, t.wte), *((b, b) for b in t.h), (t.ln_f, model.lm_head)]  # (first module, last module)
    seconds = {"prefill": [0.0] * len(parts), "decode": [0.0] * len(parts)}
    started: dict[int, tuple[float, str]] = {}
    handles = []
    for i, (head_module, tail_module) in enumerate(parts):
        def pre(module, args, i=i):
            started[i] = (time.perf_counter(), "prefill" if args[0].shape[1] > 1 else "decode")

        def post(module, args, out, i=i):
            start, phase = started.pop(i)
            seconds[phase][i] += time.perf_counter() - start

        handles += [head_module.register_forward_pre_hook(pre), tail_module.register_forward_hook(post)]
    try:
        with torch.inference_mode():
            model.generate(input_ids, attention_mask=attention_mask, do_sample=False, max_new_tokens=max_new_tokens,
                           min_new_tokens=max_new_tokens, pad_token_id=model.config.eos_token_id)
    finally:
        for h in handles:
            h.remove()
    seconds["decode"] = [s / max(1, max_new_tokens - 1) for s in seconds["decode"]]
    return seconds


def run_pipeline_jobs(model, devices: str | list[Device] | None, jobs: list[PipelineJob], plan: Plan | None = None,
                      dtype: torch.dtype | None = None, timeout: float = PIPELINE_TIMEOUT, threads: int | None = None,
                      affinity: list[list[int]] | None = None, fail: tuple | None = None) -> list[RunRecord]:
    """Several generations in one start of the stage processes (benchmarks and tests reuse the loaded stages)."""
    model_path = model_folder(model)
    config = load_config(str(model_path))
    if plan is None:
        if devices is None:
            raise ValueError("give devices (like 'cpu,cpu') or a plan")
        dtype = dtype or default_dtype(config)
        plan = plan_pipeline(config, devices, jobs, dtype, str(model))
    check_pipeline_plan(plan, config.n_layer)
    if affinity is not None and len(affinity) != len(plan.devices):
        raise ValueError(f"affinity needs one list of cores per stage ({len(plan.devices)}), got {len(affinity)}")
    dtype_name = str(dtype).replace("torch.", "") if dtype is not None else None
    spec = {"model": str(model_path), "plan_json": plan.to_json(), "jobs": jobs, "dtype": dtype_name,
            "timeout": timeout, "threads": threads, "affinity": affinity, "fail": fail,
            "stage_devices": [s.device for s in plan.devices], "backend": pick_backend([s.device for s in plan.devices])}
    return launch_stages(spec, len(plan.devices))


def prompts_job(model_path: Path, config, prompts: list[str], micro_batches: int = 1, max_new_tokens: int = 50,
                **knobs) -> PipelineJob:
    """Tokenize and left-pad prompts as generate_text does, checked the same way, into a job (notebook 05)."""
    tokenizer = load_tokenizer(str(model_path))
    ids = check_generation(config, tokenizer, prompts, max_new_tokens,
                           **{k: v for k, v in knobs.items() if k != "seed"})
    input_ids, mask = pad_left(ids, tokenizer.eos_token_id, "cpu")
    return make_job(input_ids, mask, micro_batches, max_new_tokens, **knobs)


def run_pipeline(model, prompts: list[str], devices: str | list[Device] | None = None,
                 micro_batches: int = 1, plan: Plan | None = None, dtype: torch.dtype | None = None,
                 timeout: float = PIPELINE_TIMEOUT, threads: int | None = None,
                 affinity: list[list[int]] | None = None, fail: tuple | None = None, **sampling) -> RunRecord:
    """Generate with one process per stage, micro-batches flowing through them at once; texts + RunRecord (notebook 05).

    `model` is a name or folder ("tiny", "gpt-j-6b", a path); `sampling` takes generate_text's max_new_tokens,
    greedy, temperature, top_p, top_k and seed. Like generate_text, `texts[i]` continues `prompts[i]`. Greedy tokens
    equal `model.generate` on the whole batch; seeded sampling equals `torch.manual_seed(seed); model.generate(...)`
    run on each micro-batch alone (each micro-batch has its own generator), so on the whole batch when
    micro_batches=1.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    model_path = model_folder(model)
    job = prompts_job(model_path, load_config(str(model_path)), prompts, micro_batches, **sampling)
    record = run_pipeline_jobs(model_path, devices, [job], plan=plan, dtype=dtype, timeout=timeout, threads=threads,
                               affinity=affinity, fail=fail)[0]
    record.prompts = prompts
    return record


# --------------------------------------------------------------------------
# 06 · prompt widget
# --------------------------------------------------------------------------

class StopOnEvent:
    """A transformers stopping criterion: generation ends after the current token once `event` is set (notebook 06)."""

    def __init__(self, event):
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def format_run_line(record: RunRecord, stopped: bool = False) -> str:
    """One line after a widget run: how it ended, tokens/s, and each stage's device, busy share and memory (notebook 06)."""
    asked = record.settings.get("max_new_tokens", record.new_tokens)
    ended = (f"stopped after {record.new_tokens} of {asked} tokens" if stopped and record.new_tokens < asked
             else f"{record.new_tokens} tokens" + (" (end of text)" if record.new_tokens < asked else ""))
    busy = record.busy_seconds()
    stages = [f"stage {s} {row['device']}: busy {(busy[s] if s < len(busy) else 0) / record.total_seconds:.0%}, "
              f"{format_size(row['total_bytes'])}" for s, row in enumerate(record.memory)]
    allocated = {row["device"]: row["cuda_allocated_bytes"] for row in record.memory if "cuda_allocated_bytes" in row}
    stages += [f"{device} allocated {format_size(n)}" for device, n in allocated.items()]
    speed = "one token: no rate" if math.isnan(record.tokens_per_second) else f"{record.tokens_per_second:.1f} tokens/s"
    return " · ".join([f"{ended} in {record.total_seconds:.2f} s", speed, *stages])


class PromptWidget:
    """Prompt box, sampling controls, Generate/Stop and streamed text; generates in a background thread (notebook 06)."""

    def __init__(self, model, tokenizer, prompt: str = "", max_new_tokens: int = 50, generate=None):
        import html
        import threading

        import ipywidgets as w

        self.model, self.tokenizer, self.escape = model, tokenizer, html.escape
        self.generate_fn = generate or generate_text
        self.stop_event, self.thread, self.record, self.error = threading.Event(), None, None, None
        self.prompt_used, self.text = "", ""
        limit = model.config.n_positions - 1
        wide = {"style": {"description_width": "9em"}, "layout": w.Layout(width="28em")}
        self.prompt = w.Textarea(value=prompt, placeholder="Type a prompt", description="prompt",
                                 layout=w.Layout(width="100%", height="5em"), style=wide["style"])
        self.max_new_tokens = w.IntSlider(min(max_new_tokens, limit), min=1, max=limit, description="max new tokens",
                                          **wide)
        self.temperature = w.FloatSlider(SAMPLING_DEFAULTS["temperature"], min=0.0, max=2.0, step=0.05,
                                         description="temperature", **wide)
        self.top_p = w.FloatSlider(SAMPLING_DEFAULTS["top_p"], min=0.0, max=1.0, step=0.05, description="top-p", **wide)
        self.top_k = w.IntSlider(SAMPLING_DEFAULTS["top_k"], min=0, max=200, description="top-k (0: off)", **wide)
        self.seed = w.IntText(0, description="seed", **wide)
        self.greedy = w.Checkbox(False, description="greedy (no sampling)", indent=False)
        self.generate_button = w.Button(description="Generate", button_style="primary", icon="play")
        self.stop_button = w.Button(description="Stop", button_style="danger", icon="stop", disabled=True)
        self.output = w.HTML().add_class("gptj-output")
        self.status = w.HTML().add_class("gptj-status")
        self.message = w.HTML().add_class("gptj-message")
        self.generate_button.on_click(self.start)
        self.stop_button.on_click(self.stop)
        self.greedy.observe(self.show_sampling, "value")
        controls = w.VBox([self.max_new_tokens, self.temperature, self.top_p, self.top_k, self.seed, self.greedy])
        self.ui = w.VBox([self.prompt, controls, w.HBox([self.generate_button, self.stop_button]), self.message,
                          self.output, self.status]).add_class("gptj-prompt-widget")

    def _repr_mimebundle_(self, **kwargs):
        return self.ui._repr_mimebundle_(**kwargs)

    def show_sampling(self, change=None) -> None:
        """Grey out temperature, top-p and top-k while greedy is ticked."""
        for slider in (self.temperature, self.top_p, self.top_k):
            slider.disabled = self.greedy.value

    def settings(self) -> dict:
        """The controls' values as `generate_text` keywords."""
        return {"max_new_tokens": self.max_new_tokens.value, "greedy": self.greedy.value,
                "temperature": self.temperature.value, "top_p": self.top_p.value, "top_k": self.top_k.value,
                "seed": self.seed.value}

    def show_text(self, piece: str = "", stream_end: bool = False) -> None:
        """Append a streamed piece of text to the output, after the prompt in bold."""
        self.text += piece
        self.output.value = (f'<pre style="white-space: pre-wrap; margin: 0"><b>{self.escape(self.prompt_used)}</b>'
                             f"{self.escape(self.text)}</pre>")

    def show_error(self, err: Exception) -> None:
        """A readable message in the widget instead of a traceback."""
        self.error = err
        kind = "" if isinstance(err, ValueError) else f"{type(err).__name__}: "
        self.message.value = f'<span style="color: #b00020">{self.escape(kind + str(err))}</span>'

    def start(self, button=None) -> None:
        """Generate's click handler: check the settings here, then generate in a background thread."""
        import threading

        if self.running():
            return
        self.message.value, self.status.value, self.error = "", "", None
        settings, prompt = self.settings(), self.prompt.value
        try:
            check_generation(self.model.config, self.tokenizer, prompt, **{k: v for k, v in settings.items()
                                                                           if k != "seed"})
        except ValueError as err:
            self.show_error(err)
            return
        self.stop_event.clear()
        self.prompt_used, self.text, self.record = prompt, "", None
        self.generate_button.disabled, self.stop_button.disabled = True, False
        self.show_text()
        self.status.value = "generating..."
        self.thread = threading.Thread(target=self.run, args=(prompt, settings), daemon=True)
        self.thread.start()

    def run(self, prompt: str, settings: dict) -> None:
        """The background thread: stream the text into the output, then show the run's line."""
        from transformers import TextStreamer

        try:
            streamer = TextStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
            streamer.on_finalized_text = self.show_text
            _, self.record = self.generate_fn(self.model, self.tokenizer, prompt, stream=streamer,
                                              stopping_criteria=[StopOnEvent(self.stop_event)], **settings)
            self.status.value = self.escape(format_run_line(self.record, stopped=self.stop_event.is_set()))
        except Exception as err:  # shown in the widget: the UI must survive any failure of a run
            self.status.value = ""
            self.show_error(err)
        finally:
            self.generate_button.disabled, self.stop_button.disabled = False, True

    def stop(self, button=None) -> None:
        """Stop's click handler: generation ends after the token being computed."""
        self.stop_event.set()

    def running(self) -> bool:
        """Whether a generation is in progress."""
        return self.thread is not None and self.thread.is_alive()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the current generation to end; True when none is left running."""
        if self.thread is not None:
            self.thread.join(timeout)
        return not self.running()


def prompt_widget(model, tokenizer, prompt: str = "", max_new_tokens: int = 50, generate=None) -> PromptWidget:
    """An interactive prompt for a split (or whole) model; `generate` has `generate_text`'s signature (notebook 06)."""
    return PromptWidget(model, tokenizer, prompt=prompt, max_new_tokens=max_new_tokens, generate=generate)


# --------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------

def output_dir() -> Path | None:
    """Where notebooks save figures: $GPTJ_HELPERS_OUT when set (`make demo` sets build/), else nowhere."""
    out = os.environ.get("GPTJ_HELPERS_OUT")
    return Path(out) if out else None


def show_figure(fig, name: str) -> Path | None:
    """Show a figure as a bare PNG (no "<Figure size ...>" text for nbval) and save it under `output_dir()` if set."""
    import base64
    import io

    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    path = None
    out = output_dir()
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"{name}.png"
        path.write_bytes(buffer.getvalue())
    plt.close(fig)
    try:
        from IPython.display import display

        display({"image/png": base64.b64encode(buffer.getvalue()).decode()}, raw=True)
    except ImportError:  # plain Python: saving is all we can do
        pass
    return path


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
    build_atomically(out, lambda tmp: make_tiny_gptj(tmp, seed=args.seed, format=args.format))
    print(out)


DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def cmd_download(args: argparse.Namespace) -> None:
    """download [REPO] --revision R --local-dir DIR: fetch config, tokenizer and one copy of the weights."""
    print(download_gptj(args.repo_id, revision=args.revision, local_dir=args.local_dir, endpoint=args.endpoint))


def cmd_convert_jax(args: argparse.Namespace) -> None:
    """convert-jax SLIM_DIR OUT_DIR: the original JAX slim checkpoint to safetensors."""
    print(convert_jax_checkpoint(args.slim_dir, args.out_dir, config=args.config, dtype=DTYPES[args.dtype],
                                 progress=not args.no_progress))


def cmd_convert_bin(args: argparse.Namespace) -> None:
    """convert-bin SRC OUT_DIR: a pytorch_model.bin (or its folder) to safetensors."""
    print(convert_to_safetensors(args.src, args.out_dir, dtype=DTYPES.get(args.dtype), progress=not args.no_progress))


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


SETUPS = {  # README's "Which setup do I have?": name -> (model, devices, dtype)
    "Colab, 1 x T4 16 GB": ("gpt-j-6b", "cuda:0=15GiB", "float16"),
    "Kaggle, 2 x T4 16 GB": ("gpt-j-6b", "cuda:0=15GiB,cuda:1=15GiB", "float16"),
    "4 x 8 GB": ("gpt-j-6b", "4x7GiB", "float16"),
    "3 x 10 GB (the seed's box)": ("gpt-j-6b", "3x9GiB", "float16"),
    "8 x 4 GB": ("gpt-j-6b", "8x3.5GiB", "float16"),
    "CPU only (tiny default)": ("tiny", "3x4MiB", "float32"),
}


def setups_markdown(reserve: str = "1GiB", prompt_tokens: int = 512, max_new_tokens: int = 256) -> str:
    """The README's table of common setups, each planned by `plan_split` (README)."""
    rows = ["| setup | settings line | blocks per device | fullest device |", "|---|---|---|---|"]
    for name, (model, devices, dtype) in SETUPS.items():
        res = reserve if model != "tiny" else "0"
        plan = plan_split(model, parse_devices(devices, check=False), dtype=getattr(torch, dtype), reserve=res,
                          prompt_tokens=prompt_tokens if model != "tiny" else 16,
                          max_new_tokens=max_new_tokens if model != "tiny" else 48, model_name=model)
        blocks = " / ".join(str(st.blocks[1] - st.blocks[0]) for st in plan.devices)
        fullest = max(plan.devices, key=lambda st: st.fill)
        settings = f'`MODEL = "{model}"; DEVICES = "{devices}"; DTYPE = torch.{dtype}`'
        rows.append(f"| {name} | {settings} | {blocks} | {format_size(fullest.total_bytes)} of "
                    f"{format_size(fullest.budget_bytes)} ({fullest.fill:.0%}) |")
    note = (f"Planned by `python -m gptj_helpers setups`: GPT-J-6B in float16 with {prompt_tokens} prompt tokens, "
            f"{max_new_tokens} new tokens, batch 1 and a {reserve} reserve per GPU for the CUDA context and activations.")
    return "\n".join(rows) + "\n\n" + note


def cmd_setups(args: argparse.Namespace) -> None:
    """setups: print the README's table of common setups."""
    print(setups_markdown())


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a text file, one per line (blank lines skipped)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"prompts file {path} does not exist: write one prompt per line")
    prompts = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompts file {path} has no prompts: write one prompt per line")
    return prompts


def cmd_pipeline(args: argparse.Namespace) -> None:
    """pipeline: generate with one process per stage; under torchrun this process is one stage."""
    sampling = dict(max_new_tokens=args.max_new_tokens, greedy=args.greedy, temperature=args.temperature,
                    top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    fail = (args.fail_stage, args.fail_after, args.fail_mode) if args.fail_stage is not None else None
    if "RANK" not in os.environ:  # plain `python -m gptj_helpers pipeline`: start the stages from here
        prompts = read_prompts(args.prompts_file)
        try:
            record = run_pipeline(args.model, prompts, args.devices, micro_batches=args.micro_batches,
                                  dtype=getattr(torch, args.dtype) if args.dtype else None, timeout=args.timeout,
                                  fail=fail, **sampling)
        except PipelineError as err:
            raise SystemExit(f"error: {err}") from err
    else:  # one stage of a torchrun launch
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        spec = {"model": args.model, "devices": args.devices, "micro_batches": args.micro_batches,
                "sampling": sampling, "dtype": args.dtype, "timeout": args.timeout, "fail": fail,
                "prompts": read_prompts(args.prompts_file) if rank == 0 else None}
        try:
            records = serve_stage(rank, world, spec)
        except (ValueError, FileNotFoundError, MemoryError):
            raise
        except Exception as err:
            if is_neighbour_error(err):
                raise SystemExit(f"error: pipeline stage {rank} lost a neighbouring stage (see its error): {err}") from err
            raise SystemExit(f"error: pipeline stage {rank} failed: {type(err).__name__}: {err}") from err
        if rank != 0:
            leave_process()
        record = records[0]
    print("\n\n".join(prompt + text for prompt, text in zip(record.prompts, record.texts)), flush=True)
    print(format_timing(record), file=sys.stderr)
    if "RANK" in os.environ:
        leave_process()


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    """The options generate and pipeline share: as generate_text's keywords."""
    p.add_argument("--max-new-tokens", type=int, default=50)
    p.add_argument("--greedy", action="store_true", help="always take the most likely token (no sampling)")
    p.add_argument("--temperature", type=float, default=SAMPLING_DEFAULTS["temperature"])
    p.add_argument("--top-p", type=float, default=SAMPLING_DEFAULTS["top_p"])
    p.add_argument("--top-k", type=int, default=SAMPLING_DEFAULTS["top_k"], help="0: no top-k filter (the seed's)")
    p.add_argument("--seed", type=int, help="seed the sampler for a reproducible text")


def build_parser() -> argparse.ArgumentParser:
    """The command line: one subcommand per task of the series."""
    parser = argparse.ArgumentParser(prog="python -m gptj_helpers", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("make-tiny", help="write the tiny default GPT-J (random weights) and its tokenizer")
    p.add_argument("out_dir")
    p.add_argument("--seed", type=int, default=TINY_SEED)
    p.add_argument("--format", choices=["hf", "jax-slim"], default="hf",
                   help="hf: safetensors + tokenizer (default); jax-slim: the original JAX checkpoint layout")
    p.set_defaults(func=cmd_make_tiny)

    p = sub.add_parser("download", help="download GPT-J (or another hub model) with huggingface_hub")
    p.add_argument("repo_id", nargs="?", default=GPTJ_6B_REPO)
    p.add_argument("--revision", default=GPTJ_6B_REVISION, help="branch or commit (default: float16)")
    p.add_argument("--local-dir", help="put the files here instead of the hub cache")
    p.add_argument("--endpoint", help="hub URL (default: huggingface.co or $HF_ENDPOINT)")
    p.set_defaults(func=cmd_download)

    p = sub.add_parser("convert-jax", help="convert the original JAX slim checkpoint to safetensors, streamed")
    p.add_argument("slim_dir", help="the folder holding shard_0 ... shard_7")
    p.add_argument("out_dir")
    p.add_argument("--config", help="mesh-transformer-jax config JSON (default: GPT-J-6B's)")
    p.add_argument("--dtype", choices=list(DTYPES), default="float16")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_convert_jax)

    p = sub.add_parser("convert-bin", help="convert a pytorch_model.bin to safetensors without running pickle code")
    p.add_argument("src", help="pytorch_model.bin, or the folder holding it (its config and tokenizer are copied)")
    p.add_argument("out_dir")
    p.add_argument("--dtype", choices=list(DTYPES), help="default: keep the saved dtype")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_convert_bin)

    p = sub.add_parser("devices", help="list this machine's devices, or parse a device spec like 3x5GiB")
    p.add_argument("spec", nargs="?")
    p.set_defaults(func=cmd_devices)

    p = sub.add_parser("plan", help="plan the split of a model over devices with memory budgets")
    p.add_argument("--model", default="tiny", help="tiny, gpt-j-6b, or a model folder")
    p.add_argument("--devices", required=True, help='e.g. "3x5GiB" or "cuda:0=6GiB,cuda:1=10GiB"')
    p.add_argument("--dtype", default="float16", choices=list(DTYPES))
    p.add_argument("--prompt-tokens", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--reserve", default="0", help="bytes kept free on every device, e.g. 1GiB")
    p.add_argument("--json", action="store_true", help="print the Plan object as JSON")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("setups", help="plan GPT-J-6B for common setups (the README's table)")
    p.set_defaults(func=cmd_setups)
    p = sub.add_parser("pipeline", help="generate with one process per stage (torchrun or started from here)")
    p.add_argument("--model", default="tiny", help="tiny, gpt-j-6b, or a model folder")
    p.add_argument("--devices", required=True, help='one stage per device, e.g. "cpu,cpu" or "cuda:0,cuda:1"')
    p.add_argument("--prompts-file", required=True, help="a text file with one prompt per line")
    p.add_argument("--micro-batches", type=int, default=1)
    add_sampling_arguments(p)
    p.add_argument("--dtype", choices=list(DTYPES), help="default: the saved dtype")
    p.add_argument("--timeout", type=float, default=PIPELINE_TIMEOUT, help="seconds a stage waits for a neighbour")
    p.add_argument("--fail-stage", type=int, help=argparse.SUPPRESS)  # tests: inject a fault in this stage
    p.add_argument("--fail-after", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--fail-mode", choices=["raise", "exit"], default="raise", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_pipeline)

    p = sub.add_parser("run-notebooks", help="execute notebooks headless (make demo, make notebooks)")
    p.add_argument("notebooks", nargs="+")
    p.add_argument("--out", help="folder for the executed copies and their figures")
    p.add_argument("--inplace", action="store_true", help="write the outputs back into the notebooks")
    p.set_defaults(func=cmd_run_notebooks)

    p = sub.add_parser("generate", help="generate text through the model split over devices (sampling like the seed)")
    p.add_argument("--model", default="tiny", help="tiny, gpt-j-6b, a hub id, or a model folder")
    p.add_argument("--devices", required=True, help='e.g. "cpu", "4xcpu" or "cuda:0=6GiB,cuda:1=10GiB"')
    p.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for a batch")
    add_sampling_arguments(p)
    p.add_argument("--stream", action="store_true", help="print tokens as they come (prompts one at a time)")
    p.add_argument("--dtype", choices=list(DTYPES),
                   help="default: float16 on GPUs, float32 on the CPU")
    p.set_defaults(func=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m gptj_helpers`."""
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, ConnectionError, MemoryError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
