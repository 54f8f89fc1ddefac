"""protocol reaches the quantize kernels by plain imports, in the direction the project's style guide
(shared/STYLE.md) allows: protocol and kernels are both at the bottom of the package; protocol may import
kernels, kernels never import protocol."""
import ast
import sys
from pathlib import Path

import numpy as np
import torch

from latentwire.protocol import quant

ROOT = Path(__file__).resolve().parents[1]


def _imports(path):
    """(module, level) of every import in a file: ``from ..kernels.quantize import x`` -> ('kernels.quantize', 2)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(alias.name, 0) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            out.append((node.module or "", node.level))
    return out


def test_protocol_imports_no_module_by_a_string():
    for path in sorted((ROOT / "protocol").glob("*.py")):
        source = path.read_text()
        assert "importlib" not in source and "__import__" not in source, path.name


def test_kernels_never_import_protocol():
    for path in sorted((ROOT / "kernels").glob("*.py")):
        for module, level in _imports(path):
            assert not (module.startswith("latentwire.protocol") or (level >= 2 and module.startswith("protocol"))), \
                (path.name, module)


def test_the_accelerator_path_reaches_the_kernels_module():
    x3 = torch.tensor([[[1.0, 3.0], [-2.0, 2.0]]])
    lo, hi = quant.channel_ranges_torch(x3, "x")
    assert "latentwire.kernels.quantize" in sys.modules
    np.testing.assert_array_equal(lo, [1.0, -2.0])
    np.testing.assert_array_equal(hi, [3.0, 2.0])
    step = quant.steps_for(lo, hi, 255)
    q = quant.quantize_torch(x3, lo.astype(np.float32), step, 255)
    np.testing.assert_array_equal(q.numpy(), quant.quantize(x3.numpy(), lo.astype(np.float32), step, 255))
