"""lpq: post-training quantization and quantization-aware training in HiFloat8, HiFloat4 and MXFP4."""
__version__ = "0.1.0"
