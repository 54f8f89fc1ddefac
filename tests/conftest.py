"""Test-session setup shared by every test file.

Triton decides at decoration time (when a kernel module is imported) whether a kernel is compiled or
interpreted, so TRITON_INTERPRET must be set before anything imports latentwire.kernels. Without a
CUDA device the kernels can only run interpreted (slow, exact); with one they run compiled.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
