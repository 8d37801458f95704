"""Notebook 01: weights into safetensors, streamed in bounded memory. The original JAX "slim" checkpoint (8 shards x
16 pieces) becomes one safetensors file per block; `write_safetensors_shards` also writes convert_bin.py's
conversion of `pytorch_model.bin` pickles.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .files import build_atomically

# The original mesh-transformer-jax "slim" checkpoint: shard_S/P.npz, facts in ../shared/reference.
GPTJ_6B_JAX_CONFIG = {"layers": 28, "d_model": 4096, "n_heads": 16, "n_vocab": 50400, "pe_rotary_dims": 64,
                      "seq": 2048, "cores_per_replica": 8}

JAX_PIECES = 16  # each shard's leaves are cut into 16 .npz files


def jax_config_of(config) -> dict:
    """A mesh-transformer-jax config dict from a JSON path, a dict, or a GPTJConfig; None is GPT-J-6B's (notebook
    01)."""
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
    """Refuse NaN or inf in a weight, naming it; checked a few MiB of rows at a time (isfinite's temporaries of a
    whole 394 MiB embedding took more memory than the embedding)."""
    rows = t.split(max(1, 2**20 // max(1, t[0].numel()))) if t.dim() else [t]
    if not all(torch.isfinite(chunk).all() for chunk in rows):
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
    """Convert the original slim JAX checkpoint to a Hugging Face safetensors folder, one block at a time (notebook
    01)."""
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
            bias_of_wte = leaf.target == "transformer.wte.bias"  # kept in float32 until it is folded into wte
            t = sum(part.float() for part in parts).to(torch.float32 if bias_of_wte else dtype)
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
    """Write a Hugging Face GPT-J state dict in the slim JAX layout: bf16, 8 shards x 16 pieces, plus its config
    (notebook 01)."""
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
