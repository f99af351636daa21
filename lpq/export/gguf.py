"""Export kind `gguf`: a weight-only MXFP4 model for llama.cpp (Llama and Qwen3 families).

llama.cpp's GGML type MXFP4 stores a block of 32 values as 17 bytes: the E8M0 scale byte, then 16
bytes whose low nibbles hold elements 0..15 and high nibbles elements 16..31. Its nibble is lpq's
(`S EE M`: the table entry for code c is the doubled E2M1 value) and it decodes the scale byte e as
2^(e - 128), half the OCP scale 2^(e - 127), which the doubled table compensates: the value is
lpq's, so the scale byte is written unchanged. Only the nibbles move (lpq keeps element 2i in the
low nibble of byte i). The one value GGML reads differently is e = 0xFF (OCP: a NaN block; GGML:
2^127), which is refused, and its table has no negative zero, so lpq's -0 reads back as +0.

Tensor names are llama.cpp's (gguf-py's own name map), q_proj/k_proj rows of the Llama family are
permuted the way llama.cpp's rotary embedding expects (each head's two rotary halves interleaved;
it permutes whole rows, so the packed codes and scales are permuted, not re-quantized), and the
tokenizer (byte-level BPE) and chat template come from the source model's tokenizer.

Refused, because llama.cpp would run something else: input and attention quantization (llama.cpp
multiplies MXFP4 weights with activations in its own precision: its CPU backend quantizes them to
Q8_0 blocks, not lpq's formats), online transforms (Hadamard, SmoothQuant scales), other weight
formats, MoE, Wan, and rope scaling other than the default.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lpq.export.bits import dense_tensors, linear_bits, require_causal_lm
from lpq.export.packing import input_transforms, quantized_weights
from lpq.export.settings import RUNTIME_WEIGHT_FORMATS, check_runtime_quant
from lpq.export.tensor_io import check_finite
from lpq.models.adapters import get_adapter
from lpq.quant.recipe import QuantRecipe

FILE = "model.gguf"
WHAT = "a GGUF file"
FORMATS = RUNTIME_WEIGHT_FORMATS["gguf"]
ARCHS = {"llama": "LLAMA", "qwen3": "QWEN3"}
NAN_SCALE = 0xFF
README = ("GGUF file for llama.cpp (`model.gguf`): weight-only MXFP4 (GGML type MXFP4) holding lpq's own codes and "
          "E8M0 scales, the other tensors in the model's dtype, the tokenizer and chat template. Run it with "
          "llama.cpp (`llama-cli -m THIS_FOLDER/model.gguf`) or llama-cpp-python. Activations run in llama.cpp's "
          "own precision.")
_TORCH_TO_GGML = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def mxfp4_blocks(codes: Tensor, scales: Tensor) -> np.ndarray:
    """lpq's MXFP4 codes (rows, L/2) and E8M0 scales (rows, L/32) as GGML MXFP4 blocks (rows, L/32 * 17)."""
    if bool((scales == NAN_SCALE).any()):
        raise ValueError("an MXFP4 block has the NaN scale 0xFF, which GGML reads as 2^127; the weights hold NaN")
    rows, nb = scales.shape
    nib = torch.stack((codes & 0xF, codes >> 4), dim=-1).reshape(rows, nb, 32)
    qs = nib[:, :, :16] | (nib[:, :, 16:] << 4)              # byte j: element j low, element j + 16 high
    return torch.cat((scales.unsqueeze(-1), qs), dim=-1).reshape(rows, nb * 17).numpy()


def _rope_rows(n: int, heads: int) -> Tensor:
    """Row order llama.cpp's Llama rotary embedding expects: per head, the two halves interleaved."""
    head_dim = n // heads
    return torch.arange(n).reshape(heads, 2, head_dim // 2).transpose(1, 2).reshape(n)


def _check(net: nn.Module, recipe: QuantRecipe, family: str) -> None:
    if family not in ARCHS:
        raise ValueError(f"kind gguf writes the {' and '.join(ARCHS)} families; this model is {family}")
    check_runtime_quant("gguf", recipe)    # what the recipe alone rules out (checked as it was read, too)
    transforms = input_transforms(net)
    if transforms:
        raise ValueError(f"{next(iter(transforms))} has an online input transform (Hadamard / SmoothQuant scale), "
                         f"which llama.cpp cannot run; export a recipe without hadamard for GGUF")
    rope = getattr(net.config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"rope_type {rope['rope_type']!r}: kind gguf writes models with default rotary embeddings")


def _metadata(w: Any, net: nn.Module, family: str) -> None:
    c = net.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    w.add_name(getattr(c, "_name_or_path", "") or type(net).__name__)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(float((getattr(c, "rope_parameters", None) or {}).get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)


def _pre_tokenizer(pre: dict | None) -> str:
    """llama.cpp's name for a byte-level BPE pre-tokenizer, from the tokenizer's own definition."""
    steps = (pre or {}).get("pretokenizers", [pre] if pre else [])
    types = [s.get("type") for s in steps]
    if types == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    split = next((s for s in steps if s.get("type") == "Split"), None)
    regex = (split or {}).get("pattern", {}).get("Regex", "")
    if "ByteLevel" in types and "\\p{N}{1,3}" in regex:
        return "llama-bpe"          # Llama 3: numbers split into groups of up to three digits
    if "ByteLevel" in types and "\\p{N}" in regex:
        return "qwen2"              # Qwen2/2.5/3: every digit apart
    raise ValueError(f"the tokenizer's pre-tokenizer {types} has no llama.cpp name lpq knows (gpt-2, llama-bpe, "
                     f"qwen2)")


def _tokenizer(w: Any, tokenizer: Any, vocab_size: int) -> None:
    """Byte-level BPE vocabulary, merges, special tokens and chat template; anything else is left out."""
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    model = spec.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        warnings.warn(f"tokenizer {type(tokenizer).__name__} ({model.get('type', 'no tokenizers backend')}) is not a "
                      f"byte-level BPE; the GGUF file has no vocabulary and llama.cpp cannot tokenize text with it")
        return
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    by_id = {i: tok for tok, i in model["vocab"].items()} | {i: t["content"] for i, t in added.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:                     # the embedding is larger than the vocabulary
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL if i not in added else
                         gguf.TokenType.CONTROL if added[i]["special"] else gguf.TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(_pre_tokenizer(spec.get("pre_tokenizer")))
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    for role, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("unk", w.add_unk_token_id),
                      ("pad", w.add_pad_token_id)):
        token_id = getattr(tokenizer, f"{role}_token_id", None)
        if token_id is not None:
            add(int(token_id))
    w.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        w.add_chat_template(template)


def _gguf_name(tmap: Any, key: str) -> str:
    name = tmap.get_name(key, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise ValueError(f"{key}: no llama.cpp tensor name for it")
    return name


def write_network(net: nn.Module, folder: Path, recipe: QuantRecipe, max_bytes: int,
                  tokenizer: Any = None) -> dict[str, Any]:
    """Write `net` (a Llama/Qwen3 causal LM with MXFP4 weights from lpq) as `folder/model.gguf`.
    Returns the size counts of export_model's report. (GGUF is one file: `max_bytes` does not apply.)"""
    import gguf

    require_causal_lm(net, "gguf")
    family = get_adapter(net).family
    _check(net, recipe, family)
    linears = linear_bits(net, WHAT, FORMATS)
    c = net.config
    arch = getattr(gguf.MODEL_ARCH, ARCHS[family])
    tmap = gguf.get_tensor_name_map(arch, c.num_hidden_layers)
    heads = {"q_proj": c.num_attention_heads, "k_proj": c.num_key_value_heads} if family == "llama" else {}

    def rows(name: str, n: int) -> Tensor | None:
        proj = name.rsplit(".", 1)[-1]
        return _rope_rows(n, heads[proj]) if proj in heads else None

    w = gguf.GGUFWriter(str(folder / FILE), gguf.MODEL_ARCH_NAMES[arch])
    _metadata(w, net, family)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_MXFP4_MOE)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if tokenizer is not None:
        _tokenizer(w, tokenizer, c.vocab_size)
    quantized_bytes = other_bytes = other_params = 0
    for lb in linears:
        perm = rows(lb.name, lb.shape[0])
        codes, scales = (lb.codes, lb.scales) if perm is None else (lb.codes[perm], lb.scales[perm])
        blocks = mxfp4_blocks(codes, scales)
        w.add_tensor(_gguf_name(tmap, lb.name + ".weight"), blocks, raw_dtype=gguf.GGMLQuantizationType.MXFP4)
        quantized_bytes += blocks.nbytes
    dense = dense_tensors(net, skip={qw.key for qw in quantized_weights(net)})
    for key, t in dense.items():
        check_finite(key, t)
        perm = rows(key.rsplit(".", 1)[0], t.shape[0]) if t.dim() else None     # q/k weights and biases
        t = t if perm is None else t[perm]
        # 1-D tensors (norms) in float32, as llama.cpp's converter writes them; the rest in the model's dtype
        t = t.float() if t.dim() == 1 or t.dtype not in _TORCH_TO_GGML else t
        kind = getattr(gguf.GGMLQuantizationType, _TORCH_TO_GGML[t.dtype])
        data = t.contiguous().view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.contiguous().numpy()
        w.add_tensor(_gguf_name(tmap, key), data, raw_shape=tuple(t.shape), raw_dtype=kind)
        other_bytes += data.nbytes
        other_params += t.numel()
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {"quantized_tensors": len(linears), "quantized_params": sum(lb.shape[0] * lb.shape[1] for lb in linears),
            "quantized_bytes": quantized_bytes, "other_params": other_params, "other_bytes": other_bytes}
