"""Models and their measurement: Stable-Diffusion-style models loaded from diffusers folders (sd.py), the
procedural world (world.py) with its judge, the embedded world models and their exact denoiser, and plan
evaluation (evaluate.py, `latentwire eval`). Training scripts (train_models.py, train_judge.py) sit beside
them; runtime modules never import those. Region-aware hybrid super-resolution is planned, not here yet."""
