"""Helpers for the notebook series "GPT-J-6B when no single GPU is big enough".

Sections follow the notebooks: 00 models and devices, 01 download and convert,
02 plan and place, 03 generate and time, 04 measure and plot, 05 pipeline,
06 prompt widget, and the command line (`python -m gptj_helpers --help`).
Nothing runs at import; transformers and friends are imported inside functions.
"""

from __future__ import annotations

import argparse
import contextlib
import json
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


def make_tiny_gptj(out_dir: str | Path, seed: int = TINY_SEED, format: str = "hf") -> Path:
    """Write the tiny random GPT-J (safetensors + config.json) and its tokenizer to `out_dir` (notebook 00).

    format="jax-slim" writes the same weights in the original JAX checkpoint layout instead (notebook 01)."""
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
    model = meta_model(config)
    itemsize = torch.empty((), dtype=dtype).element_size()

    def nbytes(module) -> int:
        return sum(p.numel() for p in module.parameters()) * itemsize

    head = nbytes(model.transformer.ln_f) + nbytes(model.lm_head)
    sizes = {"embedding": nbytes(model.transformer.wte), "block": nbytes(model.transformer.h[0]), "head": head}
    sizes["total"] = sizes["embedding"] + config.n_layer * sizes["block"] + head
    sizes["params"] = sum(p.numel() for p in model.parameters())
    return sizes


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


def check_device_name(name: str, part: str) -> str:
    """Validate a device name like "cpu" or "cuda:1" against this machine."""
    try:
        dev = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"device spec part {part!r}: {name!r} is not a device name (use cpu, cuda or cuda:N)") from err
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


def parse_devices(spec: str) -> list[Device]:
    """Parse a device spec: "3x5GiB", "cuda:0=10GiB,cuda:1=10GiB", "cpu,cpu,cpu", "2xcpu=4GiB" (notebook 00)."""
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
        name = check_device_name(name, part)
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

    # Linux: VmHWM is this process's own peak, reset after the imports (ru_maxrss would include the parent's at fork)
    code = ("import json, re, resource, sys, time, numpy, psutil, safetensors.torch, tqdm.auto, gptj_helpers as gh\n"
            "from transformers import GPTJConfig\n"
            "base = psutil.Process().memory_info().rss\n"
            "try: open('/proc/self/clear_refs', 'w').write('5')\n"
            "except OSError: pass\n"
            "start = time.perf_counter(); rc = gh.main(sys.argv[1:]); seconds = time.perf_counter() - start\n"
            "try: peak = int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)) * 1024\n"
            "except OSError: peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "print(json.dumps(dict(rc=rc, seconds=seconds, baseline=base, peak=peak)))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_DIR), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=timeout, env=env)
    result = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else {"rc": proc.returncode}
    if result["rc"] != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {proc.stderr.strip()[-2000:]}")
    return {**result, "peak_over_baseline": result["peak"] - result["baseline"]}


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

    p = sub.add_parser("run-notebooks", help="execute notebooks headless (make demo, make notebooks)")
    p.add_argument("notebooks", nargs="+")
    p.add_argument("--out", help="folder for the executed copies and their figures")
    p.add_argument("--inplace", action="store_true", help="write the outputs back into the notebooks")
    p.set_defaults(func=cmd_run_notebooks)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m gptj_helpers`."""
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, ConnectionError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
