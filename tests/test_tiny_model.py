"""Notebook 00: the committed trained tiny model (assets/tiny-gptj) and its training script."""
import importlib.util
import json

import pytest
from safetensors import safe_open

import gptj_helpers as gh
import gptj_split.tiny
from gptj_split.models import EOS_TOKEN
from gptj_split.tiny import tiny_model_path
from conftest import ROOT


@pytest.fixture(scope="module")
def train_tiny():
    """assets/train_tiny.py as a module (it is a script, outside the notebooks' import path)."""
    spec = importlib.util.spec_from_file_location("train_tiny", ROOT / "assets" / "train_tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_resolves_to_committed_model_when_repository_is_present(monkeypatch, tmp_path):
    assert gptj_split.tiny.TINY_TRAINED == ROOT / "gptj_split" / "tiny-gptj"
    assert gh.resolve_model("tiny") == gptj_split.tiny.TINY_TRAINED
    monkeypatch.setattr(gptj_split.tiny, "TINY_TRAINED", tmp_path / "not-installed")  # e.g. an old install
    assert gh.resolve_model("tiny") == tiny_model_path()


def test_committed_model_has_the_tiny_shape_and_fits_in_8_mb():
    folder = gptj_split.tiny.TINY_TRAINED
    config = json.loads((folder / "config.json").read_text())
    expected = gh.tiny_config()
    for key in ("model_type", "vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "rotary_dim",
                "bos_token_id", "eos_token_id", "tie_word_embeddings"):
        assert config[key] == getattr(expected, key), key
    weights = folder / "model.safetensors"
    assert weights.stat().st_size <= 8 * 10**6
    random = gh.load_model(str(tiny_model_path())).state_dict()
    with safe_open(str(weights), framework="pt") as f:
        assert set(f.keys()) == set(random)
        assert all(f.get_slice(k).get_shape() == list(random[k].shape) for k in f.keys())  # noqa: SIM118


def test_committed_tokenizer_round_trips(tiny):
    _, tokenizer = tiny
    text = 'The "for" statement is used to iterate over the elements of a sequence. naïve 😀'
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert len(ids) < len(text) / 2  # BPE merges common English, not one token per byte
    assert len(tokenizer) == gh.tiny_config().vocab_size and tokenizer.eos_token == EOS_TOKEN


def test_trained_model_beats_random_on_held_out_text(train_tiny, tiny):
    model, tokenizer = tiny
    train_names, held_names = train_tiny.split_topics()
    assert held_names and not set(train_names) & set(held_names)
    held = train_tiny.encode_topics(tokenizer, held_names)
    trained = train_tiny.held_out_loss(model, held, max_tokens=2049)
    random = train_tiny.held_out_loss(gh.load_model(str(tiny_model_path())), held, max_tokens=2049)
    assert random > 6.0  # about log(1024): a uniform guess
    assert trained < random - 2.0, (trained, random)


def test_trained_model_writes_words_of_the_training_text(train_tiny, tiny):
    model, tokenizer = tiny
    train_names, _ = train_tiny.split_topics()
    vocabulary = train_tiny.text_vocabulary(train_names)
    texts = train_tiny.sample_texts(model, tokenizer, samples=2, words=30)
    assert train_tiny.word_fraction(texts, vocabulary, words=30) >= 0.7, texts  # random weights: about 0.4


def test_word_fraction_counts_words_not_tokens(train_tiny):
    vocabulary = {"the", "list", "is"}
    assert train_tiny.word_fraction(["The list, is: the LIST!"], vocabulary) == 1.0
    assert train_tiny.word_fraction(["the xyzzy list qqq"], vocabulary) == 0.5
    assert train_tiny.word_fraction(["the list is the"], vocabulary, words=2) == 1.0


def test_evaluate_without_a_model_is_one_clear_error(train_tiny, tmp_path, capsys):
    assert train_tiny.main([str(tmp_path / "empty"), "--evaluate"]) == 2
    assert "train it first" in capsys.readouterr().err


def test_learning_rate_warms_up_then_decays_to_a_tenth(train_tiny):
    rates = [train_tiny.learning_rate(step) for step in range(train_tiny.STEPS)]
    peak = rates.index(max(rates))
    assert peak == train_tiny.WARMUP - 1 and max(rates) == pytest.approx(train_tiny.LEARNING_RATE)
    assert rates[:peak + 1] == sorted(rates[:peak + 1]) and rates[peak:] == sorted(rates[peak:], reverse=True)
    assert rates[-1] == pytest.approx(0.1 * train_tiny.LEARNING_RATE, rel=1e-3)
