"""Notebook 01: `pytorch_model.bin` pickles (one file, or shards named by `pytorch_model.bin.index.json`) into
safetensors, one file per block group. Pickles are read with `weights_only` and memory-mapped anew for every output
file: mapped pages that were read count in RSS until the mapping goes, so one mapping for the whole file would grow
to its size. A folder holding only .bin files is converted once, in place, so the split can place it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from .files import build_atomically, build_lock, cache_dir
from .devices import format_size
from .convert import check_finite, refuse_existing, target_group, write_safetensors_shards

BIN_INDEX = "pytorch_model.bin.index.json"
SAFETENSORS_INDEX = "model.safetensors.index.json"
MASK_BUFFERS = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers of 2021 exports: not weights, dropped
COPIED_SUFFIXES = (".json", ".txt", ".model")  # config and tokenizer files that travel with converted weights


def files_complete(folder: Path, index: str, single: str) -> bool:
    """True when `folder` has `index` and every file it names, or (without an index) the one file `single`."""
    if (folder / index).exists():
        names = set(json.loads((folder / index).read_text())["weight_map"].values())
        return all((folder / n).exists() for n in names)
    return (folder / single).exists()


def safetensors_complete(folder: Path) -> bool:
    """True when the split can place `folder`: model.safetensors, or its index and every shard (notebook 01)."""
    return files_complete(Path(folder), SAFETENSORS_INDEX, "model.safetensors")


def safetensors_problem(file: Path) -> str | None:
    """What is wrong with one safetensors file, read from its header alone (a few KiB), or None if it is whole: the
    header's length, its JSON, and the byte ranges it promises against the file's size (notebook 01)."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if length < 2 or 8 + length > size:
            return f"{size} bytes, too short for its own header: truncated"
        try:
            header = json.loads(f.read(length))
        except ValueError:
            return "its header is not readable JSON"
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
    needed = 8 + length + max(ends, default=0)
    if size != needed:
        return f"{size} bytes where its header promises {needed}: {'truncated' if size < needed else 'bytes added'}"
    return None


def check_safetensors(folder: Path) -> None:
    """Refuse, by file, a damaged safetensors file of a model folder (a download or a copy cut short), before anything
    loads from it, instead of safetensors' own error deep inside loading (notebook 01)."""
    for file in sorted(Path(folder).glob("*.safetensors")):
        problem = safetensors_problem(file)
        if problem:
            raise ValueError(f"{file} is damaged ({problem}): delete it, then download or convert it again "
                             f"(notebook 01)")


def bin_files(folder: Path) -> list[Path]:
    """The .bin weight files of a folder: those its index names (all present), else pytorch_model.bin, else the
    pytorch_model-*.bin shards; [] without any (notebook 01)."""
    folder = Path(folder)
    if (folder / BIN_INDEX).exists():
        names = sorted(set(json.loads((folder / BIN_INDEX).read_text())["weight_map"].values()))
        missing = [n for n in names if not (folder / n).exists()]
        if missing:
            raise FileNotFoundError(f"{folder / BIN_INDEX} names {missing[0]}, which is missing: download it again")
        return [folder / n for n in names]
    if (folder / "pytorch_model.bin").exists():
        return [folder / "pytorch_model.bin"]
    return sorted(folder.glob("pytorch_model-*.bin"))


def read_bin(file: Path) -> dict[str, torch.Tensor]:
    """One weight pickle, memory-mapped and read with `weights_only`; anything but a dict of tensors is refused by
    name (notebook 01)."""
    import pickle

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
    return state


def bin_sources(files: list[Path]) -> dict[str, Path]:
    """Every weight name, mask buffers left out, mapped to the .bin file holding it; each file is checked (notebook
    01)."""
    sources: dict[str, Path] = {}
    for file in files:
        for name in read_bin(file):  # only the pickle is read: the tensors stay on disk
            if name.endswith(MASK_BUFFERS):
                continue
            if name in sources:
                raise ValueError(f"{name} is in both {sources[name]} and {file}: which copy is meant?")
            sources[name] = file
    if not sources:
        raise ValueError(f"{', '.join(map(str, files))} hold(s) no weights")
    return sources


def bin_groups(sources: dict[str, Path], dtype: torch.dtype | None):
    """The `groups` of `write_safetensors_shards`: each output group read from its .bin files, mapped anew for it
    and unmapped once it is written, so memory holds one group's pages, plus copies where `dtype` changes (notebook
    01)."""
    plan: dict[str, dict[Path, list[str]]] = {}
    for name, file in sources.items():
        plan.setdefault(target_group(name), {}).setdefault(file, []).append(name)

    def groups(bar):
        for group in sorted(plan):
            tensors = {}
            for file, names in plan[group].items():
                state = read_bin(file)
                for name in names:
                    src = state[name]
                    want = dtype if dtype is not None and src.is_floating_point() else src.dtype
                    whole = src.is_contiguous() and src.untyped_storage().nbytes() == src.numel() * src.element_size()
                    if not whole or want != src.dtype:  # a view of a larger storage, or a new dtype: a copy
                        src = torch.empty(src.shape, dtype=want).copy_(src)
                    tensors[name] = src  # else saved as it is, straight from the mapping
                    check_finite(tensors[name], f"{name} in {file}")
                del state, src  # the mapping goes once the group's tensors are written and dropped
            bar.update(len(tensors))
            yield group, tensors
    return groups


def files_label(files: list[Path]) -> str:
    """How progress bars name the .bin files being converted."""
    return files[0].name if len(files) == 1 else f"{len(files)} .bin files"


def copy_modes(out: Path, like: Path) -> None:
    """Give the files in `out` the read/write bits of the file `like` (safetensors writes 0600: others could not
    read a shared cache)."""
    for part in out.iterdir():
        os.chmod(part, like.stat().st_mode & 0o666)


def copy_side_files(src: Path, out: Path, dtype: torch.dtype | None) -> None:
    """Copy config and tokenizer files (not the .bin index) from `src` to `out`, recording a new dtype."""
    for extra in src.iterdir():
        if extra.suffix in COPIED_SUFFIXES and extra.name not in (BIN_INDEX, SAFETENSORS_INDEX):
            shutil.copy(extra, out / extra.name)
    if dtype is not None and (out / "config.json").exists():
        cfg = json.loads((out / "config.json").read_text())
        cfg["torch_dtype" if "torch_dtype" in cfg else "dtype"] = str(dtype).removeprefix("torch.")
        (out / "config.json").write_text(json.dumps(cfg, indent=2))


def convert_to_safetensors(src: str | Path, out_dir: str | Path, dtype: torch.dtype | None = None,
                           progress: bool = True) -> Path:
    """Turn a pytorch_model.bin, or a folder of one or sharded .bin files (and its config and tokenizer), into a new
    folder of safetensors shards, memory-mapped (notebook 01)."""
    src, out_dir = Path(src), Path(out_dir)
    if not src.exists():
        raise FileNotFoundError(f"{src} does not exist")
    files = bin_files(src) if src.is_dir() else [src]
    if not files:
        raise FileNotFoundError(f"{src} holds no pytorch_model.bin or pytorch_model-*.bin files")
    refuse_existing(out_dir)
    sources = bin_sources(files)

    def build(tmp: Path) -> None:
        copy_side_files(files[0].parent, tmp, dtype)
        write_safetensors_shards(tmp, bin_groups(sources, dtype), len(sources), f"converting {files_label(files)}",
                                 progress)
        copy_modes(tmp, files[0])
        os.chmod(tmp, files[0].parent.stat().st_mode & 0o777)  # not mkdtemp's 0700

    return build_atomically(out_dir, build)


def writable(folder: Path) -> bool:
    """True when new files can be written into `folder`."""
    return os.access(folder, os.W_OK | os.X_OK)


def converted_copy(folder: Path) -> Path:
    """Where a read-only folder's .bin files are converted to: a cache folder named after its path (notebook 01)."""
    key = hashlib.sha256(str(Path(folder).resolve()).encode()).hexdigest()[:12]
    return cache_dir() / "converted" / f"{Path(folder).name}-{key}"


def check_disk(folder: Path, nbytes: int) -> None:
    """Refuse, before anything is written, to write `nbytes` where less is free."""
    free = shutil.disk_usage(folder).free
    if nbytes > free:
        raise OSError(errno.ENOSPC, f"converting to safetensors needs {format_size(nbytes)} in {folder}, which has "
                      f"{format_size(free)} free: free some disk, or download a safetensors copy instead")


def convert_in_place(folder: str | Path, progress: bool = True) -> Path:
    """Write safetensors shards, in the saved dtype, beside a folder's .bin files (notebook 01): built in a hidden
    temporary folder inside it and renamed in one by one, the index last, so the folder is placeable only once
    complete; one converter at a time, and leftovers of a killed one are removed. Returns the folder."""
    folder = Path(folder)
    with build_lock(folder / ".convert-bin.lock"):
        if safetensors_complete(folder):  # converted before, or by another process while we waited
            return folder
        for stale in folder.glob(".safetensors.*"):  # a converter killed midway: we hold the lock, nobody uses it
            shutil.rmtree(stale, ignore_errors=True)
        files = bin_files(folder)
        if not files:
            raise FileNotFoundError(f"{folder} holds neither safetensors nor pytorch_model*.bin weights")
        sources = bin_sources(files)
        size = sum(f.stat().st_size for f in files)
        check_disk(folder, size)
        if progress:
            print(f"converting {len(files)} .bin file(s), {format_size(size)}, to safetensors in {folder} (once; "
                  f"about {format_size(size)} more disk)", file=sys.stderr, flush=True)
        tmp = Path(tempfile.mkdtemp(prefix=".safetensors.", dir=folder))
        try:
            write_safetensors_shards(tmp, bin_groups(sources, None), len(sources), f"converting {files_label(files)}",
                                     progress)
            copy_modes(tmp, files[0])
            for part in sorted(tmp.iterdir(), key=lambda p: p.name == SAFETENSORS_INDEX):  # the index last
                os.replace(part, folder / part.name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def check_conversion(st_folder: Path, files: list[Path]) -> int:
    """Refuse (ValueError) unless every weight of the .bin files is in `st_folder`'s safetensors with its shape, dtype
    and equal first and last rows; returns how many were checked (notebook 01)."""
    from contextlib import ExitStack

    from safetensors import safe_open

    index = st_folder / SAFETENSORS_INDEX
    weight_map = json.loads(index.read_text())["weight_map"] if index.exists() else None
    checked = 0
    with ExitStack() as stack:
        handles = {}
        for file in files:
            state = read_bin(file)
            for name, t in state.items():
                if name.endswith(MASK_BUFFERS):
                    continue
                fname = weight_map.get(name) if weight_map is not None else "model.safetensors"
                if fname is None:
                    raise ValueError(f"{st_folder} lacks {name} (from {file}): the conversion is incomplete")
                if fname not in handles:
                    handles[fname] = stack.enter_context(safe_open(st_folder / fname, framework="pt"))
                part = handles[fname].get_slice(name)
                shape = tuple(part.get_shape())
                if shape != tuple(t.shape):
                    raise ValueError(f"{name} has shape {shape} in {st_folder / fname} but {tuple(t.shape)} in {file}")
                ends = [part[:1], part[shape[0] - 1:]] if shape and shape[0] else [handles[fname].get_tensor(name)]
                wanted = [t[:1], t[-1:]] if len(ends) == 2 else [t]
                if not all(e.dtype == w.dtype and torch.equal(e, w) for e, w in zip(ends, wanted)):
                    raise ValueError(f"{name} differs between {st_folder / fname} and {file}")
                checked += 1
            state = t = None  # unmaps the file before the next one
    return checked


def delete_bin(folder: Path, files: list[Path]) -> int:
    """Delete a folder's .bin files and their index after `check_conversion` passed; in a hub-cache snapshot also
    the blobs they link to, unless another snapshot links there too. Returns the bytes freed (notebook 01)."""
    checked = check_conversion(folder, files)
    freed = 0
    for link in [folder / BIN_INDEX, *files]:  # the index first: a kill midway leaves shards that a glob finds
        if not link.exists():
            continue
        target = link.resolve()
        shared = link.is_symlink() and any(other.resolve() == target for other in folder.parent.glob(f"*/{link.name}")
                                           if other != link and other.is_symlink())
        freed += 0 if shared else target.stat().st_size
        if link.is_symlink() and not shared:
            target.unlink()
        link.unlink()
    print(f"deleted {len(files)} .bin file(s) in {folder}, {format_size(freed)}, after checking their {checked} "
          "tensors against the safetensors copy", file=sys.stderr, flush=True)
    return freed


def placeable_folder(folder: str | Path, delete_bins: bool = False, progress: bool = True) -> Path:
    """A model folder the split can place: as it is with safetensors (or no weights at all), else with its .bin files
    converted once beside them (`convert_in_place`), or for a read-only folder into `converted_copy`; `delete_bins`:
    then delete the .bin files, after `check_conversion` (notebook 01)."""
    folder = Path(folder)
    if safetensors_complete(folder) and not delete_bins:
        check_safetensors(folder)
        return folder
    files = bin_files(folder)
    if not files:
        return folder  # safetensors, seeded random weights, or nothing: the caller's checks speak
    if not writable(folder):
        if delete_bins:
            raise ValueError(f"{folder} is read-only, so its .bin files cannot be deleted: leave out delete_bin")
        copy = converted_copy(folder)
        return copy if copy.exists() else convert_to_safetensors(folder, copy, progress=progress)
    convert_in_place(folder, progress)
    if delete_bins:
        delete_bin(folder, files)
    return folder
