"""Models and their measurement: the model families loaded from diffusers folders (models/), the procedural
world (world.py) with its judge, the embedded world models and their exact denoiser, and plan evaluation
(evaluate.py, `latentwire eval`); and the three systems: EC-Diff's search (ecdiff/), DiffusionX's prompt
sessions and noise-level predictor (diffusionx/), region-aware hybrid super-resolution (hybrid_sr/).
Training scripts (train_models.py, train_judge.py, ...) sit beside them; runtime modules never import those."""
