"""The cost model: what a plan costs on named devices and a named link, as arithmetic over the plan.

    profiles.py   DeviceProfile, LinkProfile: data files with sources (data/devices, data/links)
    model.py      predict(plan, cloud, edge, link, ...) -> Cost: latency with its parts, cloud GPU-s, bytes
    measure.py    a device profile of a model measured on this machine (`latentwire profile`)

Names are imported on first use (PEP 562): listing and loading profiles imports no torch.
"""
import importlib

_NAMES = {"DeviceProfile": "profiles", "LinkProfile": "profiles", "ProfileError": "profiles",
          "list_profiles": "profiles", "load_device": "profiles", "load_link": "profiles",
          "Cost": "model", "predict": "model", "md1_wait": "model", "measure": "measure"}
__all__ = sorted(_NAMES)


def __getattr__(name):
    if name not in _NAMES:
        raise AttributeError(f"module 'latentwire.scheduler.cost' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_NAMES[name]}", __name__), name)
