"""Notebook 00: the tiny default, GPT-J-6B's sizes, devices, project files and the CLI."""
import re
import tomllib

import pytest
import torch
from safetensors.torch import load_file

import gptj_helpers as gh
from gptj_split.devices import GPU_RESERVE, parse_size
from gptj_split.hub import download_model, hub_id
from gptj_split.models import EOS_TOKEN, default_dtype, is_gptj_6b
from gptj_split.tiny import tiny_model_path
from gptj_split.random_models import (build_seeded_model, make_tiny_gptj, save_tokenizer, write_random_model,
                                      write_seeded_files)
from conftest import ROOT, call_cli, run_cli


def greedy(model, tokenizer, text="The list", n=12):
    ids = tokenizer(text, return_tensors="pt").input_ids
    return model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=tokenizer.eos_token_id)


def test_tiny_random_is_deterministic_and_reloads_bit_identical(tmp_path):
    a, b = make_tiny_gptj(tmp_path / "a"), make_tiny_gptj(tmp_path / "b")
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    model, tokenizer = gh.load_model(str(tiny_model_path())), gh.load_tokenizer(str(tiny_model_path()))
    loaded = {k: v for k, v in model.state_dict().items()}
    assert all(torch.equal(loaded[k], wa[k]) for k in wa)
    assert (a / "vocab.json").read_bytes() == (b / "vocab.json").read_bytes()
    assert (a / "merges.txt").read_bytes() == (b / "merges.txt").read_bytes()
    again = gh.load_model(str(b))
    assert torch.equal(greedy(model, tokenizer), greedy(again, tokenizer))


def test_tiny_seed_matters(tmp_path):
    other = load_file(make_tiny_gptj(tmp_path / "s1", seed=1) / "model.safetensors")
    base = load_file(tiny_model_path() / "model.safetensors")
    assert not torch.equal(other["transformer.h.0.mlp.fc_in.weight"], base["transformer.h.0.mlp.fc_in.weight"])


def test_tiny_shape_fits_the_series():
    c = gh.tiny_config()
    assert c.n_layer == 8 and c.rotary_dim < c.n_embd // c.n_head
    for size in (c.vocab_size, c.n_embd, c.n_head, 4 * c.n_embd):
        assert size % 8 == 0


@pytest.mark.parametrize("text", ["Hello, world!", "naïve café – 漢字 😀 \t\n  spaces", "\x00\x7f\u200b", ""])
def test_tokenizer_round_trips_unicode(tiny, text):
    _, tokenizer = tiny
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert all(0 <= i < gh.tiny_config().vocab_size for i in ids)
    assert len(tokenizer) > 500 and tokenizer.eos_token == EOS_TOKEN


def test_gptj_6b_counts_on_meta_device():
    sizes = gh.module_sizes(gh.gptj_6b_config(), dtype=torch.float16)
    assert sizes["params"] == 6_050_882_784
    assert sizes["block"] == 201_355_264 * 2
    assert sizes["embedding"] == 206_438_400 * 2
    assert sizes["head"] == (8_192 + 206_438_400 + 50_400) * 2
    assert sizes["total"] == sizes["params"] * 2
    assert gh.module_sizes(gh.gptj_6b_config(), dtype=torch.float32)["total"] == sizes["params"] * 4


@pytest.mark.parametrize("text,expected", [("10GiB", 10 * 2**30), ("5GB", 5 * 10**9), ("512 MiB", 512 * 2**20),
                                           ("1.5gb", 1_500_000_000), ("100", 100), ("2MB", 2_000_000)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


def test_parse_devices_good():
    three = gh.parse_devices("3x5GiB")
    assert len(three) == 3 and all(d.budget_bytes == 5 * 2**30 for d in three)
    expected = "cuda:0" if torch.cuda.is_available() else "cpu"
    assert three[0].name == expected
    laid = gh.parse_devices("4x4GiB", gh.describe_hardware("2 x T4"))  # bare sizes take the GPUs in order
    assert [d.name for d in laid] == ["cuda:0", "cuda:0", "cuda:1", "cuda:1"]
    cpus = gh.parse_devices("cpu,cpu,cpu")
    assert [d.name for d in cpus] == ["cpu"] * 3 and cpus[0].budget_bytes > 0
    mixed = gh.parse_devices("cpu=6GiB, cpu=10GiB, 2xcpu=1GB")
    assert [d.budget_bytes for d in mixed] == [6 * 2**30, 10 * 2**30, 10**9, 10**9]
    assert str(mixed[0]) == "cpu=6.00GiB"


@pytest.mark.parametrize("spec,fragment", [("", "empty device spec"), ("3x5 gigs", "5 gigs"),
                                           ("cpu=ten", "ten"), ("tpu:0=1GiB", "tpu:0"),
                                           ("0x5GiB", "at least 1"), ("cpu,foo", "foo")])
def test_parse_devices_bad(spec, fragment):
    with pytest.raises(ValueError, match=re.escape(fragment)):
        gh.parse_devices(spec)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_gpu_is_explained():
    with pytest.raises(ValueError, match="no CUDA GPU"):
        gh.parse_devices("cuda:0=10GiB")


def test_environment_yml_matches_pyproject():
    """Binder installs pyproject's ranges: the same pip requirements, except torch (conda-forge's CPU build, same
    range) and ipywidgets (8 only: Binder runs JupyterLab 4, which has no extension for 7), plus the `quant` extra."""
    import yaml
    from packaging.requirements import Requirement
    from packaging.version import Version

    def by_name(reqs):
        return {r.name.lower().replace("_", "-"): r.specifier for r in map(Requirement, reqs)}

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = by_name(project["dependencies"])
    env = yaml.safe_load((ROOT / "environment.yml").read_text())["dependencies"]
    conda = [d for d in env if isinstance(d, str)]
    pip = by_name(next(d["pip"] for d in env if isinstance(d, dict)))
    assert "torch" not in pip, "Binder's torch comes from conda-forge (pytorch-cpu), never from pip"
    torch_spec = next(d for d in conda if re.match(r"pytorch-cpu\b", d))
    assert torch_spec.removeprefix("pytorch-cpu") == str(deps.pop("torch"))
    lab, ours = pip.pop("ipywidgets"), deps.pop("ipywidgets")
    assert Version("7.7.1") in ours and Version("8.1.9") in ours
    assert Version("7.7.1") not in lab and Version("8.1.9") in lab
    assert set(deps) <= set(pip), f"in pyproject but not environment.yml: {set(deps) - set(pip)}"
    extra = set(pip) - set(deps)
    quant = by_name(project["optional-dependencies"]["quant"])  # notebook 08 runs on Binder too
    assert set(quant) <= extra and {name: str(pip[name]) for name in quant} == {n: str(s) for n, s in quant.items()}
    extra -= set(quant)
    assert extra <= {"jupyterlab", "nbval"}, f"in environment.yml but not pyproject: {extra}"
    assert extra <= set(by_name(project["optional-dependencies"]["dev"]))
    assert {name: str(pip[name]) for name in deps} == {name: str(spec) for name, spec in deps.items()}


def test_constraints_pin_cpu_torch():
    pins = (ROOT / "constraints.txt").read_text()
    assert re.search(r"^torch==2\.13\.0$", pins, flags=re.M)
    assert "nvidia" not in pins.lower()


def test_cli_help_lists_subcommands():
    result = run_cli("--help", timeout=60)
    assert result.returncode == 0
    assert "make-tiny" in result.stdout and "devices" in result.stdout


def test_cli_make_tiny(tmp_path):
    out = tmp_path / "tiny"
    result = call_cli("make-tiny", str(out))
    assert result.returncode == 0, result.stderr
    assert (out / "config.json").exists() and (out / "model.safetensors").exists()
    assert call_cli("make-tiny", str(out)).returncode != 0  # refuses to overwrite


def test_cli_bad_device_spec_is_one_clear_line():
    result = call_cli("devices", "3xfoo")
    assert result.returncode == 2 and result.stderr.startswith("error:") and "foo" in result.stderr


def test_hub_id_offline_fails_fast(monkeypatch, tmp_path):
    import time

    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    start = time.perf_counter()
    with pytest.raises(ConnectionError, match="needs the internet"):
        download_model("someone/some-model", cache_dir=tmp_path)
    assert time.perf_counter() - start < 10


def test_unreachable_endpoint_fails_fast(tmp_path):
    with pytest.raises(ConnectionError, match="cannot reach 127.0.0.1"):
        download_model("someone/some-model", endpoint="http://127.0.0.1:9", cache_dir=tmp_path)


def test_resolve_model_paths(tmp_path, tiny_path):
    assert gh.resolve_model(str(tiny_path)) == tiny_path
    with pytest.raises(FileNotFoundError, match="config.json"):
        gh.resolve_model(str(tmp_path))
    assert hub_id("gpt-j-6b") == ("EleutherAI/gpt-j-6b", "float16")
    assert gh.load_config("gpt-j-6b").n_layer == 28  # known offline


def test_module_does_no_work_at_import():
    import subprocess
    import sys

    code = "import sys, gptj_helpers; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.stdout.strip() == "False"


def test_gpt_j_6b_random_is_a_named_model_without_weight_files():
    folder = gh.resolve_model("gpt-j-6b-random")
    assert (folder / "random_weights.json").exists() and not list(folder.glob("*.safetensors"))
    config = gh.load_config("gpt-j-6b-random")
    assert is_gptj_6b(config) and default_dtype(config) == torch.bfloat16
    assert gh.load_tokenizer("gpt-j-6b-random")("The list")["input_ids"]
    plan = gh.plan_split("gpt-j-6b-random", "2x7GiB")
    assert plan.dtype == "bfloat16" and [s.blocks for s in plan.devices] == [(0, 14), (14, 28)]


def test_gpt_j_6b_random_refused_before_building_where_it_does_not_fit(monkeypatch):
    import gptj_split.random_models

    monkeypatch.setattr(gptj_split.random_models, "available_memory", lambda device: 3 * 2**30)
    monkeypatch.setattr(gptj_split.random_models, "seeded_tensor", lambda *a, **k: pytest.fail("a tensor was built"))
    with pytest.raises(MemoryError, match=r"needs 11\.27 GiB on cpu, which has 3\.00 GiB free"):
        gh.load_model("gpt-j-6b-random")


def test_a_budget_larger_than_the_named_card_is_refused(monkeypatch):
    """torch reports a T4 as 14.75 GiB: a 15GiB budget on it is refused, naming the card and both sizes; so are slices
    that add up to more than the card. The node is read from torch (mocked here as one T4)."""
    class Props:
        name, total_memory, major, minor = "Tesla T4", 15_835_660_288, 7, 5

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Props())
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (15_000_000_000, Props.total_memory))
    with pytest.raises(ValueError, match=r"'cuda:0=15GiB': cuda:0 is a Tesla T4 with 14\.75 GiB in all, less than "
                       r"the budget of 15\.00 GiB: give at most 14GiB"):
        gh.parse_devices("cuda:0=15GiB")
    assert gh.parse_devices("cuda:0=14GiB") == [gh.Device("cuda:0", 14 * 2**30)]
    assert gh.parse_devices("cuda:0") == [gh.Device("cuda:0", 15_000_000_000 - GPU_RESERVE)]  # free less reserve
    with pytest.raises(ValueError, match=r"2 budgets on cuda:0 add up to 16\.00 GiB, more than the Tesla T4's"):
        gh.parse_devices("2x8GiB")
    with pytest.raises(ValueError, match=r"cuda:1 does not exist, this node has 1 GPU\(s\) \(cuda:0: 1 x Tesla T4\)"):
        gh.parse_devices("cuda:1=7GiB")
    # planning for a card that is not here: describe it
    assert gh.parse_devices("cuda:0=14GiB,cuda:1=14GiB", gh.describe_hardware("2 x T4"))[1].name == "cuda:1"


def test_seeded_weights_written_as_safetensors_load_with_from_pretrained_and_equal_the_seeded_model(tmp_path):
    """The rehearsal's gpt-j-6b-random files, at the tiny size: stock from_pretrained reads them, tensor for tensor
    the model built from the seed."""
    from transformers import GPTJForCausalLM

    seeded = write_random_model(gh.tiny_config(), tmp_path / "seeded", seed=3)
    save_tokenizer(seeded)
    files = write_seeded_files(seeded, tmp_path / "files", torch.bfloat16)
    assert len(list(files.glob("model-*.safetensors"))) == gh.tiny_config().n_layer + 1
    loaded = GPTJForCausalLM.from_pretrained(str(files))
    built = build_seeded_model(seeded, gh.tiny_config(), torch.bfloat16, "cpu")
    assert loaded.dtype == torch.bfloat16
    for (name, a), (_, b) in zip(loaded.state_dict().items(), built.state_dict().items()):
        assert torch.equal(a, b), name
