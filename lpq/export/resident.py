"""Packed-resident weights: a loaded export keeps its quantized weights as codes and decodes each
module's weights only while that module runs.

`load_quantized(..., keep_packed=True)` holds the packed codes, block scales and prescales (about the
export's size on disk) instead of every quantized weight decoded in the model's dtype (about 3.5x
that for a 4-bit format in bf16). A forward pre-hook decodes the module's weights with the same
`unpack` as the dense load, so the values, and the outputs, are bit for bit those of the dense load;
a forward hook puts the meta placeholders back, so one module's weights are decoded at a time, and
after a decode on the CPU hands the freed pages back to the system (glibc otherwise keeps the
decode's freed heap memory: +1.4 GB over one forward of a 36-layer Qwen3-8B shape). The price is one
decode per weight per forward. Such a model is for inference: it cannot be trained, moved with
`.to()` (load it on its device), or exported again.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lpq.export.packing import unpack
from lpq.formats import Packed
from lpq.memory import release_freed_memory

_STORE = "_lpq_packed_weights"      # module attribute: {parameter name: PackedWeight}


@dataclass
class PackedWeight:
    """One quantized weight as stored: its packed bits, the quantizer's prescale and the dtype it
    decodes to."""

    packed: Packed
    prescale: Tensor | None
    dtype: torch.dtype

    def decode(self) -> Tensor:
        return unpack(self.packed, self.prescale, self.dtype)

    def placeholder(self) -> nn.Parameter:
        return nn.Parameter(torch.empty(self.packed.shape, dtype=self.dtype, device="meta"), requires_grad=False)

    @property
    def nbytes(self) -> int:
        prescale = 0 if self.prescale is None else self.prescale.numel() * self.prescale.element_size()
        return self.packed.nbytes + prescale


def keep_packed(module: nn.Module, name: str, weight: PackedWeight) -> None:
    """Make parameter `name` of `module` a meta placeholder that holds `weight` decoded during each
    forward of `module`."""
    store: dict[str, PackedWeight] | None = module.__dict__.get(_STORE)
    if store is None:
        store = module.__dict__[_STORE] = {}
        module.register_forward_pre_hook(_decode_weights)
        module.register_forward_hook(_drop_weights, always_call=True)   # also when the forward raises
    store[name] = weight
    module._parameters[name] = weight.placeholder()


def _decode_weights(module: nn.Module, args: Any) -> None:
    for name, weight in module.__dict__[_STORE].items():
        module._parameters[name] = nn.Parameter(weight.decode(), requires_grad=False)


def _drop_weights(module: nn.Module, args: Any, output: Any) -> None:
    store: dict[str, PackedWeight] = module.__dict__[_STORE]
    for name, weight in store.items():
        module._parameters[name] = weight.placeholder()
    if any(w.packed.codes.device.type == "cpu" for w in store.values()):   # a GPU decode frees no host heap
        release_freed_memory()


def packed_resident(net: nn.Module) -> dict[str, PackedWeight]:
    """{state-dict key: PackedWeight} of every packed-resident weight of `net` (empty for a dense model)."""
    out: dict[str, PackedWeight] = {}
    for module_name, m in net.named_modules():
        for name, weight in m.__dict__.get(_STORE, {}).items():
            out[f"{module_name}.{name}" if module_name else name] = weight
    return out
