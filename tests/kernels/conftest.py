"""The Triton kernel tests run on CUDA tensors where a GPU is present, else on CPU tensors through
Triton's interpreter. TRITON_INTERPRET must be set before lpq.kernels (and so triton.jit) is first
imported: conftest runs at collection, before any test module of this folder imports it. Only
triton reads the variable, and nothing else in the suite uses triton."""
import importlib.util
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

if importlib.util.find_spec("triton") is None:   # installed by the dev extra; without it, nothing to test
    collect_ignore_glob = ["test_*.py"]
