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
    except (ValueError, FileNotFoundError, ConnectionError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
