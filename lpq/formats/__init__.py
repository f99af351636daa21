"""Exact HiFloat8 / HiFloat4 / MXFP4 (and NVFP4) numerics: fake quantization and real bit codes."""
from lpq.formats.api import (BIT_ORDER_VERSION, SPEC_VERSION, FakeQuantSTE, Packed, decode, encode,
                             fake_quant, fake_quant_ste)
from lpq.formats.spec import FORMATS, FormatSpec, get_format

__all__ = ["BIT_ORDER_VERSION", "SPEC_VERSION", "FORMATS", "FakeQuantSTE", "FormatSpec", "Packed",
           "decode", "encode", "fake_quant", "fake_quant_ste", "get_format"]
