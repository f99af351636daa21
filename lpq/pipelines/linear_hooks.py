"""W4A4 simulation on plain nn.Linear modules, driven by the PTQ pipeline.

Each quantized linear gets one forward pre-hook: input -> block Hadamard (when the layer was
rotated) -> fake-quant in the activation format (when its block is enabled). Weights are rewritten
in place (rotated, then replaced by their quantized values), so the module stays an nn.Linear that
any transformers/diffusers code runs. Protected blocks keep their rotation (an exact identity up to
float rounding) and skip the quantization.
"""
from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatch

from torch import Tensor, nn

from lpq import formats
from lpq.algorithms.hadamard import fwht


@dataclass
class LinearState:
    act_format: str | None = None      # None: inputs stay high precision
    rotation: int | None = None        # block Hadamard size applied online to inputs
    enabled: bool = False              # quantize the input (weights are rewritten separately)
    input_scale: Tensor | None = None  # SmoothQuant: inputs are divided by this before rotation


def _pre_hook(module: nn.Module, args: tuple) -> tuple:
    st: LinearState = module._lpq_state
    x = args[0]
    if st.input_scale is not None:
        x = x / st.input_scale.to(x.dtype)
    if st.rotation:
        x = fwht(x, st.rotation)
    if st.enabled and st.act_format:
        x = formats.fake_quant(x, st.act_format)
    return (x,) + tuple(args[1:])


def attach(module: nn.Linear) -> LinearState:
    """The module's simulation state, creating it (and its hook) on first use."""
    if not hasattr(module, "_lpq_state"):
        module._lpq_state = LinearState()
        module._lpq_hook = module.register_forward_pre_hook(_pre_hook)
    return module._lpq_state


def state(module: nn.Module) -> LinearState | None:
    return getattr(module, "_lpq_state", None)


def detach(module: nn.Module) -> None:
    if hasattr(module, "_lpq_hook"):
        module._lpq_hook.remove()
        del module._lpq_hook, module._lpq_state


def linears(block: nn.Module, skip: tuple[str, ...] = ()) -> dict[str, nn.Linear]:
    """The nn.Linear modules of a block by relative name, minus names matching a `skip` fnmatch pattern."""
    return {n: m for n, m in block.named_modules()
            if isinstance(m, nn.Linear) and not any(fnmatch(n, s) for s in skip)}


def set_enabled(block: nn.Module, on: bool) -> None:
    """Input quantization of the block's linears, and the runtime's fused experts, on or off."""
    for m in block.modules():
        st = state(m)
        if st is not None:
            st.enabled = on
        elif hasattr(m, "quant_enabled"):
            m.quant_enabled = on
