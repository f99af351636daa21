"""lpq: post-training quantization and quantization-aware training in HiFloat8, HiFloat4 and MXFP4."""
__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy: `import lpq` stays light; lpq.quantize_model imports torch/transformers on first use.
    if name == "quantize_model":
        from lpq.quant import quantize_model

        return quantize_model
    if name == "load_quantized":
        from lpq.export.reader import load_quantized

        return load_quantized
    raise AttributeError(f"module 'lpq' has no attribute {name!r}")
