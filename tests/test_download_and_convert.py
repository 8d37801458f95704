"""Notebook 01: downloading from a (local, fake) hub, converting the JAX slim checkpoint and pickles, bad input."""
import hashlib
import io
import json
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save

import gptj_helpers as gh
from gptj_split.cli import build_parser
from gptj_split.convert import target_group
from gptj_split.convert_bin import MASK_BUFFERS, converted_copy, safetensors_complete
from gptj_split.hub import WEIGHTS_VARIABLE
from gptj_split.tiny import tiny_model_path
from gptj_split.quiet import quiet_progress
from gptj_split.place import stage_parameter_names
from gptj_split.random_models import make_tiny_gptj
from conftest import call_cli

# ---------------------------------------------------------------- a small hub on 127.0.0.1

REPO = "test-org/tiny-gptj"
LAYOUTS = ("safetensors", "safetensors-sharded", "bin-with-masks", "bin-sharded")  # repos test-org/LAYOUT


class FakeHub(BaseHTTPRequestHandler):
    """The hub's URL layout for several repos: revision info, tree listing, HEAD/GET resolve with Range."""

    repos: dict = {}  # repo id -> {file name: bytes}
    files: dict = {}  # REPO's files (the same dict as repos[REPO])
    log: list = []
    drop: dict = {}  # file -> (bytes sent before the connection is cut, how many GETs to cut)
    timeout = 30  # seconds a connection may stall before its thread gives up

    def log_message(self, *args):
        pass

    def send_json(self, obj, status=200):
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_HEAD(self):
        self.do_GET(head=True)

    def do_GET(self, head=False):
        path = self.path.split("?")[0]
        self.log.append((self.command, path, self.headers.get("Range")))
        api = re.match(r"/api/models/(.+)/(revision|tree)/", path)
        resolve = re.match(r"/(.+?/.+?)/resolve/[^/]+/(.+)", path)
        repo = api.group(1) if api else resolve.group(1) if resolve else None
        if repo not in self.repos or (resolve and resolve.group(2) not in self.repos[repo]):
            return self.send_json({"error": "not found"}, 404)
        files = self.repos[repo]
        if api and api.group(2) == "revision":
            return self.send_json({"id": repo, "sha": repo_sha(repo)})
        if api:
            return self.send_json([{"type": "file", "path": name, "size": len(data), "oid": sha(data)[:40],
                                    "lfs": {"oid": sha(data), "size": len(data), "pointerSize": 130}}
                                   for name, data in sorted(files.items())])
        name = resolve.group(2)
        data, start = files[name], 0
        if self.headers.get("Range"):
            start = int(self.headers["Range"].split("=")[1].split("-")[0])
        self.send_response(206 if start else 200)
        self.send_header("X-Repo-Commit", repo_sha(repo))
        self.send_header("ETag", f'"{sha(data)}"')
        self.send_header("Content-Length", str(len(data) - start))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if head:
            return
        cut, times = self.drop.get(name, (None, 0))
        if times > 0 and cut > start:
            self.drop[name] = (cut, times - 1)
            self.wfile.write(data[start:cut])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)  # mid-file: the client sees a truncated body
            self.close_connection = True
            return
        self.wfile.write(data[start:])


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def repo_sha(repo: str) -> str:
    return hashlib.sha1(repo.encode()).hexdigest()


def saved(state: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def with_mask_buffers(state: dict, n_layer: int) -> dict:
    """A state dict plus the causal-mask buffers that 2021 exports (GPT-J's main branch) carried."""
    state = dict(state)
    for i in range(n_layer):
        state[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 512, 512, dtype=torch.bool))
        state[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e9)
    return state


def layout_files(tiny_path: Path, layout: str) -> dict[str, bytes]:
    """The tiny model's config, tokenizer and weights in one of the hub's layouts; shards cut inside a block."""
    files = {p.name: p.read_bytes() for p in tiny_path.iterdir() if p.is_file() and p.name != "model.safetensors"}
    state = load_file(tiny_path / "model.safetensors")
    if layout == "safetensors":
        return {**files, "model.safetensors": (tiny_path / "model.safetensors").read_bytes()}
    if layout == "bin-with-masks":
        return {**files, "pytorch_model.bin": saved(with_mask_buffers(state, gh.tiny_config().n_layer))}
    names = list(state)
    cut = len(names) // 2 + 3
    assert target_group(names[cut - 1]) == target_group(names[cut])  # one block's tensors in both files
    ext, prefix, index = ((".safetensors", "model", "model.safetensors.index.json") if layout == "safetensors-sharded"
                          else (".bin", "pytorch_model", "pytorch_model.bin.index.json"))
    weight_map = {}
    for i, part in enumerate((names[:cut], names[cut:])):
        fname = f"{prefix}-{i + 1:05d}-of-00002{ext}"
        tensors = {k: state[k] for k in part}
        files[fname] = save(tensors) if ext == ".safetensors" else saved(tensors)
        weight_map.update({k: fname for k in part})
    files[index] = json.dumps({"metadata": {}, "weight_map": weight_map}).encode()
    return files


@pytest.fixture(scope="module")
def layouts(tiny_path):
    return {f"test-org/{layout}": layout_files(tiny_path, layout) for layout in LAYOUTS}


@pytest.fixture
def hub(tiny_path, layouts, tmp_path, monkeypatch):
    """Serve the tiny model (plus files a download must skip) as REPO, and in every layout as test-org/LAYOUT, on a
    free port; yields (endpoint, handler class)."""
    import huggingface_hub.file_download
    import huggingface_hub.utils._http

    monkeypatch.setattr(huggingface_hub.file_download.time, "sleep", lambda s: None)
    monkeypatch.setattr(huggingface_hub.utils._http.time, "sleep", lambda s: None)
    files = {p.name: p.read_bytes() for p in tiny_path.iterdir() if p.is_file()}
    files["pytorch_model.bin"] = b"a second copy of the weights, never to be fetched" * 1000
    files["flax_model.msgpack"] = b"not needed"
    repos = {REPO: files, **{repo: dict(layout) for repo, layout in layouts.items()}}
    handler = type("Hub", (FakeHub,), {"repos": repos, "files": files, "log": [], "drop": {}})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", handler
    server.shutdown()
    server.server_close()
    thread.join(10)


def gets(handler, name):
    return [entry for entry in handler.log if entry[0] == "GET" and entry[1].endswith("/" + name)]


@pytest.mark.timeout(120)
def test_download_fetches_only_needed_files_and_loads(hub, tmp_path, tiny_path):
    endpoint, handler = hub
    path = gh.download_gptj(REPO, revision="float16", endpoint=endpoint, cache_dir=tmp_path / "hub")
    assert sorted(p.name for p in path.iterdir()) == sorted(p.name for p in tiny_path.iterdir() if p.is_file())
    assert all((path / p.name).read_bytes() == p.read_bytes() for p in tiny_path.iterdir() if p.is_file())
    assert not gets(handler, "pytorch_model.bin") and not gets(handler, "flax_model.msgpack")
    model = gh.load_model(str(path))
    assert torch.equal(model.lm_head.weight, load_file(tiny_path / "model.safetensors")["lm_head.weight"])
    requests = len(handler.log)
    assert gh.download_gptj(REPO, revision="float16", endpoint=endpoint, cache_dir=tmp_path / "hub") == path
    assert len(handler.log) == requests  # complete already: no network at all


@pytest.mark.timeout(120)
def test_interrupted_download_fails_clearly_then_completes(hub, tmp_path, tiny_path):
    endpoint, handler = hub
    weights = (tiny_path / "model.safetensors").read_bytes()
    handler.drop["model.safetensors"] = (len(weights) // 2, 10**6)  # every attempt of the first call is cut
    local = tmp_path / "gptj"
    with pytest.raises(ConnectionError, match="interrupted.*Run the same command again"):
        gh.download_gptj(REPO, revision="float16", local_dir=local, endpoint=endpoint, cache_dir=tmp_path / "hub")
    assert len(gets(handler, "model.safetensors")) > 1  # huggingface_hub retried within the call
    assert not (local / "model.safetensors").exists()
    handler.drop.clear()
    path = gh.download_gptj(REPO, revision="float16", local_dir=local, endpoint=endpoint, cache_dir=tmp_path / "hub")
    assert (path / "model.safetensors").read_bytes() == weights
    assert len(gets(handler, "config.json")) == 1  # finished files were kept


@pytest.mark.timeout(120)
def test_dropped_large_file_resumes_with_range(hub, tmp_path):
    endpoint, handler = hub
    noise = np.frombuffer(np.random.default_rng(0).bytes(12 * 2**20), dtype=np.uint8)  # past the first 10 MiB chunk
    big = save({"noise": torch.from_numpy(noise.copy())})  # a whole safetensors file: the folder is checked
    handler.files["model.safetensors"] = big
    handler.drop["model.safetensors"] = (11 * 2**20, 1)
    path = gh.download_gptj(REPO, revision="float16", endpoint=endpoint, cache_dir=tmp_path / "hub")
    assert (path / "model.safetensors").read_bytes() == big
    ranges = [r for _, _, r in gets(handler, "model.safetensors") if r]
    assert ranges and int(ranges[-1].split("=")[1].split("-")[0]) > 0


@pytest.mark.timeout(30)
def test_offline_fails_fast_with_advice(tmp_path, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket closes
    with pytest.raises(ConnectionError, match="cannot reach 127.0.0.1.*model='tiny'"):
        gh.download_gptj(REPO, endpoint=f"http://127.0.0.1:{port}", cache_dir=tmp_path / "hub")
    r = call_cli("download", REPO, "--endpoint", f"http://127.0.0.1:{port}", "--local-dir", str(tmp_path / "x"))
    assert r.returncode == 2 and "cannot reach" in r.stderr and "Traceback" not in r.stderr
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConnectionError, match="HF_HUB_OFFLINE is set"):
        gh.download_gptj(REPO, endpoint="http://127.0.0.1:1", cache_dir=tmp_path / "hub")


# ---------------------------------------------------------------- every hub layout ends placeable

def greedy_tokens(model, tokenizer, n=8):
    batch = tokenizer(["The list", "A function is"], return_tensors="pt", padding=True)
    return model.generate(**batch, max_new_tokens=n, do_sample=False, pad_token_id=tokenizer.eos_token_id)


def check_placeable(path: Path, tiny) -> None:
    """`path` places as two stages whose greedy tokens equal the original model's, and holds no mask buffers."""
    model, tokenizer = tiny
    tokenizer.padding_side, tokenizer.pad_token = "left", tokenizer.eos_token
    assert safetensors_complete(path)
    names = stage_parameter_names(path)
    assert sorted(names) == sorted(model.state_dict()) and not any(k.endswith(MASK_BUFFERS) for k in names)
    plan = gh.plan_split(path, "cpu,cpu", dtype=torch.float32)
    assert [st.blocks[1] > st.blocks[0] for st in plan.devices] == [True, True]
    split = gh.place_stages(path, plan)
    assert torch.equal(greedy_tokens(split, tokenizer), greedy_tokens(model, tokenizer))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_hub_layout_downloads_to_a_placeable_folder(hub, tmp_path, tiny, layout):
    endpoint, handler = hub
    path = gh.download_gptj(f"test-org/{layout}", revision="float16", endpoint=endpoint, cache_dir=tmp_path / "hub")
    check_placeable(path, tiny)
    served = handler.repos[f"test-org/{layout}"]
    assert all((path / name).read_bytes() == data for name, data in served.items())  # the .bin files are kept
    if "bin" in layout:
        assert sorted(p.name for p in path.glob("*.safetensors")) == [
            f"model-{g}.safetensors" for g in [f"block-{i:02d}" for i in range(8)] + ["embedding", "head"]]
        assert not list(path.glob(".*"))  # no temporary folder or lock left
    requests = len(handler.log)
    assert gh.download_gptj(f"test-org/{layout}", revision="float16", endpoint=endpoint,
                            cache_dir=tmp_path / "hub") == path
    assert len(handler.log) == requests  # placeable already: no network, no second conversion


@pytest.mark.timeout(120)
def test_gpt_j_6b_with_only_a_bin_resolves_placeable_then_deletes_it(hub, tmp_path, tiny, layouts, monkeypatch):
    import huggingface_hub
    import huggingface_hub.constants as constants

    endpoint, handler = hub  # the hub's default endpoint and cache, as resolve_model("gpt-j-6b") uses them
    handler.repos["EleutherAI/gpt-j-6b"] = layouts["test-org/bin-with-masks"]
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    path = gh.resolve_model("gpt-j-6b")
    assert path.is_relative_to(tmp_path / "hub") and (path / "pytorch_model.bin").is_symlink()
    check_placeable(path, tiny)
    blob = (path / "pytorch_model.bin").resolve()
    cache = huggingface_hub.scan_cache_dir(tmp_path / "hub")  # the cache stays readable with the converted files
    converted = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    assert converted > 0.7 * blob.stat().st_size and cache.size_on_disk > blob.stat().st_size + converted
    requests = len(handler.log)
    assert gh.resolve_model("gpt-j-6b", delete_bin=True) == path
    assert len(handler.log) == requests
    assert not (path / "pytorch_model.bin").exists() and not (path / "pytorch_model.bin").is_symlink()
    assert not blob.exists()  # the blob is gone too: the disk is freed
    check_placeable(path, tiny)
    huggingface_hub.scan_cache_dir(tmp_path / "hub")
    assert gh.resolve_model("gpt-j-6b") == path and len(handler.log) == requests  # no download of the .bin again


@pytest.mark.timeout(120)
def test_download_command_deletes_sharded_bin_after_checking(hub, tmp_path, tiny, monkeypatch):
    import huggingface_hub.constants as constants

    endpoint, _ = hub
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    local = tmp_path / "gptj"
    assert gh.main(["download", "test-org/bin-sharded", "--endpoint", endpoint, "--local-dir", str(local),
                    "--delete-bin"]) == 0
    assert not list(local.glob("pytorch_model*"))
    check_placeable(local, tiny)


def bin_folder(tmp_path: Path, tiny_path: Path, state=None) -> Path:
    """A local model folder with config, tokenizer and only a pytorch_model.bin (with mask buffers)."""
    folder = tmp_path / "bin-only"
    folder.mkdir()
    files = layout_files(tiny_path, "bin-with-masks")
    for name, data in files.items():
        (folder / name).write_bytes(data)
    if state is not None:
        torch.save(state, folder / "pytorch_model.bin")
    return folder


@pytest.mark.timeout(120)
def test_generate_command_converts_a_local_bin_folder_once(tmp_path, tiny_path, tiny):
    folder = bin_folder(tmp_path, tiny_path)
    model, tokenizer = tiny
    want, _ = gh.generate_text(model, tokenizer, ["The list"], 4, greedy=True)
    r = call_cli("generate", "--model", str(folder), "--devices", "cpu,cpu", "--prompt", "The list",
                "--max-new-tokens", "4", "--greedy")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "The list" + want[0] + "\n"
    assert "converting 1 .bin file(s)" in r.stderr
    assert (folder / "pytorch_model.bin").exists() and safetensors_complete(folder)
    mode = (folder / "pytorch_model.bin").stat().st_mode
    assert all(f.stat().st_mode == mode for f in folder.glob("model*"))  # readable as the .bin is, not 0600
    index = (folder / "model.safetensors.index.json").stat().st_mtime_ns
    assert gh.resolve_model(str(folder)) == folder
    assert (folder / "model.safetensors.index.json").stat().st_mtime_ns == index  # converted once
    assert build_parser().parse_args(["generate", "--devices", "cpu", "--prompt", "x", "--delete-bin"]).delete_bin


@pytest.mark.timeout(120)
def test_interrupted_conversion_leaves_the_folder_unplaceable_then_completes(tmp_path, tiny_path, tiny, monkeypatch):
    import safetensors.torch

    folder = bin_folder(tmp_path, tiny_path)
    real, calls = safetensors.torch.save_file, []

    def failing(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", failing)
    with pytest.raises(OSError, match="No space left"):
        gh.resolve_model(str(folder))
    assert sorted(p.name for p in folder.iterdir()) == sorted(layout_files(tiny_path, "bin-with-masks"))
    (folder / ".safetensors.killed").mkdir()  # what a killed converter leaves
    (folder / ".safetensors.killed" / "model-block-00.safetensors").write_bytes(b"half")
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    assert gh.resolve_model(str(folder)) == folder
    assert not list(folder.glob(".*"))
    check_placeable(folder, tiny)


def test_conversion_refuses_a_disk_without_room(tmp_path, tiny_path, monkeypatch):
    import shutil
    from types import SimpleNamespace

    folder = bin_folder(tmp_path, tiny_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: SimpleNamespace(total=10**12, used=10**12 - 1000, free=1000))
    with pytest.raises(OSError, match=r"needs .* in .*bin-only, which has 1000 B free"):
        gh.resolve_model(str(folder))
    assert not safetensors_complete(folder) and not list(folder.glob(".*"))


def test_read_only_bin_folder_is_converted_into_the_cache(tmp_path, tiny_path, tiny, monkeypatch):
    import gptj_split.convert_bin
    import gptj_split.files

    folder = bin_folder(tmp_path, tiny_path)
    before = sorted(p.name for p in folder.iterdir())
    monkeypatch.setattr(gptj_split.convert_bin, "writable", lambda f: False)
    path = gh.resolve_model(str(folder))
    assert path == converted_copy(folder) and path.is_relative_to(gptj_split.files.cache_dir())
    assert sorted(p.name for p in folder.iterdir()) == before
    check_placeable(path, tiny)
    assert gh.resolve_model(str(folder)) == path
    with pytest.raises(ValueError, match="read-only"):
        gh.resolve_model(str(folder), delete_bin=True)


def test_a_damaged_conversion_keeps_the_bin(tmp_path, tiny_path):
    folder = bin_folder(tmp_path, tiny_path)
    gh.resolve_model(str(folder))
    block = folder / "model-block-03.safetensors"
    tensors = {k: v.clone() for k, v in load_file(block).items()}  # not views of the file rewritten below
    name = "transformer.h.3.mlp.fc_in.weight"
    tensors[name][-1, 0] += 1  # the last row differs
    block.write_bytes(save(tensors))
    with pytest.raises(ValueError, match=f"{name} differs"):
        gh.resolve_model(str(folder), delete_bin=True)
    del tensors[name]
    block.write_bytes(save(tensors))
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    del index["weight_map"][name]
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=f"lacks {name}"):
        gh.resolve_model(str(folder), delete_bin=True)
    assert (folder / "pytorch_model.bin").exists()


# ---------------------------------------------------------------- the JAX slim checkpoint, written by hand here

SMALL = {"layers": 3, "d_model": 128, "n_heads": 16, "n_vocab": 512, "pe_rotary_dims": 4, "seq": 64,
         "cores_per_replica": 8}


def random_slim_leaves(cfg, seed=0):
    """{(module, leaf): [8 per-shard float32 arrays, already bf16-exact]}, biases different on every shard."""
    rng = np.random.default_rng(seed)
    d, v, S, ff = cfg["d_model"], cfg["n_vocab"], cfg["cores_per_replica"], 4 * cfg["d_model"]

    def bf16(a):
        return torch.from_numpy(a.astype(np.float32)).to(torch.bfloat16).float().numpy()

    def per_shard(shape, scale):
        return [bf16(rng.normal(0, scale, shape)) for _ in range(S)]

    def replicated(shape, loc, scale):
        one = bf16(loc + rng.normal(0, scale, shape))
        return [one] * S

    top = "causal_transformer_shard/~/"
    leaves = {(top + "embedding_shard/~/linear", "w"): per_shard((v // S, d), 1.0),
              (top + "embedding_shard/~/linear", "b"): per_shard((d,), 0.1),
              (top + "projection_shard/~/replicated_layer_norm", "scale"): replicated((d,), 1.0, 0.1),
              (top + "projection_shard/~/replicated_layer_norm", "offset"): replicated((d,), 0.0, 0.1),
              (top + "projection_shard/~/linear", "w"): per_shard((d, v // S), d ** -0.5),
              (top + "projection_shard/~/linear", "b"): per_shard((v // S,), 0.1)}
    for i in range(cfg["layers"]):
        m = f"{top}layer_{i}/~/"
        for lin in ("linear", "linear_1", "linear_2"):
            leaves[(m + lin, "w")] = per_shard((d, d // S), d ** -0.5)
        leaves[(m + "linear_3", "w")] = per_shard((d // S, d), d ** -0.5)
        leaves[(m + "linear_4", "w")] = per_shard((d, ff // S), d ** -0.5)
        leaves[(m + "linear_4", "b")] = per_shard((ff // S,), 0.1)
        leaves[(m + "linear_5", "w")] = per_shard((ff // S, d), ff ** -0.5)
        leaves[(m + "linear_5", "b")] = per_shard((d,), 0.1)
        leaves[(m + "replicated_layer_norm", "scale")] = replicated((d,), 1.0, 0.1)
        leaves[(m + "replicated_layer_norm", "offset")] = replicated((d,), 0.0, 0.1)
    return leaves


def write_slim(leaves, cfg, out: Path):
    """np.savez per shard and piece, as mesh-transformer-jax's write_ckpt: tree_flatten order, split in 16."""
    order = [leaves[key] for key in sorted(leaves)] + [[np.array(1000, np.int32)] * cfg["cores_per_replica"]]
    for s in range(cfg["cores_per_replica"]):
        (out / f"shard_{s}").mkdir(parents=True)
        for p, piece in enumerate(np.array_split(np.arange(len(order)), 16)):
            arrays = [order[i][s] for i in piece]
            raw = [a if a.dtype == np.int32 else torch.from_numpy(a).to(torch.bfloat16).view(torch.int16)
                   .numpy().view("V2") for a in arrays]
            np.savez(out / f"shard_{s}" / f"{p}.npz", *raw)
    (out / "jax_config.json").write_text(json.dumps(cfg))
    return out


def reference_logits(leaves, cfg, tokens):
    """GPT-J's forward pass written against the sharded JAX arrays, in float64 numpy."""
    P = {f"{mod.split('/~/', 1)[1]}/{leaf}": [a.astype(np.float64) for a in arrays]
         for (mod, leaf), arrays in leaves.items()}
    S, d, H, rd = cfg["cores_per_replica"], cfg["d_model"], cfg["n_heads"], cfg["pe_rotary_dims"]
    hd, vs, T = d // H, cfg["n_vocab"] // S, len(tokens)

    def norm(x, name):
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + 1e-5) * P[name + "/scale"][0] + P[name + "/offset"][0]

    def rotary(x):  # (T, heads, hd): rotate adjacent pairs of the first rd dims
        inv = 1.0 / 10000 ** (np.arange(0, rd, 2) / rd)
        ang = np.arange(T)[:, None] * inv[None]
        sin, cos = np.repeat(np.sin(ang), 2, -1)[:, None], np.repeat(np.cos(ang), 2, -1)[:, None]
        r = x[..., :rd]
        turned = np.stack([-r[..., 1::2], r[..., ::2]], -1).reshape(r.shape)
        return np.concatenate([r * cos + turned * sin, x[..., rd:]], -1)

    def gelu(x):
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))

    x = np.zeros((T, d))
    for s in range(S):
        local = np.asarray(tokens) - s * vs
        onehot = (local[:, None] == np.arange(vs)[None]).astype(np.float64)  # all zeros for other shards' tokens
        x += onehot @ P["embedding_shard/~/linear/w"][s] + P["embedding_shard/~/linear/b"][s]
    mask = np.tril(np.ones((T, T), bool))
    for i in range(cfg["layers"]):
        m = f"layer_{i}/~/"
        h, total = norm(x, m + "replicated_layer_norm"), 0
        for s in range(S):
            q, v, k = (h @ P[m + lin + "/w"][s] for lin in ("linear", "linear_1", "linear_2"))
            q, k, v = (a.reshape(T, -1, hd) for a in (q, k, v))
            q, k = rotary(q), rotary(k)
            scores = np.einsum("thd,uhd->htu", q, k) / np.sqrt(hd)
            scores = np.where(mask[None], scores, -np.inf)
            att = np.exp(scores - scores.max(-1, keepdims=True))
            att /= att.sum(-1, keepdims=True)
            out = np.einsum("htu,uhd->thd", att, v).reshape(T, -1) @ P[m + "linear_3/w"][s]
            ff = gelu(h @ P[m + "linear_4/w"][s] + P[m + "linear_4/b"][s]) @ P[m + "linear_5/w"][s]
            total = total + out + ff + P[m + "linear_5/b"][s]
        x = x + total
    h = norm(x, "projection_shard/~/replicated_layer_norm")
    return np.concatenate([h @ P["projection_shard/~/linear/w"][s] + P["projection_shard/~/linear/b"][s]
                           for s in range(S)], -1)


@pytest.fixture(scope="module")
def small_slim(tmp_path_factory):
    leaves = random_slim_leaves(SMALL)
    return leaves, write_slim(leaves, SMALL, tmp_path_factory.mktemp("slim") / "ckpt")


def hf_logits(path, tokens, dtype=torch.float32):
    from transformers import GPTJForCausalLM

    with quiet_progress():
        model = GPTJForCausalLM.from_pretrained(str(path), dtype=dtype).eval()
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].double().numpy()


def test_converted_logits_match_numpy_reference_on_shards(small_slim, tmp_path):
    leaves, slim = small_slim
    tokens = [int(t) for t in np.random.default_rng(1).integers(0, SMALL["n_vocab"], 40)]  # tokens on every shard
    ref = reference_logits(leaves, SMALL, tokens)
    out = gh.convert_jax_checkpoint(slim, tmp_path / "hf32", config=slim / "jax_config.json", dtype=torch.float32,
                                    progress=False)
    got = hf_logits(out, tokens)
    assert ref.std() > 0.5  # the check is not trivially passed by tiny logits
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * ref.std())
    half = gh.convert_jax_checkpoint(slim, tmp_path / "hf16", config=SMALL, dtype=torch.bfloat16, progress=False)
    got16 = hf_logits(half, tokens, dtype=torch.float32)  # bf16 storage; biases summed in float32, then rounded
    assert np.abs(got16 - ref).max() < 0.05 * np.abs(ref).max()
    assert (got16.argmax(-1) == ref.argmax(-1)).mean() > 0.9
    # the check can fail: the shards of one feed-forward weight in the wrong order give different logits
    swapped = dict(leaves)
    key = ("causal_transformer_shard/~/layer_1/~/linear_4", "w")
    swapped[key] = swapped[key][::-1]
    assert not np.allclose(reference_logits(swapped, SMALL, tokens), got, rtol=1e-4, atol=1e-4 * ref.std())


def test_converted_folder_layout(small_slim, tmp_path):
    _, slim = small_slim
    out = gh.convert_jax_checkpoint(slim, tmp_path / "hf", config=SMALL, progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert files == [f"model-block-{i:02d}.safetensors" for i in range(3)] + ["model-embedding.safetensors",
                                                                             "model-head.safetensors"]
    assert sorted(load_file(out / "model-head.safetensors")) == ["lm_head.bias", "lm_head.weight",
                                                                 "transformer.ln_f.bias", "transformer.ln_f.weight"]
    assert all(k.startswith("transformer.h.1.") for k in load_file(out / "model-block-01.safetensors"))
    assert load_file(out / "model-block-00.safetensors")["transformer.h.0.mlp.fc_in.weight"].dtype == torch.float16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # the temporary folder was renamed
    with pytest.raises(FileExistsError, match="already exists"):
        gh.convert_jax_checkpoint(slim, out, config=SMALL, progress=False)


def test_tiny_in_jax_layout_converts_back_to_tiny_rounded(tmp_path):
    r = call_cli("make-tiny", str(tmp_path / "slim"), "--format", "jax-slim")
    assert r.returncode == 0, r.stderr
    assert len(list((tmp_path / "slim").glob("shard_*/*.npz"))) == 8 * 16
    with np.load(tmp_path / "slim" / "shard_0" / "0.npz") as npz:
        assert npz["arr_0"].dtype == np.dtype("V2") and len(npz.files) == 6  # 87 leaves: 7 pieces of 6, 9 of 5
    r = call_cli("convert-jax", str(tmp_path / "slim"), str(tmp_path / "hf"), "--config",
                str(tmp_path / "slim" / "jax_config.json"), "--dtype", "float32")
    assert r.returncode == 0, r.stderr
    assert "converting slim" in r.stderr and "86/86" in r.stderr  # the progress bar counts tensors
    original = load_file(tiny_model_path() / "model.safetensors")  # make-tiny writes the random one
    converted = gh.load_model(str(tmp_path / "hf")).state_dict()
    assert sorted(converted) == sorted(original)
    assert all(torch.equal(converted[k], original[k].to(torch.bfloat16).float()) for k in original)
    assert not all(torch.equal(converted[k], original[k]) for k in original)  # bf16 rounding is visible


# ---------------------------------------------------------------- bad input: a clear error, no output folder

def corrupt(slim: Path, case: str) -> dict:
    """Damage a copy of a slim checkpoint; returns the config to convert it with."""
    cfg = dict(SMALL)
    if case == "missing shard folder":
        import shutil

        shutil.rmtree(slim / "shard_3")
    elif case == "missing piece":
        (slim / "shard_2" / "7.npz").unlink()
    elif case == "truncated npz":
        data = (slim / "shard_5" / "3.npz").read_bytes()
        (slim / "shard_5" / "3.npz").write_bytes(data[: len(data) // 2])
    elif case == "config does not match (width)":
        cfg["n_vocab"] = 1024
    elif case == "config does not match (layers)":
        cfg["layers"] = 4
    elif case in ("NaN", "inf"):
        with np.load(slim / "shard_4" / "2.npz") as npz:
            arrays = [npz[f"arr_{i}"] for i in range(len(npz.files))]
        bits = arrays[1].view(np.uint16).copy()  # layer 0's fc_in weight
        bits.flat[5] = 0x7FC0 if case == "NaN" else 0x7F80  # bf16 NaN / +inf
        arrays[1] = bits.view("V2")
        np.savez(slim / "shard_4" / "2.npz", *arrays)
    return cfg


@pytest.mark.parametrize("case, message", [
    ("missing shard folder", r"shard_3 is missing"),
    ("missing piece", r"shard_2/7.npz is missing"),
    ("truncated npz", r"shard_5/3.npz.*(truncated|damaged)"),
    ("config does not match (width)", r"shard_0/0.npz: arr_1 \(.*embedding_shard/~/linear/w\) has shape \(64, 128\), "
                                      r"the config expects \(128, 128\).*--config"),
    ("config does not match (layers)", r"shard_0/\d+.npz holds \d+ arrays, a 4-layer config expects \d+"),
    ("NaN", r"layer_0/~/linear_4/w in .*shard_4/2.npz contains NaN or inf"),
    ("inf", r"layer_0/~/linear_4/w in .*shard_4/2.npz contains NaN or inf"),
])
def test_bad_slim_checkpoint_is_refused_by_name(small_slim, tmp_path, case, message):
    import shutil

    slim = tmp_path / "slim"
    shutil.copytree(small_slim[1], slim)
    cfg = corrupt(slim, case)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        gh.convert_jax_checkpoint(slim, tmp_path / "out" / "hf", config=cfg, progress=False)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())  # nothing left behind
    r = call_cli("convert-jax", str(slim), str(tmp_path / "out" / "hf"), "--config", str(tmp_path / "cfg.json"))
    assert r.returncode == 2 and "error:" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out" / "hf").exists()


# ---------------------------------------------------------------- pickles

def test_pickle_converts_to_safetensors_without_mask_buffers(tmp_path, tiny_path):
    from transformers import GPTJForCausalLM

    src = tmp_path / "bin"
    src.mkdir()
    state = {k: v.clone() for k, v in load_file(tiny_path / "model.safetensors").items()}
    for i in range(gh.tiny_config().n_layer):  # what 2021 exports carried
        state[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 512, 512, dtype=torch.bool))
        state[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e9)
    torch.save(state, src / "pytorch_model.bin")
    for name in ("config.json", "vocab.json", "merges.txt", "tokenizer_config.json"):
        (src / name).write_bytes((tiny_path / name).read_bytes())
    r = call_cli("convert-bin", str(src), str(tmp_path / "st"), "--dtype", "float16")
    assert r.returncode == 0, r.stderr
    with quiet_progress():
        model = GPTJForCausalLM.from_pretrained(str(tmp_path / "st"))
    assert model.dtype == torch.float16
    converted = {}
    for f in (tmp_path / "st").glob("*.safetensors"):
        converted.update(load_file(f))
    assert not any("attn.bias" in k or "masked_bias" in k for k in converted)
    assert all(torch.equal(model.state_dict()[k], state[k].half()) for k in converted)
    assert gh.load_tokenizer(str(tmp_path / "st")).encode("Hello") == gh.load_tokenizer("tiny").encode("Hello")


@pytest.mark.timeout(180)
def test_bin_conversion_memory_stays_near_the_largest_tensor(tmp_path):
    from transformers import GPTJConfig

    # GPT-J's proportions, smaller: the embedding and the head about as big as one block
    config = GPTJConfig(vocab_size=12608, n_embd=1024, n_layer=6, n_head=8, rotary_dim=16, n_positions=128)
    state = {k: torch.full(p.shape, 0.5) for k, p in gh.meta_model(config).named_parameters()}
    largest = max(t.numel() * t.element_size() for t in state.values())
    (tmp_path / "bin").mkdir()
    torch.save(state, tmp_path / "bin" / "pytorch_model.bin")
    total = (tmp_path / "bin" / "pytorch_model.bin").stat().st_size
    del state
    run = gh.measure_command(["convert-bin", str(tmp_path / "bin"), str(tmp_path / "st"), "--no-progress"])
    assert total > 7 * largest
    # one group (about one largest tensor) and a few MiB: one mapping kept for the whole file reached `total`
    assert run["peak_over_baseline"] < largest + total / 4, (run["peak_over_baseline"], largest, total)


class Payload:
    """Unpickling this would run code: it creates a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("case", ["code", "not a tensor", "not a dict"])
def test_pickle_with_anything_but_tensors_is_refused(tmp_path, case):
    marker = tmp_path / "code_ran"
    obj = {"code": {"w": torch.ones(2), "x": Payload(marker)}, "not a tensor": {"w": torch.ones(2), "step": 7},
           "not a dict": [torch.ones(2)]}[case]
    torch.save(obj, tmp_path / "pytorch_model.bin")
    match = {"code": "holds more than tensors", "not a tensor": r"'step' is not a tensor \(int\)",
             "not a dict": "holds a list"}[case]
    with pytest.raises(ValueError, match=match):
        gh.convert_to_safetensors(tmp_path / "pytorch_model.bin", tmp_path / "out")
    assert not marker.exists() and not (tmp_path / "out").exists()
    (tmp_path / "config.json").write_text(gh.tiny_config().to_json_string())
    with pytest.raises(ValueError, match=match):  # the same refusal where a folder is resolved for the split
        gh.resolve_model(str(tmp_path))
    assert not marker.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "pytorch_model.bin"]


def test_sharded_bin_folder_converts_to_a_new_folder(tmp_path, tiny_path, layouts):
    src = tmp_path / "src"
    src.mkdir()
    for name, data in layouts["test-org/bin-sharded"].items():
        (src / name).write_bytes(data)
    out = gh.convert_to_safetensors(src, tmp_path / "st", dtype=torch.float16, progress=False)
    converted = {}
    for f in out.glob("*.safetensors"):
        converted.update(load_file(f))
    original = load_file(tiny_path / "model.safetensors")
    assert sorted(converted) == sorted(original)
    assert all(torch.equal(converted[k], original[k].half()) for k in original)
    assert not (out / "pytorch_model.bin.index.json").exists() and (out / "tokenizer.json").exists()
    assert out.stat().st_mode == src.stat().st_mode  # not mkdtemp's 0700
    assert {f.stat().st_mode for f in out.glob("*.safetensors")} == {(src / "config.json").stat().st_mode}
    assert sorted(p.name for p in src.iterdir()) == sorted(layouts["test-org/bin-sharded"])  # the source untouched


@pytest.mark.timeout(120)
def test_measured_peak_is_the_child_own_not_the_parent(tmp_path):
    held = torch.ones(75_000_000)  # 300 MB in this (parent) process: a forked child must not report it
    make_tiny_gptj(tmp_path / "slim", format="jax-slim")
    run = gh.measure_command(["convert-jax", str(tmp_path / "slim"), str(tmp_path / "hf"), "--config",
                              str(tmp_path / "slim" / "jax_config.json"), "--no-progress"])
    assert run["rc"] == 0 and (tmp_path / "hf" / "model.safetensors.index.json").exists()
    assert 0 < run["peak_over_baseline"] < held.numel() * 4 // 2
    with pytest.raises(RuntimeError, match="convert-jax .* failed: .*shard_0 is missing"):
        gh.measure_command(["convert-jax", str(tmp_path / "nowhere"), str(tmp_path / "x")])


@pytest.mark.parametrize("keep", [0.5, 100, 4])
def test_a_damaged_weight_file_is_named_in_one_line(tmp_path, keep):
    """A `model.safetensors` cut short (half the file, inside its header, before its header's length) is refused by
    name, with what to do, by every loader, instead of safetensors' "incomplete metadata" from deep inside."""
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(gh.resolve_model("tiny"), folder)
    file = folder / "model.safetensors"
    whole = file.read_bytes()
    file.write_bytes(whole[:int(len(whole) * keep) if keep < 1 else keep])
    wanted = rf"{re.escape(str(file))} is damaged \(.*truncated\): delete it, then download or convert it again"
    plan = gh.plan_split("tiny", "2xcpu")
    for load in (lambda: gh.load_model(str(folder)), lambda: gh.place_stages(str(folder), plan)):
        with pytest.raises(ValueError, match=wanted):
            load()
    file.write_bytes(whole + b"\0")
    with pytest.raises(ValueError, match="bytes added"):
        gh.load_model(str(folder))


@pytest.mark.timeout(120)
def test_a_tokenizer_fetches_only_small_files_into_the_weights_folder(hub, tmp_path, tiny, monkeypatch):
    """load_tokenizer("gpt-j-6b") fetches config and tokenizer files, never weights, into $GPTJ_WEIGHTS; the weights
    then go to the same folder, announced with their size first, and nothing is fetched twice."""
    import huggingface_hub.constants as constants

    endpoint, handler = hub
    handler.repos["EleutherAI/gpt-j-6b"] = handler.files
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv(WEIGHTS_VARIABLE, str(tmp_path / "drive" / "gpt-j-6b"))
    tokenizer = gh.load_tokenizer("gpt-j-6b")
    assert tokenizer("The list")["input_ids"] == tiny[1]("The list")["input_ids"]
    fetched = {entry[1].rsplit("/", 1)[1] for entry in handler.log if entry[0] == "GET" and "/resolve/" in entry[1]}
    assert fetched and not any(name.endswith((".safetensors", ".bin", ".msgpack")) for name in fetched), fetched
    assert (tmp_path / "drive" / "gpt-j-6b" / "tokenizer.json").exists()
    assert not [f for f in (tmp_path / "hub").rglob("*") if f.is_file() and f.parent.name != "refs"]  # no copy there
    requests = len(handler.log)
    gh.load_tokenizer("gpt-j-6b")
    assert len(handler.log) == requests  # there already: no network
    path = gh.resolve_model("gpt-j-6b")
    assert path == tmp_path / "drive" / "gpt-j-6b" and (path / "model.safetensors").exists()
    assert not [f for f in (tmp_path / "hub").rglob("*") if f.is_file() and f.parent.name != "refs"]
    assert len(gets(handler, "tokenizer.json")) == 1 and len(gets(handler, "model.safetensors")) == 1
