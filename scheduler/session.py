"""What both sides agree on when a generation opens: plain data that travels in the session message."""
import math
from dataclasses import asdict, dataclass, field

import msgpack
import torch

from latentwire.kernels.tables import BUILDERS

from .fields import (INT64, FieldError, need_bool, need_int, need_list, need_map, need_number, need_scalar,
                     need_str)
from .plan import MAX_NAME_CHARS, MAX_STEPS, Plan, PlanError

SUPPORTED_SCHEDULERS = tuple(BUILDERS)  # the diffusers schedulers the fused step computes
SESSION_FIELDS = ("prompt", "plan", "scheduler", "scheduler_config", "negative_prompt", "guidance_scale", "seed",
                  "restart_solver", "inference_steps", "timestep_kwargs")
MAX_TIMESTEP_KWARGS = 2
TIMESTEP_KWARGS = ("mu", "sigmas")
MAX_PROMPT_CHARS = 4096  # CLIP reads 77 tokens; a longer prompt is truncated by its tokenizer anyway
GUIDANCE = (-100.0, 100.0)  # classifier-free guidance scales in use lie in 0..20


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
    inference_steps: int = None  # diffusers' num_inference_steps, where it differs from the plan's step count
    # (PNDM's PLMS: N inference steps are N + 1 scheduler steps); None: the plan's num_steps
    timestep_kwargs: dict = field(default_factory=dict)  # more set_timesteps arguments (Flux's mu and sigmas)

    def make_scheduler(self):
        """A fresh scheduler of the named class with this config, set to the plan's number of steps."""
        import diffusers

        cls = getattr(diffusers, self.scheduler, None)
        if cls is None or not hasattr(cls, "from_config"):
            raise PlanError(f"unknown scheduler {self.scheduler!r}: name a diffusers scheduler class")
        n = self.plan.num_steps if self.inference_steps is None else self.inference_steps
        try:
            s = cls.from_config(self.scheduler_config)
            s.set_timesteps(n, **self.timestep_kwargs)
        except Exception as e:  # diffusers raises what it likes on a config it cannot use
            raise PlanError(f"cannot build a {self.scheduler} from the session's scheduler config "
                            f"({type(e).__name__}: {e})") from None
        if len(s.timesteps) != self.plan.num_steps:
            raise PlanError(f"{self.scheduler} takes {len(s.timesteps)} steps for {n} inference steps, but plan "
                            f"{self.plan.name!r} has {self.plan.num_steps}: build the plan for the scheduler's "
                            "steps (scheduler_steps()), and give inference_steps")
        return s

    @classmethod
    def for_model(cls, model, prompt, *, plan="hybrid-sd", steps=25, scheduler=None, plan_params=None, **fields):
        """A session for ``model``'s folder: its scheduler, or the diffusers class ``scheduler`` swapped in the
        diffusers way (NAME.from_config(the folder's config)); the built-in ``plan`` over the steps that
        scheduler takes for ``steps`` inference steps (plan_params: the plan's own, e.g. {"k": 10}), or a Plan
        (a searched one, from a file), which must cover exactly those steps; the other fields as SessionSpec's. Raises UnsupportedScheduler (a ValueError) for a scheduler or configuration
        the fused step cannot run, naming the ones it can, before anything is sent anywhere."""
        from latentwire.kernels import FusedSampler, UnsupportedScheduler

        from .plan import make

        s = model.make_scheduler(scheduler)
        name = type(s).__name__
        if name not in SUPPORTED_SCHEDULERS:
            where = f"scheduler {name}" if scheduler else f"the model folder's scheduler {name}"
            raise UnsupportedScheduler(f"{where} is not supported by latentwire's fused step; supported: "
                                       f"{', '.join(SUPPORTED_SCHEDULERS)}. Swap one in with --scheduler NAME (the "
                                       "Python API: scheduler=NAME); it keeps the folder's noise schedule, as "
                                       "diffusers' from_config does")
        kwargs = model.timestep_kwargs(steps) if hasattr(model, "timestep_kwargs") else {}
        n = scheduler_steps(s, steps, **kwargs)
        if isinstance(plan, Plan):
            if plan.num_steps != n:
                raise PlanError(f"the plan {plan} covers {plan.num_steps} steps, but {name} takes {n} for {steps} "
                                f"inference steps: give --steps {plan.num_steps} (or the steps that make "
                                f"{plan.num_steps}), or a plan made for {n}")
        else:
            plan = make(plan, n, **(plan_params or {}))
        spec = cls(prompt=prompt, plan=plan, scheduler=name,
                   scheduler_config=dict(s.config), inference_steps=None if n == steps else steps,
                   timestep_kwargs=kwargs, **fields)
        FusedSampler(spec.make_scheduler())  # its configuration too (thresholding, say)
        return spec

    def to_plain(self):
        """The session as msgpack-native values: what travels in a run request."""
        d = asdict(self)
        d["plan"] = self.plan.to_plain()
        d["scheduler_config"] = msgpack.unpackb(msgpack.packb(self.scheduler_config, default=_jsonable), raw=False)
        return d

    @classmethod
    def from_plain(cls, d, field="session", max_steps=MAX_STEPS):
        """A session from msgpack-native values, every field checked by type, range and size (a FieldError
        names the field and the value) before anything is built: the plan (max_steps: the receiver's
        limit), the scheduler named from those the fused step supports, every scheduler-config value, a
        finite guidance scale and a seed within int64."""
        need_map(field, d, len(SESSION_FIELDS), required=("prompt", "plan", "scheduler"),
                 optional=SESSION_FIELDS)
        plan = Plan.from_plain(d["plan"], f"{field}.plan", max_steps)
        config = check_scheduler_config(f"{field}.scheduler_config", d.get("scheduler_config", {}))
        return cls(prompt=need_str(f"{field}.prompt", d["prompt"], MAX_PROMPT_CHARS), plan=plan,
                   scheduler=need_str(f"{field}.scheduler", d["scheduler"], MAX_NAME_CHARS, SUPPORTED_SCHEDULERS),
                   scheduler_config=config,
                   negative_prompt=need_str(f"{field}.negative_prompt", d.get("negative_prompt", ""), MAX_PROMPT_CHARS),
                   guidance_scale=need_number(f"{field}.guidance_scale", d.get("guidance_scale", 7.5), *GUIDANCE),
                   seed=need_int(f"{field}.seed", d.get("seed", 0), 0, INT64[1]),
                   restart_solver=need_bool(f"{field}.restart_solver", d.get("restart_solver", False)),
                   inference_steps=None if d.get("inference_steps") is None else
                   need_int(f"{field}.inference_steps", d["inference_steps"], 1, max_steps),
                   timestep_kwargs=_timestep_kwargs(f"{field}.timestep_kwargs", d.get("timestep_kwargs", {}),
                                                    max_steps))

    def to_msgpack(self):
        return msgpack.packb(self.to_plain(), use_bin_type=True)

    @classmethod
    def from_msgpack(cls, data):
        try:
            d = msgpack.unpackb(data, raw=False)
        except Exception as e:
            raise PlanError(f"not a serialized session ({type(e).__name__}: {e})") from None
        try:
            return cls.from_plain(d)
        except FieldError as e:
            raise PlanError(f"not a serialized session ({e})") from None


# Each scheduler-config value a diffusers scheduler we step reads, with its type and range. Strings are
# bounded here and their choices left to diffusers (which refuses unknown ones: a PlanError). Any other
# key must be a plain scalar: diffusers ignores keys it does not know.
_BOOL = ("bool",)
CONFIG_FIELDS = {
    "num_train_timesteps": ("int", 1, 10_000), "steps_offset": ("int", 0, 10_000), "solver_order": ("int", 1, 3),
    "beta_start": ("number", 0.0, 1.0), "beta_end": ("number", 0.0, 1.0),
    "clip_sample_range": ("number", 0.0, 1e4), "sample_max_value": ("number", 0.0, 1e4),
    "dynamic_thresholding_ratio": ("number", 0.0, 1.0),
    "shift": ("number", 0.0, 1e3), "flow_shift": ("number", 0.0, 1e3), "base_shift": ("number", 0.0, 1e3),
    "max_shift": ("number", 0.0, 1e3),
    "base_image_seq_len": ("int", 1, 1 << 24), "max_image_seq_len": ("int", 1, 1 << 24),
    "sigma_min": ("optional number", 0.0, 1e4), "sigma_max": ("optional number", 0.0, 1e4),
    "shift_terminal": ("optional number", 0.0, 1.0),
    "lambda_min_clipped": ("number or -inf", -1e4, 1e4),
    "trained_betas": ("optional betas",),
    "_use_default_values": ("names",),
    **{k: _BOOL for k in ("clip_sample", "set_alpha_to_one", "thresholding", "rescale_betas_zero_snr",
                          "euler_at_final", "invert_sigmas", "lower_order_final", "stochastic_sampling",
                          "use_beta_sigmas", "use_dynamic_shifting", "use_exponential_sigmas", "use_flow_sigmas",
                          "use_karras_sigmas", "use_lu_lambdas")},
}
MAX_CONFIG_KEYS = 64


def check_scheduler_config(field, config):
    """A scheduler config from the network -> itself, each value checked against CONFIG_FIELDS."""
    need_map(field, config, MAX_CONFIG_KEYS)
    for key, value in config.items():
        where = f"{field}.{key}"
        kind, *bounds = CONFIG_FIELDS.get(key, ("scalar",))
        if kind == "int":
            need_int(where, value, *bounds)
        elif kind == "number":
            need_number(where, value, *bounds)
        elif kind == "optional number":
            value is None or need_number(where, value, *bounds)
        elif kind == "number or -inf":
            value == -math.inf or need_number(where, value, *bounds)
        elif kind == "bool":
            need_bool(where, value)
        elif kind == "optional betas":
            if value is not None:
                for i, b in enumerate(need_list(where, value, 10_000, 1)):
                    need_number(f"{where}.{i}", b, 0.0, 1.0)
        elif kind == "names":
            for i, name in enumerate(need_list(where, value, MAX_CONFIG_KEYS)):
                need_str(f"{where}.{i}", name, MAX_NAME_CHARS)
        else:
            need_scalar(where, value, MAX_NAME_CHARS)
    return config


def scheduler_steps(scheduler, inference_steps, **timestep_kwargs):
    """How many steps ``scheduler`` takes for diffusers' num_inference_steps (the length of its timesteps
    after set_timesteps): what a plan for it must cover. PNDM's PLMS takes one more."""
    s = type(scheduler).from_config(scheduler.config)
    s.set_timesteps(inference_steps, **timestep_kwargs)
    return len(s.timesteps)


def _timestep_kwargs(field, d, max_steps):
    """set_timesteps' extra arguments from the network: mu (a finite number) and sigmas (a schedule of at
    most max_steps noise levels in [0, 1])."""
    need_map(field, d, MAX_TIMESTEP_KWARGS, optional=TIMESTEP_KWARGS)
    if "mu" in d:
        need_number(f"{field}.mu", d["mu"], -1e3, 1e3)
    if "sigmas" in d:
        for i, v in enumerate(need_list(f"{field}.sigmas", d["sigmas"], max_steps, 1)):
            need_number(f"{field}.sigmas.{i}", v, 0.0, 1.0)
    return d


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
    return torch.randn(shape, generator=torch.Generator().manual_seed(_derived(seed, 7 + i)), dtype=dtype)


def renoise_noise(seed, shape, dtype=torch.float32):
    """The noise preview-refine adds to the preview before the cloud refines it."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(_derived(seed, 5)), dtype=dtype)


def _derived(seed, offset):
    """A generator seed of its own for one use of the session's seed, within torch's 64-bit range (the
    same value as before for every seed below 2**63 / 1_000_003)."""
    return (seed * 1_000_003 + offset) % (1 << 64)
