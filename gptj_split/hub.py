"""Notebooks 00 and 01: model names to local folders. "tiny" (shipped with the package), a local folder, or a hub
id such as "gpt-j-6b", downloaded with huggingface_hub; then the config, tokenizer or whole model loaded from it.
Whatever layout the weights come in (safetensors, one or sharded pytorch_model.bin), the folder returned holds
safetensors the split can place: .bin files are converted once, beside themselves (convert_bin.py).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from .models import (GPTJ_6B_RANDOM, GPTJ_6B_REPO, GPTJ_6B_REVISION, RANDOM_WEIGHTS, as_dtype, gptj_6b_config,
                     sliced_config, gptj_modeling)
from .tiny import tiny_folder
from .quiet import quiet_progress
from .convert_bin import BIN_INDEX, SAFETENSORS_INDEX, files_complete, placeable_folder
from .random_models import build_seeded_model, random_gptj_folder

WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")  # first match wins: never fetch both copies
SMALL_FILES = ["*.json", "*.txt", "*.model"]  # config, tokenizer, generation settings: never the weights
WEIGHTS_VARIABLE = "GPTJ_WEIGHTS"  # a folder for downloaded weights that outlives the session (Drive on Colab)


def weights_dir() -> Path | None:
    """Where hub downloads go: the folder named by $GPTJ_WEIGHTS (for example on a mounted Google Drive, so the
    12.1 GB survive a Colab session), else None: huggingface_hub's cache, shared by every notebook (notebook 01)."""
    folder = os.environ.get(WEIGHTS_VARIABLE)
    return Path(folder).expanduser() if folder else None


def is_local_name(name: str) -> bool:
    """True for names that never reach the hub: the tiny default, the random GPT-J, an existing folder or a path."""
    return (name in ("tiny", GPTJ_6B_RANDOM) or Path(name).expanduser().exists() or name.count("/") > 1
            or name.startswith((".", "/", "~")))


def hub_id(name: str) -> tuple[str, str | None]:
    """Map a model name to (hub repo id, revision); "gpt-j-6b" is the float16 branch of EleutherAI's repo."""
    if name.lower() in ("gpt-j-6b", "gptj-6b", GPTJ_6B_REPO.lower()):
        return GPTJ_6B_REPO, GPTJ_6B_REVISION
    return name, None


def resolve_model(name: str = "tiny", delete_bin: bool = False) -> Path:
    """Turn "tiny", "gpt-j-6b-random", a local folder, "gpt-j-6b" or a hub id into a local folder with a config and
    safetensors weights, or a seed for them; .bin weights are converted once, and with `delete_bin` deleted after a
    check (notebooks 00, 01)."""
    if name == "tiny":  # the trained weights shipped in the package (make tiny-model), else the random model
        return tiny_folder()
    if name == GPTJ_6B_RANDOM:
        return random_gptj_folder()
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path} has no config.json: is it a converted model folder? "
                                    "See notebook 01 to download or convert one.")
        return placeable_folder(path, delete_bin)
    if name.count("/") > 1 or name.startswith((".", "/", "~")):
        raise FileNotFoundError(f"model folder {path} does not exist")
    repo_id, revision = hub_id(name)
    return download_gptj(repo_id, revision=revision, local_dir=weights_dir(), delete_bin=delete_bin)


def load_config(name: str = "tiny"):
    """The model's GPTJConfig; GPT-J-6B's is known offline, so it can be planned without weights (notebook 00)."""
    from transformers import AutoConfig

    if hub_id(name)[0] == GPTJ_6B_REPO:
        return gptj_6b_config()
    return AutoConfig.from_pretrained(str(resolve_model(name)))


def load_tokenizer(name: str = "tiny"):
    """The model's tokenizer, via the same transformers class that loads GPT-J's; for a hub id only the small files
    are fetched, into the folder where its weights go, never the weights (notebook 00)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(resolve_model(name) if is_local_name(name) else small_files(name)))


def small_files(name: str, endpoint: str | None = None, cache_dir: str | Path | None = None) -> Path:
    """A hub model's config and tokenizer files (a few MB), in the folder where `download_gptj` puts its weights, from
    disk when they are there already (notebook 00)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo_id, revision = hub_id(name)
    kwargs = dict(repo_id=repo_id, revision=revision, endpoint=endpoint, cache_dir=cache_dir, local_dir=weights_dir(),
                  allow_patterns=SMALL_FILES)
    with contextlib.suppress(LocalEntryNotFoundError):
        path = Path(snapshot_download(**kwargs, local_files_only=True))
        if (path / "config.json").exists():
            return path
    check_online(endpoint)
    return Path(snapshot_download(**kwargs))


def load_model(name: str = "tiny", dtype: torch.dtype | None = None, device: str = "cpu", blocks: int | None = None):
    """Load a whole model straight onto one device, in eval mode; `blocks`: only the first blocks, with the embedding
    and head, a slice for checks at full size (notebook 00; notebook 02 splits it instead)."""
    from transformers import AutoConfig

    GPTJForCausalLM = gptj_modeling().GPTJForCausalLM

    path = resolve_model(name)
    config = AutoConfig.from_pretrained(str(path))
    if blocks is not None:
        config = sliced_config(config, blocks)
    if (path / RANDOM_WEIGHTS).exists():
        return build_seeded_model(path, config, as_dtype(dtype), device)
    with quiet_progress(), quiet_warnings(blocks is not None):  # a slice leaves the other blocks' tensors unused
        model = GPTJForCausalLM.from_pretrained(str(path), config=config, dtype=dtype or "auto",
                                                device_map={"": device})
    return model.eval()


@contextlib.contextmanager
def quiet_warnings(quiet: bool = True):
    """transformers' warnings off inside the block when `quiet` (its load report of unused tensors), then restored."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    if quiet:
        hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def download_gptj(repo_id: str = GPTJ_6B_REPO, revision: str | None = GPTJ_6B_REVISION,
                  local_dir: str | Path | None = None, endpoint: str | None = None,
                  cache_dir: str | Path | None = None, delete_bin: bool = False) -> Path:
    """Download config, tokenizer and one copy of the weights (safetensors if the branch has them, else the .bin
    files) with huggingface_hub, and return a folder the split can place (notebook 01).

    huggingface_hub retries a dropped transfer within the call, continuing with Range requests past its first 10 MiB.
    A call that fails keeps the files it finished; the next call fetches the rest, an unfinished file from its start.
    .bin weights are converted once to safetensors beside them (`convert_in_place`: in the hub-cache snapshot or
    `local_dir`, about as big again); `delete_bin=True` then deletes the .bin files (and their cache blobs) after
    checking every tensor's name, shape and end rows against the copy.
    """
    from fnmatch import fnmatch

    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    kwargs = dict(repo_id=repo_id, revision=revision, endpoint=endpoint, cache_dir=cache_dir, local_dir=local_dir)
    with contextlib.suppress(LocalEntryNotFoundError):  # complete already? then no network at all
        path = Path(snapshot_download(**kwargs, local_files_only=True, allow_patterns=["*.json"]))
        if model_files_complete(path):
            return placeable_folder(path, delete_bin)
    check_online(endpoint)
    sizes = {f.path: getattr(f, "size", 0) or 0
             for f in HfApi(endpoint=endpoint).list_repo_tree(repo_id, revision=revision, recursive=True)}
    weights = next((p for p in WEIGHT_PATTERNS if any(fnmatch(f, p) for f in sizes)), None)
    if weights is None:
        raise FileNotFoundError(f"{repo_id}@{revision} has no safetensors or pytorch_model.bin weights")
    patterns = SMALL_FILES + [weights]
    wanted = [f for f in sizes if any(fnmatch(f, p) for p in patterns)]
    print(f"downloading {repo_id}@{revision}: {len(wanted)} files, {sum(sizes[f] for f in wanted) / 1e9:.2f} GB "
          f"(weights: {weights}) into {local_dir or cache_dir or 'the huggingface_hub cache'}; files already there "
          "are kept", flush=True)
    try:
        path = Path(snapshot_download(**kwargs, allow_patterns=patterns))
    except transport_errors() as err:  # a dropped connection, after the hub's own retries
        raise ConnectionError(f"downloading {repo_id}@{revision} was interrupted ({type(err).__name__}: {err}). "
                              "Run the same command again: finished files are kept, an unfinished one starts "
                              "over.") from err
    return placeable_folder(path, delete_bin)


download_model = download_gptj  # an older name, kept for notebooks that use it


def transport_errors() -> tuple[type[BaseException], ...]:
    """The transport-error classes of the HTTP clients huggingface_hub may use here (httpx, httpx2)."""
    import importlib

    classes = []
    for name in ("httpx", "httpx2"):
        with contextlib.suppress(ImportError):
            classes.append(importlib.import_module(name).TransportError)
    return tuple(classes)


def model_files_complete(path: Path) -> bool:
    """True when a folder has config.json and complete weights: model.safetensors or pytorch_model.bin, or an index
    and every file it names (notebook 01)."""
    return (path / "config.json").exists() and (files_complete(path, SAFETENSORS_INDEX, "model.safetensors")
                                                or files_complete(path, BIN_INDEX, "pytorch_model.bin"))


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
