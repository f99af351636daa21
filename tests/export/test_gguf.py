"""Export kind gguf: read back with gguf-py's own reader and dequantizer."""
from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize

from lpq.export import export_model
from lpq.export.gguf import _rope_rows, mxfp4_blocks
from lpq.export.packing import quantized_weights
from lpq.formats import decode, encode
from lpq.quant import InputTransform, set_input_transform
from tests.export.helpers import quantized_lm

W4A16 = {"weight": {"format": "mxfp4"}}


def _read(out) -> tuple[gguf.GGUFReader, dict[str, torch.Tensor]]:
    reader = gguf.GGUFReader(out / "model.gguf")
    tensors = {}
    for t in reader.tensors:
        values = dequantize(t.data, t.tensor_type)
        tensors[t.name] = torch.from_numpy(np.array(values)).float().reshape(tuple(reversed(t.shape)))
    return reader, tensors


def _canonical(t: torch.Tensor) -> torch.Tensor:
    """float32 bits with -0 as +0 (GGML's MXFP4 table has no negative zero)."""
    return (t.float() + 0.0).view(torch.int32)


def test_nibble_order_and_scale_byte_against_ggml_dequantize():
    x = torch.randn(3, 96, generator=torch.Generator().manual_seed(1)) * torch.logspace(-3, 3, 96)
    p = encode(x, "mxfp4")
    blocks = mxfp4_blocks(p.codes, p.scales)
    assert blocks.shape == (3, 3 * 17)
    got = torch.from_numpy(dequantize(blocks, gguf.GGMLQuantizationType.MXFP4)).reshape(3, 96)
    assert torch.equal(_canonical(got), _canonical(decode(p)))


def test_nan_scale_is_refused():
    p = encode(torch.tensor([[float("nan")] + [1.0] * 31]), "mxfp4")
    with pytest.raises(ValueError, match="NaN scale"):
        mxfp4_blocks(p.codes, p.scales)


@pytest.mark.parametrize("name, arch", [("tiny-llama", "llama"), ("tiny-qwen3", "qwen3")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gguf_weights_equal_lpqs_bit_for_bit(tmp_path, name, arch, dtype):
    model, _ = quantized_lm(name, {**W4A16, "protected_blocks": [1]}, dtype=dtype)
    export_model(model, None, tmp_path / "g", kind="gguf")
    reader, tensors = _read(tmp_path / "g")
    assert reader.fields["general.architecture"].contents() == arch
    c = model.config
    assert reader.fields[f"{arch}.attention.head_count_kv"].contents() == c.num_key_value_heads
    model.eval()
    heads = {"q_proj": c.num_attention_heads, "k_proj": c.num_key_value_heads}
    qtypes = {t.name: t.tensor_type for t in reader.tensors}
    for layer in range(c.num_hidden_layers):
        for hf, gg in [("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"), ("self_attn.v_proj", "attn_v"),
                       ("self_attn.o_proj", "attn_output"), ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"),
                       ("mlp.down_proj", "ffn_down")]:
            mod = model.get_submodule(f"model.layers.{layer}.{hf}")
            w = (mod.quantized_weight() if layer == 0 else mod.weight).detach()   # block 1 is protected
            proj = hf.rsplit(".", 1)[1]
            if arch == "llama" and proj in heads:    # llama.cpp's rotary layout; Qwen3 keeps HF's
                w = w[_rope_rows(w.shape[0], heads[proj])]
            got = tensors[f"blk.{layer}.{gg}.weight"]
            expect_type = gguf.GGMLQuantizationType.MXFP4 if layer == 0 else \
                {torch.float32: gguf.GGMLQuantizationType.F32, torch.bfloat16: gguf.GGMLQuantizationType.BF16}[dtype]
            assert qtypes[f"blk.{layer}.{gg}.weight"] == expect_type
            assert torch.equal(_canonical(got), _canonical(w)), (layer, hf)
    assert torch.equal(tensors["token_embd.weight"], model.model.embed_tokens.weight.float())
    assert torch.equal(tensors["output_norm.weight"], model.model.norm.weight.float())
    if arch == "qwen3":
        assert torch.equal(tensors["blk.0.attn_q_norm.weight"], model.model.layers[0].self_attn.q_norm.weight.float())


def test_rope_rows_interleave_each_heads_halves():
    assert _rope_rows(8, 2).tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_byte_level_bpe_tokenizer_and_chat_template(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(["hello world, the quick brown fox"] * 20,
                           trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>"],
                                               initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|endoftext|>")
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    model, _ = quantized_lm("tiny-llama", W4A16)
    export_model(model, None, tmp_path / "g", kind="gguf", tokenizer=tok)
    f = gguf.GGUFReader(tmp_path / "g" / "model.gguf").fields
    tokens = f["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == model.config.vocab_size
    assert tokens[: len(tok)] == tok.convert_ids_to_tokens(list(range(len(tok))))
    assert tokens[-1] == f"[PAD{model.config.vocab_size - 1}]"
    assert f["tokenizer.ggml.pre"].contents() == "gpt-2"
    assert f["tokenizer.ggml.token_type"].contents()[0] == gguf.TokenType.CONTROL
    assert f["tokenizer.ggml.bos_token_id"].contents() == tok.bos_token_id
    assert f["tokenizer.ggml.merges"].contents()[0] == " ".join(json.loads(tk.to_str())["model"]["merges"][0])
    assert f["tokenizer.chat_template"].contents() == tok.chat_template


@pytest.mark.parametrize("name, data, setup, message", [
    ("tiny-llama", {"format": "mxfp4"}, None, "weight-only"),
    ("tiny-llama", {"weight": {"format": "hif4"}}, None, "the recipe has hif4 weights"),
    ("tiny-llama", {"weight": {"format": "nvfp4"}}, None, "the recipe has nvfp4 weights"),
    ("tiny-qwen3-moe", W4A16, None, "families"),
    ("tiny-llama", W4A16, lambda m: set_input_transform(m, "model.layers.0.mlp.down_proj", InputTransform(32)),
     "online input transform"),
])
def test_refusals_leave_nothing_behind(tmp_path, name, data, setup, message):
    model, _ = quantized_lm(name, data)
    if setup is not None:
        setup(model)
    with pytest.raises(ValueError, match=message):
        export_model(model, None, tmp_path / "g", kind="gguf")
    assert not any(tmp_path.iterdir())


def test_quantized_weight_count_matches_the_model(tmp_path):
    model, _ = quantized_lm("tiny-qwen3", W4A16)
    report = export_model(model, None, tmp_path / "g", kind="gguf")
    assert report.quantized_tensors == len(quantized_weights(model))


@pytest.mark.slow
def test_smollm2_gguf_tokenizer_and_weights(tmp_path):
    from lpq.models.hub import ModelConfig, load_model
    from lpq.quant import quantize_model
    from tests.export.helpers import recipe

    loaded = load_model(ModelConfig("smollm2-135m", dtype="bfloat16"))
    quantize_model(loaded.model, recipe(W4A16))
    report = export_model(loaded.model, None, tmp_path / "g", kind="gguf", tokenizer=loaded.tokenizer)
    assert report.quantized_tensors == 30 * 7
    reader, tensors = _read(tmp_path / "g")
    f = reader.fields
    tok = loaded.tokenizer
    assert f["tokenizer.ggml.pre"].contents() == "gpt-2" and f["tokenizer.ggml.model"].contents() == "gpt2"
    assert f["tokenizer.ggml.tokens"].contents() == tok.convert_ids_to_tokens(list(range(len(tok))))
    assert f["tokenizer.ggml.eos_token_id"].contents() == tok.eos_token_id
    assert "<|im_start|>" in f["tokenizer.chat_template"].contents()
    assert "output.weight" not in tensors                  # tied to token_embd, as in llama.cpp's own files
    c = loaded.model.config
    q = loaded.model.model.layers[3].self_attn.q_proj.quantized_weight().detach()
    assert torch.equal(_canonical(tensors["blk.3.attn_q.weight"]), _canonical(q[_rope_rows(q.shape[0], c.num_attention_heads)]))


def test_export_command_kinds(tmp_path):
    """`lpq export --kind gguf | compressed-tensors`: the file it writes, or a one-line refusal."""
    import typer
    from typer.testing import CliRunner

    from lpq.pipelines.export import register

    app = typer.Typer()
    app.callback()(lambda: None)
    register(app)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  id: tiny-qwen3\nquant:\n  weight: {format: mxfp4}\n")
    run = lambda kind, out: CliRunner().invoke(app, ["export", "--config", str(recipe), "--out", str(tmp_path / out),
                                                     "--kind", kind])
    done = run("gguf", "g")
    assert done.exit_code == 0, done.output
    assert gguf.GGUFReader(tmp_path / "g" / "model.gguf").fields["general.architecture"].contents() == "qwen3"
    done = run("compressed-tensors", "ct")
    assert done.exit_code == 0, done.output
    assert json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]["format"] == \
        "mxfp4-pack-quantized"
    recipe.write_text("model:\n  id: tiny-qwen3\nquant:\n  weight: {format: hif4}\n")
    refused = run("gguf", "h")
    assert refused.exit_code == 2 and "error: --kind: export kind gguf stores mxfp4, mxfp4-rceil, mxfp4-toolkit weights, "\
        "the recipe has hif4 weights" in refused.output     # from the recipe, before the model loads
    assert not (tmp_path / "h").exists()
