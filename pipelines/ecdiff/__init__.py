"""EC-Diff (edge-cloud diffusion with K-step noise forecasting), as latentwire runs it.

The plan itself is scheduler.plan's ``ec-diff`` (its presets are EC-Diff's published settings); its
forecasting rule is kernels.extrapolate.ECDiff. This package holds what EC-Diff adds on top: the search for
the switch step and the forecasting parameters (search.py), which `latentwire search --system ec-diff` runs.
"""
from .search import Result, SearchError, Trial, search, share

__all__ = ["Result", "SearchError", "Trial", "search", "share"]
