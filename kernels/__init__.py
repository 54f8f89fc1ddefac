"""Fused Triton kernels for denoising steps and K-step noise extrapolation (each beside its torch reference)."""
