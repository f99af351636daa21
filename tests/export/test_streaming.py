"""Big models without materializing them: the export streams one block at a time (offloaded blocks
loaded one at a time, shards written as tensors come) and load_quantized fills a meta-device
skeleton tensor by tensor. Results are bit-exact with the in-memory model."""
from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors import safe_open

from lpq.export import export_model, load_quantized
from lpq.export import packing, reader, writer
from lpq.export.tensor_io import ShardWriter, sha256
from lpq.formats import FORMATS, encode
from lpq.quant import InputTransform, QuantLinear, set_input_transform
from tests.export.helpers import logits, quantized_lm, same_bits, tokens

RECIPE = {"format": "hif4", "attention": {"format": "hif8"}, "protected_blocks": [1]}


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen3", "tiny-qwen3-moe", "tiny-pangu"])
def test_reload_from_a_meta_skeleton_is_bit_exact(tmp_path, name):
    """Every tiny family, bf16 (rotary tables then kept in the dtype they had), several shards: the
    skeleton holds no weight memory, and the reloaded logits, buffers and weights are bit-exact."""
    model, r = quantized_lm(name, RECIPE, torch.bfloat16)
    set_input_transform(model, "model.layers.0.self_attn.o_proj", InputTransform(64, torch.rand(64) + 0.5))
    ids = tokens()
    expected = logits(model, ids)
    export_model(model, r, tmp_path / "ckpt", max_shard_gb=20e-6)      # 20 kB shards
    loaded = load_quantized(tmp_path / "ckpt")

    files = json.loads((tmp_path / "ckpt" / "lpq_index.json").read_text())["files"]
    assert len(files) > 3 and all("-of-" in f for f in files)
    assert same_bits(logits(loaded, ids), expected)
    want = dict(model.named_buffers())
    for n, b in loaded.named_buffers():
        assert same_bits(b, want[n]), n                                   # rotary inv_freq included
    for n, p in model.state_dict().items():
        if not n.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight", "up_proj.weight",
                           "gate_proj.weight", "down_proj.weight", "gate_up_proj", "experts.down_proj")):
            assert same_bits(loaded.state_dict()[n], p), n


def test_skeleton_has_no_weight_memory(tmp_path, monkeypatch):
    model, r = quantized_lm("tiny-llama", RECIPE)
    export_model(model, r, tmp_path / "ckpt")
    seen = {}
    real_build = reader._build

    def spy(*args):
        net = real_build(*args)
        seen["params"] = [p.is_meta for p in net.parameters()]
        seen["inv_freq"] = net.model.rotary_emb.inv_freq.clone()
        return net

    monkeypatch.setattr(reader, "_build", spy)
    load_quantized(tmp_path / "ckpt")
    assert seen["params"] and all(seen["params"])
    assert same_bits(seen["inv_freq"], model.model.rotary_emb.inv_freq)   # made by the constructor, not loaded


def test_tied_embeddings_stay_one_tensor(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from lpq.models.tiny import _LLM_COMMON
    from lpq.quant import quantize_model
    from tests.export.helpers import recipe

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**_LLM_COMMON, tie_word_embeddings=True)).eval()
    r = recipe({"format": "mxfp4"})
    quantize_model(model, r)
    ids = tokens()
    expected = logits(model, ids)
    export_model(model, r, tmp_path / "ckpt")
    index = json.loads((tmp_path / "ckpt" / "lpq_index.json").read_text())
    assert index["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    loaded = load_quantized(tmp_path / "ckpt")
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert same_bits(logits(loaded, ids), expected)


def _offloaded_tiny(tmp_path):
    """tiny-llama saved, then loaded with accelerate: embeddings, head and blocks 1.. on disk."""
    from lpq.models.hub import ModelConfig, load_model

    lm = load_model(ModelConfig(id="tiny-llama"))
    folder = tmp_path / "tiny"
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    n = lm.model.config.num_hidden_layers
    device_map = {"model.embed_tokens": "disk", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "disk",
                  **{f"model.layers.{i}": "cpu" if i == 0 else "disk" for i in range(n)}}
    cfg = ModelConfig(id=str(folder), device_map=device_map, offload_dir=str(tmp_path / "off"))
    return load_model(ModelConfig(id=str(folder))).model, load_model(cfg).model


@pytest.mark.parametrize("kind", ["packed", "fake"])
def test_offloaded_model_is_exported_one_block_at_a_time(tmp_path, monkeypatch, kind):
    """Disk-offloaded blocks, embeddings and head: the export loads one part at a time and writes the
    same tensors as the export of the model in memory."""
    from lpq.models.offload import is_offloaded
    from lpq.quant import quantize_model
    from tests.export.helpers import recipe

    plain, offloaded = _offloaded_tiny(tmp_path)
    r = recipe({"weight": {"format": "mxfp4"}} if kind == "fake" else RECIPE)
    for m in (plain, offloaded):
        quantize_model(m, r)
    assert is_offloaded(offloaded)
    layers = offloaded.model.layers
    held = []
    real = writer.materialized

    def spy(module, *args, **kwargs):
        with real(module, *args, **kwargs):
            held.append(([i for i, b in enumerate(layers) if not b.mlp.up_proj.weight.is_meta],
                         not offloaded.model.embed_tokens.weight.is_meta, not offloaded.lm_head.weight.is_meta))
            yield

    monkeypatch.setattr(writer, "materialized", __import__("contextlib").contextmanager(spy))
    export_model(offloaded, r, tmp_path / "off_ckpt", kind=kind)
    monkeypatch.undo()
    export_model(plain, r, tmp_path / "plain_ckpt", kind=kind)

    # the embeddings, the final norm and the head one by one, then each block alone (block 0 lives on the cpu)
    assert held == [([0], True, False), ([0], False, False), ([0], False, True)] + \
        [([0] if i == 0 else [0, i], False, False) for i in range(len(layers))]
    assert is_offloaded(offloaded) and layers[1].mlp.up_proj.weight.is_meta
    stem = "lpq_packed" if kind == "packed" else "model"
    with safe_open(str(tmp_path / "off_ckpt" / f"{stem}.safetensors"), "pt") as a, \
            safe_open(str(tmp_path / "plain_ckpt" / f"{stem}.safetensors"), "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        for k in a.keys():
            assert same_bits(a.get_tensor(k), b.get_tensor(k)), k


def test_export_leaves_no_quantized_copies_cached(tmp_path):
    model, r = quantized_lm("tiny-llama", RECIPE)
    lin = model.model.layers[0].self_attn.q_proj
    export_model(model, r, tmp_path / "ckpt")
    assert lin._cache.value is None
    with torch.no_grad():
        model(tokens())                    # a forward caches it; the export then reuses that copy
    cached = lin._cache.value
    export_model(model, r, tmp_path / "ckpt2")
    assert lin._cache.value is cached


def test_fake_sharded_export_loads_with_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    model, r = quantized_lm("tiny-qwen3-moe", {"weight": {"format": "mxfp4"}}, torch.bfloat16)
    export_model(model, r, tmp_path / "fake", kind="fake", max_shard_gb=50e-6)
    index = json.loads((tmp_path / "fake" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert "model.layers.0.mlp.experts.0.gate_proj.weight" in index["weight_map"]     # the checkpoint layout
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "fake")
    assert plain.dtype == torch.bfloat16
    with torch.no_grad():
        for i in (0, 1):
            ours = model.model.layers[i]
            assert same_bits(plain.model.layers[i].mlp.experts.gate_up_proj, ours.mlp.experts.quantized_weight("gate_up_proj"))
            assert same_bits(plain.model.layers[i].self_attn.q_proj.weight, ours.self_attn.q_proj.quantized_weight())
        assert same_bits(plain.lm_head.weight, model.lm_head.weight)


# ---------------------------------------------------------------- the pieces


def _header(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return n, json.loads(f.read(n))


def test_shard_writer_groups_aligns_and_checksums(tmp_path):
    tensors = {"a": torch.arange(3, dtype=torch.uint8), "b": torch.randn(5), "c": torch.randn(7).bfloat16(),
               "big": torch.zeros(40, dtype=torch.float64), "d": torch.tensor(2.5), "e": torch.ones(0)}
    with ShardWriter(tmp_path, "x", {"k": "v"}, max_bytes=40) as w:
        for name, t in tensors.items():
            w.add(name, t)
        weight_map, files = w.close()

    # consecutive tensors up to 40 bytes, the 320-byte one alone (the grouping from before streaming)
    assert weight_map == {"a": "x-00001-of-00003.safetensors", "b": "x-00001-of-00003.safetensors",
                          "c": "x-00001-of-00003.safetensors", "big": "x-00002-of-00003.safetensors",
                          "d": "x-00003-of-00003.safetensors", "e": "x-00003-of-00003.safetensors"}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(files)           # no scratch file left
    for fname, info in files.items():
        path = tmp_path / fname
        assert info == {"bytes": path.stat().st_size, "sha256": sha256(path)}
        n, header = _header(path)
        assert (8 + n) % 8 == 0 and header.pop("__metadata__") == {"k": "v"}
        for name, entry in header.items():
            size = torch.empty((), dtype=tensors[name].dtype).element_size()
            assert entry["data_offsets"][0] % size == 0                          # aligned to its element
        with safe_open(str(path), "pt") as f:
            for name in f.keys():
                assert same_bits(f.get_tensor(name), tensors[name]) if tensors[name].numel() else True


def test_shard_writer_sizes_match_the_old_grouping(tmp_path):
    sizes = [10, 10, 25, 5, 100, 1, 1]
    with ShardWriter(tmp_path, "s", {}, max_bytes=30) as w:
        for i, n in enumerate(sizes):
            w.add(f"t{i}", torch.zeros(n, dtype=torch.uint8))
        weight_map, files = w.close()
    groups = {}
    for name, f in weight_map.items():
        groups.setdefault(f, []).append(name)
    assert sorted(groups.values()) == [["t0", "t1"], ["t2", "t3"], ["t4"], ["t5", "t6"]]


def test_shard_writer_cleans_up_on_error(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with ShardWriter(tmp_path, "s", {}, max_bytes=8) as w:
            w.add("a", torch.zeros(8, dtype=torch.uint8))
            w.add("b", torch.zeros(8, dtype=torch.uint8))       # closes the first shard
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fmt", ["hif4", "mxfp4", "hif8", "nvfp4"])
@pytest.mark.parametrize("shape, groups", [((37, 200), 1), ((3, 20, 96), 3), ((6, 64), 0)])
def test_chunked_unpack_equals_whole_tensor_decode(monkeypatch, fmt, shape, groups):
    """unpack decodes a few rows at a time: bits equal to one decode of the whole tensor."""
    from lpq.formats import decode

    assert fmt in FORMATS
    g = torch.Generator().manual_seed(1)
    w = torch.randn(shape, generator=g) * 3
    prescale = None if groups == 0 else torch.rand(groups, generator=g) + 0.5
    p = encode(w if prescale is None else w * prescale.reshape(-1, *[1] * (w.dim() - 1)), fmt, -1)
    whole = decode(p)
    if prescale is not None:
        whole = whole / packing._per_group(prescale, whole)
    monkeypatch.setattr(packing, "_DECODE_ROWS_BYTES", 4 * shape[-1] * 4)      # 4 rows per chunk
    for dtype in (torch.float32, torch.bfloat16):
        assert same_bits(packing.unpack(p, prescale, dtype), whole.to(dtype))


def test_quantized_weights_decoded_as_read(tmp_path, monkeypatch):
    """A packed weight is set as soon as its parts are read (no dict of the whole checkpoint)."""
    model, r = quantized_lm("tiny-llama", RECIPE)
    export_model(model, r, tmp_path / "ckpt")            # one file
    live, peak = [0], [0]
    real_iter, real_set = reader.iter_file, reader._set_weight

    def counting_iter(*args):
        for item in real_iter(*args):
            live[0] += 1
            peak[0] = max(peak[0], live[0])
            yield item

    def counting_set(qw, key, entry, tensors, *rest):
        live[0] -= len(tensors) - 1
        real_set(qw, key, entry, tensors, *rest)

    monkeypatch.setattr(reader, "iter_file", counting_iter)
    monkeypatch.setattr(reader, "_set_weight", counting_set)
    monkeypatch.setattr(reader, "_fill", lambda target, value, real=reader._fill: (real(target, value),
                                                                                    live.__setitem__(0, live[0] - 1)))
    loaded = load_quantized(tmp_path / "ckpt")
    assert peak[0] <= 3                                # codes + scales of one weight, at most
    assert isinstance(loaded.model.layers[0].mlp.up_proj, QuantLinear)


@pytest.mark.parametrize("edit, why", [(("[3]", "[4]"), "bytes for shape"), (('"U8"', '"X9"'), "unknown dtype"),
                                       (("[0,3]", "[1,4]"), "overlap or leave gaps")])
def test_inconsistent_headers_are_damage(tmp_path, edit, why):
    from lpq.export.layout import CheckpointError
    from lpq.export.tensor_io import read_headers

    with ShardWriter(tmp_path, "s", {}, max_bytes=100) as w:
        w.add("a", torch.arange(3, dtype=torch.uint8))
        _, files = w.close()
    path = tmp_path / "s.safetensors"
    data = path.read_bytes()
    assert edit[0].encode() in data and len(edit[0]) == len(edit[1])
    path.write_bytes(data.replace(edit[0].encode(), edit[1].encode()))
    with pytest.raises(CheckpointError, match=f"s.safetensors: the checkpoint is damaged .*{why}"):
        read_headers(tmp_path, files)


@pytest.mark.parametrize("fmt, on_grid", [("hif4", False), ("hif4", True), ("mxfp4", False), ("nvfp4", False),
                                          ("hif8", False)])
def test_pack_in_row_chunks_reproduces_the_weight(monkeypatch, fmt, on_grid):
    """pack() works a few rows at a time: every chunk decodes to its rows bit for bit, and RTN codes
    are those of a whole-tensor encode."""
    from lpq.formats import decode, grid

    model, _ = quantized_lm("tiny-llama", {"weight": {"format": fmt, "scaling": "current"}}, torch.bfloat16)
    lin = model.model.layers[0].mlp.down_proj
    if on_grid:                                    # GPTQ-like: searched scales, needs the on-grid search
        lin.set_quantized_weight(grid.fake_quant(lin.weight.float(), fmt, search=True).to(lin.weight.dtype))
    qw = next(q for q in packing.quantized_weights(model) if q.module is lin)
    with torch.no_grad():
        w_q = qw.forward_weight()
    whole = packing.pack(qw, w_q)
    monkeypatch.setattr(packing, "_PACK_ROWS_BYTES", 4 * w_q.shape[-1] * 5)       # 5 rows per chunk
    chunked = packing.pack(qw, w_q)
    assert same_bits(packing.unpack(chunked, qw.prescale(), w_q.dtype), w_q)
    assert chunked.codes.shape == whole.codes.shape
    if not on_grid:
        assert same_bits(chunked.codes, whole.codes) and same_bits(decode(chunked), decode(whole))


def test_files_written_by_safetensors_itself_are_read(tmp_path):
    """Exports written before streaming used safetensors' save_file: the reader takes them as they are."""
    from safetensors.torch import save_file

    from lpq.export.tensor_io import iter_file, read_headers

    tensors = {"w": torch.randn(3, 5).bfloat16(), "codes": torch.arange(7, dtype=torch.uint8), "s": torch.tensor(2.0)}
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata={"lpq_export_version": "2"})
    files = {"old.safetensors": {"bytes": (tmp_path / "old.safetensors").stat().st_size,
                                 "sha256": sha256(tmp_path / "old.safetensors")}}
    headers, metadata = read_headers(tmp_path, files)
    assert metadata == {"lpq_export_version": "2"} and set(headers) == set(tensors)
    read = dict(iter_file(tmp_path, "old.safetensors", files["old.safetensors"], headers))
    assert all(same_bits(read[k], tensors[k]) for k in tensors)
