"""Notebook 08: weight formats in the planner, honest byte counts, per-block quantization in this project's placement
and pipeline stages, the plan as a stock `device_map`, and quality on the tiny model, for torchao and bitsandbytes."""
import importlib.util
import json
import logging
import sys

import pytest
import torch

import gptj_helpers as gh
from gptj_split.place import plan_of, stored_bytes
from gptj_split.plan import linear_bytes, map_device
from gptj_split.quantize import BlockQuantizer, MissingBackend, check_backend, import_backend
from gptj_split.stage import forward_stage, load_stage, new_stage_cache
import gptj_split.place
import gptj_split.quantize
from gptj_split import quality
from conftest import ROOT, call_cli

GB = 10**9
BACKEND_CASES = [("int8", "torchao"), ("int8", "bitsandbytes"), ("nf4", "bitsandbytes")]


def needs(backend):
    return pytest.mark.skipif(importlib.util.find_spec(backend) is None, reason=f"{backend} is not installed")


def test_bytes_per_weight_include_scales_and_zero_points():
    assert linear_bytes(4096, 4096, "int8", torch.bfloat16) == 4096 * 4096 + 4096 * 5  # int8 + fp32 scale + zp
    assert linear_bytes(4096, 4096, "nf4", torch.bfloat16) == 4096 * 4096 * 0.5625 + 64  # absmax per 64, code
    assert linear_bytes(8, 4, "float16", torch.float16) == 64
    sizes = {w: gh.planned_sizes(gh.gptj_6b_config(), torch.float16, w)["total"] / GB for w in (None, "int8", "nf4")}
    assert sizes[None] == pytest.approx(12.10, abs=0.01)
    assert sizes["int8"] == pytest.approx(6.47, abs=0.01) and sizes["nf4"] == pytest.approx(4.00, abs=0.01)


def test_the_planner_fits_int8_where_float16_is_refused_and_suggests_smaller_weights():
    with pytest.raises(MemoryError, match=r"weights=int8"):
        gh.plan_split("gpt-j-6b", "1x7GiB", dtype=torch.float16)
    with pytest.raises(MemoryError, match=r"weights=nf4"):
        gh.plan_split("gpt-j-6b", "1x5GiB", dtype=torch.float16)
    with pytest.raises(MemoryError) as err:  # already in 4 bits: nothing smaller to suggest
        gh.plan_split("gpt-j-6b", "1x3GiB", dtype=torch.float16, weights="nf4")
    assert "blocks in nf4" in str(err.value) and "weights=" not in str(err.value)
    plan = gh.plan_split("gpt-j-6b", "1x7GiB", dtype=torch.float16, weights="int8")
    assert plan.weights == "int8" and plan.quantized and plan.devices[0].fill < 1
    result = call_cli("plan", "--model", "gpt-j-6b", "--devices", "1x7GiB", "--weights", "int8", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert (data["weights"], data["dtype"]) == ("int8", "bfloat16")


def test_unknown_or_mismatched_formats_are_refused_listing_the_known_ones():
    with pytest.raises(ValueError, match="unknown weight format 'int4': use one of float16, bfloat16, float32, int8"):
        gh.plan_split("tiny", "cpu", weights="int4")
    with pytest.raises(ValueError, match="compute dtype"):
        gh.plan_split("tiny", "cpu", dtype=torch.float32, weights="float16")
    assert gh.plan_split("tiny", "cpu", weights="bfloat16").dtype == "bfloat16"  # a float format names the dtype
    with pytest.raises(ValueError, match="unknown quantized weight format 'fp4': use one of int8, nf4"):
        check_backend("fp4")


def test_plans_round_trip_and_plans_saved_before_weight_formats_still_load(tiny_path):
    plan = gh.plan_split(tiny_path, "2xcpu", dtype=torch.float32, weights="nf4")
    assert gh.Plan.from_json(plan.to_json()) == plan
    old = gh.Plan.from_json((ROOT / "tests" / "data" / "plan_before_weight_formats.json").read_text())
    assert "weights" not in json.loads((ROOT / "tests" / "data" / "plan_before_weight_formats.json").read_text())
    assert old.weights == old.dtype == "float32" and not old.quantized
    model = gh.place_stages(tiny_path, old)
    assert plan_of(model).weights == "float32"


def test_device_map_covers_every_tensor_once_and_agrees_with_the_plan():
    config = gh.tiny_config()
    plan = gh.plan_split(config, gh.parse_devices("cpu=3MiB,cuda:1=3MiB,cuda:0=3MiB", gh.describe_hardware("2 x T4")),
                         dtype=torch.float32)
    device_map = plan.device_map()
    model = gh.meta_model(config)
    names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    for name in names:
        owners = [k for k in device_map if name == k or name.startswith(k + ".")]
        assert len(owners) == 1, (name, owners)
        assert device_map[owners[0]] == map_device(plan.devices[gptj_split.place.tensor_stage(plan, name)].device)
    assert set(device_map.values()) == {"cpu", 1, 0} and device_map["lm_head"] == 0
    assert map_device("cuda") == 0 and map_device("cpu") == "cpu"


@needs("bitsandbytes")
def test_from_pretrained_takes_the_device_map_with_and_without_bitsandbytes(tiny_path):
    plan = gh.plan_split(tiny_path, "2xcpu", dtype=torch.float32)
    plain = gh.load_pretrained(tiny_path, plan)
    assert all(p.device.type == "cpu" for p in plain.parameters())  # all-"cpu": accepted, no hooks to attach
    assert type(plain.transformer.h[0].mlp.fc_in) is torch.nn.Linear
    rows = gh.measure_memory(plain)  # it carries its plan: counted stage by stage, as the plan has it
    assert plan_of(plain) is plan and [r.param_bytes for r in rows][1] == plan.devices[1].param_bytes
    int8 = gh.load_pretrained(tiny_path, gh.plan_split(tiny_path, "2xcpu", dtype=torch.float32, weights="int8"),
                              backend="bitsandbytes")
    assert type(int8.transformer.h[0].mlp.fc_in).__name__ == "Linear8bitLt"
    assert type(int8.lm_head) is torch.nn.Linear  # the head stays in the compute dtype


def test_stock_loading_is_refused_where_transformers_cannot_place_it(tiny_path):
    mixed = gh.plan_split(gh.tiny_config(), gh.parse_devices("cpu=1GiB,cuda:0=1GiB", gh.describe_hardware("T4")),
                          dtype=torch.float32, weights="nf4")
    with pytest.raises(ValueError, match="llm_int8_enable_fp32_cpu_offload"):
        gh.pretrained_config(mixed)
    with pytest.raises(ValueError, match="moves \"cpu\" entries .* to CUDA"):
        gh.pretrained_config(gh.plan_split(tiny_path, "cpu", weights="int8"), backend="torchao")
    random = gh.plan_split(gh.gptj_6b_config(), "1x7GiB", weights="int8")
    with pytest.raises(ValueError, match="no weight files"):
        gh.load_pretrained("gpt-j-6b-random", random)


@needs("torchao")
@needs("bitsandbytes")
def test_a_backend_that_cannot_run_on_the_device_is_refused_before_loading(monkeypatch):
    with pytest.raises(ValueError, match=r"torchao 0\.\d+.* cannot run int8 weights on mps"):
        check_backend("int8", "torchao", ["cpu", "mps"])
    with pytest.raises(ValueError, match="bitsandbytes .* cannot run nf4 weights on cuda:0"):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        check_backend("nf4", None, ["cuda:0"])
    with pytest.raises(ValueError, match="use bitsandbytes"):
        check_backend("nf4", "torchao")


def test_a_missing_backend_says_how_to_install_it(monkeypatch, tiny_path):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if not installed
    with pytest.raises(MissingBackend, match=r'pip install "gptj-helpers\[quant\]"'):
        gh.place_quantized(tiny_path, gh.plan_split(tiny_path, "cpu", weights="nf4"))
    assert "bitsandbytes missing" in gh.backend_versions()


def test_quiet_backends_restores_the_log_levels():
    logger = logging.getLogger("bitsandbytes")
    old = logger.level
    logger.setLevel(logging.INFO)
    try:
        with gh.quiet_backends():
            assert logger.level == logging.ERROR
        assert logger.level == logging.INFO
    finally:
        logger.setLevel(old)


@pytest.mark.parametrize("weights,backend", BACKEND_CASES)
def test_measured_block_bytes_equal_the_plan_and_blocks_quantize_one_at_a_time(tiny_path, weights, backend,
                                                                                 monkeypatch):
    pytest.importorskip(backend)
    plan = gh.plan_split(tiny_path, "2xcpu", dtype=torch.float32, weights=weights)
    events, quantizer, read = [], BlockQuantizer(weights, backend, "float32"), gptj_split.place.WeightReader.read

    def logged_read(self, name, *args):
        events.append(("read", name.rpartition(".")[0]))
        return read(self, name, *args)

    def logged_quantize(name, module):
        if type(module) is torch.nn.Linear:
            assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in module.parameters())
            events.append(("quantize", name))
        return quantizer(name, module)

    monkeypatch.setattr(gptj_split.place.WeightReader, "read", logged_read)
    model = gptj_split.place.place_stages(tiny_path, plan, transform=logged_quantize)
    quantized = [i for i, e in enumerate(events) if e[0] == "quantize"]
    assert len(quantized) == 6 * 8  # q, k, v, out, fc_in, fc_out of 8 blocks
    for i in quantized:  # each linear right after its own tensors, before any other tensor is read: so at most one
        assert events[i - 1] == ("read", events[i][1])  # full-precision linear layer is ever held
        assert ("read", events[i][1]) not in events[i + 1:]
    assert all(type(b.mlp.fc_in) is not torch.nn.Linear or backend == "torchao" for b in model.transformer.h)
    counted = gptj_split.quantize.quantized_bytes(model)
    assert counted["blocks"] == pytest.approx(plan.module_bytes["block"] * 8, rel=0.01)
    rows, buffers = gh.measure_memory(model), sum(stored_bytes(b) for b in model.buffers())  # rotary tables
    assert rows[-1].param_bytes == pytest.approx(plan.devices[-1].param_bytes, rel=0.01)
    assert sum(r.param_bytes for r in rows) - buffers == pytest.approx(sum(s.param_bytes for s in plan.devices),
                                                                       rel=0.01)
    naive = sum(t.numel() * t.element_size() for _, t in model.transformer.h.named_parameters())
    ratio = {"torchao": 3.84, "bitsandbytes": 0.98 if weights == "int8" else 0.89}[backend]  # numel x element_size
    assert naive / counted["blocks"] == pytest.approx(ratio, abs=0.02)  # says 4x for torchao, misses scales for bnb


@needs("bitsandbytes")
@pytest.mark.parametrize("shape", [(512, 128), (128, 512), (100, 48), (7, 64)])  # 48 wide: nf4 blocks cross rows
def test_quantizing_slices_of_rows_equals_bitsandbytes_quantizing_the_whole_weight(shape, monkeypatch):
    bnb = import_backend("bitsandbytes")
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    monkeypatch.setattr(gptj_split.quantize, "CHUNK_ELEMENTS", 192)  # several slices, the last one short
    assert len(list(gptj_split.quantize.row_chunks(weight))) > 1
    with gh.quiet_backends():
        int8 = gptj_split.quantize.bnb_quantize(bnb, weight, "int8")
        nf4 = gptj_split.quantize.bnb_quantize(bnb, weight, "nf4")
        own8 = bnb.nn.Int8Params(weight.clone(), requires_grad=False, has_fp16_weights=False).to("cpu")
        own4 = bnb.nn.Params4bit(weight.clone(), requires_grad=False, quant_type="nf4", compress_statistics=False,
                                 blocksize=64).to("cpu")
    assert torch.equal(int8.CB, own8.CB) and torch.equal(int8.SCB, own8.SCB)
    assert torch.equal(nf4.data, own4.data) and torch.equal(nf4.quant_state.absmax, own4.quant_state.absmax)
    assert nf4.quant_state.shape == own4.quant_state.shape


@needs("torchao")
def test_a_quantized_split_makes_the_quantized_unsplit_models_tokens(tiny):
    _, tokenizer = tiny
    ids = torch.tensor([tokenizer("The list of")["input_ids"]])
    out = {}
    for spec in ("cpu", "3xcpu"):
        model = gh.place_quantized("tiny", gh.plan_split("tiny", spec, weights="int8"))
        out[spec] = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12,
                                   pad_token_id=0)
    assert torch.equal(out["cpu"], out["3xcpu"])


@needs("bitsandbytes")
def test_pipeline_stages_quantize_their_blocks_as_they_load(tiny_path):
    plan = gh.plan_split(tiny_path, "2xcpu", dtype=torch.float32, weights="nf4")
    quantizer = BlockQuantizer("nf4", "bitsandbytes", "float32")
    stages = [load_stage(tiny_path, plan, rank, torch.float32, "cpu", transform=quantizer) for rank in range(2)]
    for stage, st in zip(stages, plan.devices):
        assert all(type(b.mlp.fc_in).__name__ == "Linear4bit" for b in stage.model.h)
        assert stage.param_bytes == pytest.approx(st.param_bytes, rel=0.01)
    whole = gh.place_quantized(tiny_path, plan)
    ids = torch.tensor([[5, 17, 300, 42]])
    mask = torch.ones_like(ids)
    with torch.inference_mode(), gh.quiet_backends():
        hidden = forward_stage(stages[0], ids, mask, new_stage_cache(stages[0]))
        logits = forward_stage(stages[1], hidden, mask, new_stage_cache(stages[1]))
        expected = whole(ids).logits[:, -1].float()
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


@needs("bitsandbytes")
def test_run_pipeline_stage_processes_quantize_their_own_blocks(tiny_path, tiny):
    _, tokenizer = tiny
    plan = gh.plan_split(tiny_path, "2xcpu", dtype=torch.float32, weights="nf4")
    with pytest.raises(ValueError, match=r"nf4: pass options=gh.LaunchOptions\(transform=gh.quantizer_for\(plan\)\)"):
        gh.run_pipeline(tiny_path, "The list of", plan=plan, max_new_tokens=2)
    assert gh.quantizer_for(gh.plan_split(tiny_path, "2xcpu")) is None
    options = gh.LaunchOptions(timeout=60, transform=gh.quantizer_for(plan))
    texts, record = gh.run_pipeline(tiny_path, ["The list of"], plan=plan, options=options, greedy=True,
                                    max_new_tokens=10)
    expected, _ = gh.generate_text(gh.place_quantized(tiny_path, plan), tokenizer, ["The list of"], greedy=True,
                                   max_new_tokens=10)
    assert texts == expected
    for row, stage in zip(record.memory, plan.devices):  # each process holds its blocks in nf4, as planned
        assert row.param_bytes == pytest.approx(stage.param_bytes, rel=0.01)


def test_held_out_text_is_the_one_the_tiny_model_is_scored_on(tiny):
    _, tokenizer = tiny
    spec = importlib.util.spec_from_file_location("train_tiny", ROOT / "assets" / "train_tiny.py")
    train_tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_tiny)
    expected = train_tiny.encode_topics(tokenizer, train_tiny.split_topics()[1])
    ids = quality.held_out_ids(tokenizer)
    assert torch.equal(ids, expected) and (len(ids) - 1) // quality.WINDOW * quality.WINDOW == 12160


@needs("torchao")
@needs("bitsandbytes")
def test_quality_rows_measure_each_format_against_float32():
    rows = quality.measure_quality("tiny", windows=2, new_tokens=6)
    by = {r["format"]: r for r in rows}
    assert list(by) == list(quality.FORMAT_ROWS)
    assert by["float32"]["kl"] == 0 and by["float32"]["top1_agreement"] == 1
    assert by["float32"]["greedy_same"] == by["float32"]["greedy_total"] == 6 * len(quality.GREEDY_PROMPTS)
    for label in list(by)[1:]:
        assert 0 < by[label]["kl"] < 0.05 and 0.8 < by[label]["top1_agreement"] <= 1
        assert by[label]["positions"] == 2 * quality.WINDOW
    assert by["nf4 (bitsandbytes)"]["kl"] > by["int8 (torchao)"]["kl"]  # 4 bits lose more than 8
    assert "nf4 (bitsandbytes)" in quality.format_quality(rows)


def pretend_card(monkeypatch, name: str, capability: tuple[int, int]) -> None:
    """This process sees one CUDA card of the given name and compute capability (nothing runs on it)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: name)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=0: capability)

    class Props:
        total_memory, major, minor = 16 * 2**30, *capability

    Props.name = name
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index=0: Props())


@needs("bitsandbytes")
def test_int8_through_bitsandbytes_is_refused_on_a_p100_by_name(monkeypatch):
    import_backend("bitsandbytes")  # imported for this CPU first: it probes CUDA on import
    pretend_card(monkeypatch, "Tesla P100-PCIE-16GB", (6, 0))
    with pytest.raises(ValueError, match=r"cuda:0 is a Tesla P100-PCIE-16GB \(compute capability 6.0\).*"
                                         r"needs 7.5.*use weights='nf4', or int8 through torchao"):
        check_backend("int8", "bitsandbytes", ["cuda:0"])
    assert check_backend("nf4", "bitsandbytes", ["cuda:0"]) == "bitsandbytes"  # the alternatives stay open
    pretend_card(monkeypatch, "Tesla T4", (7, 5))
    assert check_backend("int8", "bitsandbytes", ["cuda:0"]) == "bitsandbytes"


def test_bfloat16_is_refused_on_a_card_that_only_emulates_it(monkeypatch):
    """A T4 says `is_bf16_supported()`, yet computes bfloat16 by emulation: the plan refuses it, by card."""
    pretend_card(monkeypatch, "Tesla T4", (7, 5))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    config = gh.load_config("gpt-j-6b-random")
    with pytest.raises(ValueError, match=r"cuda:0 is a Tesla T4 \(compute capability 7.5\).*use dtype float16"):
        gh.plan_split(config, "cuda:0=14GiB", dtype=torch.bfloat16)
    assert gh.plan_split(config, "cuda:0=14GiB").dtype == "float16"  # the default never picks it
    pretend_card(monkeypatch, "NVIDIA A100-SXM4-40GB", (8, 0))
    assert gh.plan_split(config, "cuda:0=14GiB", dtype=torch.bfloat16).dtype == "bfloat16"
