"""What both sides agree on when a generation opens: plain data that travels in the session message."""
from dataclasses import asdict, dataclass, field

import msgpack
import torch

from .plan import Plan, PlanError


@dataclass(frozen=True)
class SessionSpec:
    """One generation. The scheduler is named by its diffusers class and config, so both sides build the
    same schedule; the plan says who runs each step."""

    prompt: str
    plan: Plan
    scheduler: str  # diffusers class name, e.g. "DPMSolverMultistepScheduler"
    scheduler_config: dict = field(default_factory=dict)
    negative_prompt: str = ""
    guidance_scale: float = 7.5
    seed: int = 0
    restart_solver: bool = False  # a receiver restarts a multistep solver at first order (else: state travels)

    def make_scheduler(self):
        """A fresh scheduler of the named class with this config, set to the plan's number of steps."""
        import diffusers

        cls = getattr(diffusers, self.scheduler, None)
        if cls is None or not hasattr(cls, "from_config"):
            raise PlanError(f"unknown scheduler {self.scheduler!r}: name a diffusers scheduler class")
        try:
            s = cls.from_config(self.scheduler_config)
            s.set_timesteps(self.plan.num_steps)
        except Exception as e:  # diffusers raises what it likes on a config it cannot use
            raise PlanError(f"cannot build a {self.scheduler} from the session's scheduler config "
                            f"({type(e).__name__}: {e})") from None
        return s

    def to_msgpack(self):
        d = asdict(self)
        d["plan"] = self.plan.to_msgpack()
        return msgpack.packb(d, use_bin_type=True, default=_jsonable)

    @classmethod
    def from_msgpack(cls, data):
        try:
            d = msgpack.unpackb(data, raw=False)
            d["plan"] = Plan.from_msgpack(d["plan"])
            return cls(**d)
        except PlanError:
            raise
        except Exception as e:
            raise PlanError(f"not a serialized session ({type(e).__name__}: {e})") from None


def _jsonable(value):
    """diffusers configs hold tuples, numpy scalars and the like; msgpack gets their plain forms."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"cannot serialize {type(value).__name__} in a scheduler config")


def step_noise(seed, shape, i, dtype=torch.float32):
    """The noise a stochastic sampler adds at step i of the generation with this seed: drawn from its
    own generator, so it is the same whichever side runs the step."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + 7 + i), dtype=dtype)


def renoise_noise(seed, shape, dtype=torch.float32):
    """The noise preview-refine adds to the preview before the cloud refines it."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + 5), dtype=dtype)
