"""Model loading: shipped names, local folders, and one clear line for every failure."""

from __future__ import annotations

import json
import shutil
from contextlib import nullcontext

import pytest
import torch

import circuits
from circuits.errors import ModelLoadError, OptionError
from circuits.model import context_length
from circuits.testing import FAMILIES, NODE_FAMILIES, tiny_gpt2, tiny_model
from circuits.zoo import find, list_models


def test_shipped_model_loads_offline_with_its_tokenizer():
    model = circuits.load_model("ioi-gpt2-4l")
    assert model.architecture == "GPT2LMHeadModel" and model.tokenizer is not None
    assert not model.hf.training
    ids = model.tokenize([" Mary"])
    assert ids.shape == (1, 1)


def test_local_folder_loads(tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(find("ioi-gpt2-4l"), folder)
    model = circuits.load_model(folder)
    assert model.name == str(folder)


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="no model folder"):
        circuits.load_model(str(tmp_path / "nope"))


@pytest.mark.parametrize(
    "missing, message",
    [("model.safetensors", "no weights"), ("tokenizer.json", "no tokenizer"),
     ("config.json", "no config.json")],
)
def test_incomplete_folder_is_a_clear_error(tmp_path, missing, message):
    folder = tmp_path / "m"
    shutil.copytree(find("ioi-gpt2-4l"), folder)
    (folder / missing).unlink()
    if missing == "tokenizer.json":
        (folder / "tokenizer_config.json").unlink()
    with pytest.raises(ModelLoadError, match=message):
        circuits.load_model(folder)


def test_hub_name_without_network_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="Hugging Face hub") as info:
        circuits.load_model("some-org/not-a-model")
    assert "\n" not in str(info.value)


def test_file_instead_of_folder(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"")
    with pytest.raises(ModelLoadError, match="is a file"):
        circuits.load_model(f)


def _copy(tmp_path, name="ioi-gpt2-4l"):
    folder = tmp_path / "m"
    shutil.copytree(find(name), folder)
    return folder


def _edit_config(folder, **fields):
    config = json.loads((folder / "config.json").read_text())
    config.update(fields)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("value", [None, 123, "", "   ", b"ioi-gpt2-4l", "a\x00b"])
def test_a_value_that_names_no_model_is_an_option_error(value):
    with pytest.raises(OptionError, match="pass a shipped model") as info:
        circuits.load_model(value)
    assert "\n" not in str(info.value)


def test_weights_of_another_width_than_the_config(tmp_path):
    folder = _copy(tmp_path)
    _edit_config(folder, n_embd=256)
    with pytest.raises(ModelLoadError, match=r"do not match its config.json: 52 weights have "
                                             r"another shape .*\[384\] in the weights but \[768\]"):
        circuits.load_model(folder)


@pytest.mark.parametrize("damage", ["half", "header", "garbage", "empty"])
def test_truncated_or_garbage_safetensors(tmp_path, damage):
    folder = _copy(tmp_path)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"half": data[: len(data) // 2], "header": data[:20],
                         "garbage": b"not a model " * 50, "empty": b""}[damage])
    with pytest.raises(ModelLoadError, match="model.safetensors in .* is truncated or not a "
                                             "safetensors file"):
        circuits.load_model(folder)


def test_config_with_more_layers_than_the_weights_is_refused(tmp_path):
    folder = _copy(tmp_path)
    _edit_config(folder, n_layer=6)
    with pytest.raises(ModelLoadError) as info:
        circuits.load_model(folder)
    message = str(info.value)
    assert ("asks for 6 layers but the weights hold 4 (transformer.h.0 to transformer.h.3), so "
            "the weights of the other 2 are missing") in message
    assert "\n" not in message


def test_config_with_fewer_layers_than_the_weights_is_refused(tmp_path):
    folder = _copy(tmp_path)
    _edit_config(folder, n_layer=3)
    # 11 of layer 3's 12: transformers' GPT-2 ignores keys matching "attn.bias" (c_attn.bias)
    with pytest.raises(ModelLoadError, match=r"11 weights are not used by the config "
                                             r"\(transformer.h.3."):
        circuits.load_model(folder)


@pytest.mark.parametrize("family", FAMILIES + NODE_FAMILIES)
@pytest.mark.parametrize("tie", [True, False])
def test_every_family_saved_with_save_pretrained_loads_exactly(tmp_path, family, tie):
    """Tied embeddings are not 'missing': nothing legitimate is refused."""
    original = tiny_model(family, tie_word_embeddings=tie).hf
    folder = tmp_path / family
    original.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(find("ioi-gpt2-4l") / name, folder / name)
    # transformers would give a qwen2 folder Qwen2Tokenizer, not the GPT-2 tokenizer it holds
    forced = family == "qwen2"
    with pytest.warns(UserWarning, match="folder's tokenizer.json") if forced else nullcontext():
        loaded = circuits.load_model(folder)
    state = loaded.hf.state_dict()
    assert all(torch.equal(value, state[key]) for key, value in original.state_dict().items())
    assert loaded.fingerprint == circuits.model.fingerprint(original)


def test_every_shipped_model_loads_without_complaint():
    names = [card.name for card in list_models()] + ["planted-ioi", "planted-induction",
                                                     "planted-mlp"]
    for name in names:
        model = circuits.load_model(name)
        assert model.context_length == model.hf.config.n_positions


@pytest.mark.parametrize("field, value", [("n_layer", "4"), ("n_embd", 0), ("vocab_size", True)])
def test_config_shape_field_of_the_wrong_type(tmp_path, field, value):
    folder = _copy(tmp_path)
    _edit_config(folder, **{field: value})
    with pytest.raises(ModelLoadError, match=f"config.json in .*: {field} must be a positive whole "
                                             "number"):
        circuits.load_model(folder)


def test_config_that_is_not_json(tmp_path):
    folder = _copy(tmp_path)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="config.json in .* is not readable JSON"):
        circuits.load_model(folder)


def test_sharded_index_naming_a_missing_file(tmp_path):
    folder = _copy(tmp_path)
    (folder / "model.safetensors").unlink()
    index = {"weight_map": {"transformer.wte.weight": "model-00001-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="names the weight file 'model-00001-of-00002"):
        circuits.load_model(folder)


# -- context length and fingerprint -------------------------------------------------------------
def test_context_length_from_the_config():
    assert context_length(tiny_gpt2(n_positions=48)) == 48
    assert tiny_model("llama", max_position_embeddings=96).context_length == 96
    assert context_length(torch.nn.Linear(2, 2)) is None


def test_fingerprint_is_stable_and_sensitive(tmp_path):
    first = circuits.load_model("ioi-gpt2-4l")
    again = circuits.load_model(_copy(tmp_path))
    assert first.fingerprint == again.fingerprint
    assert first.fingerprint.startswith("v2-") and int(first.fingerprint[3:], 16) >= 0
    assert len(first.fingerprint) == 19
    assert first.fingerprint != circuits.load_model("factual-gpt2-4l").fingerprint  # same shape
    with torch.no_grad():
        again.hf.transformer.h[2].mlp.c_fc.weight.view(-1)[0] += 1e-3  # a sampled position
    assert circuits.model.fingerprint(again.hf) != first.fingerprint
    assert again.fingerprint == first.fingerprint  # computed once and kept
    assert tiny_gpt2(seed=0).fingerprint != tiny_gpt2(seed=1).fingerprint
    assert tiny_gpt2(n_layer=2).fingerprint != tiny_gpt2(n_layer=3).fingerprint


def test_fingerprint_of_the_weights_as_stored_in_every_dtype():
    """Documented: the sample is of the values as stored, so loads in any dtype compare."""
    bf16 = circuits.load_model("ioi-gpt2-4l", dtype="bfloat16")
    assert bf16.fingerprint == circuits.load_model("ioi-gpt2-4l").fingerprint
    assert bf16.fingerprint != circuits.load_model("factual-gpt2-4l", dtype="bfloat16").fingerprint


# -- the tokenizer the folder names --------------------------------------------------------------
SENTENCE = "When Alice and Bob went to the school"
WORDS = ["<unk>", "<s>", *SENTENCE.split(), ",", "gave", "a", "drink"]


def word_level_qwen2(folder):
    """A random Qwen2 model whose folder holds a word-level tokenizer (a word per id, split on
    whitespace), named in tokenizer_config.json as the generic fast tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>",
                            bos_token="<s>").save_pretrained(folder)
    tiny_model("qwen2", vocab_size=len(WORDS)).hf.save_pretrained(folder)


def test_a_qwen2_folder_keeps_its_own_word_level_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    word_level_qwen2(tmp_path)
    want = [WORDS.index(w) for w in SENTENCE.split()]  # one id per word, by construction
    # what transformers alone loads: the test needs it to differ (Qwen2Tokenizer, byte-level)
    forced = AutoTokenizer.from_pretrained(tmp_path)
    assert type(forced).__name__ == "Qwen2Tokenizer"
    assert forced(SENTENCE, add_special_tokens=False)["input_ids"] != want
    with pytest.warns(UserWarning, match="not the TokenizersBackend its tokenizer_config.json "
                                         "names.*using the folder's tokenizer.json"):
        model = circuits.load_model(tmp_path)
    assert model.tokenizer(SENTENCE, add_special_tokens=False)["input_ids"] == want
    assert model.tokenizer.unk_token == "<unk>" and model.tokenizer.bos_token == "<s>"


def test_a_tokenizer_json_that_cannot_be_read_stops_the_load(tmp_path, monkeypatch):
    """Where the folder's own tokenizer is needed but cannot be built: one line, no traceback."""
    import transformers

    word_level_qwen2(tmp_path)

    class Broken:  # as the tokenizers library fails on a file it cannot parse
        @classmethod
        def from_pretrained(cls, *args, **kwargs):
            raise Exception("data did not match any variant of untagged enum ModelWrapper")

    # the generic class only: transformers' own loading of Qwen2Tokenizer still works
    monkeypatch.setattr(transformers, "PreTrainedTokenizerFast", Broken)
    with pytest.raises(ModelLoadError, match=r"^transformers loads Qwen2Tokenizer for .*its "
                                             r"tokenizer.json cannot be loaded \(data did not"):
        circuits.load_model(tmp_path)
