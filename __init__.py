"""latentwire: edge-cloud collaborative diffusion inference.

Subpackages, each depending only on the ones below it:

- ``latentwire.pipelines``: diffusers models and the three published systems (EC-Diff, DiffusionX,
  region-aware hybrid super-resolution).
- ``latentwire.scheduler``: splits one generation's denoising steps between an edge and a cloud process.
- ``latentwire.protocol``: the wire format that carries a latent and its solver state between them.
- ``latentwire.kernels``: fused Triton kernels for scheduler steps and K-step noise extrapolation.
"""

__version__ = "0.1.0"
