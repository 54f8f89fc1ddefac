"""diffusers models and the three systems latentwire implements: EC-Diff, DiffusionX, hybrid super-resolution."""
