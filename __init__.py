"""latentwire: edge-cloud collaborative diffusion inference.

Subpackages, each depending only on the ones below it:

- ``latentwire.pipelines``: Stable-Diffusion-style models loaded from diffusers folders, the procedural
  world with its judge, embedded models and exact denoiser, and plan evaluation.
- ``latentwire.scheduler``: splits one generation's denoising steps between an edge and a cloud process
  (cloud-only, edge-only, hybrid-sd, EC-Diff's ec-diff, DiffusionX's preview-refine).
- ``latentwire.protocol``: the wire format that carries a latent and its solver state between them.
- ``latentwire.kernels``: fused Triton kernels for scheduler steps and K-step noise extrapolation.

Planned, not implemented yet: EC-Diff's search for the handoff step, DiffusionX's noise-level
predictor, and region-aware hybrid super-resolution.
"""

__version__ = "0.1.0"
