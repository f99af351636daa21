"""Suite-wide setup that must happen before any test module is imported.

Triton's interpreter: the Triton kernel tests (tests/kernels) run on CPU tensors through it when no
GPU is present, and triton reads TRITON_INTERPRET when it is first imported, which a dependency can
do while earlier test modules are collected (compressed-tensors imports triton). Only triton reads
the variable, and other users of triton (compressed-tensors) run it only on CUDA tensors, so nothing
else in the suite changes. With a GPU the compiled kernels are tested and the variable stays unset.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
