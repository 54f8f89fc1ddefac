"""latentwire: edge-cloud collaborative diffusion inference.

Subpackages, each depending only on the ones below it:

- ``latentwire.pipelines``: model families loaded from diffusers folders, the procedural world with its
  judge, embedded models and exact denoiser, plan evaluation, and the three systems: EC-Diff's search
  (``pipelines.ecdiff``), DiffusionX's sessions and noise-level predictor (``pipelines.diffusionx``), and
  region-aware hybrid super-resolution (``pipelines.hybrid_sr``).
- ``latentwire.scheduler``: splits one generation's denoising steps between an edge and a cloud process
  (cloud-only, edge-only, hybrid-sd, EC-Diff's ec-diff, DiffusionX's preview-refine), the cost model, and
  the serving front ends (ZeroMQ daemons, the worker pool, Ray Serve).
- ``latentwire.protocol``: the wire format that carries a latent and its solver state between them.
- ``latentwire.kernels``: fused Triton kernels for scheduler steps and K-step noise extrapolation, each
  with a torch path (Triton is optional: it has no wheels for macOS or Windows).
"""
import os
import sys

__version__ = "0.1.0"


def _unshadow():
    """Take this package's own folder off ``sys.path``.

    In a source checkout the repository root *is* this package, so its folders ``kernels/``,
    ``protocol/``, ... sit at the top of the root. A process whose ``sys.path`` holds the root (``python
    -m latentwire.cli`` or ``python -c`` started there, or a Ray worker, which gets its driver's working
    directory) would import them under their bare names: ``kernels`` is Hugging Face's kernel hub, which
    transformers requires and diffusers imports, and ``import diffusers`` then fails on our folder. The
    root is never needed on the path: ``latentwire`` itself is found by the installer's finder (editable
    installs) or in site-packages. Children that latentwire starts also run with ``-P``
    (``latentwire.scheduler.serving.process.cli_command``); this covers the launches it does not control.
    A bare module imported from the root before ``latentwire`` cannot be undone here."""
    here = os.path.realpath(os.path.dirname(__file__))
    sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.curdir) != here]


_unshadow()
