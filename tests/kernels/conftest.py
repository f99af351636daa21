"""The Triton kernel tests run on CUDA tensors where a GPU is present, else on CPU tensors through
Triton's interpreter (TRITON_INTERPRET, set by tests/conftest.py before anything imports triton)."""
import importlib.util

if importlib.util.find_spec("triton") is None:   # installed by the dev extra; without it, nothing to test
    collect_ignore_glob = ["test_*.py"]
