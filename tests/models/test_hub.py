"""lpq.models.hub: resolving model.id and reading the depth from configs alone."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lpq.models import hub
from lpq.models.adapters import get_adapter
from lpq.models.hub import BUILTINS, ModelConfig, ModelError, peek_blocks, peek_depth, resolve


@pytest.mark.parametrize("name", [n for n in BUILTINS if n.startswith("tiny-")])
def test_peek_blocks_of_tiny_builtins_match_the_built_models(name):
    loaded = hub.load_model(ModelConfig(id=name))
    adapter = get_adapter(loaded.model)
    built = {net: len(adapter.blocks(m)) for net, m in adapter.networks(loaded.model)}
    assert peek_blocks(ModelConfig(id=name.upper())) == built


def test_peek_blocks_of_saved_folders_without_loading_weights(tmp_path, monkeypatch):
    from transformers import GPT2Config, Qwen3Config, Qwen3ForCausalLM

    from lpq.models.tiny import tiny_wan_pipeline

    Qwen3ForCausalLM(Qwen3Config(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=5,
                                 num_attention_heads=2, num_key_value_heads=1, head_dim=8)).save_pretrained(
        tmp_path / "qwen")
    (tmp_path / "qwen" / "tokenizer.json").write_text("{}")
    tiny_wan_pipeline(two_experts=True).save_pretrained(tmp_path / "wan22")
    GPT2Config(n_layer=4).save_pretrained(tmp_path / "gpt2")           # n_layer: read through AutoConfig
    (tmp_path / "gpt2" / "model.safetensors").write_bytes(b"")         # weights are never opened
    (tmp_path / "gpt2" / "tokenizer.json").write_text("{}")

    def no_weights(*a, **k):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", no_weights)
    assert peek_blocks(ModelConfig(id=str(tmp_path / "qwen"), kind="causal_lm")) == {"": 5}
    assert peek_blocks(ModelConfig(id=str(tmp_path / "wan22"))) == {"transformer": 2, "transformer_2": 2}
    assert peek_depth(ModelConfig(id=str(tmp_path / "gpt2"))) == 4


def test_check_blocks_refuses_out_of_range():
    hub.check_blocks(ModelConfig(id="tiny-qwen3"), [0, 1])
    with pytest.raises(ModelError, match=r"quant.protected_blocks: block 2 is out of range: tiny-qwen3 has 2 "
                                         r"blocks \(0-1\)"):
        hub.check_blocks(ModelConfig(id="tiny-qwen3"), [0, 2])


@pytest.mark.parametrize("name, local", [("someorg/model", False), ("gpt2", False), ("./m", True), ("../m", True),
                                         ("~/m", True), ("/abs/m", True), ("a/b/c", True), ("m/", True),
                                         ("models\\m", True), (".", True)])
def test_local_looking_names(name, local):
    assert hub._looks_local(name) is local


def test_hub_ids_that_are_not_valid():
    with pytest.raises(ModelError, match="is not a built-in .* a local folder, or a hub id"):
        resolve(ModelConfig(id="some org/bad name!"))


def test_empty_model_id():
    with pytest.raises(ValueError, match="model.id is empty"):      # refused as the recipe is read
        ModelConfig(id="  ")
    cfg = ModelConfig()
    cfg.id = " "                                                     # set afterwards, as an option does
    with pytest.raises(ModelError, match="model.id is empty"):
        resolve(cfg)


def test_a_packed_export_is_not_loaded_as_a_model(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "lpq_export.json").write_text(json.dumps({"kind": "packed"}))
    with pytest.raises(ModelError, match="is a packed lpq export; load it with lpq.load_quantized"):
        resolve(ModelConfig(id=str(tmp_path)))


def test_models_import_without_a_cycle_and_naming_builtins_is_cheap():
    code = ("import sys; import lpq.models.tiny as t; assert 'lpq.models.hub' not in sys.modules; "
            "import lpq.models.hub as h; assert 'torch' not in sys.modules, 'torch imported'; "
            "assert h.BUILTINS == ('smollm2-135m', *t.TINY_MODELS)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
