"""Split plans and the runners that carry one generation across an edge and a cloud process.

Names are imported on first use (PEP 562), so that `latentwire keys` and the other commands that need no
model reach ``latentwire.scheduler.serving.security`` without importing torch.
"""
import importlib

_NAMES = {"Summary": "executor", "check_models": "executor", "run_plan": "executor", "stretches": "executor",
          "BUILT_IN": "plan", "Plan": "plan", "PlanError": "plan", "Segment": "plan", "make": "plan",
          "SegmentRun": "segments", "drive": "segments", "SessionSpec": "session"}
__all__ = sorted(_NAMES)


def __getattr__(name):
    if name not in _NAMES:
        raise AttributeError(f"module 'latentwire.scheduler' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_NAMES[name]}", __name__), name)
