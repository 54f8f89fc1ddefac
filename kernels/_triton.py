"""Triton when it is installed, else a stand-in that lets the kernel files import.

Triton has wheels for Linux only, and an edge may be a Mac or a Windows laptop. Every kernel has a torch
path, and dispatch takes it where Triton is missing (``AVAILABLE``), so the kernel files keep their
``@triton.jit`` kernels beside their references and still import without Triton: the stand-in's ``jit``
returns a kernel that raises TritonMissing when launched, ``tl.constexpr`` is an annotation only, and
``InterpretedFunction`` matches nothing.
"""
import math

try:
    import triton
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    AVAILABLE = True
except ImportError:
    AVAILABLE = False


class TritonMissing(RuntimeError):
    """A Triton kernel was asked for where Triton is not installed."""


if not AVAILABLE:
    class _Kernel:
        def __init__(self, fn):
            self.fn = fn
            self.__name__ = fn.__name__

        def __getitem__(self, grid):
            raise TritonMissing(f"{self.__name__} is a Triton kernel and Triton is not installed (it has wheels "
                                "for Linux only): pip install triton, or leave backend=None for the torch path")

        def __call__(self, *args, **kwargs):  # a @triton.jit helper called from another kernel: never run
            return self[None]

    class _Triton:
        @staticmethod
        def jit(fn=None, **_options):
            return _Kernel(fn) if fn is not None else _Kernel

        @staticmethod
        def cdiv(a, b):
            return math.ceil(a / b)

    class _Language:
        constexpr = object  # used only in kernel signatures' annotations

    class InterpretedFunction:  # noqa: D101 - nothing is an instance of it without Triton
        pass

    triton, tl = _Triton(), _Language()

__all__ = ["AVAILABLE", "InterpretedFunction", "TritonMissing", "tl", "triton"]
