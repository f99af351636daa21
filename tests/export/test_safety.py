"""Damaged checkpoints give clear errors; interrupted exports leave nothing; --force is needed to replace."""
from __future__ import annotations

import json

import pytest

from lpq.export import CheckpointError, export_model, load_quantized
from lpq.export.tensor_io import ShardWriter
from tests.export.helpers import quantized_lm


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model, r = quantized_lm("tiny-qwen3-moe", {"format": "hif4"})
    out = tmp_path_factory.mktemp("ckpt") / "packed"
    export_model(model, r, out)
    return model, r, out


def _copy(src, tmp_path):
    import shutil

    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    return dst


def test_truncated_file(exported, tmp_path):
    ckpt = _copy(exported[2], tmp_path)
    f = ckpt / "lpq_packed.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match=r"lpq_packed\.safetensors: the checkpoint is damaged .*truncated"):
        load_quantized(ckpt)


def test_corrupted_bytes(exported, tmp_path):
    ckpt = _copy(exported[2], tmp_path)
    f = ckpt / "lpq_packed.safetensors"
    data = bytearray(f.read_bytes())
    data[-100] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"lpq_packed\.safetensors: the checkpoint is damaged .*SHA-256"):
        load_quantized(ckpt)


def test_corrupted_header_without_checksum(exported, tmp_path):
    ckpt = _copy(exported[2], tmp_path)
    f = ckpt / "lpq_packed.safetensors"
    data = bytearray(f.read_bytes())
    data[8:16] = b"\x00garbage"                       # inside the JSON header
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"damaged \(safetensors cannot read it"):
        load_quantized(ckpt, verify=False)


def test_missing_file(exported, tmp_path):
    ckpt = _copy(exported[2], tmp_path)
    (ckpt / "lpq_packed.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing; the checkpoint is incomplete"):
        load_quantized(ckpt)


@pytest.mark.parametrize("key", ["bit_order_version", "format_spec_version", "lpq_export_version"])
def test_unknown_versions_are_refused(exported, tmp_path, key):
    ckpt = _copy(exported[2], tmp_path)
    manifest = json.loads((ckpt / "lpq_export.json").read_text())
    manifest[key] = 99
    (ckpt / "lpq_export.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=f"{key.replace('_', ' ')} 99, but this lpq reads only version"):
        load_quantized(ckpt)


def test_unknown_bit_order_in_network_config(exported, tmp_path):
    ckpt = _copy(exported[2], tmp_path)
    config = json.loads((ckpt / "config.json").read_text())
    config["quantization_config"]["bit_order_version"] = 2
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="config.json: written with bit order version 2"):
        load_quantized(ckpt)


def test_not_an_export(tmp_path):
    with pytest.raises(CheckpointError, match="not an lpq export"):
        load_quantized(tmp_path)


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_interrupted_export_leaves_nothing(exported, tmp_path, monkeypatch, error):
    model, r, _ = exported
    real = ShardWriter.close

    def write_then_fail(self):
        real(self)                             # a real file is on disk when the failure hits
        raise error

    monkeypatch.setattr(ShardWriter, "close", write_then_fail)
    with pytest.raises(type(error)):
        export_model(model, r, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_interrupted_forced_export_keeps_the_old_folder(exported, tmp_path, monkeypatch):
    model, r, _ = exported
    old = tmp_path / "out"
    export_model(model, r, old)
    before = {p.name: p.read_bytes() for p in old.iterdir()}
    monkeypatch.setattr(ShardWriter, "add", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        export_model(model, r, old, force=True)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert {p.name: p.read_bytes() for p in old.iterdir()} == before


def test_existing_out_needs_force_and_lpqs_marker(exported, tmp_path):
    from lpq.outputs import OutputError

    model, r, _ = exported
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("x")
    with pytest.raises(OutputError, match="not empty and was not written by lpq"):
        export_model(model, r, out, force=True)           # never the user's folder, even with force
    assert [p.name for p in out.iterdir()] == ["stale.txt"]
    (out / "stale.txt").unlink()
    export_model(model, r, out)                           # an empty folder is adopted
    with pytest.raises(OutputError, match="pass --force"):
        export_model(model, r, out)
    export_model(model, r, out, force=True)
    assert (out / "lpq_export.json").is_file() and (out / "lpq_output.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_recipe_must_be_the_models(exported, tmp_path):
    from tests.export.helpers import recipe

    model, _, _ = exported
    with pytest.raises(ValueError, match="differs from the one the model was quantized with"):
        export_model(model, recipe({"format": "hif8"}), tmp_path / "out")


def test_unquantized_model_is_refused(tmp_path):
    from lpq.models.tiny import tiny_causal_lm

    with pytest.raises(ValueError, match="not quantized"):
        export_model(tiny_causal_lm("tiny-llama"), None, tmp_path / "out")


@pytest.mark.parametrize("kind", ["packed", "fake"])
@pytest.mark.parametrize("target", ["model.layers.1.post_attention_layernorm.weight", "model.layers.0.self_attn.q_proj.weight"])
def test_non_finite_weights_are_refused_and_nothing_is_written(tmp_path, kind, target):
    """A NaN norm weight (e.g. from a diverged distillation) or a NaN in a quantized weight: the export
    names the tensor and leaves no folder behind."""
    import torch

    model, r = quantized_lm("tiny-llama", {"format": "hif4"})
    with torch.no_grad():
        model.get_parameter(target).view(-1)[3] = float("nan")
    with pytest.raises(ValueError, match=f"{target}: [0-9]+ of [0-9]+ values are NaN or Inf"):
        export_model(model, r, tmp_path / "out", kind=kind)
    assert list(tmp_path.iterdir()) == []


def test_finite_check_goes_slice_by_slice_and_counts_every_bad_value(monkeypatch):
    """The check reads a tensor a slice at a time (an embedding's whole mask would cost 0.6 GB); a bad
    value in any slice, of a non-contiguous tensor too, is found and all of them are counted."""
    import torch

    from lpq.export import tensor_io

    monkeypatch.setattr(tensor_io, "_CHECK_CHUNK", 7)
    t = torch.randn(10, 9, dtype=torch.bfloat16)
    tensor_io.check_finite("w", t)
    t[9, 8] = float("inf")
    t[0, 0] = float("nan")
    with pytest.raises(ValueError, match="w: 2 of 90 values are NaN or Inf"):
        tensor_io.check_finite("w", t)
    with pytest.raises(ValueError, match="w.T: 2 of 90 values"):
        tensor_io.check_finite("w.T", t.T)
