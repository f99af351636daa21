"""Issue 15, model loading: every failure is one line that says what is wrong; nothing waits on the hub."""
from __future__ import annotations

import json
import time

import pytest

from tests.cli.helpers import RECIPE, error_line, lpq, lpq_process, snapshot


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE)
    return path


def _llama_folder(path, weights=True, tokenizer=True):
    from transformers import LlamaConfig, LlamaForCausalLM

    from lpq.models.tiny import _word_tokenizer

    config = LlamaConfig(vocab_size=1000, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                         num_attention_heads=2)
    if weights:
        LlamaForCausalLM(config).save_pretrained(path)
    else:
        config.save_pretrained(path)
    if tokenizer:
        _word_tokenizer(1000).save_pretrained(path)
    return path


def _export(recipe, model, tmp_path, **kw):
    before = snapshot(tmp_path)
    code, out = lpq("export", "--config", recipe, "--model", model, "--out", tmp_path / "o", **kw)
    assert code == 2, out
    assert snapshot(tmp_path) == before          # nothing written, nothing of the user's touched
    return error_line(out)


def test_invalid_config_json_names_file_line_and_column(recipe, tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text('{"model_type": "llama",\n "hidden_size": 64,,\n}')
    line = _export(recipe, tmp_path / "m", tmp_path)
    assert f"{tmp_path / 'm' / 'config.json'}:2:20: not valid JSON" in line
    assert "hub" not in line


def test_folder_without_weights(recipe, tmp_path):
    _llama_folder(tmp_path / "m", weights=False)
    assert "this folder has no weights (no *.safetensors or pytorch_model*.bin" in _export(recipe, tmp_path / "m",
                                                                                           tmp_path)


def test_folder_with_a_missing_shard(recipe, tmp_path):
    m = _llama_folder(tmp_path / "m")
    (m / "model.safetensors").rename(m / "model-00001-of-00002.safetensors")
    (m / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    line = _export(recipe, m, tmp_path)
    assert "model-00002-of-00002.safetensors (listed in model.safetensors.index.json) is missing" in line


def test_folder_without_tokenizer(recipe, tmp_path):
    line = _export(recipe, _llama_folder(tmp_path / "m", tokenizer=False), tmp_path)
    assert "this folder has no tokenizer" in line and "sentencepiece" not in line


def test_local_folder_loads(recipe, tmp_path):
    m = _llama_folder(tmp_path / "m")
    code, out = lpq("export", "--config", recipe, "--model", m, "--out", tmp_path / "o")
    assert code == 0, out
    assert json.loads((tmp_path / "o" / "config.json").read_text())["num_hidden_layers"] == 3


def test_unknown_builtin_names_the_closest(recipe, tmp_path):
    line = _export(recipe, "tiny-lama", tmp_path)
    assert "unknown built-in model 'tiny-lama'; did you mean tiny-llama?" in line
    assert "hf download" not in line


def test_builtin_names_in_any_case_never_ask_the_hub(recipe, tmp_path, monkeypatch):
    from lpq.models import hub

    def no_hub(*a, **k):
        raise AssertionError("a built-in name went to the hub")

    monkeypatch.setattr(hub, "_resolve_hub", no_hub)
    assert hub.resolve(hub.ModelConfig(id="SmolLM2-135M")).name == "smollm2-135m"
    assert hub.peek_depth(hub.ModelConfig(id="smollm2-135M")) == 30
    code, out = lpq("export", "--config", recipe, "--model", "Tiny-Llama", "--out", tmp_path / "o")
    assert code == 0, out


@pytest.mark.parametrize("spelling", ["./missing/model", "../missing", "~/lpq-no-such-model", "ABS", "a/b/c",
                                      "sub/model"])
def test_local_looking_paths_are_never_sent_to_the_hub(recipe, tmp_path, monkeypatch, spelling):
    from lpq.models import hub

    monkeypatch.setattr(hub, "_resolve_hub", lambda *a, **k: pytest.fail("sent to the hub"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()                       # an existing first component makes sub/model a path
    model = str(tmp_path / "nothing") if spelling == "ABS" else spelling
    line = _export(recipe, model, tmp_path)
    assert f"model folder {model} does not exist" in line
    assert "hf download" not in line and "huggingface-cli" not in line


def test_unreachable_hub_is_one_line_and_quick(recipe, tmp_path):
    # A closed local port: the hub "cannot be reached" at once, whatever network the test machine has.
    t0 = time.perf_counter()
    code, out = lpq_process("export", "--config", recipe, "--model", "someorg/somemodel", "--out", tmp_path / "o",
                            env={"HF_HUB_OFFLINE": None, "HF_ENDPOINT": "http://127.0.0.1:9"}, cwd=tmp_path)
    elapsed = time.perf_counter() - t0
    assert code == 2, out
    line = error_line(out)
    assert "model 'someorg/somemodel' is not a built-in or a local folder, and the hub cannot be reached" in line
    assert "hf download someorg/somemodel --local-dir DIR" in line
    assert elapsed < 40, elapsed     # interpreter start and imports; before, transformers retried for ~50 s
    assert not (tmp_path / "o").exists()


def test_hub_offline_without_a_cached_copy(recipe, tmp_path):
    line = _export(recipe, "someorg/somemodel", tmp_path)       # the helpers set HF_HUB_OFFLINE=1
    assert "HF_HUB_OFFLINE is set and the local hub cache has no copy" in line


def _hub_cache(tmp_path):
    """A local hub cache (huggingface_hub's layout) holding someorg/tiny."""
    snap = tmp_path / "cache" / "models--someorg--tiny" / "snapshots" / ("a" * 40)
    _llama_folder(snap)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("a" * 40)
    return tmp_path / "cache"


def test_hub_offline_uses_the_cached_copy(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from lpq.models import hub

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(_hub_cache(tmp_path)))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    src = hub.resolve(hub.ModelConfig(id="someorg/tiny"))
    assert (src.kind, src.offline, src.model_kind) == ("hub", True, "causal_lm")
    assert hub.peek_depth(hub.ModelConfig(id="someorg/tiny")) == 3


@pytest.mark.slow   # an interpreter start: the hub endpoint is read at import
def test_unreachable_hub_uses_the_cached_copy(recipe, tmp_path):
    """A hub model already in the local hub cache loads when the hub cannot be reached."""
    cache = _hub_cache(tmp_path)
    code, out = lpq_process("export", "--config", recipe, "--model", "someorg/tiny", "--out", tmp_path / "o",
                            env={"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": None,
                                 "HF_ENDPOINT": "http://127.0.0.1:9"})
    assert code == 0, out
    assert json.loads((tmp_path / "o" / "config.json").read_text())["num_hidden_layers"] == 3
    assert "the hub cannot be reached" in out and "using the cached copy of someorg/tiny" in out


def test_train_protected_block_out_of_range_before_any_training(tmp_path):
    recipe = tmp_path / "t.yaml"
    (tmp_path / "corpus.txt").write_text("some words " * 100)
    recipe.write_text(f"""model: {{id: tiny-llama}}
quant:
  weight: {{format: hif8, scaling: current}}
  protected_blocks: [1, 7]
train: {{output_dir: run, steps: 4}}
data: {{paths: [{tmp_path / "corpus.txt"}]}}
""")
    before = snapshot(tmp_path)
    t0 = time.perf_counter()
    code, out = lpq("train", "--config", recipe)
    assert code == 2
    assert f"{recipe}: quant.protected_blocks: block 7 is out of range: tiny-llama has 2 blocks (0-1)" in \
        error_line(out)
    assert time.perf_counter() - t0 < 20 and snapshot(tmp_path) == before
