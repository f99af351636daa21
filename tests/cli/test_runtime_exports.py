"""Exports written for another runtime (`lpq export --kind compressed-tensors | gguf`) are not lpq models:
load_quantized, `lpq eval --candidate`, `lpq eval --model` and `lpq inspect --model` refuse them in one line
that names the kind and what reads it; any other command loading one as its model is refused too."""
from __future__ import annotations

import pytest

from lpq.export import CheckpointError, load_quantized
from tests.cli.helpers import error_line, lpq, snapshot

READERS = {"compressed-tensors": "vLLM (`vllm serve", "gguf": "llama.cpp (`llama-cli -m"}


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("runtime_exports")
    recipe = root / "r.yaml"
    recipe.write_text("model: {id: tiny-qwen3}\nquant: {weight: {format: mxfp4}}\n")
    for kind in READERS:
        code, out = lpq("export", "--config", recipe, "--out", root / kind, "--kind", kind)
        assert code == 0, out
    return root


def _refusal(folder, kind) -> str:
    return f"{folder} is a {kind} export, for another runtime: load it with {READERS[kind]}"


@pytest.mark.parametrize("kind", READERS)
def test_load_quantized_names_the_kind_and_its_reader(exports, kind):
    with pytest.raises(CheckpointError) as e:
        load_quantized(exports / kind)
    assert str(e.value).startswith(_refusal(exports / kind, kind)) and "\n" not in str(e.value)
    assert "lpq loads packed exports (lpq export --kind packed)" in str(e.value)


@pytest.mark.parametrize("kind", READERS)
def test_lpq_eval_and_inspect_refuse_in_one_line(exports, tmp_path, kind):
    before = snapshot(exports)
    code, out = lpq("eval", "--model", "tiny-qwen3", "--candidate", exports / kind, "--tasks", "wikitext2",
                    "--out", tmp_path / "e")
    assert code == 2 and _refusal(exports / kind, kind) in error_line(out)
    assert not (tmp_path / "e").exists()                      # refused before any folder or model
    code, out = lpq("eval", "--model", exports / kind, "--tasks", "wikitext2", "--out", tmp_path / "e2",
                    "--config", exports / "r.yaml")
    assert code == 2 and _refusal(exports / kind, kind) in error_line(out)
    code, out = lpq("inspect", "--config", exports / "r.yaml", "--model", exports / kind)
    assert code == 2 and _refusal(exports / kind, kind) in error_line(out)
    code, out = lpq("export", "--config", exports / "r.yaml", "--model", exports / kind, "--out", tmp_path / "x")
    assert code == 2 and f"{exports / kind} is an lpq {kind} export, for another runtime" in error_line(out)
    assert snapshot(exports) == before
