"""Test-session setup shared by every test file.

Triton decides at decoration time (when a kernel module is imported) whether a kernel is compiled or
interpreted, so TRITON_INTERPRET must be set before anything imports latentwire.kernels. Without a
CUDA device the kernels can only run interpreted (slow, exact); with one they run compiled.

Ray, which the Ray Serve tests start, binds the machine's own network address unless told otherwise: its
`resolve_ip_for_localhost` turns 127.0.0.1 into that address, and `_node_ip_address` with it. With
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 it takes 127.0.0.1, as it does on a Mac, and every Ray process listens
on loopback only (tests/test_ray_serve.py checks it). Ray reads it at import, and the gateway processes
the tests start inherit it.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # tests talk to loopback only
