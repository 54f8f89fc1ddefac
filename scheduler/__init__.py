"""Split plans and the executor that carries one generation across an edge and a cloud process."""
from .executor import Summary, check_models, run_plan, run_segment
from .plan import BUILT_IN, Plan, PlanError, Segment, make
from .session import SessionSpec

__all__ = ["BUILT_IN", "Plan", "PlanError", "Segment", "SessionSpec", "Summary", "check_models", "make",
           "run_plan", "run_segment"]
